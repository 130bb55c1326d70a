"""One batch's walk over its users' states: events of the same user in order, the GRU stepped in "waves"
(wave j = the j-th event of every user in the batch, one ``model.step`` per wave). Pure.

What the walk decides per event (the rules are the processor's, stream/pipeline/processor.py): the session
gap, re-delivered events, unknown items, the business rules' per-user lists, the "because" history, and
the non-finite states it drops. It leaves each event's hidden state after the event (``post_hidden``,
``has_hidden``) for the one top-K pass, and each user's working state for the final states.

A user's working state is a list, indexed by position because it is read and written per event:
``[hidden | None, last_ts_ms, session_events, offsets, bought, session items, recent rows]``.
"""

from __future__ import annotations

import numpy as np

from model.attribution import session_rows
from model.events import EventType
from model.features import CATEGORY, GAP, N_FEATURES, PRICE, category_rows, gap_buckets, price_buckets
from model.recommender import Recommender
from state.codec import N_SOURCES, UserState
from stream.pipeline.events import Event
from stream.pipeline.exposure import PAD
from stream.pipeline.ranking import RuleContext, UserRules
from stream.pipeline.rules import as_arrays, as_lists, remember, user_exclusions

# event type -> what the rules remember of it (view and click both count as viewed)
_RULE_KIND = {int(EventType.VIEW): "viewed", int(EventType.CLICK): "viewed", int(EventType.CART): "cart",
              int(EventType.PURCHASE): "purchase"}


def batch_order(events: list[Event]) -> tuple[np.ndarray, np.ndarray, dict[bytes, int]]:
    """(prev_event, wave_of, last_idx): ``prev_event[i]`` the user's previous event in this batch (-1 for
    none), ``wave_of[i]`` how many events of the user come before it in the batch, ``last_idx`` each user's
    last event (users in order of their first event)."""
    n = len(events)
    prev_event = np.full(n, -1, dtype=np.int64)
    last_idx: dict[bytes, int] = {}
    wave_of = np.zeros(n, dtype=np.int64)
    for i, e in enumerate(events):
        j = last_idx.get(e.key)
        if j is not None:
            prev_event[i] = j
            wave_of[i] = wave_of[j] + 1
        last_idx[e.key] = i
    return prev_event, wave_of, last_idx


def event_features(model: Recommender, events: list[Event]) -> np.ndarray:
    """Category and price rows of each event (model.features); the gap column is filled per event while
    the waves walk the users' states. Categories the model does not know map to 0 (absent)."""
    n = len(events)
    out = np.zeros((n, N_FEATURES), dtype=np.int64)
    if model.net.C is not None:
        out[:, CATEGORY] = category_rows([e.category for e in events], model.net.categories)
    prices = np.fromiter((np.nan if e.price is None else e.price for e in events), dtype=np.float64, count=n)
    out[:, PRICE] = price_buckets(prices)
    return out


def non_finite_rows(H: np.ndarray) -> np.ndarray | None:
    """Indices of the rows of ``H`` holding a NaN or an infinity, or None when there is none. One
    whole-array test; the dearer per-row reduction only runs when something is wrong."""
    finite = np.isfinite(H)
    if finite.all():
        return None
    return np.flatnonzero(~finite.all(axis=1))


