"""Where built or converted models live: ``$RLSWIFT_CACHE`` or ``~/.cache/rlswift``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where built or converted models live: ``$RLSWIFT_CACHE`` or ``~/.cache/rlswift``."""
    return Path(os.environ.get("RLSWIFT_CACHE") or Path.home() / ".cache" / "rlswift")
