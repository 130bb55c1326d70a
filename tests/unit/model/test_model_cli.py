"""The model commands end to end on small synthetic data, through the real ``gruflow`` parser."""

from __future__ import annotations

import json

import pytest

from stream.cli import main


def _json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture()
def split_files(tmp_path):
    from model.data import split_by_time
    from model.synthetic import generate

    train, test = split_by_time(generate(600, 150, seed=3), days=3.0)
    paths = []
    for name, df in (("train.tsv", train), ("test.tsv", test)):
        p = tmp_path / name
        df.to_csv(p, sep="\t", index=False)
        paths.append(str(p))
    return paths


def test_train_evaluate_baseline_bench(tmp_path, split_files, capsys) -> None:
    train, test = split_files
    ckpt = tmp_path / "m.ckpt"
    params = "layers=16,n_epochs=1,n_sample=64,batch_size=16"
    assert main(["train", train, "--format", "session-rec", "--params", params, "--out", str(ckpt),
                 "--threads", "1", "--no-progress", "--json"]) == 0
    out = _json(capsys)
    assert out["params"]["layers"] == [16] and out["training"]["events"] > 0 and ckpt.exists()

    assert main(["evaluate", str(ckpt), test, "--format", "session-rec", "--cutoffs", "1,5,10,20",
                 "--tie", "conservative", "--json", "--threads", "1"]) == 0
    res = _json(capsys)
    assert set(res["recall"]) == {"1", "5", "10", "20"} and res["tie"] == "conservative" and res["n_events"] > 0

    for name in ("popularity", "cooccurrence"):
        assert main(["baseline", name, train, test, "--format", "session-rec", "--json"]) == 0
        base = _json(capsys)
        assert base["n_events"] == res["n_events"] and set(base["mrr"]) == {"1", "5", "10", "20"}

    assert main(["bench", "train", train, "--format", "session-rec", "--params", params, "--json",
                 "--threads", "1"]) == 0
    bench = _json(capsys)
    assert bench["events_per_s"] > 0 and bench["peak_rss_bytes"] > 0


def test_bad_params_give_a_clear_error(tmp_path, split_files, capsys) -> None:
    assert main(["train", split_files[0], "--params", "layerz=3", "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "gruflow: error: unknown parameter 'layerz'" in capsys.readouterr().err
