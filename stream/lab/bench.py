"""``gruflow bench stream --json``: one worker process on the embedded broker, measured end to end.

0. compute ceiling: before the worker starts, the worker's batch computation alone (decode, GRU steps,
   exact top-K, output JSON; no Kafka, no state store) on 10,000 of the same events, and the top-K
   scoring alone: ``ratio_to_compute_ceiling`` = end-to-end rate / that ceiling.
1. throughput: N events (synthetic sessions over the catalogue) are produced BEFORE the worker starts;
   events_per_s = N / (last - first publication time of their recommendations), i.e. sustained
   processing of a backlog: consume, decode, state reads, GRU + top-K, changelog + recommendation
   produce, delivery wait, RocksDB writes, offset acks.
2. raw consumer: a plain confluent-kafka consumer reads the same N input messages (same run, same
   broker) for ``ratio_to_raw``.
3. latency: new events at a fixed offered rate (``offered_rate``), each stamped with its send time;
   latency = arrival of its recommendation at a consumer in this process - send time (two Kafka hops
   plus the worker's batch wait and processing). It follows ``--warmup-seconds`` of the same load, not
   measured: a fresh broker JVM spends its first minute compiling (its CPU use halves once warm), which
   is not the steady state a deployed broker is in.
4. latency while training (skip with ``--no-training``): a ``gruflow trainer`` runs as a separate process
   (the recommended deployment) with back-to-back fine-tune rounds over a bounded buffer, publishing the
   versions it promotes (the worker swaps them in); once its first round has finished, the same offered
   load is measured again. ``p99_ratio_training`` = p99 with training / p99 without (goal < 1.5).
5. latency peer (skip with ``--no-echo``): with the worker and trainer stopped, ``stream.lab.echo`` (a plain
   confluent-kafka consume -> produce loop that answers each event without computing anything) takes the
   worker's place on topics of its own; the same load generator, reader and offered rate measure it
   after a short warm-up. ``echo_latency_ms`` is the floor of two Kafka hops on this machine in this
   run, and ``latency_p99_ratio_to_echo`` = the worker's p99 / the echo's.

The model is a GRU4Rec of the requested size trained for one quick epoch on synthetic sessions of the
same shop as the events (scoring speed depends on a trained model's spread of scores, see
model/topk.py); ``topk_int8_fraction`` = share of the ceiling run's rows that the int8 path proved.
``*_cpu_steal``: CPUs per second that the hypervisor gave to other guests during that part (/proc/stat
steal time; the 2-vCPU VM of gruflow's first sessions lost up to 0.8 of a CPU so in its host's busy phases).
``cpu_model``: the processor's name, since figures compare only between runs on the same kind of machine;
``cpu_flags``: which of the SIMD features that decide the top-K path it has. ``scorer_path``: the top-K path
that calibration kept for the ceiling run (``scorer_calibration_rows_per_s``: what it measured of each);
``worker_scorer_path``: the one the worker kept (its ``gruflow_scorer_info`` metric), ``worker_calibration``
what the worker's calibration measured (its log line).
Prints one JSON object. No assertions: goals are written in the issue note, not enforced here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from stream.lab.bench_load import RecReader, scrape_total
from stream.lab.bench_machine import log, peak_rss_bytes
from stream.lab.bench_model import bench_data, compute_ceiling, prepare_model
from stream.lab.bench_report import bench_json
from stream.lab.bench_runs import backlog_run, echo_comparison, latency_run, training_comparison
from stream.settings import ENV_PREFIX, Settings
from stream.tools.harness import GruflowProcess, kafka_for, stop_process


def bench_settings(base: Settings, name: str, work: Path, args: argparse.Namespace) -> Settings:
    """One bench run's settings on the broker of ``base``: its own topics (created here), consumer group, data
    dir and web port, the run's partitions and k."""
    from stream.kafka.broker_setup import free_port
    from stream.kafka.topics import ensure_topics

    run = time.strftime("%H%M%S")
    settings = base.replace(topic_prefix=f"{name}{run}.", app_id=f"gruflow-{name}-{run}", data_dir=work / "state",
                            web_host="127.0.0.1", web_port=free_port(), partitions=args.partitions,
                            top_k=args.k, broker_session_timeout_s=6.0)
    ensure_topics(settings)
    return settings


def run_bench(args: argparse.Namespace) -> int:
    """One run (``--items N``), or one per catalogue size (``--items 20000,200000``: stream.lab.bench_scale)."""
    from stream.lab.bench_scale import parse_items, run_scale

    sizes = parse_items(args.items)
    if len(sizes) > 1:
        print(json.dumps(run_scale(args, measure)))
    else:
        print(json.dumps(measure(argparse.Namespace(**{**vars(args), "items": sizes[0]}))))
    return 0


def _publish_check(args: argparse.Namespace, settings: Settings, model_path: Path) -> dict[str, Any]:
    """With ``--publish-check``: how long a published version 2 takes until the worker serves it."""
    if not getattr(args, "publish_check", False):
        return {}
    from stream.lab.bench_scale import publish_to_serving

    log("publishing model version 2 (1% of the output rows moved); timing until it is served ...")
    serving = publish_to_serving(settings, model_path, lambda name: scrape_total(settings.process.web_port, name))
    log(f"version 2 served {serving['publish_to_serving_s']} s after its publication began")
    return serving


