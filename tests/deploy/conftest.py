"""Fixtures of the offline deploy checks; the helpers live in ``deploykit`` (a unique module name: every test
folder has a ``conftest``, so ``from conftest import ...`` would depend on collection order)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploykit import base_objects, overlay_objects, promtool, rendered  # noqa: E402,F401  (fixtures)
