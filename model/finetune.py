"""Online fine-tuning: a bounded buffer of recent sessions and one guarded fine-tune round at a time.

Pure library code (no Kafka): the trainer process feeds ``SessionBuffer`` from the stream and calls
``FineTuner.run_round`` every so often. A round trains a *copy* of the served weights with the same
losses and sampling as offline training (``model.train.fit``), grows the vocabulary with items that
became frequent enough, and scores the candidate against the served model on the most recent
sessions the candidate did not train on (the guardrail). Nothing here changes the served model: the
caller publishes a promoted candidate and then calls ``FineTuner.accept``.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from model.exposure import ConcentrationLimits, concentration_problem, item_jump, topk_exposure
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.vocab import Vocabulary
from model.weight_check import weight_problem

# parameters with one row per item: grown when the vocabulary grows
ITEM_ROW_PARAMS = ("Wy.weight", "By.weight", "E.weight", "GE.Wx0.weight")
# rough per-session bookkeeping cost in the buffer (objects, containers, ordered-dict entry)
_SESSION_OVERHEAD_BYTES = 400
# list slot + float64 time + int8 type + category list slot (interned strings) + float64 price
_EVENT_FIXED_BYTES = 8 + 8 + 1 + 8 + 8


@dataclass(frozen=True)
class FineTuneConfig:
    """How the trainer fine-tunes; built from ``stream.settings.Settings`` by the trainer."""

    buffer_max_events: int = 200_000
    buffer_max_age_s: float = 6 * 3600.0
    reservoir_sessions: int = 2000
    session_gap_s: float = 1800.0
    guardrail_tolerance: float = 0.02  # absolute, on recall@K and on MRR@K
    guardrail_cutoff: int = 20
    holdout_fraction: float = 0.1  # share of the buffer's events (most recent sessions) held out
    min_holdout_events: int = 50
    min_train_events: int = 200
    new_item_min_count: int = 3
    item_retire_after_s: float = 0.0  # 0 = never retire
    n_epochs: int = 1
    learning_rate: float | None = None  # None = the model's own learning rate
    seed: int = 0
    # the concentration check of the guardrail (model/exposure.py); 0 switches a check off
    guardrail_max_gini_increase: float = 0.0
    guardrail_min_coverage_ratio: float = 0.0
    guardrail_max_item_exposure_factor: float = 0.0

    @property
    def concentration(self) -> ConcentrationLimits:
        return ConcentrationLimits(self.guardrail_max_gini_increase, self.guardrail_min_coverage_ratio,
                                   self.guardrail_max_item_exposure_factor)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "FineTuneConfig":
        """Take the fields both objects share (duck-typed so model/ never imports stream/)."""
        values = {f: getattr(settings, f) for f in cls.__dataclass_fields__ if hasattr(settings, f)}
        lr = getattr(settings, "finetune_learning_rate", 0.0)
        if lr and lr > 0:
            values["learning_rate"] = float(lr)
        values.update(overrides)
        return cls(**values)


class _Session:
    __slots__ = ("sid", "key", "items", "times", "types", "cats", "prices", "last")

    def __init__(self, sid: int, key: str) -> None:
        self.sid = sid
        self.key = key
        self.items: list[str] = []
        self.times = array("d")
        self.types = bytearray()
        self.cats: list[str | None] = []  # side features (model.features): None / NaN when absent
        self.prices = array("d")
        self.last = -math.inf

    def __len__(self) -> int:
        return len(self.items)


class SessionBuffer:
    """Recent sessions, bounded by event count and by event-time age, plus an optional reservoir.

    A user's events form one session until a gap longer than ``session_gap_s`` (event time). When a
    session leaves the buffer (oldest activity first) it is offered to a uniform reservoir of older
    sessions (Algorithm R), which a round trains on too so the model does not forget the past. Not
    thread-safe: the trainer guards it with its own lock.
    """

    def __init__(self, max_events: int, max_age_s: float, session_gap_s: float = 1800.0,
                 reservoir_sessions: int = 0, seed: int = 0) -> None:
        if max_events < 1:
            raise ValueError("buffer max_events must be >= 1")
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.session_gap_s = session_gap_s
        self.reservoir_sessions = max(0, reservoir_sessions)
        self._sessions: OrderedDict[int, _Session] = OrderedDict()  # by last activity, oldest first
        self._open: dict[str, _Session] = {}
        self._reservoir: list[_Session] = []
        self._offered = 0
        self._rng = random.Random(seed)
        self._next_sid = 0
        self._events = 0
        self._bytes = 0
        self._reservoir_events = 0
        self._reservoir_bytes = 0
        self.newest_time = -math.inf
        self.first_time = math.inf
        self.total_added = 0
        self._counts: Counter[str] = Counter()
        self._last_seen: dict[str, float] = {}

    # --- sizes
    @property
    def n_events(self) -> int:
        return self._events

    @property
    def n_sessions(self) -> int:
        return len(self._sessions)

    @property
    def reservoir_size(self) -> int:
        return len(self._reservoir)

    @property
    def nbytes(self) -> int:
        """Approximate memory held (recent sessions + reservoir), in bytes."""
        return self._bytes + self._reservoir_bytes

    @staticmethod
    def _event_bytes(item_id: str) -> int:
        return _EVENT_FIXED_BYTES + sys.getsizeof(item_id)

    # --- input
    def add(self, key: str, item_id: str, ts: float, event_type: int = 1, category: str | None = None,
            price: float | None = None) -> None:
        item_id = str(item_id)
        s = self._open.get(key)
        if s is None or ts - s.last > self.session_gap_s:
            s = _Session(self._next_sid, key)
            self._next_sid += 1
            self._open[key] = s
            self._sessions[s.sid] = s
            self._bytes += _SESSION_OVERHEAD_BYTES + sys.getsizeof(key)
        else:
            self._sessions.move_to_end(s.sid)
        s.items.append(item_id)
        s.times.append(ts)
        s.types.append(int(event_type) & 0x7F)
        s.cats.append(None if category is None else sys.intern(str(category)))
        s.prices.append(math.nan if price is None else float(price))
        s.last = max(s.last, ts)
        self._events += 1
        self._bytes += self._event_bytes(item_id)
        self.total_added += 1
        self.newest_time = max(self.newest_time, ts)
        self.first_time = min(self.first_time, ts)
        self._counts[item_id] += 1
        if ts > self._last_seen.get(item_id, -math.inf):
            self._last_seen[item_id] = ts
        self._evict()

    def add_many(self, keys: Iterable[str], items: Iterable[str], times: Iterable[float],
                 types: Iterable[int]) -> None:
        for k, i, t, e in zip(keys, items, times, types):
            self.add(k, i, t, e)

    def _evict(self) -> None:
        horizon = self.newest_time - self.max_age_s
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if self._events <= self.max_events and oldest.last >= horizon:
                break
            del self._sessions[oldest.sid]
            if self._open.get(oldest.key) is oldest:
                del self._open[oldest.key]
            self._events -= len(oldest)
            size = _SESSION_OVERHEAD_BYTES + sys.getsizeof(oldest.key) + sum(map(self._event_bytes, oldest.items))
            self._bytes -= size
            self._offer(oldest, size)

    def _offer(self, s: _Session, size: int) -> None:
        if self.reservoir_sessions == 0 or len(s) < 2:
            return
        self._offered += 1
        if len(self._reservoir) < self.reservoir_sessions:
            slot = len(self._reservoir)
            self._reservoir.append(s)
        else:
            slot = self._rng.randrange(self._offered)
            if slot >= self.reservoir_sessions:
                return
            old = self._reservoir[slot]
            self._reservoir_events -= len(old)
            self._reservoir_bytes -= _SESSION_OVERHEAD_BYTES + sys.getsizeof(old.key) + sum(
                map(self._event_bytes, old.items))
            self._reservoir[slot] = s
        self._reservoir_events += len(s)
        self._reservoir_bytes += size

    def remove_user(self, key: str) -> int:
        """Drop every session of ``key`` (recent and reservoir) and its items from the not yet drained
        counts: a user flagged as a bot, or one who asked to be forgotten. Returns the events removed.
        O(sessions). A session evicted without entering the reservoir is already gone; its items stay
        in the counts until the next drain (counts never go below 0)."""
        removed = 0
        for sid in [sid for sid, s in self._sessions.items() if s.key == key]:
            s = self._sessions.pop(sid)
            self._events -= len(s)
            self._bytes -= _SESSION_OVERHEAD_BYTES + sys.getsizeof(s.key) + sum(map(self._event_bytes, s.items))
            removed += self._uncount(s)
        self._open.pop(key, None)
        kept = []
        for s in self._reservoir:
            if s.key == key:
                self._reservoir_events -= len(s)
                self._reservoir_bytes -= _SESSION_OVERHEAD_BYTES + sys.getsizeof(s.key) + sum(
                    map(self._event_bytes, s.items))
                removed += self._uncount(s)
            else:
                kept.append(s)
        self._reservoir = kept
        return removed

    def _uncount(self, s: _Session) -> int:
        for item in s.items:
            left = self._counts.get(item, 0) - 1
            if left > 0:
                self._counts[item] = left
            else:
                self._counts.pop(item, None)
        return len(s)

    def users(self) -> set[str]:
        """Keys with at least one session held (recent or reservoir)."""
        return {s.key for s in self._sessions.values()} | {s.key for s in self._reservoir}

    # --- output
    def drain_stats(self) -> tuple[Counter[str], dict[str, float]]:
        """Item counts and last-seen times accumulated since the previous call (bounded by the
        number of distinct items between two rounds)."""
        counts, last = self._counts, self._last_seen
        self._counts, self._last_seen = Counter(), {}
        return counts, last

    def to_frame(self, include_reservoir: bool = True) -> pd.DataFrame:
        """The buffer as an event table (SessionId, ItemId, Time, EventType, Category, Price), sorted by
        session then time; a column ``Recent`` marks sessions of the recent buffer (False = reservoir)."""
        sessions = list(self._sessions.values())
        recent = [True] * len(sessions)
        if include_reservoir:
            sessions += self._reservoir
            recent += [False] * len(self._reservoir)
        lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
        n = int(lengths.sum())
        sid = np.repeat(np.fromiter((s.sid for s in sessions), dtype=np.int64, count=len(sessions)), lengths)
        items = [i for s in sessions for i in s.items]
        times = np.concatenate([np.frombuffer(s.times, dtype=np.float64) for s in sessions]) if n else np.zeros(0)
        types = np.frombuffer(b"".join(bytes(s.types) for s in sessions), dtype=np.int8) if n else np.zeros(0, np.int8)
        cats = pd.Series([c for s in sessions for c in s.cats], dtype=object)
        prices = np.concatenate([np.frombuffer(s.prices, dtype=np.float64) for s in sessions]) if n else np.zeros(0)
        df = pd.DataFrame({"SessionId": sid, "ItemId": pd.Series(items, dtype=object), "Time": times,
                           "EventType": types.astype(np.int8), "Category": cats, "Price": prices,
                           "Recent": np.repeat(np.array(recent, bool), lengths)})
        return df.sort_values(["SessionId", "Time"], kind="stable").reset_index(drop=True)


@dataclass
class ModelState:
    """The model as the fine-tuner sees it: what a checkpoint holds, plus its version."""

    net: GRU4RecNet
    vocab: Vocabulary
    params: GRU4RecParams
    popularity: np.ndarray
    metadata: dict = field(default_factory=dict)
    version: int = 0

    @property
    def retired_rows(self) -> list[int]:
        return list(self.metadata.get("retired_rows", []))


@dataclass(frozen=True)
class RoundResult:
    """One round's verdict. Invariant: a "promoted" candidate has passed ``model.weight_check`` (finite,
    bounded weights); a round whose training diverged is "diverged" and carries no candidate."""

    status: str  # "promoted" | "rejected" | "skipped" | "diverged"
    reason: str
    candidate: ModelState | None = None
    current_scores: dict = field(default_factory=dict)
    candidate_scores: dict = field(default_factory=dict)
    loss: float = math.nan
    train_events: int = 0
    holdout_events: int = 0
    new_items: tuple[str, ...] = ()
    retired_items: int = 0
    duration_s: float = 0.0
    concentration: str = ""  # the concentration check that refused the candidate (model.exposure), or ""

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def summary(self) -> dict:
        return {"status": self.status, "reason": self.reason, "current": self.current_scores,
                "candidate": self.candidate_scores, "loss": self.loss, "train_events": self.train_events,
                "holdout_events": self.holdout_events, "new_items": len(self.new_items),
                "retired_items": self.retired_items, "duration_s": round(self.duration_s, 3),
                "concentration": self.concentration}


def split_recent(df: pd.DataFrame, fraction: float, min_events: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out whole sessions, most recently active first, until ``fraction`` of the recent buffer's
    events (at least ``min_events``) is held out. Reservoir sessions always go to training."""
    recent = df[df["Recent"]] if "Recent" in df.columns else df
    if recent.empty:
        return df, df.iloc[:0]
    last = recent.groupby("SessionId", sort=False)["Time"].agg(["max", "size"]).sort_values("max", ascending=False)
    want = max(min_events, int(math.ceil(fraction * len(recent))))
    k = int(np.searchsorted(np.cumsum(last["size"].to_numpy()), want) + 1)
    held = last.index[:k]
    mask = df["SessionId"].isin(held)
    return df[~mask], df[mask]


