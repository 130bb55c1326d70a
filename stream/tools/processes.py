"""Child gruflow processes (worker, trainer) started by the demo and the benchmarks."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

#: the directory that holds the ``stream`` package: child processes start there so ``python -m stream...`` resolves
#: to this copy of gruflow.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def stop_process(proc: subprocess.Popen[bytes] | None, grace_s: float = 30.0) -> None:
    """SIGTERM (a clean shutdown: commits, broker leave), then SIGKILL if it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
