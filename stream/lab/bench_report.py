"""The one JSON object ``gruflow bench stream --json`` prints: the runs' figures, the run's settings and the
machine's (``cpu_model``, ``cpu_flags``, ``load_avg_1m``), in a fixed key order."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from stream.lab.bench_load import percentiles
from stream.lab.bench_machine import cpu_flags, cpu_model
from stream.lab.bench_runs import Backlog
from stream.settings import Settings


def bench_json(args: argparse.Namespace, settings: Settings, backlog: Backlog, ceiling: dict[str, Any],
               latency: tuple[np.ndarray, float | None], to_publish_ms: list[float], peak_rss: int,
               *extra: dict[str, Any]) -> dict[str, Any]:
    """The result; ``extra`` (training, echo, serving, in that order) are merged after the worker's own."""
    lat, latency_steal = latency
    events_per_s, raw = backlog.events_per_s, backlog.raw_events_per_s
    result: dict[str, Any] = {
        "events_per_s": round(events_per_s, 1),
        "events": backlog.events,
        "throughput_cpu_steal": backlog.cpu_steal,
        "latency_ms": percentiles(lat),
        "latency_ms_send_to_publish": percentiles(np.asarray(to_publish_ms[:lat.size], dtype=np.float64)),
        "offered_rate": args.rate,
        "warmup_seconds": args.warmup_seconds,
        "latency_events": int(lat.size),
        "raw_consumer_events_per_s": round(raw, 1),
        "ratio_to_raw": round(events_per_s / raw, 4) if raw else None,
        **ceiling,
        "ratio_to_compute_ceiling": round(events_per_s / ceiling["compute_ceiling_events_per_s"], 3),
        "peak_rss_bytes": peak_rss,
        "catalogue_items": args.items,
        "hidden": args.hidden,
        "k": args.k,
        "partitions": args.partitions,
        "batch_max_events": settings.worker.batch_max_events,
        "batch_max_ms": settings.worker.batch_max_ms,
        "torch_threads": settings.scoring.torch_threads,
        "scoring_threads": settings.scoring.scoring_threads,
        "processing_guarantee": settings.worker.processing_guarantee,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "worker_scorer_path": backlog.worker_scorer_path,
        "worker_calibration": backlog.worker_calibration,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "latency_cpu_steal": latency_steal,
    }
    for part in extra:
        result.update(part)
    if args.profile:
        result["profile"] = args.profile
    return result
