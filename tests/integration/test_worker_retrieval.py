"""A worker serving a 200,000-item model from its index (GRUFLOW_RETRIEVAL=approximate) on the real broker:
every event answered, retired items never shown, and a fine-tuned version swapped in with its own index."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import checkpoint_to_bytes, load_checkpoint, save_checkpoint
from model.network import GRU4RecNet
from model.params import GRU4RecParams
from model.vocab import Vocabulary
from stream.online import model_sync
from stream.kafka.topics import ensure_topics
from workerkit import Ev, TopicReader, WorkerProc, produce

N, H, K = 200_000, 16, 20
RETIRED_V1 = set(range(0, N, 997))
RETIRED_V2 = RETIRED_V1 | set(range(5, N, 1009))


def _structured_net(seed: int) -> GRU4RecNet:
    """Output rows around a few hundred centroids and skewed biases, as a trained model's look."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(300, H)) * 0.5
    W = centroids[rng.integers(0, 300, size=N)] + rng.normal(size=(N, H)) * 0.2
    b = rng.permutation(-np.log1p(np.arange(N)) * 0.3)
    net = GRU4RecNet(N, GRU4RecParams(layers=(H,), seed=seed))
    with torch.no_grad():
        net.Wy.weight.copy_(torch.from_numpy(W.astype(np.float32)))
        net.By.weight.copy_(torch.from_numpy(b.astype(np.float32)).reshape(-1, 1))
    return net


def _events(n_users: int, per_user: int, seed: int, prefix: str) -> list[Ev]:
    rng = np.random.default_rng(seed)
    t0 = int(time.time() * 1000) - 3_600_000
    return [Ev(f"{prefix}{u}", f"i{int(rng.integers(0, N))}", t0 + 1000 * j + u)
            for j in range(per_user) for u in range(n_users)]


def _check_answers(reader: TopicReader, events: list[Ev], version: int, retired: set[int]) -> None:
    want = {(e.user, e.ts) for e in events}
    seen = reader.poll_until(lambda c: want <= {(r["user_id"], r["event_ts"]) for r in c.recommendations()
                                                 if r["model_version"] == version},
                             300, f"an answer from model version {version} to each of {len(want)} events")
    answers = [r for r in seen.recommendations() if (r["user_id"], r["event_ts"]) in want]
    for r in answers:
        rows = [int(item["item_id"][1:]) for item in r["items"]]
        assert len(rows) == K and len(set(rows)) == K, r
        if r["model_version"] == version:
            assert not set(rows) & retired, f"a retired item recommended: {r}"
        scores = [item["score"] for item in r["items"]]
        assert scores == sorted(scores, reverse=True), r


def test_a_worker_serves_a_large_catalogue_from_its_index_and_swaps_in_a_fine_tuned_one(kafka, tmp_path: Path
                                                                                         ) -> None:
    settings = kafka.settings(partitions=2)
    ensure_topics(settings)
    vocab = Vocabulary(f"i{r}" for r in range(N))
    params = GRU4RecParams(layers=(H,), seed=1)
    net = _structured_net(seed=1)
    path = save_checkpoint(tmp_path / "v1.gfc", net, vocab, params, np.linspace(N, 1, N),
                           {"version": 1, "retired_rows": sorted(RETIRED_V1)})
    reader = TopicReader(settings, settings.topic("recommendations"))
    worker = WorkerProc(kafka, settings, path, tmp_path, GRUFLOW_RETRIEVAL="approximate", GRUFLOW_RETRIEVAL_NPROBE="8")
    # ready once the index is built: ~10 s on a quiet machine, minutes on a crowded one
    try:
        worker.start(timeout=600)
        assert worker.metric("gruflow_scorer_info", path="approximate") == 1.0, worker.log_tail()
        first = _events(200, 3, seed=2, prefix="a")
        produce(settings, first)
        _check_answers(reader, first, 1, RETIRED_V1)
        assert worker.wait_metric("gruflow_topk_rows_total", lambda v: v > 0, path="approximate")

        # a fine-tune round: some output rows moved, more items retired; published like the trainer does
        with torch.no_grad():
            moved = torch.arange(3, N, 211)
            net.Wy.weight[moved] += 0.3
            net.By.weight[moved] += 0.5
        ckpt = load_checkpoint(path)
        data = checkpoint_to_bytes(net, vocab, params, ckpt.popularity,
                                   {"version": 2, "retired_rows": sorted(RETIRED_V2)})
        model_sync.publish_version(settings, data, 2, 1)
        assert worker.wait_metric("gruflow_model_version", lambda v: v == 2.0, timeout=300), worker.log_tail()
        assert "retrieval index for model version 2" in worker.log_tail(200)
        assert worker.metric("gruflow_scorer_info", path="approximate") == 1.0
        second = _events(200, 3, seed=3, prefix="b")
        produce(settings, second)
        _check_answers(reader, second, 2, RETIRED_V2)
    finally:
        worker.__exit__(None, None, None)  # stops it, and kills it if it does not stop
        reader.close()
