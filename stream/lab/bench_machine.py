"""What the bench reads of the machine and its processes: the host's steal time (/proc/stat), the
processor's name and SIMD features (/proc/cpuinfo), a process's peak RSS; and the bench's log line."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def steal_s() -> float | None:
    """CPU time the hypervisor gave to others while this VM wanted it (all CPUs, seconds since boot; Linux
    /proc/stat). On a shared 2-vCPU VM it came to 0.8 of a CPU in some phases: then every latency
    figure measures the host, so each run reports it."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The processor's name (Linux): a run's figures compare only with runs on the same kind of machine (the
    computation alone ran at 9-26k events/s on the machine of gruflow's first sessions, 53-74k on a later one)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return None


CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimddp")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> dict[str, bool] | None:
    """The SIMD features that decide which top-K path is fastest (Linux; x86 "flags", Arm "Features" of the
    first processor): the int8 paths need VNNI-class instructions to beat float32."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() in ("flags", "Features"):
                present = set(value.split())
                return {flag: flag in present for flag in CPU_FLAGS}
    except OSError:
        pass
    return None


class StealMeter:
    """CPUs stolen per second of wall time between ``start`` and ``stop`` (None where not measurable)."""

    def start(self) -> "StealMeter":
        self.t0, self.s0 = time.monotonic(), steal_s()
        return self

    def stop(self) -> float | None:
        s1, dt = steal_s(), time.monotonic() - self.t0
        if self.s0 is None or s1 is None or dt <= 0:
            return None
        return round((s1 - self.s0) / dt, 3)
