"""The read side of checkpoints: manifest parsing, verification and decoding of one hook's saved state.

Nothing here writes; `manager.CheckpointManager` uses these to load and resume, `inspect` to show and compare.
Only orjson and safetensors ever parse checkpoint bytes (no pickle), so reading a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import orjson
import safetensors.torch

from rlswift.checkpoint.codec import CodecError, decode

__all__ = ["CheckpointError", "FORMAT_VERSION", "MANIFEST", "read_manifest", "verify", "load_hook_state"]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found, verified or loaded; the message says which file and why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict:
    """Parse `path/manifest.json` (no verification of the files; use `verify` for that)."""
    return orjson.loads((Path(path) / MANIFEST).read_bytes())


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem that makes `path` an unusable checkpoint (empty list: complete and intact).

    Checks: folder exists, manifest present and parseable, format_version supported, every listed file
    present with the recorded size and sha256, every hook's files listed.
    """
    p = Path(path)
    if not p.exists():
        return [f"{p}: no such folder"]
    if not p.is_dir():
        return [f"{p}: not a folder"]
    mpath = p / MANIFEST
    if not mpath.is_file():
        return [f"{p}: incomplete checkpoint: {MANIFEST} is missing (the save was interrupted, or this is not "
                "a checkpoint folder)"]
    try:
        m = orjson.loads(mpath.read_bytes())
    except (orjson.JSONDecodeError, OSError) as e:
        return [f"{mpath}: unreadable manifest ({e})"]
    if not isinstance(m, dict):
        return [f"{mpath}: manifest is not a JSON object"]
    fv = m.get("format_version")
    if not isinstance(fv, int):
        return [f"{mpath}: format_version missing or not an int"]
    if fv > FORMAT_VERSION:
        return [f"{p}: written by a newer rlswift (format {fv} > {FORMAT_VERSION}); upgrade rlswift"]
    files, hooks = m.get("files"), m.get("hooks")
    if not isinstance(files, dict) or not isinstance(hooks, dict):
        return [f"{mpath}: manifest lacks 'files' or 'hooks'"]
    problems: list[str] = []
    root = p.resolve()
    for rel, info in files.items():
        f = (p / rel)
        if os.path.isabs(rel) or ".." in Path(rel).parts or not f.resolve().is_relative_to(root):
            problems.append(f"{mpath}: file entry {rel!r} points outside the checkpoint")
            continue
        if not f.is_file():
            problems.append(f"{f}: missing (listed in the manifest)")
            continue
        size = f.stat().st_size
        if size != info.get("size"):
            problems.append(f"{f}: size {size} != {info.get('size')} recorded in the manifest (truncated or "
                            "modified)")
            continue
        if sha256_file(f) != info.get("sha256"):
            problems.append(f"{f}: sha256 does not match the manifest (corrupted or modified)")
    for name, hfiles in hooks.items():
        for rel in hfiles:
            if rel not in files:
                problems.append(f"{mpath}: hook {name!r} file {rel!r} has no checksum entry")
    return problems


def load_hook_state(path: str | os.PathLike, name: str, manifest: dict) -> Any:
    """Decode one hook's saved state from a (verified) checkpoint folder, without any hook object."""
    p = Path(path)
    tree, tensors = None, {}
    for rel in manifest["hooks"][name]:
        try:
            if rel.endswith(".json"):
                tree = orjson.loads((p / rel).read_bytes())
            elif rel.endswith(".safetensors"):
                tensors = safetensors.torch.load_file(str(p / rel))
            else:
                raise CheckpointError(f"{p / rel}: unsupported hook file type (rlswift never unpickles; "
                                      "only .json and .safetensors hook files are read)")
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file, named as such
            raise CheckpointError(f"{p / rel}: cannot be parsed ({type(e).__name__}: {e})") from e
    if tree is None:
        raise CheckpointError(f"{p}: hook {name!r} has no .json tree file")
    try:
        return decode(tree, tensors, hook=name)
    except (CodecError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: hook {name!r} cannot be decoded ({e})") from e
