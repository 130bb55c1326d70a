"""`gruflow experiment online --plot`: slice-by-slice hit rates from the worker's cumulative counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.lab.experiment import plot_hit_rates, windowed_hit_rate

CURVE = [{"events": 100, "gru": (80.0, 40.0), "popularity": (80.0, 8.0)},
         {"events": 200, "gru": (80.0, 40.0), "popularity": (80.0, 8.0)},  # nothing scored in this slice
         {"events": 300, "gru": (180.0, 100.0), "popularity": (180.0, 18.0)}]


def test_windowed_hit_rate_is_the_hit_rate_of_each_slice() -> None:
    assert windowed_hit_rate(CURVE, "gru") == ([100, 300], [0.5, 0.6])
    assert windowed_hit_rate(CURVE, "popularity") == ([100, 300], [0.1, 0.1])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = {"curve": CURVE, "gru": {"hr": {"20": 0.55}}, "popularity": {"hr": {"20": 0.1}}}
    out = tmp_path / "hr.png"
    plot_hit_rates(run, run, 20, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
