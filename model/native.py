"""gruflow's compiled helpers (``native.c``): the int8 top-K kernel and the batch JSON encoder, loaded with
ctypes (which releases the GIL during each call: the scoring threads run in parallel, and the event loop
runs while a batch is encoded).

Where the library comes from, first found wins:
1. a library built ahead of time next to the source, ``native-<source digest>.so``: ``pip install`` builds
   it (setup.py; ``-e`` too, next to the source), as does ``python -m model.native --prebuild`` (the
   Docker image, whose runtime stage has no compiler);
2. where the install had no compiler: a build with the system C compiler (``$CC``, else ``cc``) on first
   use, cached per source, compiler and platform under ``$XDG_CACHE_HOME/gruflow/native`` (``~/.cache``
   by default).

Optional by design: without a library ``library()`` returns None (the reason logged once) and the
callers keep their Python paths, which give the same answers; ``topk_kernel()`` also needs a CPU with
AVX-512 VNNI, or AVX2 and FMA for the kernel's AVX2 version (``model.topk`` uses torch elsewhere, and keeps
the kernel only where calibration finds it fastest).
"""

from __future__ import annotations

import argparse
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
from typing import Any, NamedTuple

from model.cache_dir import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
_P = ctypes.c_void_p
_I = ctypes.c_int
_D = ctypes.c_double
_L = ctypes.c_int64
_TOPK_ARGS = [_P, _P, _I, _I,  # codes, init, nblocks, kw4
              _P, _P, _I, _I, _I,  # W, b, n, h, n_coarse
              _D, _D, _D,  # w_norm, e_norm, fp_slack
              _P, _I, _I, _I, _I,  # x, m, k, max_candidates, block_cap
              _P, _P, _P]  # items, values, ok
_ENCODE_ARGS = [_P, _L, _P, _L, _L, _L,  # scores, scores_len, rows, n, k, pad
                _P, _P, _L,  # prefixes, prefix_off, n_prefix
                _P, _P, _P, _L,  # heads, head_off, mid, mid_len
                _P, _P, _L,  # ts, tail, tail_len
                _P, _L, _P]  # out, out_cap, off

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []  # empty until the first library() call


def cache_dir() -> Path:
    return cache_root() / "native"


def prebuilt_path() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return SOURCE.with_name(f"native-{digest}.so")


def library() -> ctypes.CDLL | None:
    """The loaded library, or None where there is none (found or built on the first call)."""
    with _lock:
        if not _loaded:
            try:
                _loaded.append(_load(_find_or_build()))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                log.warning("compiled helpers unavailable (%s); gruflow uses its Python/torch paths", exc)
                _loaded.append(None)
        return _loaded[0]


class TopKKernel(NamedTuple):
    run: Any  # the ctypes function (gf_topk or gf_topk_avx2), arguments as _TOPK_ARGS
    isa: str  # "avx512_vnni" or "avx2"


ISAS = ("avx512_vnni", "avx2")  # the top-K kernel's instruction sets, fastest first


def topk_kernel(isa: str = "auto") -> TopKKernel | None:
    """The top-K kernel for ``isa`` where it can run here, else None. "auto": AVX-512 VNNI where the CPU has
    it, else AVX2 (with FMA); "avx2" also on a CPU that has AVX-512 (to measure what an AVX2 machine gets)."""
    if isa != "auto" and isa not in ISAS:
        raise ValueError(f"unknown instruction set {isa!r} for the top-K kernel: use auto or one of {ISAS}")
    lib = library()
    if lib is None:
        return None
    if isa in ("auto", "avx512_vnni") and lib.gf_supported():
        return TopKKernel(lib.gf_topk, "avx512_vnni")
    if isa in ("auto", "avx2") and lib.gf_supported_avx2():
        return TopKKernel(lib.gf_topk_avx2, "avx2")
    return None


def _find_or_build() -> Path:
    prebuilt = prebuilt_path()
    if prebuilt.is_file():
        return prebuilt
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version + platform.platform().encode()).hexdigest()[:16]
    target = cache_dir() / f"native-{digest}.so"
    if not target.is_file():
        build(target, compiler)
        log.info("built gruflow's compiled helpers: %s", target)
    return target


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    return compiler


def build(target: Path, compiler: str | None = None) -> Path:
    """Compile the kernel into ``target``, published atomically (concurrent builders each write a whole
    file). Generic code for the platform: the AVX-512 functions are chosen at run time (``gf_supported``)."""
    compiler = compiler or _compiler()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, "-O3", "-fPIC", "-shared", "-o", tmp, str(SOURCE), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.gf_supported.restype = _I
    lib.gf_supported.argtypes = []
    lib.gf_supported_avx2.restype = _I
    lib.gf_supported_avx2.argtypes = []
    for kernel in (lib.gf_topk, lib.gf_topk_avx2):
        kernel.restype = _I
        kernel.argtypes = _TOPK_ARGS
    lib.gf_encode.restype = _L
    lib.gf_encode.argtypes = _ENCODE_ARGS
    return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.native", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prebuild", action="store_true",
                        help="compile the library next to its source (for images without a compiler)")
    args = parser.parse_args(argv)
    if args.prebuild:
        print(build(prebuilt_path()))
        return 0
    lib = library()
    print("compiled helpers:", "available" if lib is not None else "unavailable (Python/torch paths)")
    kernel = topk_kernel()
    print("top-K kernel:", f"available ({kernel.isa})" if kernel is not None else "unavailable (torch path)")
    return 0 if lib is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
