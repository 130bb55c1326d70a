"""`gruflow config` prints the effective settings with their sources, secrets masked; the worker's and
the trainer's help point to it."""

from __future__ import annotations

import pytest

from stream.cli import main


def test_config_prints_values_sources_and_masks_secrets(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GRUFLOW_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("GRUFLOW_TOP_K", "7")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    lines = {line.split("=", 1)[0]: line for line in out.splitlines() if line.startswith("GRUFLOW_")}
    assert lines["GRUFLOW_SASL_PASSWORD"].startswith("GRUFLOW_SASL_PASSWORD=***  # env: ")
    assert lines["GRUFLOW_TOP_K"].startswith("GRUFLOW_TOP_K=7  # env: recommendations per event")
    assert lines["GRUFLOW_PARTITIONS"].startswith("GRUFLOW_PARTITIONS=8  # default: ")
    assert "## scoring:" in out and "## connection:" in out


def test_config_refuses_an_unknown_setting_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GRUFLOW_TOP_KK", "7")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gruflow: error: ") and "GRUFLOW_TOP_KK" in err


@pytest.mark.parametrize("command", ["worker", "trainer"])
def test_worker_and_trainer_help_point_to_config(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "gruflow config" in capsys.readouterr().out
