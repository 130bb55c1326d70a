"""``gruflow bench serve --json``: recommendations on request while the stream runs, on the embedded broker.

One worker process (the model of ``gruflow bench stream``: trained for one quick epoch on synthetic
sessions, 20,000 items, hidden 100 by default). After a warm-up at the stream rate (its users, "warm-N",
are the ones asked for later):

1. stream alone: events at ``--rate`` (2,000/s) for ``--seconds``; the stream's latency per event =
   arrival of its recommendation at a consumer - send time (as in ``bench stream``).
2. stream + requests: the same event load, and at the same time ``GET /users/{id}/recommendations``
   at ``--request-rate`` (500/s) for known users (with ``--anonymous-share`` of them ``POST
   /recommendations`` with 3 items), open loop: request i is due at t0 + i/rate, and its latency counts
   from that due time (a slow answer delays no later request, and a late start is counted). The
   request load runs in its own process so it does not take the GIL of the event load generator; it is a
   light kept-alive HTTP/1.1 client (stream/lab/http_load.py), started and ready before the window opens, so
   the CPU it takes from the worker's machine stays small.
   ``stream_p99_ratio`` = the stream's p99 with requests / without (goal < 1.5); ``requests`` has
   requests/s answered, statuses and p50/p99 (goal p99 <= 20 ms at 500 requests/s).
   Known users' requests of the default shape are answered from the list published after their last
   event (``worker_handler_ms.cached_share``: the share answered so); ``--no-answer-cache`` scores every
   request instead.
3. "because" cost (skip with ``--no-because``): the worker's throughput (events/s) on a backlog of
   ``--because-events``, with GRUFLOW_BECAUSE off and on, each on fresh topics with a fresh worker.

Prints one JSON object; ``load_avg_1m``, the CPU's name and flags say what the machine was doing, and
``worker_scorer_path``/``worker_calibration`` which top-K path the worker kept and why. No assertions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stream.lab.bench import bench_settings
from stream.lab.bench_load import WARMUP_PREFIX, RecReader, latency_window, percentiles, warm_up
from stream.lab.bench_machine import cpu_flags, cpu_model, log
from stream.lab.bench_model import bench_data, train_model
from stream.lab.bench_runs import calibration_line
from stream.tools.harness import PROJECT_ROOT, kafka_for, label_value, scrape, stop_process
from stream.settings import ENV_PREFIX, Settings


def _requests(url: str, users: int, rate: float, seconds: float, k: int, anonymous_share: float,
              n_items: int) -> list[bytes]:
    """The request load, pre-encoded: known users' GETs and, ``anonymous_share`` of them, POSTs of 3 items."""
    from stream.lab.http_load import get_request, post_request

    rng = np.random.default_rng(7)
    host = url.split("//", 1)[1]
    requests = []
    for _ in range(int(rate * seconds)):
        anonymous = bool(rng.random() < anonymous_share)
        user = int(rng.integers(0, users))
        items = rng.integers(0, n_items, 3).tolist()
        if anonymous:
            body = json.dumps({"items": [f"i{i}" for i in items], "k": k}).encode()
            requests.append(post_request(host, "/recommendations", body))
        else:
            requests.append(get_request(host, f"/users/{WARMUP_PREFIX}{user}/recommendations?k={k}"))
    return requests


def _request_process(queue: Any, go: Any, url: str, rate: float, users: int, seconds: float, k: int,
                     anonymous_share: float, n_items: int) -> None:
    """The request load's process: imports and requests made first, then "ready" on ``queue``; the load
    starts when ``go`` is set (with the stream's measured window, which the start-up's CPU would disturb)
    and its figures are put on ``queue``."""
    from stream.lab.http_load import open_loop
    from stream.worker.main import new_event_loop

    requests = _requests(url, users, rate, seconds, k, anonymous_share, n_items)
    loop = new_event_loop("uvloop")  # the load's own CPU is taken from the worker's 2 cores: the lighter loop
    queue.put("ready")
    go.wait()
    try:
        out, span = loop.run_until_complete(open_loop(url, requests, rate))
    finally:
        loop.close()
    queue.put({"requests": len(requests), "requests_per_s": round(len(requests) / span, 1),
               "statuses": out.statuses, "latency_ms": percentiles(np.asarray(out.latencies_ms, dtype=np.float64)),
               "offered_request_rate": rate})


