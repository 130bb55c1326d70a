"""The online experiment reads the worker's prequential counters at the worker's own list length."""

from __future__ import annotations

import pytest

from stream.lab.experiment import prequential


def _samples(k: int, events: float, hits: float, rr: float) -> dict:
    def key(name: str, **labels: str) -> tuple:
        return name, tuple(sorted(labels.items()))

    return {
        key("gruflow_prequential_events_total", model="gru", version="3"): events,
        key("gruflow_prequential_hits_total", model="gru", version="3", k=str(k)): hits,
        key("gruflow_prequential_reciprocal_rank_total", model="gru", version="3", k=str(k)): rr,
        key("gruflow_prequential_events_total", model="popularity", version="3"): events,
        key("gruflow_prequential_hits_total", model="popularity", version="3", k=str(k)): 1.0,
    }


@pytest.mark.parametrize("k", [5, 20, 50])
def test_prequential_uses_the_workers_k(k: int) -> None:
    out = prequential(_samples(k, events=40.0, hits=10.0, rr=4.0), "gru", k)
    assert out == {"hr": {str(k): 0.25}, "mrr": {str(k): 0.1}, "n": 40}


def test_prequential_of_another_k_finds_no_hits() -> None:
    # counters labelled k=10 say nothing about k=20: reading the wrong k is what reported 0 hits before
    out = prequential(_samples(10, events=40.0, hits=10.0, rr=4.0), "gru", 20)
    assert out["hr"] == {"20": 0.0} and out["n"] == 40
