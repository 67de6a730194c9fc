"""Models: the tiny local builder, SmolLM2 from its package, policy/reference loading and engine weight export."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where built or converted models live: ``$RLSWIFT_CACHE`` or ``~/.cache/rlswift``."""
    return Path(os.environ.get("RLSWIFT_CACHE") or Path.home() / ".cache" / "rlswift")


from rlswift.models.tiny import build_tiny_model, tiny_model_path  # noqa: E402

__all__ = ["cache_dir", "build_tiny_model", "tiny_model_path"]
