"""``gruflow tune``: params files, the validation carve, the search on a small budget, and its wiring
into ``gruflow train --params-file``."""

from __future__ import annotations

import json
import time

import pytest

from model.params import GRU4RecParams, ParamsError, read_params_file, write_params_file
from stream.cli import main


@pytest.fixture(scope="module")
def split_files(tmp_path_factory):
    from model.data import split_latest_sessions
    from model.synthetic import generate

    folder = tmp_path_factory.mktemp("tune")
    train, test = split_latest_sessions(generate(300, 120, seed=5), 0.2)
    paths = []
    for name, df in (("train.tsv", train), ("test.tsv", test)):
        p = folder / name
        df.to_csv(p, sep="\t", index=False)
        paths.append(str(p))
    return paths


def test_params_file_round_trips(tmp_path) -> None:
    params = GRU4RecParams(loss="cross-entropy", layers=(96, 64), batch_size=80, learning_rate=0.085, momentum=0.15,
                           constrained_embedding=False, n_sample=0, sample_alpha=0.3, logq=1.0, elu_param=0.0,
                           dropout_p_embed=0.05, dropout_p_hidden=0.35, n_epochs=7, event_types=False, seed=9)
    path = tmp_path / "p.json"
    write_params_file(str(path), params, {"note": "where they came from"})
    assert read_params_file(str(path)) == params
    assert json.loads(path.read_text())["about"] == {"note": "where they came from"}


@pytest.mark.parametrize("params, message", [
    ({"leaning_rate": 0.1}, "unknown parameter 'leaning_rate'"),
    ({"layers": 100}, "layers=100: expected a tuple"),
    ({"constrained_embedding": "yes"}, "expected a bool"),
    ({"batch_size": 32.5}, "expected a int"),
])
def test_params_file_refuses_unknown_names_and_wrong_types(tmp_path, params, message) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"kind": "gruflow-params", "version": 1, "params": params}))
    with pytest.raises(ParamsError, match=message):
        read_params_file(str(path))


def test_validation_is_the_latest_sessions_of_the_training_data_only() -> None:
    from model.synthetic import generate
    from model.tune import carve_validation

    train = generate(400, 150, seed=2)
    fit_part, valid = carve_validation(train, 0.1)
    assert not valid.empty and not fit_part.empty
    assert set(valid["SessionId"]).isdisjoint(fit_part["SessionId"])
    assert set(valid["SessionId"]) <= set(train["SessionId"])
    assert set(valid["ItemId"]) <= set(fit_part["ItemId"])  # validation scores only items the trial can know
    ends = lambda df: df.groupby("SessionId")["Time"].max()  # noqa: E731
    assert ends(fit_part).max() <= ends(train[train["SessionId"].isin(valid["SessionId"])]).min()


def test_tune_reads_only_the_training_file(split_files, tmp_path, monkeypatch, capsys) -> None:
    import model.data

    train, test = split_files
    loaded: list[str] = []
    real = model.data.load_events
    monkeypatch.setattr(model.data, "load_events", lambda path, fmt: loaded.append(str(path)) or real(path, fmt))
    out = tmp_path / "p.json"
    assert main(["tune", train, "--format", "session-rec", "--budget-minutes", "1", "--trials", "2",
                 "--max-layers", "64", "--max-epochs", "1", "--threads", "1", "--out", str(out)]) == 0
    assert loaded == [train] and test not in loaded and out.exists()


def test_tune_in_one_minute_writes_a_file_train_accepts(split_files, tmp_path, capsys) -> None:
    train, test = split_files
    out, table, ckpt = tmp_path / "p.json", tmp_path / "valid.md", tmp_path / "m.ckpt"
    started = time.monotonic()
    assert main(["tune", train, "--format", "session-rec", "--budget-minutes", "1", "--max-layers", "96",
                 "--max-epochs", "2", "--threads", "1", "--out", str(out), "--table", str(table), "--json"]) == 0
    took = time.monotonic() - started
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    # the budget ends the search: no trial starts after it, a running one stops at its next epoch (the
    # margin is one epoch and an evaluation of a small trial, generous for a loaded machine)
    assert took < 60 + 120, took
    assert summary["seconds"] >= 60
    assert summary["trials"] >= 2 and summary["complete"] >= 1
    assert summary["official"]["state"] == "complete"  # the official configuration is trial 0
    assert summary["best"]["mrr"] >= summary["official"]["mrr"]
    progress = [line for line in captured.err.splitlines() if line.startswith("trial ")]
    assert len(progress) == summary["trials"] and "best MRR@20" in progress[-1]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + summary["trials"] and f"| {summary['best_trial']}* |" in table.read_text()

    tuned = read_params_file(str(out))
    assert tuned.to_dict() == summary["params"]
    assert main(["train", train, "--format", "session-rec", "--params-file", str(out), "--params", "seed=3",
                 "--out", str(ckpt), "--test", test, "--no-progress", "--json", "--threads", "1"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["params"] == {**tuned.to_dict(), "seed": 3}
    assert trained["metrics"]["n_events"] > 0


def test_tune_errors_are_one_line(split_files, tmp_path, capsys) -> None:
    train, _ = split_files
    out = tmp_path / "p.json"
    assert main(["tune", train, "--format", "session-rec", "--budget-minutes", "0", "--out", str(out)]) == 2
    assert "gruflow: error: the budget must be positive" in capsys.readouterr().err
    tiny = tmp_path / "tiny.tsv"
    tiny.write_text("SessionId\tItemId\tTime\n1\ta\t1\n1\tb\t2\n")
    assert main(["tune", str(tiny), "--format", "session-rec", "--budget-minutes", "1", "--out", str(out)]) == 2
    assert "too small to hold out" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["train", train, "--format", "session-rec", "--params-file", str(bad), "--out", str(out)]) == 2
    assert "not a params file" in capsys.readouterr().err
    assert not out.exists()
