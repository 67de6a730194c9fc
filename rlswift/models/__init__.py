"""Models: the tiny local builder, SmolLM2 from its package, policy/reference loading and engine weight export."""

from __future__ import annotations

import os
from pathlib import Path

# tiny and smollm2 import cache_dir from here inside their functions, so importing them first is safe.
from rlswift.models.policy import (
    engine_weights,
    is_peft_model,
    load_policy,
    load_policy_state,
    load_tokenizer,
    make_reference,
    policy_state_dict,
    reference_logprobs_context,
)
from rlswift.models.smollm2 import smollm2_path
from rlswift.models.tiny import build_tiny_model, tiny_model_path


def cache_dir() -> Path:
    """Where built or converted models live: ``$RLSWIFT_CACHE`` or ``~/.cache/rlswift``."""
    return Path(os.environ.get("RLSWIFT_CACHE") or Path.home() / ".cache" / "rlswift")


# Built-in model names -> builders returning a local folder (nothing is downloaded).
BUILTIN_MODELS = {"tiny": tiny_model_path, "smollm2-135m": smollm2_path}


def resolve_model(name_or_path: str | Path) -> Path:
    """A local model folder for a built-in name ("tiny", "smollm2-135m") or a folder holding config.json."""
    key = str(name_or_path)
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]()
    folder = Path(key).expanduser()
    if (folder / "config.json").is_file():
        return folder
    problem = "has no config.json" if folder.is_dir() else "does not exist"
    raise FileNotFoundError(
        f"model {key!r}: the folder {folder} {problem}. Use a built-in name ({', '.join(sorted(BUILTIN_MODELS))}) "
        "or a local folder written by save_pretrained (no hub downloads here)."
    )


__all__ = [
    "cache_dir",
    "build_tiny_model",
    "tiny_model_path",
    "smollm2_path",
    "resolve_model",
    "BUILTIN_MODELS",
    "load_policy",
    "load_tokenizer",
    "policy_state_dict",
    "load_policy_state",
    "engine_weights",
    "is_peft_model",
    "reference_logprobs_context",
    "make_reference",
]
