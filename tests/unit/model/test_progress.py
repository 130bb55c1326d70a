"""Progress output: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io

from model.progress import PlainProgress, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_it_prints_plain_lines() -> None:
    out = io.StringIO()
    bar = progress(100, "replay", stream=out, interval_s=0.0)
    assert isinstance(bar, PlainProgress)
    bar.update(40)
    bar.update(60)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["replay: 40/100 ev", "replay: 100/100 ev"]
    assert "\r" not in out.getvalue()


def test_lines_come_once_per_interval() -> None:
    out = io.StringIO()
    bar = progress(None, "train", stream=out, interval_s=3600.0)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert out.getvalue() == ""


def test_on_a_terminal_it_draws_a_bar() -> None:
    out = _Terminal()
    bar = progress(10, "epoch 1/1", stream=out)
    assert not isinstance(bar, PlainProgress)
    bar.update(10)
    bar.close()
    assert "epoch 1/1" in out.getvalue()


def test_disabled_prints_nothing() -> None:
    out = io.StringIO()
    bar = progress(10, "x", enabled=False, stream=out)
    bar.update(10)
    bar.close()
    assert out.getvalue() == ""
