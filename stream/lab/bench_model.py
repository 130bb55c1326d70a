"""The bench's model and data: one synthetic shop split into training sessions and the bench's events, a
GRU4Rec trained for one quick epoch on them (or taken from the model cache), and the compute ceiling: the
worker's batch computation alone on the bench's own messages."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.lab.bench_machine import log
from stream.settings import Settings
from stream.tools.harness import train_quick_model


TRAIN_SESSIONS = 30_000  # ~200k synthetic events: one quick epoch, ~15-30 s on 2 cores


def train_model(path: Path, train: Any, n_items: int, hidden: int) -> None:
    """A GRU4Rec of the requested size trained for one quick epoch on synthetic sessions of the same
    shop as the bench's events: the worker's int8 top-K pre-filter relies on a trained model's spread
    of scores (an untrained model's are nearly flat), so a random model would misstate its speed."""
    from model.vocab import Vocabulary

    vocab = Vocabulary(f"i{r}" for r in range(n_items))
    n, seconds = train_quick_model(train, path, hidden=hidden, n_epochs=1, vocab=vocab, popularity_floor=1.0,
                                   metadata={"version": 1, "source": "gruflow bench"})
    log(f"model: {n:,} items, hidden {hidden}, one epoch on {len(train):,} synthetic events in {seconds:.0f} s")


def bench_data(n: int, n_items: int) -> tuple[Any, Any]:
    """(training sessions, the bench's n events): one synthetic shop, split by session start."""
    from model.synthetic import generate

    df = generate(n_sessions=TRAIN_SESSIONS + max(1, n // 5), n_items=n_items, seed=1)
    train = df[df["SessionId"] < TRAIN_SESSIONS]
    rest = df[df["SessionId"] >= TRAIN_SESSIONS]
    return train, rest.iloc[np.argsort(rest["Time"].to_numpy(), kind="stable")].head(n)


def compute_ceiling(settings: Settings, model_path: Path, df: Any, n: int = 10_000) -> dict[str, Any]:
    """The worker's batch computation alone, on the bench's own messages, in this process with the
    worker's torch threads and batch size, before the worker starts: decode + ``process_batch`` (GRU
    steps, exact top-K over the catalogue, output JSON), and the top-K scoring on its own. No Kafka, no
    state store: the ceiling the end-to-end rate is compared with."""
    import torch

    from model.checkpoint import load_checkpoint
    from stream.pipeline.events import CLICKS, PURCHASES, Limits, Rejected, decode_event
    from stream.pipeline.processor import PopularityBaseline, ProcessorConfig, process_batch
    from stream.tools.replay import iter_messages
    from model.topk_calibration import ScorerCache
    from stream.lab.bench_scale import RECALL_STATES, recall_vs_exact
    from stream.worker.pipeline import retrieval_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(settings.scoring.torch_threads)
    try:
        model = load_checkpoint(model_path).recommender(1)
        sc = settings.scoring
        cache = ScorerCache(sc.scoring_threads, compiled=sc.compiled_kernel, k=sc.top_k, path=sc.scorer_path,
                            retrieval=retrieval_policy(sc))
        scorer = cache.get(model)
        calibration = cache.calibration
        limits, cfg, popularity = Limits(), ProcessorConfig(k=sc.top_k), PopularityBaseline()
        purchases = settings.topic("purchases")
        messages = list(iter_messages(settings, df, limit=n))
        size = settings.worker.batch_max_events
        compute_s = scoring_s = 0.0
        events_done = 0
        scored_all: list[np.ndarray] = []
        for start in range(0, len(messages), size):
            part = messages[start:start + size]
            t0 = time.perf_counter()
            events = [decode_event(value, key, PURCHASES if topic == purchases else CLICKS, limits, topic=topic,
                                   partition=0, offset=start + i, append_ts_ms=ts, now_ms=ts)
                      for i, (topic, key, value, ts) in enumerate(part)]
            events = [e for e in events if not isinstance(e, Rejected)]
            scored: list[np.ndarray] = []

            def top_k(hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
                scored.append(hidden)
                scored_all.append(hidden)
                return scorer.top_k(hidden, k)

            result = process_batch(model, events, {}, cfg, popularity, top_k)
            compute_s += time.perf_counter() - t0
            t1 = time.perf_counter()
            for hidden in scored:  # the same states again: the scoring share of the batch
                scorer.top_k(hidden, settings.scoring.top_k)
            scoring_s += time.perf_counter() - t1
            events_done += len(result.outputs)
        hidden = np.vstack(kept)[:RECALL_STATES] if (kept := [h for h in scored_all if len(h)]) else None
        recall = (recall_vs_exact(model, scorer.top_k(hidden, sc.top_k)[0], hidden, sc.top_k)
                  if hidden is not None else None)
    finally:
        torch.set_num_threads(threads)
    return {"compute_ceiling_events_per_s": round(events_done / compute_s, 1) if compute_s else float("nan"),
            "topk_ceiling_events_per_s": round(events_done / scoring_s, 1) if scoring_s else float("nan"),
            "topk_int8_fraction": round(scorer.rows_int8 / scorer.rows_scored, 4) if scorer.rows_scored else None,
            "compiled_topk": getattr(scorer, "native", None) is not None,
            "compiled_topk_isa": kernel.isa if (kernel := getattr(getattr(scorer, "native", None), "kernel", None))
            else None,
            "scorer_path": calibration.path,
            "recall_at_k_vs_exact": recall,
            "scorer_calibration_rows_per_s": dict(calibration.rows_per_s),
            "scorer_calibration_s": round(calibration.seconds, 3)}


def prepare_model(args: argparse.Namespace, train: Any, work: Path) -> Path:
    """The bench model's path: from ``--model-cache`` when an earlier run trained it on the same synthetic
    sessions, else trained now (and kept there for the next run)."""
    cache = getattr(args, "model_cache", None)
    model_path = (Path(cache) / f"bench-model-{args.items}-{args.hidden}.gfc") if cache else work / "bench-model.gfc"
    if model_path.exists():
        log(f"model: {model_path} (trained by an earlier run on the same synthetic sessions)")
    else:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        train_model(model_path, train, args.items, args.hidden)
    return model_path
