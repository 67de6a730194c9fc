"""Prompt datasets for online RL (GRPO) in TRL's prompt-only formats, and prompt rendering to token ids.

A row is a dict with "prompt" (a string, or a list of {"role", "content"} messages); every other column is kept and
handed to reward functions as keyword arguments (TRL's convention). A row's stable uid is its index in the source,
so seeds derived from it (rollout.seeds.sample_seed) do not depend on shuffling or batching.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rlswift.data.arithmetic import arithmetic_rows
from rlswift.errors import DataError, MissingError, UnknownNameError

BUILTIN_PROMPT_SOURCES = ("arithmetic",)
ARITHMETIC_DEFAULT_ROWS = 1000
# The arithmetic "test" split draws from its own seed so it does not repeat the training rows' stream.
_SPLIT_SEED_OFFSET = {"train": 0, "test": 1_000_003, "validation": 2_000_003}


class PromptDataset:
    """An in-memory list of prompt rows with stable uids (the row's index in the source)."""

    def __init__(self, rows: Sequence[dict], source: str = "<memory>") -> None:
        self.rows = [validate_prompt_row(row, i) for i, row in enumerate(rows)]
        self.source = source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def uid(self, index: int) -> int:
        """The stable uid of row ``index`` (its index in the source)."""
        return range(len(self.rows))[index]

    def prompt(self, index: int) -> str | list[dict]:
        """Row ``index``'s prompt (string or message list)."""
        return self.rows[index]["prompt"]

    def reward_kwargs(self, index: int) -> dict[str, Any]:
        """Row ``index``'s extra columns (everything but "prompt"), passed to reward functions as kwargs."""
        return {k: v for k, v in self.rows[index].items() if k != "prompt"}

    def fingerprint(self) -> str:
        """sha256 of the rows' canonical JSON: a resume can check it still trains on the same data."""
        return rows_fingerprint(self.rows)


def rows_fingerprint(rows: Sequence[dict]) -> str:
    """sha256 of the canonical JSON of ``rows`` (key order does not matter; row order does)."""
    blob = json.dumps(list(rows), sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value)
    )


def validate_prompt_row(row: Any, index: int) -> dict:
    """Return ``row`` if it is a valid prompt row, else raise naming the row index, its columns and the fix."""
    if not isinstance(row, dict):
        raise DataError(f"row {index} is a {type(row).__name__}, not a dict; each row must be an object with 'prompt'")
    if "prompt" not in row:
        raise DataError(
            f"row {index} has no 'prompt' column (it has {sorted(row)}). Each row needs 'prompt': a string or a "
            "list of {'role', 'content'} messages; rename the column holding the prompt to 'prompt'."
        )
    prompt = row["prompt"]
    if not (isinstance(prompt, str) or _is_messages(prompt)):
        raise DataError(
            f"row {index}: 'prompt' is a {type(prompt).__name__} ({str(prompt)[:80]!r}); it must be a string or a "
            "non-empty list of {'role': ..., 'content': ...} messages"
        )
    return row


def read_rows(source: str | Path, split: str = "train") -> list[dict]:
    """Rows of a local .jsonl / .json / .parquet file or a `datasets.save_to_disk` folder, as a list of dicts."""
    path = Path(source).expanduser()
    if not path.exists():
        raise MissingError(f"data source {str(source)!r} does not exist")
    if path.is_dir():
        return _read_datasets_folder(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: line {lineno} is not valid JSON ({e})") from None
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and split in data and isinstance(data[split], list):
            data = data[split]  # {"train": [...], "test": [...]}
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            n = {len(v) for v in data.values()}
            if len(n) != 1:
                raise DataError(f"{path}: column lists have different lengths {sorted(n)}")
            data = [dict(zip(data, values)) for values in zip(*data.values())]  # columnar -> rows
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of row objects (or a dict of equal-length columns)")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(
        f"unsupported data file {path.name!r}: use .jsonl, .json, .parquet or a folder written by "
        "datasets' save_to_disk"
    )


def _read_datasets_folder(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UnknownNameError(f"{path} has no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    return ds.to_list()


def _read_source_rows(source: str, split: str, num_rows: int | None, what: str) -> list[dict]:
    """Rows of the local file/folder ``source`` (the first ``num_rows`` when given) for a loader of ``what`` data.

    A missing path is reported as neither a built-in source nor a file, the two things a dataset name can be.
    """
    if not Path(source).expanduser().exists():
        raise MissingError(
            f"{what} data {source!r} is neither a built-in task ({', '.join(BUILTIN_PROMPT_SOURCES)}) nor an existing "
            "file/folder (.jsonl, .json, .parquet, datasets save_to_disk folder)"
        )
    rows = read_rows(source, split)
    return rows if num_rows is None else rows[:num_rows]


def load_prompt_dataset(
    source: str, *, num_rows: int | None = None, seed: int = 0, split: str = "train"
) -> PromptDataset:
    """A `PromptDataset` from "arithmetic" (built-in, ``num_rows`` default 1000, seeded) or a local file/folder.

    For files, ``num_rows`` keeps the first rows (uids stay their source indices); ``seed`` only matters for
    built-in generated tasks (shuffling is the sampler's job).
    """
    if num_rows is not None and num_rows < 1:
        raise DataError(f"num_rows must be >= 1 or None, got {num_rows}")
    if source == "arithmetic":
        if split not in _SPLIT_SEED_OFFSET:
            raise UnknownNameError(f"the arithmetic task has splits {sorted(_SPLIT_SEED_OFFSET)}, not {split!r}")
        n = num_rows if num_rows is not None else ARITHMETIC_DEFAULT_ROWS
        return PromptDataset(arithmetic_rows(n, seed + _SPLIT_SEED_OFFSET[split]), source=f"arithmetic:{split}")
    rows = _read_source_rows(source, split, num_rows, "prompt")
    if not rows:
        raise DataError(f"prompt data {source!r} (split {split!r}) has no rows")
    return PromptDataset(rows, source=str(source))


def render_prompt(tokenizer: Any, prompt: str | list[dict], max_prompt_length: int | None = None) -> list[int]:
    """Token ids of a prompt as TRL's GRPOTrainer renders it.

    Messages: the chat template with ``add_generation_prompt=True``. Strings: plain tokenization
    (``tokenizer(text=prompt)``). A prompt longer than ``max_prompt_length`` is an error (never silently cut:
    a cut prompt changes the task).
    """
    if isinstance(prompt, str):
        ids = list(tokenizer(text=prompt)["input_ids"])
    elif _is_messages(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError("the prompt is a message list but the tokenizer has no chat template; use string prompts")
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = list(out["input_ids"])
    else:
        raise TypeError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        raise DataError(
            f"prompt has {len(ids)} tokens, more than max_prompt_length={max_prompt_length}; raise "
            "max_prompt_length or shorten/filter the prompts"
        )
    return ids
