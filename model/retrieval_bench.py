"""Micro-benchmark of ``model.retrieval`` on large catalogues: build time, index size, queries/s, recall@K.

    python -m model.retrieval_bench --items 200000,1000000 --json

The output weights come from a real GRU4Rec trained briefly on synthetic sessions (``model.synthetic``)
and are then extended to N items: each new item copies the output row of a trained "parent" item plus
Gaussian noise (half the per-dimension spread of the trained rows), so items form clusters around
trained ones, and its bias follows a Zipf-like popularity through the trained model's own relation
between bias and log popularity. The queries are the hidden states of that model stepping held-out
sessions. Random weights would be the easy case for nothing and the hard case for everything: neither
clusters nor popularity, so neither ANN nor exact pruning would behave as on a trained model.

Every timing is taken ``--repeats`` times and the median is reported; recall is deterministic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import faiss
import numpy as np
import orjson
import torch

from model.params import GRU4RecParams
from model.recommender import Recommender
from model.retrieval import ItemIndex, RetrievalConfig
from model.synthetic import generate
from model.train import item_rows_for, train_model


@dataclass(frozen=True)
class BenchSetup:
    trained_items: int = 2_000
    sessions: int = 8_000
    epochs: int = 1
    n_sample: int = 256  # negative samples per batch: training is a means here, not the thing measured
    batch_size: int = 128
    hidden: int = 100
    queries: int = 1_000
    single_queries: int = 200  # queries timed one at a time (batch size 1)
    k: int = 20
    seed: int = 0


def trained_model(setup: BenchSetup) -> tuple[Recommender, np.ndarray]:
    """A GRU4Rec trained on synthetic sessions, and hidden states of it stepping held-out sessions."""
    data = generate(setup.sessions, setup.trained_items, seed=setup.seed)
    params = GRU4RecParams(layers=(setup.hidden,), n_epochs=setup.epochs, n_sample=setup.n_sample,
                           batch_size=setup.batch_size, seed=setup.seed)
    net, vocab, popularity = train_model(data, params, progress=False)
    rec = Recommender(net, vocab, version=1, popularity=popularity)
    held_out = generate(setup.queries, setup.trained_items, seed=setup.seed + 1)
    held_out = held_out[held_out["ItemId"].isin(set(vocab.ids))]
    rows = item_rows_for(held_out, vocab)
    sessions = held_out["SessionId"].to_numpy()
    types = held_out["EventType"].to_numpy().astype(np.int64)
    states, hidden = [], {}
    for s, r, t in zip(sessions, rows, types):  # one event at a time, as the worker sees them
        h = hidden.get(s, rec.zero_state(1))
        hidden[s] = rec.step(h, np.array([r]), np.array([t]))
        states.append(hidden[s][0])
    pick = np.random.default_rng(setup.seed).choice(len(states), size=min(setup.queries, len(states)),
                                                    replace=False)
    return rec, np.stack(states)[pick].astype(np.float32)


def cached_model(setup: BenchSetup, path: str | None, log) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(W, b, popularity, query states) of ``trained_model``, kept in an ``.npz`` at ``path`` if given:
    training takes minutes on a loaded 2-core machine and is not what is measured."""
    if path and os.path.exists(path):
        with np.load(path) as z:
            return z["W"], z["b"], z["popularity"], z["states"]
    t0 = time.perf_counter()
    rec, x = trained_model(setup)
    log(f"trained {setup.trained_items}-item model in {time.perf_counter() - t0:.0f}s; {len(x)} query states")
    W = rec.net.Wy.weight.detach().float().numpy().copy()
    b = rec.net.By.weight.detach().float().reshape(-1).numpy().copy()
    pop = np.asarray(rec.popularity, dtype=np.float64)
    if path:
        np.savez(path, W=W, b=b, popularity=pop, states=x)
    return W, b, pop, x


