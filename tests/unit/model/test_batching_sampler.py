"""Session-parallel mini-batches and the popularity sampler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from model.batching import index_sessions, session_parallel
from model.negative_sampling import NegativeSampler


def _table(lengths: list[int], starts: list[float] | None = None) -> pd.DataFrame:
    rows = []
    item = 0
    for s, n in enumerate(lengths):
        t0 = starts[s] if starts else float(s)
        for k in range(n):
            rows.append((s, str(item), t0 + k * 0.001, 1))
            item += 1
    return pd.DataFrame(rows, columns=["SessionId", "ItemId", "Time", "EventType"])


def _replay(lengths, batch_size, starts=None, min_active=1):
    df = _table(lengths, starts)
    index = index_sessions(df, np.arange(len(df), dtype=np.int64))
    session_of = np.repeat(np.arange(len(lengths)), lengths)
    return index, session_of, list(session_parallel(index, batch_size, min_active))


def test_every_pair_once_and_within_one_session() -> None:
    lengths = [3, 2, 5, 2, 4, 1, 3, 2]
    index, session_of, chunks = _replay(lengths, 3)
    pairs = []
    for ch in chunks:
        pos = ch.input_positions()
        for step in pos:
            for p in step:
                assert session_of[p] == session_of[p + 1]
                pairs.append(int(p))
    expected = [p for p in range(index.n_events - 1) if session_of[p] == session_of[p + 1]]
    assert sorted(pairs) == expected


def test_finished_marks_exactly_the_slots_whose_session_ended() -> None:
    lengths = [3, 2, 5, 2, 4, 3, 2]
    index, session_of, chunks = _replay(lengths, 3)
    slots = None  # session currently in each slot, tracked from the positions
    for ch in chunks:
        cur = session_of[ch.start]
        if slots is not None:
            # the slots kept from the previous chunk: a new session exactly where it was marked finished
            changed = cur != slots[prev_keep]
            assert np.array_equal(changed, prev_finished[prev_keep])
        last = ch.start + ch.n_steps  # position of each slot's last input after this chunk
        ended = (last + 1 >= index.offsets[session_of[last] + 1])
        assert np.array_equal(ch.finished, ended)
        slots, prev_finished, prev_keep = cur, ch.finished, ch.keep


def test_sessions_enter_in_start_time_order_and_batch_shrinks() -> None:
    lengths = [2, 2, 2, 2]
    starts = [30.0, 10.0, 20.0, 0.0]  # session ids 0..3, start order 3, 1, 2, 0
    index, session_of, chunks = _replay(lengths, 2, starts)
    first = [list(session_of[ch.start]) for ch in chunks]
    assert first[0] == [3, 1]
    assert first[1] == [2, 0]
    assert [len(ch.start) for ch in chunks] == [2, 2]
    assert not chunks[-1].keep.any()


def test_stops_below_min_active_like_the_reference_without_samples() -> None:
    index, _, chunks = _replay([5, 2], 2, min_active=2)
    # after the first chunk only one session remains: with min_active=2 iteration ends
    assert len(chunks) == 1


def test_sampler_frequencies_follow_popularity_power_alpha() -> None:
    counts = np.array([1.0, 4.0, 9.0, 16.0, 0.0])
    gen = torch.Generator().manual_seed(3)
    sampler = NegativeSampler(counts, n_sample=1000, alpha=0.5, cache_size=50_000, generator=gen)
    draws = torch.cat([sampler.next() for _ in range(200)]).numpy()
    freq = np.bincount(draws, minlength=5) / draws.size
    expected = np.array([1, 2, 3, 4, 0]) / 10.0
    assert np.abs(freq - expected).max() < 0.01
    assert freq[4] == 0.0


def test_sampler_alpha_zero_is_uniform_over_seen_items() -> None:
    counts = np.array([1.0, 100.0, 10_000.0])
    sampler = NegativeSampler(counts, 3000, 0.0, 30_000, torch.Generator().manual_seed(1))
    draws = torch.cat([sampler.next() for _ in range(20)]).numpy()
    freq = np.bincount(draws, minlength=3) / draws.size
    assert np.abs(freq - 1 / 3).max() < 0.02


def test_fit_draws_negatives_from_a_stream_independent_of_the_weight_init(monkeypatch) -> None:
    # the network's init and fit() share params.seed; fit must not replay the init's uniforms as its
    # negatives (and dropout masks), or the first ~1M samples would be a function of the initial weights
    from model.network import GRU4RecNet
    from model.params import GRU4RecParams
    from model.synthetic import generate
    from model.train import build_vocabulary, fit

    df = generate(n_sessions=200, n_items=60, seed=2)
    vocab = build_vocabulary(df)
    params = GRU4RecParams(layers=(8,), n_sample=256, sample_alpha=0.0, dropout_p_hidden=0.0, n_epochs=1, seed=9,
                           loss="cross-entropy")
    first: list[torch.Tensor] = []
    original = NegativeSampler._refill

    def recording_refill(self) -> None:
        original(self)
        if not first:
            first.append(self._cache[0].clone())

    monkeypatch.setattr(NegativeSampler, "_refill", recording_refill)
    fit(GRU4RecNet(len(vocab), params), df, params, item_rows=vocab, progress=False)
    counts = np.ones(len(vocab))
    init_stream = NegativeSampler(counts, 256, 0.0, 256 * 4, torch.Generator().manual_seed(params.seed))
    replay = original.__get__(init_stream)
    replay()
    agree = float((init_stream._cache[0] == first[0]).double().mean())
    assert agree < 0.1, f"{agree:.0%} of fit's first negatives equal the weight-init stream's draws"
