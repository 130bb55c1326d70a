"""Which events the trainer learns from: per-user anomaly checks on the training path (pure, no Kafka).

A user whose current session looks automated is *flagged*: the worker still answers every event of
the user (it never sees this module), but the trainer keeps the user's events out of its buffer, and
so out of fine-tuning, popularity and the new-item counts. Checks run on EVENT time, per session
(a gap longer than ``session_gap_s`` starts a new one), once a session has ``min_events`` events:

- ``rate``: mean events per second over the session above ``max_events_per_s``;
- ``session_length``: more events in one session than ``max_session_events``;
- ``regular_timing``: inter-event gaps whose coefficient of variation is below ``min_gap_cv``
  (scripts click on a timer; people do not);
- ``low_diversity``: distinct items / events below ``min_item_diversity`` (one item hammered);
- ``source_not_allowed``: an allow-list of event sources is set and the event's source is not on it.

A flag sticks to the user until the user leaves the bounded table (least recently seen first). The
events a user sent before being flagged are already buffered; the caller removes them
(``SessionBuffer.remove_user``) when ``observe`` reports a new flag.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

RATE = "rate"
SESSION_LENGTH = "session_length"
REGULAR_TIMING = "regular_timing"
LOW_DIVERSITY = "low_diversity"
SOURCE_NOT_ALLOWED = "source_not_allowed"
ALREADY_FLAGGED = "flagged_user"  # later events of a user flagged before
FILTER_REASONS = (RATE, SESSION_LENGTH, REGULAR_TIMING, LOW_DIVERSITY, SOURCE_NOT_ALLOWED, ALREADY_FLAGGED)
_MAX_DISTINCT = 256  # items remembered per session for the diversity check


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds; the defaults flag about 0.1% of the YooChoose sample's sessions of 6+ events."""

    enabled: bool = False
    min_events: int = 6
    max_events_per_s: float = 0.5
    max_session_events: int = 60
    min_gap_cv: float = 0.08
    min_item_diversity: float = 0.1
    session_gap_s: float = 1800.0
    sources: frozenset[str] = frozenset()  # empty = every source may train
    max_users: int = 200_000

    @classmethod
    def from_settings(cls, settings: Any) -> "FilterConfig":
        """From ``Settings`` (its trainer section, and the worker's session gap)."""
        t = settings.trainer
        sources = frozenset(s.strip() for s in t.training_sources.split(",") if s.strip())
        return cls(enabled=t.training_filter, min_events=t.filter_min_events,
                   max_events_per_s=t.filter_max_events_per_s, max_session_events=t.filter_max_session_events,
                   min_gap_cv=t.filter_min_gap_cv, min_item_diversity=t.filter_min_item_diversity,
                   session_gap_s=settings.worker.session_gap_s, sources=sources)


class _Session:
    """Running statistics of one user's current session (Welford's mean/variance of the gaps)."""

    __slots__ = ("first", "last", "n", "gap_mean", "gap_m2", "items", "flag")

    def __init__(self, ts: float) -> None:
        self.first = self.last = ts
        self.n = 0
        self.gap_mean = 0.0
        self.gap_m2 = 0.0
        self.items: set[str] = set()
        self.flag = ""

    def add(self, item: str, ts: float) -> None:
        if self.n:
            gap = max(0.0, ts - self.last)
            k = self.n  # gaps seen including this one
            delta = gap - self.gap_mean
            self.gap_mean += delta / k
            self.gap_m2 += delta * (gap - self.gap_mean)
        self.last = max(self.last, ts)
        self.n += 1
        if len(self.items) < _MAX_DISTINCT:
            self.items.add(item)


def anomaly(s: _Session, cfg: FilterConfig) -> str:
    """The first check a session fails, or "" (too short to judge counts as passing)."""
    if s.n > cfg.max_session_events:
        return SESSION_LENGTH
    if s.n < cfg.min_events:
        return ""
    span = s.last - s.first
    if span <= 0 or (s.n - 1) / span > cfg.max_events_per_s:
        return RATE
    gaps = s.n - 1
    cv = math.sqrt(s.gap_m2 / gaps) / s.gap_mean if s.gap_mean > 0 else 0.0
    if cv < cfg.min_gap_cv:
        return REGULAR_TIMING
    if len(s.items) < _MAX_DISTINCT and len(s.items) / s.n < cfg.min_item_diversity:
        return LOW_DIVERSITY
    return ""


@dataclass(frozen=True)
class Verdict:
    learn: bool
    reason: str = ""  # one of FILTER_REASONS when not learned from
    newly_flagged: bool = False  # first refusal of this user: drop what was buffered of it


PASS = Verdict(True)


class TrainingFilter:
    """Per-user verdicts for the training path. Not thread-safe (the trainer's consumer thread owns it)."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self._users: OrderedDict[str, _Session] = OrderedDict()

    def observe(self, user: str, item: str, ts: float, source: str = "") -> Verdict:
        cfg = self.config
        if cfg.sources and source not in cfg.sources:
            return Verdict(False, SOURCE_NOT_ALLOWED)
        if not cfg.enabled:
            return PASS
        s = self._users.get(user)
        if s is not None and s.flag:
            self._users.move_to_end(user)
            return Verdict(False, ALREADY_FLAGGED)
        if s is None or ts - s.last > cfg.session_gap_s:
            s = _Session(ts)
            self._users[user] = s
        self._users.move_to_end(user)
        s.add(item, ts)
        reason = anomaly(s, cfg)
        while len(self._users) > cfg.max_users:
            self._users.popitem(last=False)
        if not reason:
            return PASS
        s.flag = reason
        s.items = set()
        return Verdict(False, reason, newly_flagged=True)

    def forget(self, user: str) -> None:
        self._users.pop(user, None)

    def is_flagged(self, user: str) -> bool:
        s = self._users.get(user)
        return bool(s is not None and s.flag)
