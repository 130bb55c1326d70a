"""The stream's side of "because" (model/attribution.py): each event's recommendations attributed to the
user's recent items, and the published lists that carry them. Pure."""

from __future__ import annotations

import numpy as np
import orjson

from model.attribution import NO_ITEM, attribution_for
from model.recommender import Recommender
from stream.pipeline.events import Event


def because_rows(model: Recommender, rec_rows: np.ndarray, recent_at: list[list[int]], has_hidden: np.ndarray,
                 n: int) -> np.ndarray:
    """[B, K, n] session rows each recommended row (negative = none) is attributed to; NO_ITEM for none.
    ``recent_at[b]``: the user's recent rows after event b; answers without a hidden state (popular items)
    owe nothing to a session."""
    width = max((len(r) for r in recent_at), default=0)
    recent = np.full((len(recent_at), width), NO_ITEM, dtype=np.int64)
    for i, r in enumerate(recent_at):
        if r and has_hidden[i]:
            recent[i, :len(r)] = r
    return attribution_for(model.net).because(rec_rows, recent, n)


def encode_outputs_because(ids: list[str], version: int, events: list[Event], rec_rows: np.ndarray,
                           rec_scores: np.ndarray, because: np.ndarray, published_ms: int) -> list[tuple[bytes, bytes]]:
    """The stream's recommendation documents (as the processor encodes them) with ``"because": [item ids]``
    on each item that has one; rows < 0 end a list."""
    scores = np.round(rec_scores.astype(np.float64), 6).tolist()
    out = []
    for i, e in enumerate(events):
        items = []
        for j, row in enumerate(rec_rows[i].tolist()):
            if row < 0:
                break
            item: dict = {"item_id": ids[row], "score": scores[i][j]}
            why = [ids[r] for r in because[i, j].tolist() if r >= 0]
            if why:
                item["because"] = why
            items.append(item)
        out.append((e.key, orjson.dumps({"user_id": e.user_id, "items": items, "model_version": version,
                                         "event_ts": e.ts_ms, "published_ts": published_ms})))
    return out
