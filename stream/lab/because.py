"""``gruflow experiment because``: does the "because" item really weigh most in a recommendation's score?

On held-out sessions (trained on the train file, evaluated on the test file), for each session cut
after a random position with at least two distinct known items in the window: step a fresh state
through the prefix, take the top-k, and name each recommendation's "because" item
(``model.attribution``, over the last ``history`` known items, as the worker does). Then replay the
prefix twice more without an item of the window (every occurrence of it): once without the "because"
item, once without another item of the window drawn at random. Counted per recommendation:

- ``because_lowers``: removing the "because" item lowers the recommendation's score;
- ``random_lowers``: removing the random other item lowers it;
- ``because_beats_random``: removing the "because" item lowers it more than removing the random one.

Pure and offline (no Kafka): the same ``Recommender.step`` and attribution the worker runs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from model.attribution import attribution_for
from model.events import EventType
from model.recommender import Recommender


def _final_hidden(model: Recommender, rows: list[int]) -> np.ndarray | None:
    if not rows:
        return None
    H = model.zero_state(1)
    types = np.full(1, int(EventType.CLICK), dtype=np.int64)  # session-rec data: clicks, as the loaders map them
    for r in rows:
        H = model.step(H, np.asarray([r], dtype=np.int64), types)
    return H[0]


def _scores(model: Recommender, hidden: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    if hidden is None:
        return np.full(rows.shape[0], -np.inf)
    net = model.net
    top = torch.from_numpy(np.ascontiguousarray(hidden[-net.layers[-1]:], dtype=np.float32))[None, :]
    with torch.inference_mode():
        return net.score_items(top, torch.from_numpy(rows))[0].numpy()


def window_of(rows: list[int], history: int) -> list[int]:
    """The worker's recent-item window after ``rows``: distinct, last occurrence order, newest ``history``."""
    out: list[int] = []
    for r in rows:
        out = [x for x in out if x != r] + [r]
    return out[-history:]


def check_session(model: Recommender, rows: list[int], k: int, history: int, rng: np.random.Generator
                  ) -> list[tuple[bool, bool, bool]]:
    """(because_lowers, random_lowers, because_beats_random) for each top-k recommendation of a prefix."""
    window = window_of(rows, history)
    if len(window) < 2:
        return []
    hidden = _final_hidden(model, rows)
    rec_rows, _ = model.top_k(hidden[None, :], k)
    because = attribution_for(model.net).because(rec_rows, np.asarray([window], dtype=np.int64), 1)[0, :, 0]
    base = _scores(model, hidden, rec_rows[0])
    without = {item: _scores(model, _final_hidden(model, [r for r in rows if r != item]), rec_rows[0])
               for item in window}
    out = []
    for j, b in enumerate(because.tolist()):
        if b < 0:
            continue
        other = int(rng.choice([w for w in window if w != b]))
        drop_b, drop_r = base[j] - without[b][j], base[j] - without[other][j]
        out.append((bool(drop_b > 0), bool(drop_r > 0), bool(drop_b > drop_r)))
    return out


def run_because_check(model: Recommender, sessions: list[list[int]], k: int, history: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows_out: list[tuple[bool, bool, bool]] = []
    used = 0
    t0 = time.perf_counter()
    for rows in sessions:
        known = [r for r in rows if r >= 0]
        if len(set(known)) < 2:
            continue
        cut = int(rng.integers(2, len(known) + 1))
        got = check_session(model, known[:cut], k, history, rng)
        used += bool(got)
        rows_out.extend(got)
    a = np.asarray(rows_out, dtype=bool).reshape(-1, 3)
    n = a.shape[0]
    return {"sessions": used, "recommendations": n, "k": k, "history": history,
            "because_lowers": round(float(a[:, 0].mean()), 4) if n else None,
            "random_lowers": round(float(a[:, 1].mean()), 4) if n else None,
            "because_beats_random": round(float(a[:, 2].mean()), 4) if n else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def test_sessions(model: Recommender, test: Any, limit: int) -> list[list[int]]:
    """Item rows of the first ``limit`` test sessions (time order within each), -1 for unknown items."""
    out = []
    for _, g in test.sort_values(["SessionId", "Time"], kind="stable").groupby("SessionId", sort=False):
        out.append(model.vocab.rows([str(i) for i in g["ItemId"]]).tolist())
        if len(out) >= limit:
            break
    return out


def run(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from model.checkpoint import load_checkpoint
    from model.data import load_events
    from model.params import GRU4RecParams
    from model.train import train_model

    torch.set_num_threads(1)
    data = Path(args.data)
    train_path = next(iter(sorted(data.glob("*_train_full.txt"))), None) if data.is_dir() else data
    test_path = next(iter(sorted(data.glob("*_test.txt"))), None) if data.is_dir() else Path(args.test or "")
    if train_path is None or test_path is None or not test_path.is_file():
        raise FileNotFoundError(f"{data}: need *_train_full.txt and *_test.txt (session-rec), or a file and --test")
    test = load_events(test_path, args.format)
    if args.model:
        model = load_checkpoint(args.model).recommender(1)
        trained = args.model
    else:
        params = GRU4RecParams.parse(args.params or "")
        net, vocab, pop = train_model(load_events(train_path, args.format), params, progress=False)
        model = Recommender(net, vocab, 1, pop)
        trained = f"{train_path.name}, {params.n_epochs} epochs"
    result = run_because_check(model, test_sessions(model, test, args.sessions), args.k, args.history, args.seed)
    result.update({"model": trained, "test": test_path.name})
    return result
