"""Preference data (DPO) in TRL's formats, and tokenization that matches TRL 1.16's DPOTrainer token for token.

Formats (TRL's names): standard (strings) or conversational (message lists), each with an explicit "prompt" column
or an implicit prompt (no "prompt": chosen and rejected are whole conversations/texts sharing the prompt as a common
prefix, extracted as `trl.extract_prompt` does). Other columns are kept.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from rlswift.data.arithmetic import arithmetic_rows
from rlswift.data.prompts import ARITHMETIC_DEFAULT_ROWS, _is_messages, _read_source_rows
from rlswift.errors import DataError


class MalformedRowError(DataError):
    """A preference row lacks a field or has one of the wrong type; the message names the row and the field."""


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair into (prompt, chosen, rejected), exactly like `trl.extract_prompt`.

    The prompt is the longest common prefix (of messages, or of characters for strings); for strings a space just
    before the divergence stays with the completions.
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise MalformedRowError("chosen or rejected is empty, so no prompt can be extracted")
    idx = 0
    for idx in range(n):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # TRL: keep the space before the divergence out of the prompt
                idx -= 1
            break
    # Same as TRL when one side is a prefix of the other: the loop ends with idx = n - 1.
    return chosen[:idx], chosen[idx:], rejected[idx:]


def normalize_preference_row(row: Any, index: int) -> dict:
    """A validated row with an explicit prompt: {"prompt", "chosen", "rejected", ...other columns}.

    Raises `MalformedRowError` naming the row index and the missing or wrong field.
    """
    if not isinstance(row, dict):
        raise MalformedRowError(f"preference row {index} is a {type(row).__name__}, not an object")
    for field in ("chosen", "rejected"):
        if field not in row:
            raise MalformedRowError(
                f"preference row {index} has no {field!r} field (it has {sorted(row)}); each row needs 'chosen' and "
                "'rejected' (and optionally 'prompt')"
            )
    chosen, rejected = row["chosen"], row["rejected"]
    conversational = _is_messages(chosen)
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        ok = _is_messages(value) if conversational else isinstance(value, str)
        if not ok:
            if field == "chosen":
                kind = "a string or a non-empty list of {'role', 'content'} messages"
            else:
                kind = "a message list, like 'chosen'" if conversational else "a string, like 'chosen'"
            raise MalformedRowError(
                f"preference row {index}: {field!r} is {type(value).__name__} ({str(value)[:60]!r}); it must be {kind}"
            )
    out = dict(row)
    if "prompt" in row:
        prompt = row["prompt"]
        ok = _is_messages(prompt) if conversational else isinstance(prompt, str)
        if not ok:
            want = "a message list" if conversational else "a string"
            raise MalformedRowError(
                f"preference row {index}: 'prompt' is {type(prompt).__name__} but chosen/rejected are "
                f"{'messages' if conversational else 'strings'}; 'prompt' must be {want} too"
            )
    else:
        try:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        except MalformedRowError as e:
            raise MalformedRowError(f"preference row {index}: {e}") from None
        if not prompt:
            raise MalformedRowError(
                f"preference row {index}: no 'prompt' field and chosen/rejected share no common prefix to use as "
                "the prompt; add a 'prompt' column"
            )
        out.update(prompt=prompt, chosen=chosen, rejected=rejected)
    for field in ("chosen", "rejected"):
        if len(out[field]) == 0:
            raise MalformedRowError(f"preference row {index}: {field!r} is empty after the prompt")
    return out


def arithmetic_preference_rows(n: int, seed: int) -> list[dict]:
    """Built-in preference pairs on the arithmetic task: chosen = the sum, rejected = a plausible wrong sum.

    Conversational with an explicit prompt. The wrong answer is off by one, off by ten, or the sum with its last two
    digits swapped, drawn with a private numpy Generator (deterministic, no global streams).
    """
    rng = np.random.default_rng([seed, 1])  # its own stream, independent of the operands' stream
    rows = []
    for row in arithmetic_rows(n, seed):
        answer = int(row["answer"])
        wrong = _wrong_answer(answer, int(rng.integers(0, 3)), int(rng.integers(0, 2)))
        rows.append(
            {
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": str(answer)}],
                "rejected": [{"role": "assistant", "content": str(wrong)}],
                "answer": row["answer"],
            }
        )
    return rows


def _wrong_answer(answer: int, kind: int, sign: int) -> int:
    step = 1 if sign else -1
    if kind == 2:
        s = str(answer)
        swapped = int(s[:-2] + s[-1] + s[-2]) if len(s) >= 2 else answer
        if swapped != answer:
            return swapped
        kind = 0  # repeated digits (e.g. 66): fall back to off by one
    return answer + step * (1 if kind == 0 else 10)


def load_preference_dataset(
    source: str, skip_malformed: bool = False, *, num_rows: int | None = None, seed: int = 0, split: str = "train"
) -> tuple[list[dict], int]:
    """Rows with explicit prompts from "arithmetic" (built-in) or a local .jsonl/.json/.parquet/datasets folder.

    Returns ``(rows, n_skipped)``. A malformed row raises `MalformedRowError` (row index + field), or, with
    ``skip_malformed``, is dropped and counted. ``num_rows`` keeps the first rows of the source.
    """
    if source == "arithmetic":
        raw = arithmetic_preference_rows(num_rows or ARITHMETIC_DEFAULT_ROWS, seed)
    else:
        raw = _read_source_rows(source, split, num_rows, "preference")
    rows, skipped = [], 0
    for i, row in enumerate(raw):
        try:
            rows.append(normalize_preference_row(row, i))
        except MalformedRowError:
            if not skip_malformed:
                raise
            skipped += 1
    if not rows:
        raise DataError(f"preference data {source!r} has no usable rows ({skipped} malformed skipped)")
    return rows, skipped


def _template_kwargs(row: dict) -> dict:
    # TRL passes the row's tools (JSON string or list) and chat_template_kwargs to every apply_chat_template call.
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools or None, **(row.get("chat_template_kwargs") or {})}


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_preference(
    tokenizer: Any,
    row: dict,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
) -> dict[str, list[int]]:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` for a normalized row, as TRL 1.16's DPOTrainer computes them.

    Conversational: the chat template of prompt (with generation prompt), prompt+chosen and prompt+rejected.
    Standard: EOS appended to chosen/rejected unless present, then plain tokenization of prompt, prompt+chosen,
    prompt+rejected. The completion starts where the three tokenizations diverge (TRL's common-prefix rule).
    TRL 1.16 has no per-part limits; when given here, the prompt keeps its LAST ``max_prompt_length`` tokens and each
    completion its FIRST ``max_completion_length`` tokens. With both None the result equals TRL's token for token.
    """
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if _is_messages(prompt):
        kw = _template_kwargs(row)

        def encode(messages: list[dict], **extra: Any) -> list[int]:
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw, **extra)
            return list(out["input_ids"])

        prompt_ids = encode(prompt, add_generation_prompt=True)
        prompt_chosen_ids = encode(prompt + chosen)
        prompt_rejected_ids = encode(prompt + rejected)
    else:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = list(tokenizer(text=prompt)["input_ids"])
        prompt_chosen_ids = list(tokenizer(text=prompt + chosen)["input_ids"])
        prompt_rejected_ids = list(tokenizer(text=prompt + rejected)["input_ids"])
    prompt_len = min(
        _common_prefix_length(prompt_ids, prompt_chosen_ids), _common_prefix_length(prompt_ids, prompt_rejected_ids)
    )
    out = {
        "prompt_ids": prompt_ids[:prompt_len],
        "chosen_ids": prompt_chosen_ids[prompt_len:],
        "rejected_ids": prompt_rejected_ids[prompt_len:],
    }
    if max_prompt_length is not None:
        out["prompt_ids"] = out["prompt_ids"][-max_prompt_length:] if max_prompt_length > 0 else []
    if max_completion_length is not None:
        out["chosen_ids"] = out["chosen_ids"][:max_completion_length]
        out["rejected_ids"] = out["rejected_ids"][:max_completion_length]
    return out
