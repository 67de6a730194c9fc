"""Turn what a user types for a checkpoint ("latest", "best", a checkpoint folder, a run folder, a pointer file)
into the checkpoint folder it means (used by `rlswift export` and other commands that take a CHECKPOINT)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rlswift.checkpoint.reader import MANIFEST, CheckpointError, verify

__all__ = ["resolve_checkpoint", "POINTERS"]

POINTERS = ("latest", "best")
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def _follow(pointer_file: Path) -> Path:
    run = pointer_file.parent
    try:
        name = pointer_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer_file}: unreadable pointer file ({e})") from e
    if not _CKPT_RE.match(name):
        raise CheckpointError(f"{pointer_file} holds {name[:80]!r}, not a checkpoint-<step> folder name")
    target = run / name
    if not target.is_dir():
        raise CheckpointError(f"{pointer_file} names {name}, which no longer exists in {run} (deleted by "
                              "retention or by hand); pass one of its checkpoint-* folders")
    return target


def resolve_checkpoint(ref: str | os.PathLike, run_dir: str | os.PathLike | None = None,
                       check: bool = True) -> Path:
    """The checkpoint folder `ref` names (an absolute path).

    ref may be: a checkpoint folder (has manifest.json); a pointer file (`RUN/latest`, `RUN/best`); "latest" or
    "best" (a pointer of `run_dir`, default the current folder); a run folder (its `latest` pointer, or its
    newest complete checkpoint when the pointer is missing). check: also verify sizes and checksums.
    CheckpointError saying what was looked for and what to pass instead.
    """
    p = Path(ref)
    if str(ref) in POINTERS and not p.exists():
        base = Path(run_dir) if run_dir is not None else Path.cwd()
        if not (base / str(ref)).is_file():
            hint = " (set metric_for_best to keep a best checkpoint)" if str(ref) == "best" else ""
            raise CheckpointError(f"{base} has no '{ref}' pointer{hint}; pass a run folder or a checkpoint-* folder")
        p = base / str(ref)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(ref)!r} does not exist; pass a checkpoint-* folder, a run folder, "
                              "or 'latest'/'best' with a run folder")
    if p.is_file():
        if p.name not in POINTERS:
            raise CheckpointError(f"{p} is a file; pass a checkpoint-* folder, a run folder or its latest/best "
                                  "pointer")
        target = _follow(p)
    elif (p / MANIFEST).is_file():
        target = p
    elif (p / "latest").is_file():
        target = _follow(p / "latest")
    else:
        steps = sorted((int(m.group(1)), d) for d in p.iterdir()
                       if (m := _CKPT_RE.match(d.name)) and (d / MANIFEST).is_file())
        if not steps:
            raise CheckpointError(f"{p} holds no complete checkpoint (no manifest.json, no latest pointer, no "
                                  "checkpoint-* folder with a manifest)")
        target = steps[-1][1]
    if check and (problems := verify(target)):
        raise CheckpointError(f"checkpoint {target} is unusable: " + "; ".join(problems))
    return target.absolute()
