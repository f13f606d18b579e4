"""Where cdtool keeps caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$CDTOOL_CACHE`, else `$XDG_CACHE_HOME/cdtool`, else `~/.cache/cdtool`."""
    root = os.environ.get("CDTOOL_CACHE")
    if root:
        path = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        path = (Path(xdg) if xdg else Path.home() / ".cache") / "cdtool"
    path.mkdir(parents=True, exist_ok=True)
    return path
