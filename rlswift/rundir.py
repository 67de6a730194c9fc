"""The run folder: one writer at a time, and never a deletion of anything rlswift did not write.

A run folder holds `config.yaml`, `metrics.jsonl`, `trajectories.jsonl`, `checkpoint-*/`, `latest`, `best`,
`reward.png`, and two files of rlswift's own: `.rlswift-run` (the marker: this folder is an rlswift run) and
`.rlswift.lock` (held with `flock` for the whole life of the process that writes the run; the kernel drops it when
the process dies, also on SIGKILL, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import time
from pathlib import Path

import orjson

from rlswift.errors import RunDirError

MARKER = ".rlswift-run"
LOCK = ".rlswift.lock"
# Everything a run writes into its folder, by name; `overwrite=true` deletes these and nothing else.
RUN_FILES = frozenset({"config.yaml", "metrics.jsonl", "trajectories.jsonl", "latest", "best", "reward.png", MARKER})
_RUN_DIRS = re.compile(r"^checkpoint-\d+$")
_RUN_TMP = re.compile(r"^\.(tmp-|latest\.tmp-|best\.tmp-)")


def _is_run_entry(name: str) -> bool:
    return name in RUN_FILES or bool(_RUN_DIRS.match(name)) or bool(_RUN_TMP.match(name))


class RunLock:
    """An exclusive `flock` on `folder/.rlswift.lock`, held until `release()` or the end of the process."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirError naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another rlswift run ({holder}); a run folder has one writer. "
                "Wait for that run to finish or stop it (SIGTERM saves a checkpoint), or pick another output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, orjson.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = orjson.loads(os.pread(fd, 4096, 0))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except Exception:  # noqa: BLE001 - the holder may not have written its pid yet
        return "pid unknown"


def is_run_folder(folder: Path) -> bool:
    """True when ``folder`` holds an rlswift run (its marker, or checkpoints of a run made before the marker)."""
    if (folder / MARKER).is_file():
        return True
    return (folder / "latest").is_file() or any(_RUN_DIRS.match(p.name) for p in folder.iterdir() if p.is_dir())


def prepare_run_dir(out: Path, resume: str | None, overwrite: bool, recipe: str) -> RunLock:
    """Create/lock the run folder and check it may be used; returns the lock (keep it for the life of the run).

    - An empty or new folder starts a run. A folder holding a run needs `resume` (continue) or `overwrite`
      (delete the run's own files, nothing else). A non-empty folder that is not a run is refused: rlswift would
      overwrite files it did not write.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if others and not is_run_folder(out):
        lock.release()
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise RunDirError(
            f"{out} is not empty and is not an rlswift run folder (it holds {shown}); rlswift never writes into "
            "or deletes a folder it did not create. Pick a new or empty output_dir"
        )
    if others and overwrite:
        for name in others:
            if _is_run_entry(name):
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif others and resume is None:
        lock.release()
        raise RunDirError(
            f"{out} already holds a run. Continue it with resume=auto, start over with overwrite=true (deletes "
            "that run's checkpoints and logs), or pick another output_dir"
        )
    marker = out / MARKER
    if not marker.exists():
        marker.write_bytes(orjson.dumps({"recipe": recipe, "created": time.time()}))
    return lock
