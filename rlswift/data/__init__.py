"""Data: prompt datasets (TRL prompt-only formats, the seeded arithmetic task) and preference data (TRL formats)."""

from rlswift.data.arithmetic import DEFAULT_SYSTEM_PROMPT, arithmetic_rows
from rlswift.data.preference import (
    MalformedRowError,
    arithmetic_preference_rows,
    extract_prompt,
    load_preference_dataset,
    normalize_preference_row,
    tokenize_preference,
)
from rlswift.data.prompts import PromptDataset, load_prompt_dataset, read_rows, render_prompt, validate_prompt_row

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "arithmetic_rows",
    "PromptDataset",
    "load_prompt_dataset",
    "read_rows",
    "render_prompt",
    "validate_prompt_row",
    "MalformedRowError",
    "arithmetic_preference_rows",
    "extract_prompt",
    "load_preference_dataset",
    "normalize_preference_row",
    "tokenize_preference",
]
