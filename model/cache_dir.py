"""Where gruflow keeps what it downloads or builds once per machine (broker jars, compiled helpers).

It lives with the model because the compiled top-K kernel is cached there too, and ``model`` must not import
``stream``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/gruflow``, else ``~/.cache/gruflow``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gruflow"
