"""Online fine-tuning: one guarded fine-tune round at a time from the current model.

Pure library code (no Kafka): the trainer process feeds a ``SessionBuffer`` (:mod:`model.session_buffer`)
from the stream and calls ``FineTuner.run_round`` every so often. A round trains a *copy* of the served
weights with the same losses and sampling as offline training (``model.train.fit``), grows the
vocabulary with items that became frequent enough (:mod:`model.item_growth`), and scores the candidate
against the served model on the most recent sessions the candidate did not train on
(:mod:`model.guardrail`). Nothing here changes the served model: the caller publishes a promoted
candidate and then calls ``FineTuner.accept``.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from model.exposure import ConcentrationLimits
from model.guardrail import Verdict, judge, known_holdout, multi_event_sessions, split_recent
from model.item_growth import ITEM_ROW_PARAMS, cooccurrence_init, frequent_new_items, grow_net
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.session_buffer import SessionBuffer
from model.train import fit
from model.vocab import Vocabulary
from model.weight_check import weight_problem

# the fine-tuning API in one import: the trainer feeds a SessionBuffer and runs FineTuner rounds; the
# item-growth helpers are what a worker applying a grown published model needs
__all__ = ["FineTuneConfig", "FineTuner", "ITEM_ROW_PARAMS", "ModelState", "RoundResult", "SessionBuffer",
           "cooccurrence_init", "grow_net", "split_recent"]


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
    guardrail_hold_back_items: int = 0

    @property
    def concentration(self) -> ConcentrationLimits:
        return ConcentrationLimits(self.guardrail_max_gini_increase, self.guardrail_min_coverage_ratio,
                                   self.guardrail_max_item_exposure_factor,
                                   hold_back_items=self.guardrail_hold_back_items)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "FineTuneConfig":
        """Take the fields both objects share (duck-typed so model/ never imports stream/)."""
        values = {f: getattr(settings, f) for f in cls.__dataclass_fields__ if hasattr(settings, f)}
        lr = getattr(settings, "finetune_learning_rate", 0.0)
        if lr and lr > 0:
            values["learning_rate"] = float(lr)
        values.update(overrides)
        return cls(**values)


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
        t0 = time.perf_counter()
        cfg = self.config
        self.rounds += 1
        self._absorb(stats, first_time)
        cur = self._current

        train, holdout = split_recent(frame, cfg.holdout_fraction, cfg.min_holdout_events)
        hold_known = known_holdout(holdout, cur.vocab)
        if len(train) < cfg.min_train_events or len(hold_known) < cfg.min_holdout_events:
            return RoundResult("skipped", f"not enough events (train {len(train)}, holdout {len(hold_known)})",
                               train_events=len(train), holdout_events=len(hold_known),
                               duration_s=time.perf_counter() - t0)
        vocab, new_ids, candidate, known = self._grow(train)
        loss, failure = self._train(candidate, known, vocab, progress)
        if failure is not None:  # the candidate is garbage, the current model stays
            return RoundResult("diverged", failure, loss=loss, train_events=int(len(known)),
                               duration_s=time.perf_counter() - t0)

        hold_eval = hold_known.drop(columns=["Recent"], errors="ignore").reset_index(drop=True)
        verdict = judge((cur.net, cur.vocab), (candidate, vocab), hold_eval, cfg.guardrail_cutoff,
                        cfg.guardrail_tolerance, cfg.concentration)
        newest = float(frame["Time"].max())
        retired = self._retire(vocab, new_ids, train, newest)
        meta = self._metadata(vocab, new_ids, retired, verdict, newest, int(len(known)), loss)
        cand_state = ModelState(candidate, vocab, cur.params, self._popularity(vocab), meta, version=cur.version)
        status, reason = _decision(verdict, cfg.guardrail_tolerance)
        return RoundResult(status, reason, cand_state, verdict.current, verdict.candidate, loss, int(len(known)),
                           int(len(hold_eval)), tuple(new_ids), len(set(retired) - set(cur.retired_rows)),
                           time.perf_counter() - t0, verdict.refusal)

    def _absorb(self, stats: tuple[Counter, dict] | None, first_time: float) -> None:
        """Add the item counts and last-seen times drained from the buffer since the previous round."""
        if stats is not None:
            counts, last = stats
            self._pending_counts.update(counts)
            for item, ts in last.items():
                if ts > self._last_seen.get(item, -math.inf):
                    self._last_seen[item] = ts
        if not math.isnan(first_time):
            self._first_time = min(self._first_time, first_time)

    def _grow(self, train: pd.DataFrame) -> tuple[Vocabulary, list[str], GRU4RecNet, pd.DataFrame]:
        """The growing catalogue: items seen often enough in the training part get rows in a copy of
        the current network. Returns (vocabulary, new ids, candidate network, trainable events)."""
        cur = self._current
        vocab = Vocabulary(cur.vocab.ids)
        new_ids = frequent_new_items(train["ItemId"], vocab, self.config.new_item_min_count)
        for item in new_ids:
            vocab.add(item)
        rows = vocab.rows(train["ItemId"].tolist())
        if new_ids:
            init = cooccurrence_init(cur.net, rows, train["SessionId"].to_numpy(), len(cur.vocab), len(new_ids),
                                     seed=self.config.seed + self.rounds)
            candidate = grow_net(cur.net, len(vocab), init)
        else:
            candidate = copy.deepcopy(cur.net)
        return vocab, new_ids, candidate, multi_event_sessions(train[rows >= 0])

    def _train(self, candidate: GRU4RecNet, known: pd.DataFrame, vocab: Vocabulary,
               progress: bool) -> tuple[float, str | None]:
        """Train the candidate in place with the offline losses and sampling. Returns (loss, why the
        candidate is unusable or None)."""
        cfg, cur = self.config, self._current
        params = cur.params if cfg.learning_rate is None else replace(cur.params, learning_rate=cfg.learning_rate)
        # each round draws its own negatives and dropout masks (fit never touches torch's global generator)
        try:
            fit_out = fit(candidate, known.drop(columns=["Recent"], errors="ignore").reset_index(drop=True), params,
                          n_epochs=cfg.n_epochs, item_rows=vocab, progress=progress, seed=cfg.seed + self.rounds)
        except FloatingPointError as exc:  # fit's non-finite loss
            return math.nan, str(exc)
        loss = _loss_of(fit_out)
        problem = weight_problem(candidate)
        if problem is not None:
            return loss, f"training left unfit weights ({problem.reason}): {problem}"
        return loss, None

    def _retire(self, vocab: Vocabulary, new_ids: list[str], train: pd.DataFrame, newest: float) -> list[int]:
        """Rows of items unseen for ``item_retire_after_s`` of stream time (rows are kept, and excluded
        from recommendations); an item never seen since the start counts as seen at the start."""
        cfg = self.config
        for item in new_ids:
            self._last_seen.setdefault(item, float(train.loc[train["ItemId"] == item, "Time"].max()))
        self._last_seen = {i: t for i, t in self._last_seen.items() if i in vocab}
        if cfg.item_retire_after_s <= 0:
            return []
        base = self._first_time if not math.isinf(self._first_time) else newest
        horizon = newest - cfg.item_retire_after_s
        seen = np.array([self._last_seen.get(i, base) for i in vocab.ids], dtype=np.float64)
        return np.flatnonzero(seen < horizon).tolist()

    def _popularity(self, vocab: Vocabulary) -> np.ndarray:
        """The current popularity per row plus the counts not yet in a promoted model."""
        pop = np.zeros(len(vocab), dtype=np.float64)
        pop[: len(self._current.popularity)] = self._current.popularity
        for item, c in self._pending_counts.items():
            r = vocab.row(item)
            if r >= 0:
                pop[r] += c
        return pop

    def _metadata(self, vocab: Vocabulary, new_ids: list[str], retired: list[int], verdict: Verdict, newest: float,
                  train_events: int, loss: float) -> dict:
        cur, cfg = self._current, self.config
        meta = {k: v for k, v in cur.metadata.items() if k not in ("rollback_of", "version", "guardrail")}
        meta.update({
            "parent_version": cur.version, "created_at": time.time(), "stream_time": newest,
            "n_items": len(vocab), "new_items": len(new_ids), "retired_rows": retired,
            "guardrail": {"current": verdict.current, "candidate": verdict.candidate,
                          "tolerance": cfg.guardrail_tolerance, "cutoff": cfg.guardrail_cutoff},
            "finetune_round": self.rounds, "train_events": train_events,
            "loss": loss if math.isfinite(loss) else None,
        })
        return meta


def _decision(verdict: Verdict, tolerance: float) -> tuple[str, str]:
    """(status, reason): a candidate within the tolerance is promoted unless a concentration check refused it."""
    if not verdict.not_worse:
        return "rejected", f"worse than current beyond tolerance {tolerance}"
    if verdict.refusal:
        return "rejected", f"concentration: {verdict.detail}"
    if verdict.held_back:
        return "promoted", (f"not worse than current; {len(verdict.held_back)} item(s) whose exposure rose past "
                            "the limit keep their current output rows")
    return "promoted", "not worse than current"


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
