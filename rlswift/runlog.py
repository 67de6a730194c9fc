"""Run logs (`metrics.jsonl`, `trajectories.jsonl`) written exactly once across resumes.

Each log is a state hook whose state is its byte length at the checkpoint. Loading a checkpoint truncates the file
to that length, so lines written after the checkpoint by a run that was then killed are dropped, and the resumed run
writes them again: no duplicated and no missing lines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import orjson


class JsonlLog:
    """An append-only JSON-lines file that is also a state hook (its state: the committed byte offset)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a line (numpy/tensor-free JSON; non-finite floats become null)."""
        self._fh.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        self._fh.flush()  # readable with tail -f while the run goes; durability comes from the checkpoint fsync

    def flush(self, fsync: bool = False) -> None:
        self._fh.flush()
        if fsync:
            os.fsync(self._fh.fileno())

    def state_dict(self) -> dict[str, int]:
        # Called while a checkpoint is written: what it records must be on disk first.
        self.flush(fsync=True)
        return {"offset": self._fh.tell()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        offset = int(state["offset"])
        self._fh.close()
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < offset:
            raise RuntimeError(
                f"{self.path} holds {size} bytes but the checkpoint recorded {offset}: the log was truncated or "
                f"replaced after the checkpoint; restore it or start a new output_dir"
            )
        with open(self.path, "r+b") as fh:
            fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())
        self._fh = open(self.path, "ab")

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file, in order."""
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)
