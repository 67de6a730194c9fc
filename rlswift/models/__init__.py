"""Models: the tiny local builder, SmolLM2 from its package, policy/reference loading and engine weight export."""

from __future__ import annotations

from pathlib import Path

from rlswift.errors import MissingError
from rlswift.models.cache import cache_dir
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
    raise MissingError(
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
