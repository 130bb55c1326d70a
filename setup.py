"""Builds gruflow's compiled helpers (model/native.c) when the package is built or installed, so that a
worker never compiles at run time: ``pip install .`` puts ``native-<source digest>.so`` next to the installed
``native.c``; ``pip install -e .`` puts it next to the source (where ``model.native`` looks first). Without a C
compiler the install still succeeds: ``model.native`` then builds on first use, or gruflow scores with torch.
Everything else is declared in pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithNative(build_py):
    def run(self) -> None:
        super().run()
        sys.path.insert(0, str(ROOT))
        try:
            from model import native
        finally:
            sys.path.remove(str(ROOT))
        name = native.prebuilt_path().name
        target = ROOT / "model" / name if self.editable_mode else Path(self.build_lib) / "model" / name
        try:
            native.build(target)
        except Exception as exc:  # noqa: BLE001 - optional: the package works without it
            self.warn(f"gruflow's compiled helpers were not built ({exc}); they will be built on first use "
                      "where a C compiler is present, else gruflow scores with torch")
        else:
            self.announce(f"built {target}", level=2)


class BinaryDistribution(Distribution):
    """Wheels carry the compiled library: tag them for the platform, not as pure Python."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithNative}, distclass=BinaryDistribution)
