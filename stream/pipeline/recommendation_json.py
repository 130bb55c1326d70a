"""The published recommendation messages: one JSON document per event, assembled from per-item
fragments cached per vocabulary (``gf_encode`` in model/native.c writes them where the library loads).
The same bytes as ``orjson.dumps`` of the document, without building K dicts per event. Pure."""

from __future__ import annotations

import numpy as np
import orjson

from model import native
from model.recommender import Recommender
from stream.pipeline.events import Event
from stream.pipeline.exposure import PAD


class _ItemPrefixes(dict):
    """row -> b'{"item_id":<JSON id>,"score":', built on first use (one vocabulary's worth at most)."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__()
        self.ids = ids

    def __missing__(self, row: int) -> bytes:
        b = b'{"item_id":' + orjson.dumps(self.ids[row]) + b',"score":'
        self[row] = b
        return b


_prefix_cache: list = [None, None]  # [vocabulary, _ItemPrefixes] of the model served last
_prefix_table_cache: list = [None, None]  # [(vocabulary, size), (blob, offsets, longest)] for the compiled encoder


def vocab_ids(model: Recommender) -> list:
    """The model's item ids by row, without a copy."""
    return model.vocab.ids_view()


def _item_prefixes(model: Recommender) -> _ItemPrefixes:
    vocab = model.vocab
    if _prefix_cache[0] is not vocab:
        _prefix_cache[1] = _ItemPrefixes(vocab_ids(model))
        _prefix_cache[0] = vocab
    return _prefix_cache[1]


def _packed(parts: list[bytes]) -> tuple[bytes, np.ndarray]:
    """``parts`` joined, and where each starts: part i is blob[offsets[i]:offsets[i + 1]]."""
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)), out=offsets[1:])
    return b"".join(parts), offsets


def _prefix_table(model: Recommender) -> tuple[bytes, np.ndarray, int]:
    """Every row's b'{"item_id":<JSON id>,"score":' in one blob, with offsets: built once per vocabulary,
    not per batch."""
    ids = vocab_ids(model)
    key = (model.vocab, len(ids))  # a vocabulary only grows: rebuilt if this one did
    if _prefix_table_cache[0] != key:
        dumps = orjson.dumps
        parts = [b'{"item_id":' + dumps(i) + b',"score":' for i in ids]
        _prefix_table_cache[1] = (*_packed(parts), max(map(len, parts), default=0))
        _prefix_table_cache[0] = key
    return _prefix_table_cache[1]


def encode_outputs(model: Recommender, events: list[Event], rec_rows: np.ndarray, rec_scores: np.ndarray,
                   published_ms: int) -> list[tuple[bytes, bytes]]:
    """One recommendation JSON per event, assembled from cached per-item fragments: the same document as
    ``orjson.dumps({"user_id", "items": [{"item_id", "score"}...], "model_version", "event_ts",
    "published_ts"})`` (scores rounded to 6 decimals), without building 20 dicts per event. Rows ``PAD``
    end a list."""
    tail = b'],"model_version":%d,"event_ts":' % int(model.version)
    published = b',"published_ts":%d}' % published_ms
    # orjson writes a float row as [a,b,...]: the per-item score texts
    score_rows = orjson.dumps(np.round(rec_scores.astype(np.float64), 6), option=orjson.OPT_SERIALIZE_NUMPY)
    lib = native.library()
    if lib is not None:
        encoded = encode_compiled(lib, model, events, rec_rows, score_rows, tail, published)
        if encoded is not None:
            return encoded
    prefixes = _item_prefixes(model)
    score_rows = score_rows[2:-2].split(b"],[") if rec_scores.shape[1] else [b""] * rec_scores.shape[0]
    rows_all = rec_rows.tolist()
    dumps = orjson.dumps
    prefix = prefixes.__getitem__
    cat = bytes.__add__
    out = []
    for i, e in enumerate(events):
        rr = rows_all[i]
        if rr and rr[-1] == PAD:
            rr = rr[:rr.index(PAD)]
        items = b"},".join(map(cat, map(prefix, rr), score_rows[i].split(b",")))
        out.append((e.key, b"".join((b'{"user_id":', dumps(e.user_id), b',"items":[', items,
                                     b"}" if rr else b"", tail, b"%d" % e.ts_ms, published))))
    return out


def encode_compiled(lib, model: Recommender, events: list[Event], rec_rows: np.ndarray, score_rows: bytes,
                    mid: bytes, tail: bytes) -> list[tuple[bytes, bytes]] | None:
    """``encode_outputs``' documents written by ``gf_encode`` (native.c) into one buffer, then cut per
    event: the same bytes, without ~40 Python operations per event. None if it refused (then the
    Python assembly runs)."""
    n, k = rec_rows.shape
    blob, offsets, longest = _prefix_table(model)
    dumps = orjson.dumps
    head_blob, head_off = _packed([b'{"user_id":' + dumps(e.user_id) + b',"items":[' for e in events])
    ts = np.fromiter((e.ts_ms for e in events), dtype=np.int64, count=n)
    rows = np.ascontiguousarray(rec_rows, dtype=np.int64)
    cap = len(head_blob) + len(score_rows) + n * k * (longest + 2) + n * (len(mid) + len(tail) + 24)
    out = np.empty(cap, dtype=np.uint8)
    off = np.empty(n + 1, dtype=np.int64)
    size = lib.gf_encode(score_rows, len(score_rows), rows.ctypes.data, n, k, PAD,
                         blob, offsets.ctypes.data, len(offsets) - 1, head_blob, head_off.ctypes.data,
                         mid, len(mid), ts.ctypes.data, tail, len(tail), out.ctypes.data, cap, off.ctypes.data)
    if size < 0:
        return None
    data = out[:size].tobytes()
    bounds = off.tolist()
    return [(e.key, data[bounds[i]:bounds[i + 1]]) for i, e in enumerate(events)]
