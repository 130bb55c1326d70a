"""The scale part of ``gruflow bench stream``: ``--items 20000,200000,1000000`` runs the stream bench once per
catalogue size and prints one JSON object with a row per size.

Per size, beside the stream bench's own figures (end-to-end events/s, the computation ceiling, the top-K
path, p99 at the offered rate, the worker's peak RSS): ``recall_at_k_vs_exact``, the share of the exact
top-K (float32 over the whole catalogue, retired rows masked) found by the served path on the same hidden
states of the ceiling run (1.0 for an exact path); and ``publish_to_serving_s``, the time from the start
of publishing a new model version on the models topic (a copy of the served model whose output rows moved
as a fine-tune moves some) until the worker reports serving it, its index made (``index_*`` from the
worker's log: the first full build and the update for the new version). ``cpu_flags``/``faiss_simd``
name the machine's SIMD features and the level faiss dispatches to, so figures compare only within a
kind of machine. The worker's other settings are the defaults (``GRUFLOW_RETRIEVAL=auto``).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

RECALL_STATES = 500  # hidden states of the ceiling run compared with the exact top-K
_MOVED_SHARE = 0.01  # output rows a published test version changes
_INDEX_LINE = re.compile(r"retrieval index for model version (\d+) \((\d+) items, (\d+) lists\): (.*) in ([0-9.]+) s")


def parse_items(text: str | int) -> list[int]:
    """``"20000,200000,1000000"`` -> [20000, 200000, 1000000]; every size at least 2."""
    sizes = [int(part.replace("_", "")) for part in str(text).split(",") if part.strip()]
    if not sizes or min(sizes) < 2:
        raise ValueError(f"--items needs one or more catalogue sizes of at least 2 items, got {text!r}")
    return sizes


def recall_vs_exact(model: Any, found: np.ndarray, hidden: np.ndarray, k: int, chunk: int = 64) -> float:
    """Mean share of each state's exact top-``k`` (model.top_k: float32 over every row) among ``found``."""
    hits = 0
    for s in range(0, len(hidden), chunk):
        truth, _ = model.top_k(hidden[s:s + chunk], k)
        hits += sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found[s:s + chunk].tolist()))
    return round(hits / max(1, len(hidden) * k), 4)


def faiss_simd() -> str | None:
    """The SIMD level faiss dispatches to (``FAISS_SIMD_LEVEL`` lowers it), where faiss says."""
    try:
        import faiss

        return str(faiss.SIMDConfig.get_level_name())
    except (ImportError, AttributeError):
        return None


def index_times(log_text: str) -> dict[str, Any]:
    """The worker's index builds and updates by version, from its log lines."""
    out: dict[str, Any] = {}
    for version, items, lists, how, seconds in _INDEX_LINE.findall(log_text):
        key = "index_build" if how == "full build" else "index_update"
        out.setdefault(f"{key}_s", float(seconds))
        out.setdefault("index_lists", int(lists))
        if key == "index_update":
            out.setdefault("index_update_rows", how.split(" ")[0])
    return out


def moved_version(model_path: Path, version: int, seed: int = 7) -> bytes:
    """Checkpoint bytes of the served model as version ``version`` with 1% of its output rows moved."""
    import torch

    from model.checkpoint import checkpoint_to_bytes, load_checkpoint

    ckpt = load_checkpoint(model_path)
    W = ckpt.net.output_weights()
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(rng.choice(W.shape[0], size=max(1, int(W.shape[0] * _MOVED_SHARE)), replace=False))
    with torch.no_grad():
        W[rows] += 0.1 * W[rows].std() * torch.randn(len(rows), W.shape[1])
    return checkpoint_to_bytes(ckpt.net, ckpt.vocab, ckpt.params, ckpt.popularity,
                               {**ckpt.metadata, "version": version})


def publish_to_serving(settings: Any, model_path: Path, scrape: Any, timeout: float = 300.0) -> dict[str, Any]:
    """Publish version 2 on the models topic and time until the worker serves it (``scrape`` reads its
    ``gruflow_model_version``)."""
    from stream.online import model_sync

    data = moved_version(model_path, 2)
    t0 = time.monotonic()
    chunks = model_sync.publish_version(settings, data, 2, 1)
    published = time.monotonic() - t0
    while time.monotonic() - t0 < timeout and (scrape("gruflow_model_version") or 0) < 2:
        time.sleep(0.2)
    served = (scrape("gruflow_model_version") or 0) >= 2
    return {"publish_to_serving_s": round(time.monotonic() - t0, 2) if served else None,
            "publish_s": round(published, 2), "checkpoint_bytes": len(data), "checkpoint_chunks": chunks}


def run_scale(args: argparse.Namespace, measure: Any) -> dict[str, Any]:
    """``measure(args)`` (one stream bench run) per catalogue size; the machine's figures once."""
    import os

    from stream.lab.bench_machine import cpu_flags, cpu_model, log

    rows = []
    load_before = os.getloadavg()
    for n in parse_items(args.items):
        log(f"=== {n:,} items ===")
        one = argparse.Namespace(**{**vars(args), "items": n, "publish_check": True})
        try:
            rows.append(measure(one))
        except Exception as exc:  # noqa: BLE001 - the other sizes' figures stand
            log(f"{n:,} items failed: {exc!r}")
            rows.append({"catalogue_items": n, "error": repr(exc)})
    return {"sizes": rows, "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "faiss_simd": faiss_simd(),
            "cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