def _start_worker(settings: Settings, model_path: Path, log_path: Path, **env: str) -> subprocess.Popen[bytes]:
    full = settings.subprocess_env(**{ENV_PREFIX + "MODEL_PATH": str(model_path)}, **env)
    return subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"], env=full, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the worker on port {port} did not become ready")


def _throughput(base: Settings, model_path: Path, df: Any, work: Path, because: bool) -> float:
    """events/s of a fresh worker on a backlog of ``df`` (publication span of its recommendations)."""
    from stream.kafka.broker_setup import free_port
    from stream.tools.replay import replay
    from stream.kafka.topics import ensure_topics

    tag = f"b{int(because)}{time.strftime('%H%M%S')}"
    settings = base.replace(topic_prefix=f"bench-{tag}.", app_id=f"gruflow-bench-{tag}", data_dir=work / tag,
                            web_port=free_port())
    ensure_topics(settings)
    n = replay(settings, df, progress=False).delivered
    reader = RecReader(settings)
    worker = _start_worker(settings, model_path, work / f"worker-{tag}.log", **{ENV_PREFIX + "BECAUSE": str(because)})
    try:
        if not reader.wait_count(n, 900):
            raise RuntimeError(f"only {reader.count} of {n} recommendations arrived (because={because})")
        pub = np.asarray(reader.published, dtype=np.float64)
        return n / ((pub.max() - pub.min()) / 1000.0)
    finally:
        reader.close()
        stop_process(worker)


