"""The compiled top-K kernel (``scoring_native.c``): built once per machine and source with the system C
compiler, cached, and loaded with ctypes (which releases the GIL during each call, so the scoring
threads run it in parallel).

Optional by design: without a C compiler, or on a CPU without AVX-512 VNNI, ``kernel()`` returns None
(the reason logged once) and ``stream.scoring`` keeps its torch path, which gives the same answers.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("scoring_native.c")
_P = ctypes.c_void_p
_I = ctypes.c_int
_D = ctypes.c_double
_ARGTYPES = [_P, _P, _I, _I,  # codes, init, nblocks, kw4
             _P, _P, _I, _I, _I,  # W, b, n, h, n_coarse
             _D, _D, _D,  # w_norm, e_norm, fp_slack
             _P, _I, _I, _I, _I,  # x, m, k, max_candidates, block_cap
             _P, _P, _P]  # items, values, ok

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # empty until the first kernel() call


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gruflow" / "native"


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot run here (built on the first call)."""
    with _lock:
        if not _loaded:
            try:
                _loaded.append(_build_and_load())
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                log.warning("native top-K kernel unavailable (%s); scoring uses torch only", exc)
                _loaded.append(None)
        return _loaded[0]


def _build_and_load() -> ctypes.CDLL | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"written for x86-64 AVX-512 VNNI, this is {platform.machine()}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) found")
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    digest = hashlib.sha256(source + version + platform.platform().encode()).hexdigest()[:16]
    target = cache_dir() / f"scoring_native-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run([compiler, "-O3", "-fPIC", "-shared", "-o", tmp, str(SOURCE), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)  # atomic: concurrent builders each publish a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("built the native top-K kernel: %s", target)
    lib = ctypes.CDLL(str(target))
    lib.gf_supported.restype = _I
    if not lib.gf_supported():
        raise RuntimeError("this CPU lacks AVX-512 VNNI")
    lib.gf_topk.restype = _I
    lib.gf_topk.argtypes = _ARGTYPES
    return lib