def extend_catalogue(W: np.ndarray, b: np.ndarray, popularity: np.ndarray, n: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N items clustered around the trained ones, with Zipf-like popularity biases (see the module doc)."""
    rng = np.random.default_rng(seed)
    n0, h = W.shape
    if n <= n0:
        return W[:n].copy(), b[:n].copy()
    extra = n - n0
    parents = rng.integers(0, n0, size=extra)
    spread = W.std(axis=0, keepdims=True) * 0.5
    W_new = W[parents] + rng.normal(size=(extra, h)).astype(np.float32) * spread
    # the trained relation b ~ a + c * log(1 + count), then Zipf counts for the new items
    logc = np.log1p(popularity.astype(np.float64))
    c, a = np.polyfit(logc, b.astype(np.float64), 1)
    resid = float(np.std(b - (a + c * logc)))
    ranks = rng.permutation(extra) + 1
    counts = popularity.max() * ranks ** -1.1
    b_new = a + c * np.log1p(counts) + rng.normal(size=extra) * resid
    return (np.vstack([W, W_new.astype(np.float32)]),
            np.concatenate([b, b_new.astype(np.float32)]))


def exact_top_k(W: np.ndarray, b: np.ndarray, x: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
    Wt, bt = torch.from_numpy(W), torch.from_numpy(b)
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), chunk):
            scores = torch.addmm(bt, torch.from_numpy(x[s:s + chunk]), Wt.T)
            out.append(torch.topk(scores, k, dim=1).indices.numpy())
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _set_threads(n: int) -> None:
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


def query_rates(search, x: np.ndarray, single: int, repeats: int) -> dict:
    """Median queries/s at batch sizes 1 and 64, on 1 and 2 threads."""
    out = {}
    for threads in (1, 2):
        _set_threads(threads)
        t1 = _median_time(lambda: [search(x[i:i + 1]) for i in range(single)], repeats)
        t64 = _median_time(lambda: [search(x[s:s + 64]) for s in range(0, len(x), 64)], repeats)
        out[f"qps_b1_t{threads}"] = round(single / t1)
        out[f"qps_b64_t{threads}"] = round(len(x) / t64)
    _set_threads(1)
    return out


def candidate_configs(n: int) -> list[tuple[RetrievalConfig, list[RetrievalConfig]]]:
    """(build config, search configs) pairs: IVF-SQ8 at two list counts, HNSW at one graph degree."""
    root = int(2 ** round(np.log2(np.sqrt(n))))
    out = []
    for nlist in (root, 2 * root):
        build = RetrievalConfig(kind="ivf_sq8", nlist=nlist, n_candidates=100)
        out.append((build, [replace(build, nprobe=p, n_candidates=c)
                            for p in (8, 16, 32, 64) for c in (100, 200)]))
    hnsw = RetrievalConfig(kind="hnsw", hnsw_m=32, ef_construction=80, n_candidates=100)
    out.append((hnsw, [replace(hnsw, ef_search=e, n_candidates=c) for e in (64, 128, 256) for c in (100,)]))
    return out


def bench_catalogue(W: np.ndarray, b: np.ndarray, x: np.ndarray, setup: BenchSetup, repeats: int,
                    log, kinds: set[str] | None = None) -> dict:
    n = W.shape[0]
    k = setup.k
    _set_threads(2)
    truth = exact_top_k(W, b, x, k)
    result: dict = {"items": n, "configs": []}
    for threads in (1, 2):
        _set_threads(threads)
        t = _median_time(lambda: exact_top_k(W, b, x, k), repeats)
        result[f"exact_qps_b64_t{threads}"] = round(len(x) / t)
    log(f"N={n}: exact top-{k} {result['exact_qps_b64_t1']}/s (1 thread), {result['exact_qps_b64_t2']}/s (2)")
    for build_cfg, search_cfgs in candidate_configs(n):
        if kinds and build_cfg.kind not in kinds:
            continue
        _set_threads(2)
        t0 = time.perf_counter()
        index = ItemIndex.build(W, b, None, version=1, config=build_cfg)
        build_s = time.perf_counter() - t0
        size = index.index_bytes()
        entry = {"build": asdict(build_cfg), "build_s_2threads": round(build_s, 2), "index_bytes": size,
                 "searches": []}
        if index.supports_update:
            changed = np.random.default_rng(1).choice(n, size=n // 100, replace=False)
            W2 = W.copy()
            W2[changed] *= 1.01
            t0 = time.perf_counter()
            index.updated(changed, W2, b, None, version=2)
            entry["update_1pct_s"] = round(time.perf_counter() - t0, 2)
        log(f"N={n} {build_cfg.kind} nlist={build_cfg.nlist} m={build_cfg.hnsw_m}: built in {build_s:.1f}s, "
            f"{size / 1e6:.0f} MB")
        for cfg in search_cfgs:
            _set_threads(2)
            rows, _ = index.search(x, k, config=cfg)
            row = {"nprobe": cfg.nprobe, "ef_search": cfg.ef_search, "n_candidates": cfg.n_candidates,
                   "recall": round(recall(rows, truth), 4)}
            row.update(query_rates(lambda q: index.search(q, k, config=cfg), x, setup.single_queries, repeats))
            entry["searches"].append(row)
            log(f"  {row}")
        result["configs"].append(entry)
        del index
    return result


def best_settings(results: list[dict], min_recall: float) -> list[dict]:
    """Per catalogue size, the fastest setting (2 threads, batch 64) reaching ``min_recall``."""
    out = []
    for r in results:
        ok = [(s["qps_b64_t2"], c["build"], s) for c in r["configs"] for s in c["searches"]
              if s["recall"] >= min_recall]
        if ok:
            qps, build, s = max(ok, key=lambda t: t[0])
            out.append({"items": r["items"], "kind": build["kind"], "nlist": build["nlist"],
                        "hnsw_m": build["hnsw_m"], **s})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.retrieval_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--items", default="200000,1000000", help="catalogue sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="timings per measurement (median reported)")
    ap.add_argument("--queries", type=int, default=BenchSetup.queries)
    ap.add_argument("--min-recall", type=float, default=0.95)
    ap.add_argument("--model-cache", default=None, help="an .npz keeping the trained model and states")
    ap.add_argument("--only", default=None, help="index kinds to run, comma-separated (default: all)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.items.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.repeats < 1:
        ap.error("--items needs positive sizes and --repeats at least 1")
    setup = BenchSetup()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(2)
    W, b, pop, x = cached_model(setup, args.model_cache, log)
    x = x[:args.queries]
    results = []
    for n in sizes:
        Wn, bn = extend_catalogue(W, b, pop, n, seed=setup.seed + n)
        kinds = set(args.only.split(",")) if args.only else None
        results.append(bench_catalogue(Wn, bn, x, setup, args.repeats, log, kinds))
    doc = {"setup": asdict(setup), "load_avg": os.getloadavg(), "faiss": faiss.__version__,
           "faiss_compile_options": faiss.get_compile_options(), "results": results,
           "best": best_settings(results, args.min_recall)}
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        for r in doc["best"]:
            print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