def _handler_quantiles(port: int) -> dict[str, float | None]:
    """The worker's own time per request (``gruflow_http_request_duration_seconds``, both endpoints): the
    upper bound of the histogram bucket holding the p50/p99, in ms. Set beside the client's latency, it says
    whether a slow answer was slow inside the handler or before it (the event loop, the network stack)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    cumulative: dict[float, float] = {}
    cached = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "gruflow_http_request_duration_seconds" and sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                cumulative[le] = cumulative.get(le, 0.0) + sample.value
            elif family.name == "gruflow_http_cached_answers" and sample.name.endswith("_total"):
                cached += sample.value
    total = cumulative.get(float("inf"), 0.0)

    def upper(q: float) -> float | None:
        for le in sorted(cumulative):
            if total and cumulative[le] >= q * total:
                return None if le == float("inf") else le * 1000.0
        return None

    return {"requests": int(total), "p50_at_most": upper(0.5), "p99_at_most": upper(0.99),
            "cached_share": round(cached / total, 3) if total else None}


def _serve_phases(settings: Settings, args: argparse.Namespace, model_path: Path, work: Path) -> dict[str, Any]:
    env = {ENV_PREFIX + "SERVE_CACHE_USERS": "0"} if args.no_answer_cache else {}
    worker = _start_worker(settings, model_path, work / "worker.log", **env)
    reader = RecReader(settings)
    try:
        _wait_ready(settings.process.web_port, worker)
        log(f"warm-up: {args.rate:,.0f} events/s for {args.warmup_seconds:.0f} s ...")
        warm_up(settings, reader, args, args.warmup_seconds)
        log(f"stream alone: {args.rate:,.0f} events/s for {args.latency_seconds:.0f} s ...")
        alone, _ = latency_window(settings, reader, args)
        log(f"stream + requests: {args.request_rate:,.0f} requests/s at the same time ...")
        spawn = multiprocessing.get_context("spawn")
        queue: Any = spawn.Queue()
        go = spawn.Event()
        load = spawn.Process(target=_request_process,
                             args=(queue, go, f"http://127.0.0.1:{settings.process.web_port}", args.request_rate,
                                   5000, args.latency_seconds, args.k, args.anonymous_share, args.items))
        load.start()
        if queue.get(timeout=120) != "ready":
            raise RuntimeError("the request load did not start")
        go.set()
        together, _ = latency_window(settings, reader, args)
        requests = queue.get(timeout=args.latency_seconds + 120)
        load.join(30)
        requests["worker_handler_ms"] = _handler_quantiles(settings.process.web_port)
        # the top-K path the worker kept: figures compare only within a kind of machine and path
        scorer_path = label_value(scrape(f"http://127.0.0.1:{settings.process.web_port}"), "gruflow_scorer_info",
                                  "path")
    finally:
        reader.close()
        stop_process(worker)
    p_alone, p_together = percentiles(alone), percentiles(together)
    return {"requests": requests, "worker_scorer_path": scorer_path,
            "worker_calibration": calibration_line(work / "worker.log"),
            "stream_latency_ms": p_alone, "stream_latency_ms_with_requests": p_together,
            "stream_p99_ratio": round(p_together["p99"] / p_alone["p99"], 3)
            if p_alone["p99"] and p_together["p99"] else None}


def run_bench_serve(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {}
    with kafka_for(Settings.from_env(), quiet=True) as base:
        work = Path(tempfile.mkdtemp(prefix="gruflow-bench-serve-"))
        try:
            settings = bench_settings(base, "serve", work, args)
            model_path = Path(args.model) if args.model else work / "bench-model.gfc"
            train, df = bench_data(args.because_events, args.items)
            if model_path.exists():
                log(f"model: {model_path} (kept from an earlier run; --items and --hidden must match it)")
            else:
                train_model(model_path, train, args.items, args.hidden)
            load_before = os.getloadavg()[0]
            result.update(_serve_phases(settings, args, model_path, work))
            if not args.no_because:
                off = _throughput(settings, model_path, df, work, because=False)
                on = _throughput(settings, model_path, df, work, because=True)
                log(f"throughput: {off:,.0f} events/s without because, {on:,.0f} with")
                result.update({"because_off_events_per_s": round(off, 1), "because_on_events_per_s": round(on, 1),
                               "because_throughput_ratio": round(on / off, 3), "because_events": len(df)})
            result.update({"offered_rate": args.rate, "catalogue_items": args.items, "hidden": args.hidden, "k": args.k,
                           "partitions": args.partitions, "cpus": os.cpu_count(), "cpu_model": cpu_model(),
                           "cpu_flags": cpu_flags(), "load_avg_1m_before": round(load_before, 2),
                           "load_avg_1m": round(os.getloadavg()[0], 2)})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    p.add_argument("--items", type=int, default=20_000, help="catalogue size (default 20,000)")
    p.add_argument("--hidden", type=int, default=100, help="GRU hidden size (default 100)")
    p.add_argument("--k", type=int, default=20, help="recommendations per event and per request (default 20)")
    p.add_argument("--rate", type=float, default=2000.0, help="events/s of the stream (default 2,000)")
    p.add_argument("--request-rate", type=float, default=500.0, help="requests/s (default 500)")
    p.add_argument("--anonymous-share", type=float, default=0.1,
                   help="share of the requests that are anonymous POSTs (default 0.1)")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="length of each measured run (default 20 s)")
    p.add_argument("--warmup-seconds", type=float, default=20.0, help="unmeasured stream load first (default 20 s)")
    p.add_argument("--partitions", type=int, default=8, help="partitions of the input topics (default 8)")
    p.add_argument("--because-events", type=int, default=40_000,
                   help="backlog of each because off/on throughput run (default 40,000)")
    p.add_argument("--no-because", action="store_true", help="skip the because off/on throughput runs")
    p.add_argument("--no-answer-cache", action="store_true",
                   help="score every request (GRUFLOW_SERVE_CACHE_USERS=0) instead of answering known users from "
                        "their last published list")
    p.add_argument("--model", default=None,
                   help="checkpoint to serve: used if it exists, else trained as usual and kept there for the next run")
