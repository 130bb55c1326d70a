"""The compiled helpers are built when the package is built, not when a worker first needs them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from model import native
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_a_built_wheel_carries_the_compiled_library(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel, = tmp_path.glob("gruflow-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), "a wheel with a compiled library is platform-specific"
    names = zipfile.ZipFile(wheel).namelist()
    assert f"model/{native.prebuilt_path().name}" in names  # the name model.native looks for first
    assert "model/native.c" in names
