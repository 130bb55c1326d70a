"""Business rules at scoring time: items that must not be shown are masked before the top-K is cut,
so every list still has K items (as long as the catalogue has K allowed ones).

Two kinds of rule:
- per user, from the user's state record (state/codec.py): items the user bought (never again, or
  for ``bought_days``), items viewed or clicked, and items put in the cart, in the current session;
- catalogue rules, from the compacted item-rules topic keyed by item id (docs/rules.md): an item
  ``available: false`` or ``deny: true`` is never shown, and its ``category`` is what the include and
  exclude filters (``GRUFLOW_RULE_*_CATEGORIES``, or a request's own filter) test.

Pure: no Kafka. ``Catalogue`` is filled by the worker's item-rules reader thread and read by the
compute thread; a reader takes ``view()``, an immutable snapshot, once per batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import orjson

from state.codec import BOUGHT_DTYPE

# label values of gruflow_rule_masked_items_total{rule}
BOUGHT, SESSION_VIEWED, SESSION_CART = "bought", "session_viewed", "session_cart"
UNAVAILABLE, DENY, CATEGORY, EXPOSURE = "unavailable", "deny", "category", "exposure"
RULES = (BOUGHT, SESSION_VIEWED, SESSION_CART, UNAVAILABLE, DENY, CATEGORY, EXPOSURE)
CATALOGUE_RULES = (UNAVAILABLE, DENY, CATEGORY)  # in the order a masked item is counted under
KIND_VIEWED, KIND_CART = 0, 1  # session item kinds (state record: 4 * row + kind)
_DAY_S = 86400


class _NoCategory:
    """Equal to no category string: an include filter of only this allows no item at all."""

    def __repr__(self) -> str:
        return "<no category>"


# an include filter that no item passes (a request's categories and the settings' have none in common);
# an empty include set means "no include filter" instead
NOTHING_INCLUDED: frozenset[Any] = frozenset({_NoCategory()})


def _categories(raw: str | Iterable[str]) -> frozenset[str]:
    if isinstance(raw, str):
        raw = raw.split(",")
    return frozenset(c.strip() for c in raw if c.strip())


@dataclass(frozen=True)
class RuleConfig:
    bought: str = "off"  # "off" | "forever" | "days"
    bought_days: float = 30.0
    session_viewed: bool = False
    session_cart: bool = False
    state_items: int = 32  # purchases, and session items, kept per user (each list)
    exclude_categories: frozenset[str] = frozenset()
    include_categories: frozenset[str] = frozenset()
    candidates: int = 16  # extra top-K candidates fetched to replace masked items
    exposure_cap: float = 0.0  # 0 = off
    exposure_window_s: float = 300.0
    exposure_damping: float = 100.0

    @classmethod
    def from_settings(cls, settings: Any) -> "RuleConfig":
        s = settings.rules
        return cls(s.rule_bought, s.rule_bought_days, s.rule_session_viewed, s.rule_session_cart, s.rule_state_items,
                   _categories(s.rule_exclude_categories), _categories(s.rule_include_categories), s.rule_candidates,
                   s.exposure_cap, s.exposure_window_s, s.exposure_damping)

    @property
    def per_user(self) -> bool:
        """Whether the state record keeps the rule lists (purchases, session items)."""
        return self.bought != "off" or self.session_viewed or self.session_cart

    @property
    def tracks_session(self) -> bool:
        return self.session_viewed or self.session_cart


def request_categories(cfg: RuleConfig, include: frozenset[str], exclude: frozenset[str]
                       ) -> tuple[frozenset[Any], frozenset[str]]:
    """The (include, exclude) sets of a request with its own category filter: a request narrows the settings'
    filters, never widens them. Exclusions add up; include sets intersect (the request's alone, or the
    settings' alone, when only one has one), and an empty intersection allows nothing (``NOTHING_INCLUDED``)."""
    both = exclude | cfg.exclude_categories
    if not include or not cfg.include_categories:
        return include or cfg.include_categories, both
    return (include & cfg.include_categories) or NOTHING_INCLUDED, both


@dataclass(frozen=True)
class ItemRule:
    available: bool = True
    deny: bool = False
    category: str | None = None


def parse_item_rule(value: bytes | None) -> ItemRule | None:
    """One item-rules record's value: a JSON object with optional ``available`` (bool), ``deny`` (bool) and
    ``category`` (string or integer; null = none). None for a tombstone (null value: the item's rules are
    removed). ValueError with the reason for anything else; unknown fields are ignored."""
    if value is None:
        return None
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"JSON {type(obj).__name__}, expected an object")
    for name in ("available", "deny"):
        if name in obj and not isinstance(obj[name], bool):
            raise ValueError(f"{name} is {type(obj[name]).__name__}, expected true or false")
    category = obj.get("category")
    if category is not None and (not isinstance(category, (str, int)) or isinstance(category, bool)):
        raise ValueError(f"category is {type(category).__name__}, expected string or integer")
    return ItemRule(obj.get("available", True), obj.get("deny", False),
                    None if category is None else str(category))


@dataclass(frozen=True)
class CatalogueView:
    """An immutable snapshot of the catalogue rules; ``version`` changes with every change."""

    rules: dict[str, ItemRule]
    version: int


