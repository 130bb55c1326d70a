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


def test_the_warm_up_model_takes_a_tuned_params_file_and_params_on_top(tmp_path, monkeypatch) -> None:
    """`gruflow experiment online --params-file F --params ...`: the warm-up model is trained with F's
    parameters (not the official configuration), single values overridden by --params."""
    import argparse

    import model.train
    from model.params import GRU4RecParams, write_params_file
    from model.synthetic import generate
    from stream.lab import experiment

    df = generate(n_sessions=300, n_items=60, seed=2)
    df["Time"] = df["Time"] - df["Time"].min() + 1_700_000_000 + 3600 * (df["SessionId"] % 48)  # two days
    monkeypatch.setattr(experiment, "load_data", lambda path, fmt: df)
    seen: list[GRU4RecParams] = []
    real = model.train.train_model

    def train_model(data, params, progress=True):
        seen.append(params)
        return real(data, params, progress=False)

    monkeypatch.setattr(model.train, "train_model", train_model)
    tuned = GRU4RecParams(loss="cross-entropy", layers=(24,), n_epochs=1, batch_size=16, n_sample=0)
    write_params_file(str(tmp_path / "tuned.json"), tuned)
    args = argparse.Namespace(data="x", format="session-rec", warmup_days=1.0, limit=None, plot=None,
                              params="learning_rate=0.07", params_file=str(tmp_path / "tuned.json"))
    experiment.prepare(args)
    assert seen[0].layers == (24,) and seen[0].loss == "cross-entropy" and seen[0].learning_rate == 0.07