def grow_net(net: GRU4RecNet, n_items: int, init_rows: dict[str, torch.Tensor]) -> GRU4RecNet:
    """A grown copy of ``net`` with ``n_items`` rows: old rows kept, new rows from ``init_rows[name]``
    (parameter name -> tensor of the new rows; tables not named keep the network's own init)."""
    old_n = net.n_items
    if n_items < old_n:
        raise ValueError(f"vocabulary can only grow ({old_n} -> {n_items})")
    new = copy.deepcopy(net)
    new.expand_items(n_items)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if name in init_rows and n_items > old_n and p.shape[0] == n_items:
                p[old_n:] = init_rows[name].to(p.dtype)
    return new


def cooccurrence_init(net: GRU4RecNet, rows: np.ndarray, sessions: np.ndarray, n_old: int, n_new: int,
                      noise: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    """Initial vectors of new rows ``n_old..n_old+n_new-1``: the mean vector of the known items they
    share sessions with (co-occurrence weighted); small noise for a new item with no known neighbour."""
    pairs = pd.DataFrame({"s": sessions, "r": rows}).drop_duplicates()
    new = pairs[pairs["r"] >= n_old]
    old = pairs[(pairs["r"] >= 0) & (pairs["r"] < n_old)]
    joined = new.merge(old, on="s", suffixes=("_new", "_old"))
    idx_new = np.array(joined["r_new"].to_numpy() - n_old, dtype=np.int64)
    idx_old = np.array(joined["r_old"].to_numpy(), dtype=np.int64)
    counts = np.bincount(idx_new, minlength=n_new).astype(np.float32)
    gen = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name in ITEM_ROW_PARAMS:
        if name not in state or state[name].shape[0] != n_old:
            continue
        w = state[name].detach().float()
        sums = torch.zeros((n_new,) + tuple(w.shape[1:]))
        if len(idx_new):
            sums.index_add_(0, torch.from_numpy(idx_new), w[torch.from_numpy(idx_old)])
        c = torch.from_numpy(np.maximum(counts, 1.0)).reshape((-1,) + (1,) * (w.dim() - 1))
        mean = sums / c
        scale = noise * float(w.std()) if w.numel() > 1 else noise
        lonely = torch.from_numpy(counts == 0)
        if bool(lonely.any()):
            mean[lonely] = torch.randn((int(lonely.sum()),) + tuple(w.shape[1:]), generator=gen) * scale
        out[name] = mean.to(state[name].dtype)
    return out


def _scores(result: dict, k: int) -> dict:
    def pick(table: dict) -> float:
        return float(table.get(str(k), table.get(k, math.nan)))
    return {"recall": pick(result["recall"]), "mrr": pick(result["mrr"]),
            "n_events": int(result.get("n_events", 0))}


class FineTuner:
    """Runs guarded fine-tune rounds from the current model; the single owner of the vocabulary."""

    def __init__(self, current: ModelState, config: FineTuneConfig) -> None:
        self.config = config
        self._current = current
        self._pending_counts: Counter[str] = Counter()
        self._last_seen: dict[str, float] = {}
        self._first_time = math.inf
        self.rounds = 0

    @property
    def current(self) -> ModelState:
        return self._current

    def adopt(self, state: ModelState) -> None:
        """Continue from a model published by someone else (a rollback)."""
        self._current = state

    def accept(self, candidate: ModelState, version: int) -> ModelState:
        """Make a published candidate the current model."""
        candidate.version = version
        candidate.metadata["version"] = version
        self._current = candidate
        self._pending_counts = Counter({k: v for k, v in self._pending_counts.items() if k not in candidate.vocab})
        return candidate

    def run_round(self, frame: pd.DataFrame, stats: tuple[Counter, dict] | None = None,
                  first_time: float = math.nan, progress: bool = False) -> RoundResult:
        """One round on a snapshot of the buffer (``SessionBuffer.to_frame``) and the item statistics
        drained from it. Returns the candidate and the guardrail verdict; changes nothing served."""
        from model.evaluate import evaluate
        from model.train import fit

        t0 = time.perf_counter()
        cfg = self.config
        self.rounds += 1
        if stats is not None:
            counts, last = stats
            self._pending_counts.update(counts)
            for item, ts in last.items():
                if ts > self._last_seen.get(item, -math.inf):
                    self._last_seen[item] = ts
        if not math.isnan(first_time):
            self._first_time = min(self._first_time, first_time)
        cur = self._current

        train, holdout = split_recent(frame, cfg.holdout_fraction, cfg.min_holdout_events)
        hold_known = holdout[cur.vocab.rows(holdout["ItemId"].tolist()) >= 0]
        hold_known = hold_known[hold_known.groupby("SessionId")["SessionId"].transform("size") >= 2]
        if len(train) < cfg.min_train_events or len(hold_known) < cfg.min_holdout_events:
            return RoundResult("skipped", f"not enough events (train {len(train)}, holdout {len(hold_known)})",
                               train_events=len(train), holdout_events=len(hold_known),
                               duration_s=time.perf_counter() - t0)

        # --- growing catalogue: items seen often enough in the training part get rows
        vocab = Vocabulary(cur.vocab.ids)
        freq = train["ItemId"].value_counts()
        freq = freq[freq >= cfg.new_item_min_count]
        new_ids = sorted((i for i in freq.index if i not in vocab), key=lambda i: (-int(freq[i]), i))
        for item in new_ids:
            vocab.add(item)
        rows = vocab.rows(train["ItemId"].tolist())
        if new_ids:
            init = cooccurrence_init(cur.net, rows, train["SessionId"].to_numpy(), len(cur.vocab), len(new_ids),
                                     seed=cfg.seed + self.rounds)
            candidate = grow_net(cur.net, len(vocab), init)
        else:
            candidate = copy.deepcopy(cur.net)

        # --- train a copy with the offline losses and sampling
        known = train[rows >= 0]
        known = known[known.groupby("SessionId")["SessionId"].transform("size") >= 2]
        params = cur.params if cfg.learning_rate is None else replace(cur.params, learning_rate=cfg.learning_rate)
        # each round draws its own negatives and dropout masks (fit never touches torch's global generator)
        try:
            fit_out = fit(candidate, known.drop(columns=["Recent"], errors="ignore").reset_index(drop=True), params,
                          n_epochs=cfg.n_epochs, item_rows=vocab, progress=progress, seed=cfg.seed + self.rounds)
        except FloatingPointError as exc:  # fit's non-finite loss: the candidate is garbage, the current stays
            return RoundResult("diverged", str(exc), train_events=int(len(known)),
                               duration_s=time.perf_counter() - t0)
        loss = _loss_of(fit_out)
        problem = weight_problem(candidate)
        if problem is not None:
            return RoundResult("diverged", f"training left unfit weights ({problem.reason}): {problem}", loss=loss,
                               train_events=int(len(known)), duration_s=time.perf_counter() - t0)

        # --- guardrail: both models on the held-out recent sessions (items the served model knows)
        hold_eval = hold_known.drop(columns=["Recent"], errors="ignore").reset_index(drop=True)
        k = cfg.guardrail_cutoff
        cur_s = _scores(evaluate(cur.net, cur.vocab, hold_eval, cutoffs=(k,)), k)
        cand_s = _scores(evaluate(candidate, vocab, hold_eval, cutoffs=(k,)), k)
        tol = cfg.guardrail_tolerance
        ok = cand_s["recall"] >= cur_s["recall"] - tol and cand_s["mrr"] >= cur_s["mrr"] - tol
        # exposure is measured even with every concentration check off: it is reported with the scores
        cur_x = topk_exposure(cur.net, cur.vocab, hold_eval, k)
        cand_x = topk_exposure(candidate, vocab, hold_eval, k)
        cur_s["exposure"], cand_s["exposure"] = cur_x.summary(), cand_x.summary()
        cand_s["exposure"]["max_item_factor"] = item_jump(cur_x, cand_x, cfg.concentration.smoothing_share)[1]
        refusal, detail = concentration_problem(cur_x, cand_x, cfg.concentration)

        # --- retirement (rows kept, excluded from recommendations) and popularity
        newest = float(frame["Time"].max())
        for item in new_ids:
            self._last_seen.setdefault(item, float(train.loc[train["ItemId"] == item, "Time"].max()))
        self._last_seen = {i: t for i, t in self._last_seen.items() if i in vocab}
        retired: list[int] = []
        if cfg.item_retire_after_s > 0:
            base = self._first_time if not math.isinf(self._first_time) else newest
            horizon = newest - cfg.item_retire_after_s
            seen = np.array([self._last_seen.get(i, base) for i in vocab.ids], dtype=np.float64)
            retired = np.flatnonzero(seen < horizon).tolist()
        newly_retired = len(set(retired) - set(cur.retired_rows))
        pop = np.zeros(len(vocab), dtype=np.float64)
        pop[: len(cur.popularity)] = cur.popularity
        for item, c in self._pending_counts.items():
            r = vocab.row(item)
            if r >= 0:
                pop[r] += c

        meta = {k2: v for k2, v in cur.metadata.items() if k2 not in ("rollback_of", "version", "guardrail")}
        meta.update({
            "parent_version": cur.version, "created_at": time.time(), "stream_time": newest,
            "n_items": len(vocab), "new_items": len(new_ids), "retired_rows": retired,
            "guardrail": {"current": cur_s, "candidate": cand_s, "tolerance": tol, "cutoff": k},
            "finetune_round": self.rounds, "train_events": int(len(known)),
            "loss": loss if math.isfinite(loss) else None,
        })
        cand_state = ModelState(candidate, vocab, cur.params, pop, meta, version=cur.version)
        status, reason = ("promoted", "not worse than current") if ok else (
            "rejected", f"worse than current beyond tolerance {tol}")
        if ok and refusal:
            status, reason = "rejected", f"concentration: {detail}"
        return RoundResult(status, reason, cand_state, cur_s, cand_s, loss, int(len(known)), int(len(hold_eval)),
                           tuple(new_ids), newly_retired, time.perf_counter() - t0, refusal)


def _loss_of(out: Any) -> float:
    if isinstance(out, dict):
        for key in ("loss", "final_loss", "mean_loss"):
            if key in out:
                v = out[key]
                return float(v[-1] if isinstance(v, (list, tuple)) else v)
        losses = out.get("losses") or out.get("epoch_losses")
        if losses:
            return float(losses[-1])
    if isinstance(out, (int, float)):
        return float(out)
    return math.nan