class WaveWalk:
    """The walk of one batch (``run``), then what it leaves: ``post_hidden``/``has_hidden`` (each event's
    state after it), ``dup`` (re-delivered events), ``users`` (each list's user rules), ``recent_at`` (each
    event's recent session rows, with "because"), ``stored_resets`` (users whose stored state was not
    finite) and ``step_resets`` (GRU steps that made a non-finite state). ``states`` is not modified."""

    def __init__(self, model: Recommender, events: list[Event], states: dict[bytes, UserState], rows: np.ndarray,
                 session_gap_ms: int, because_history: int, rules: RuleContext | None) -> None:
        n = len(events)
        self.model, self.events, self.states, self.rows = model, events, states, rows
        self.size = model.state_size
        self.session_gap_ms = session_gap_ms
        self.history = because_history
        self.types = np.fromiter((e.event_type for e in events), dtype=np.int64, count=n)
        self.feats = event_features(model, events) if model.uses_features else None
        self.gap_s, self.first = np.zeros(n), np.zeros(n, dtype=bool)
        self.rcfg = rules.cfg if rules is not None and rules.active else None
        self.remembers = self.rcfg is not None and self.rcfg.per_user
        self.users: list[UserRules] = [[]] * n  # stays empty without per-user rules
        self.recent_at: list[list[int]] = [[]] * n if because_history else []
        self.work: dict[bytes, list] = {}
        self.stored_resets: set[bytes] = set()
        self.step_resets = 0
        self.post_hidden = np.zeros((n, self.size), dtype=np.float32)
        self.has_hidden = np.zeros(n, dtype=bool)
        self.dup = np.zeros(n, dtype=bool)
        self.known_item = (rows >= 0).tolist()

    def run(self, wave_of: np.ndarray) -> None:
        n_waves = int(wave_of.max()) + 1
        order = np.argsort(wave_of, kind="stable")
        bounds = np.searchsorted(wave_of[order], np.arange(n_waves + 1))
        for w in range(n_waves):
            step_i, step_h = self._advance(order[bounds[w]:bounds[w + 1]].tolist())
            if step_i:
                self._step(step_i, step_h)
        # a stored state shown without a step (unknown item, redelivery) is the one case left: dropped here.
        # The final states are built from post_hidden/has_hidden, so none of them is stored either
        bad = non_finite_rows(self.post_hidden)
        if bad is not None:
            self.post_hidden[bad] = 0.0
            self.has_hidden[bad] = False
            self.stored_resets.update(self.events[i].key for i in bad.tolist())

    def _advance(self, idx: list[int]) -> tuple[list[int], list[np.ndarray | None]]:
        """One wave's events: session gap, event count, rules and history per user; returns the events
        that step the GRU and their users' hidden states before the step."""
        # locals: the loop below runs once per event
        events, states, work, size = self.events, self.states, self.work, self.size
        session_gap_ms, remembers, rcfg, history = self.session_gap_ms, self.remembers, self.rcfg, self.history
        users, recent_at, known_item, rows = self.users, self.recent_at, self.known_item, self.rows
        post_hidden, has_hidden, dup = self.post_hidden, self.has_hidden, self.dup
        feats, gap_s, first = self.feats, self.gap_s, self.first
        step_i: list[int] = []
        step_h: list[np.ndarray | None] = []
        for i in idx:
            e = events[i]
            st = work.get(e.key)
            if st is None:
                old = states.get(e.key)
                if old is None:
                    empty = UserState.empty()
                    st = [None, e.ts_ms, 0, [-1] * N_SOURCES, empty.bought, empty.session_items, []]
                else:
                    h = old.hidden if old.hidden is not None and old.hidden.shape[0] == size else None
                    st = [h, old.last_ts_ms, old.session_events, list(old.offsets), old.bought, old.session_items,
                          old.recent.tolist() if h is not None and old.recent is not None else []]
                if remembers:
                    st[4], st[5] = as_lists(st[4], st[5])
                work[e.key] = st
            if 0 <= e.offset <= st[3][e.source]:
                dup[i] = True
                if st[0] is not None:
                    post_hidden[i] = st[0]
                    has_hidden[i] = True
                if remembers:
                    users[i] = user_exclusions(rcfg, st[4], st[5], e.ts_ms / 1000)
                if history:
                    recent_at[i] = st[6]
                continue
            if e.offset >= 0:
                st[3][e.source] = e.offset
            if e.ts_ms - st[1] > session_gap_ms:
                st[0], st[2], st[6] = None, 0, []
                st[5] = st[5][:0]
            if feats is not None:  # the gap since the user's previous event, as offline
                gap_s[i], first[i] = (e.ts_ms - st[1]) / 1000.0, st[2] == 0
            st[1] = max(st[1], e.ts_ms)
            st[2] += 1
            if remembers:
                if known_item[i]:
                    st[4], st[5] = remember(rcfg, st[4], st[5], int(rows[i]), _RULE_KIND[e.event_type],
                                            e.ts_ms // 1000)
                users[i] = user_exclusions(rcfg, st[4], st[5], e.ts_ms / 1000)
            if known_item[i]:
                step_i.append(i)
                step_h.append(st[0])
                if history:
                    st[6] = session_rows([] if st[0] is None else st[6], int(rows[i]), history)
            elif st[0] is not None:
                post_hidden[i] = st[0]
                has_hidden[i] = True
            if history:
                recent_at[i] = st[6]
        return step_i, step_h

    def _step(self, step_i: list[int], step_h: list[np.ndarray | None]) -> None:
        """One GRU step for the wave's events of known items, batched over their users."""
        events, work, feats = self.events, self.work, self.feats
        H = np.zeros((len(step_i), self.size), dtype=np.float32)
        known = [r for r, h in enumerate(step_h) if h is not None]
        if known:  # one copy for the wave instead of one per user
            H[known] = np.stack([step_h[r] for r in known])
        bad = non_finite_rows(H)
        if bad is not None:  # stored states (step outputs are checked below): step from a new session
            H[bad] = 0.0
            self.stored_resets.update(events[step_i[r]].key for r in bad.tolist())
        si = np.asarray(step_i, dtype=np.int64)
        if feats is not None:  # 0 at a session's first event (model.features)
            feats[si, GAP] = gap_buckets(self.gap_s[si], self.first[si])
        H = self.model.step(H, self.rows[si], self.types[si], feats[si] if feats is not None else None)
        self.post_hidden[si] = H
        self.has_hidden[si] = True
        for r, i in enumerate(step_i):
            work[events[i].key][0] = H[r]
        bad = non_finite_rows(H)
        if bad is not None:  # the step made them: those users have no state (a new session) from here
            self.step_resets += len(bad)
            self.post_hidden[si[bad]] = 0.0
            self.has_hidden[si[bad]] = False
            for r in bad.tolist():
                work[events[step_i[r]].key][0] = None
                work[events[step_i[r]].key][6] = []

    def final_states(self, last_idx: dict[bytes, int], rec_rows: np.ndarray, kk: int,
                     version: int) -> dict[bytes, UserState]:
        """Each user's state after the batch, with the list published after its last event. The whole
        batch's arrays are copied once and each user gets rows of them. A user's last event has a hidden
        state exactly when the user has one, and it is that state."""
        last = np.fromiter(last_idx.values(), dtype=np.int64, count=len(last_idx))
        final_hidden = self.post_hidden[last]
        final_has = self.has_hidden[last].tolist()
        final_recs = rec_rows[last].astype(np.int32)
        n_recs = (final_recs != PAD).sum(axis=1).tolist()
        remembers, history, work = self.remembers, self.history, self.work
        out: dict[bytes, UserState] = {}
        for j, key in enumerate(last_idx):
            _, last_ts, n_events, offsets, bought, session_items, recent = work[key]
            if remembers:
                bought, session_items = as_arrays(bought, session_items)
            recs = final_recs[j] if n_recs[j] == kk else final_recs[j, :n_recs[j]]
            out[key] = UserState(final_hidden[j] if final_has[j] else None, int(last_ts), int(n_events), version,
                                 recs, offsets, bought, session_items,
                                 np.asarray(recent, dtype=np.int32) if history and final_has[j] and recent else None)
        return out