class Catalogue:
    """The item rules read so far (latest per item id). One writer thread, any number of readers."""

    def __init__(self) -> None:
        self._rules: dict[str, ItemRule] = {}
        self._version = 0
        self._view = CatalogueView({}, 0)
        self._lock = threading.Lock()

    def apply(self, item_id: str, rule: ItemRule | None) -> None:
        with self._lock:
            if rule is None or rule == ItemRule():
                self._rules.pop(item_id, None)
            else:
                self._rules[item_id] = rule
            self._version += 1

    def __len__(self) -> int:
        return len(self._rules)

    def view(self) -> CatalogueView:
        with self._lock:
            if self._view.version != self._version:
                self._view = CatalogueView(dict(self._rules), self._version)
            return self._view


class CatalogueMasks:
    """Vocabulary rows masked by the catalogue rules, per rule, cached per (snapshot, vocabulary, filter):
    the stream's filter and a few request filters at once (``keep`` entries, least recently used go)."""

    def __init__(self, keep: int = 8) -> None:
        self._cache: OrderedDict[Any, dict[str, np.ndarray]] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def get(self, view: CatalogueView, vocab: Any, include: frozenset[str] = frozenset(),
            exclude: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        key = (view.version, id(vocab), len(vocab), include, exclude)
        with self._lock:
            masks = self._cache.get(key)
            if masks is not None:
                self._cache.move_to_end(key)
                return masks
        masks = catalogue_masks(view, vocab, include, exclude)
        with self._lock:
            self._cache[key] = masks
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return masks


def catalogue_masks(view: CatalogueView, vocab: Any, include: frozenset[str] = frozenset(),
                    exclude: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Sorted vocabulary rows each catalogue rule masks; an item is counted under the first rule of
    ``CATALOGUE_RULES`` that masks it. ``include`` keeps only items whose category is in it (items without a
    category are masked then); ``exclude`` masks the items of those categories. A request with its own
    filter calls this with ``request_categories``' sets."""
    unavailable, deny, category = [], [], []
    for item_id, rule in view.rules.items():
        if not rule.available:
            unavailable.append(item_id)
        elif rule.deny:
            deny.append(item_id)
        elif rule.category in exclude:
            category.append(item_id)
    masks = {UNAVAILABLE: vocab.rows(unavailable), DENY: vocab.rows(deny), CATEGORY: vocab.rows(category)}
    if include:
        allowed = [i for i, r in view.rules.items() if r.category in include and r.available and not r.deny]
        keep = np.zeros(len(vocab), dtype=bool)
        rows = vocab.rows(allowed)
        keep[rows[rows >= 0]] = True
        others = np.concatenate([m[m >= 0] for m in masks.values()]) if masks else np.zeros(0, np.int64)
        keep[others] = True  # already counted under their own rule
        masks[CATEGORY] = np.concatenate([masks[CATEGORY], np.flatnonzero(~keep)])
    return {name: np.unique(rows[rows >= 0]).astype(np.int64) for name, rows in masks.items()}


def user_exclusions(cfg: RuleConfig, bought: list[tuple[int, int]], session_items: list[int],
                    now_s: float) -> list[tuple[str, np.ndarray]]:
    """The rows a user's own rules mask in a list published at ``now_s`` (event time), per rule.
    ``bought``: (row, purchase time in s) oldest first; ``session_items``: 4 * row + kind. Plain lists:
    this runs once per event, where small numpy operations would cost more than the lists' work."""
    out = []
    if cfg.bought != "off" and bought:
        if cfg.bought == "days":
            cut = now_s - cfg.bought_days * _DAY_S
            rows = [r for r, t in bought if t >= cut]
        else:
            rows = [r for r, _ in bought]
        out.append((BOUGHT, np.array(rows, dtype=np.int64)))
    if session_items:
        if cfg.session_viewed:
            out.append((SESSION_VIEWED, np.array([c >> 2 for c in session_items if c & 3 == KIND_VIEWED],
                                                 dtype=np.int64)))
        if cfg.session_cart:
            out.append((SESSION_CART, np.array([c >> 2 for c in session_items if c & 3 == KIND_CART], dtype=np.int64)))
    return out


def remember(cfg: RuleConfig, bought: list[tuple[int, int]], session_items: list[int], row: int, kind: str,
             ts_s: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The user's rule lists (new lists) after an event of a known item (``kind``: "purchase", "cart" or
    "viewed"): the newest entry of an item replaces an older one, the oldest leave beyond
    ``cfg.state_items``."""
    cap = cfg.state_items
    if kind == "purchase" and cfg.bought != "off":
        bought = ([e for e in bought if e[0] != row] + [(row, ts_s)])[-cap:] if cap else []
    elif kind in ("cart", "viewed") and cfg.tracks_session:
        code = 4 * row + (KIND_CART if kind == "cart" else KIND_VIEWED)
        session_items = ([c for c in session_items if c != code] + [code])[-cap:] if cap else []
    return bought, session_items


def as_lists(bought: np.ndarray, session_items: np.ndarray) -> tuple[list[tuple[int, int]], list[int]]:
    """A state record's rule lists as ``remember`` and ``user_exclusions`` take them."""
    return [(int(r), int(t)) for r, t in bought.tolist()], session_items.tolist()


def as_arrays(bought: list[tuple[int, int]], session_items: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The lists back in the state record's arrays."""
    return np.array(bought, dtype=BOUGHT_DTYPE).reshape(-1), np.array(session_items, dtype=np.int32)
