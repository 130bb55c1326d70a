"""Progress output that suits where it goes: a bar on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns; in a log file, a CI transcript or a container's output
each redraw becomes a line of its own, thousands per run. Without a terminal, :func:`progress` prints
one plain line per ``interval_s`` instead; the caller reports the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class PlainProgress:
    """The tqdm subset gruflow uses (``update``, ``close``), as a line every ``interval_s`` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, stream: TextIO, interval_s: float) -> None:
        self.total, self.desc, self.unit, self.stream, self.interval_s = total, desc, unit, stream, interval_s
        self.n = 0
        self._started = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._line(now)

    def close(self) -> None:
        pass

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self._started, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        print(f"{self.desc}: {self.n}{of} {self.unit} ({rate:.0f} {self.unit}/s)", file=self.stream, flush=True)


def progress(total: int | None, desc: str, unit: str = "ev", enabled: bool = True, stream: TextIO | None = None,
             interval_s: float = 10.0) -> Any:
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`PlainProgress`;
    a disabled tqdm when ``enabled`` is false."""
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stderr
    if enabled and not stream.isatty():
        return PlainProgress(total, desc, unit, stream, interval_s)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=stream, leave=False,
                mininterval=0.5, smoothing=0.1)