def _log_ceiling(ceiling: dict[str, Any]) -> None:
    log(f"compute ceiling (no Kafka, no state): {ceiling['compute_ceiling_events_per_s']:,.0f} events/s; "
        f"top-K alone {ceiling['topk_ceiling_events_per_s']:,.0f} events/s "
        f"({ceiling['scorer_path']} path; int8 proved {ceiling['topk_int8_fraction'] or 0:.1%} of the rows)")


def _clean_up(args: argparse.Namespace, work: Path, worker: subprocess.Popen[bytes] | None,
              procs: list[subprocess.Popen[bytes]], result: dict[str, Any]) -> None:
    """After a bench run, finished or not: the index timings from the worker's log into ``result``, every
    process stopped, the log copied where --worker-log says, the work directory removed."""
    if worker is not None and (work / "worker.log").exists():
        from stream.lab.bench_scale import faiss_simd, index_times

        result.update(index_times((work / "worker.log").read_text(errors="replace")), faiss_simd=faiss_simd())
    for proc in procs:
        stop_process(proc)
    stop_process(worker)
    if getattr(args, "worker_log", None) and (work / "worker.log").exists():
        shutil.copy(work / "worker.log", args.worker_log)
    shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """One bench run on its own embedded broker (or the configured cluster) and work directory."""
    from stream.tools.replay import replay

    worker: subprocess.Popen[bytes] | None = None
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {}
    with kafka_for(Settings.from_env(), quiet=True) as base:
        work = Path(tempfile.mkdtemp(prefix="gruflow-bench-"))
        try:
            settings = bench_settings(base, "bench", work, args)
            train, df = bench_data(args.events, args.items)
            model_path = prepare_model(args, train, work)
            log(f"producing {len(df):,} events (backlog) ...")
            stats = replay(settings, df, progress=False)
            n = stats.delivered
            ceiling = compute_ceiling(settings, model_path, df)
            _log_ceiling(ceiling)

            reader = RecReader(settings)
            env = settings.subprocess_env(**{ENV_PREFIX + "MODEL_PATH": str(model_path)})
            worker_log = work / "worker.log"
            worker = GruflowProcess("worker", env, settings.process.web_port, worker_log).start(wait=False).proc
            assert worker is not None
            backlog = backlog_run(args, settings, reader, worker, n, work)
            lat, latency_steal = latency_run(args, settings, reader)
            serving = _publish_check(args, settings, model_path)
            training: dict[str, Any] = {}
            if not getattr(args, "no_training", False):
                training = training_comparison(args, settings, env, reader, work, procs, lat)
            reader.close()
            peak_rss = peak_rss_bytes(worker.pid)
            echo: dict[str, Any] = {}
            if not getattr(args, "no_echo", False):
                for proc in procs:  # the peer runs alone, as the worker did before the training run
                    stop_process(proc)
                stop_process(worker)
                echo = echo_comparison(args, settings, work, lat)
            result = bench_json(args, settings, backlog, ceiling, (lat, latency_steal), reader.to_publish_ms,
                                peak_rss, training, echo, serving)
        finally:
            _clean_up(args, work, worker, procs, result)
    return result


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    p.add_argument("--items", default="20000", help="catalogue size (default 20,000); several, comma-separated "
                                                   "(20000,200000,1000000), run one after another into one JSON")
    p.add_argument("--hidden", type=int, default=100, help="GRU hidden size (default 100)")
    p.add_argument("--publish-check", action="store_true",
                   help="time a new model version from publication to serving (always on with several --items)")
    p.add_argument("--model-cache", default=None,
                   help="directory that keeps the trained bench models by size, so runs compare on the same model")
    p.add_argument("--k", type=int, default=20, help="recommendations per event (default 20)")
    p.add_argument("--events", type=int, default=200_000, help="events for the throughput run (default 200,000)")
    p.add_argument("--rate", type=float, default=2000.0, help="offered rate of the latency run (default 2,000/s)")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="length of the latency run (default 20 s)")
    p.add_argument("--warmup-seconds", type=float, default=20.0,
                   help="unmeasured load at the same rate before the latency run, so that the broker's JIT has "
                        "compiled its hot paths (default 20 s; 0 to skip)")
    p.add_argument("--partitions", type=int, default=8, help="partitions of the input topics (default 8)")
    p.add_argument("--profile", default=None,
                   help="py-spy profile of the worker during the throughput run (.svg flame graph, else raw stacks)")
    p.add_argument("--worker-log", default=None, help="copy the worker's log here")
    p.add_argument("--no-echo", action="store_true",
                   help="skip the latency peer (a plain consume -> produce loop measured in the worker's place)")
    p.add_argument("--no-training", action="store_true",
                   help="skip the latency run with a trainer process running fine-tune rounds")
    p.add_argument("--train-buffer", type=int, default=20_000,
                   help="trainer buffer (events per fine-tune round) in the training run (default 20,000)")
    p.add_argument("--train-interval", type=float, default=1.0,
                   help="seconds between the trainer's rounds in the training run (default 1: back to back)")
    p.add_argument("--train-wait", type=float, default=300.0,
                   help="how long to wait for the trainer's first round (default 300 s)")
