"""The read side of checkpoints: manifest parsing, verification, and decoding hook states from verified bytes.

`read_checkpoint(path)` reads every file of a checkpoint exactly once: the same bytes are hashed (checked against
the manifest) and then decoded, so a resume costs one pass over the data. `verify(path)` hashes without keeping
anything. Nothing here writes; `manager.CheckpointManager` uses these to load and resume, `inspect` to show and
compare. Only orjson and our strict safetensors parser ever read checkpoint bytes (no pickle), so reading a
checkpoint cannot run code.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from rlswift.checkpoint.codec import CodecError, decode
from rlswift.checkpoint.tensorfile import WORKERS, Hasher, read_hashed, read_tensors

__all__ = ["CheckpointError", "FORMAT_VERSION", "MANIFEST", "LoadedCheckpoint", "read_manifest", "is_multi_rank",
           "verify", "read_checkpoint", "load_hook_state", "sha256_file"]

# 1: one hooks/{stem}.safetensors per hook. 2: a hook's tensors may be split over several files
# (hooks/{stem}.safetensors, hooks/{stem}@1.safetensors, ...). Both are read; older readers refuse 2 by name.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found, verified or loaded; the message says which file and why."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint read once and verified: its manifest and every hook's decoded state (tensors on CPU)."""

    path: Path
    manifest: dict
    states: dict[str, Any]  # hook name -> the object its state_dict() returned when saved
    decoded: bool = True  # False: verified only; its hooks are read when applied (a checkpoint of several ranks)

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks (hashing overlaps the reads)."""
    h = Hasher()
    read_hashed(path, os.path.getsize(path), h, keep=False)
    return h.hexdigest()


def is_multi_rank(manifest: dict) -> bool:
    """True when a checkpoint was written by several ranks (sharded and per-rank hook files; see distributed/)."""
    return int(manifest.get("world_size") or 1) > 1


def read_manifest(path: str | os.PathLike) -> dict:
    """Parse `path/manifest.json` (files not verified; use `verify` or `read_checkpoint` for that).

    CheckpointError when it is missing or not valid JSON.
    """
    mpath = Path(path) / MANIFEST
    try:
        return orjson.loads(mpath.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{mpath} is missing: {path} is not a complete checkpoint") from None
    except (OSError, orjson.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from e


def _check_manifest(p: Path) -> tuple[dict | None, list[str]]:
    """The parsed manifest if its structure is usable, else the problems."""
    if not p.exists():
        return None, [f"{p}: no such folder"]
    if not p.is_dir():
        return None, [f"{p}: not a folder"]
    mpath = p / MANIFEST
    if not mpath.is_file():
        return None, [f"{p}: incomplete checkpoint: {MANIFEST} is missing (the save was interrupted, or this is "
                      "not a checkpoint folder)"]
    try:
        m = orjson.loads(mpath.read_bytes())
    except (orjson.JSONDecodeError, OSError) as e:
        return None, [f"{mpath}: unreadable manifest ({e})"]
    if not isinstance(m, dict):
        return None, [f"{mpath}: manifest is not a JSON object"]
    fv = m.get("format_version")
    if not isinstance(fv, int):
        return None, [f"{mpath}: format_version missing or not an int"]
    if fv > FORMAT_VERSION:
        return None, [f"{p}: written by a newer rlswift (format {fv} > {FORMAT_VERSION}); upgrade rlswift"]
    files, hooks = m.get("files"), m.get("hooks")
    if not isinstance(files, dict) or not isinstance(hooks, dict):
        return None, [f"{mpath}: manifest lacks 'files' or 'hooks'"]
    problems = []
    for rel, info in files.items():
        if not isinstance(info, dict) or type(info.get("size")) is not int or not isinstance(info.get("sha256"), str):
            problems.append(f"{mpath}: file entry {rel!r} lacks an int size and a sha256")
        elif os.path.isabs(rel) or ".." in Path(rel).parts or not (p / rel).resolve().is_relative_to(p.resolve()):
            problems.append(f"{mpath}: file entry {rel!r} points outside the checkpoint")
    for name, hfiles in hooks.items():
        if not isinstance(hfiles, list) or not all(isinstance(r, str) for r in hfiles):
            problems.append(f"{mpath}: hook {name!r} has a malformed file list")
            continue
        for rel in hfiles:
            if rel not in files:
                problems.append(f"{mpath}: hook {name!r} file {rel!r} has no checksum entry")
    return (None if problems else m), problems


def _read_file(f: Path, size: int, hasher: Hasher | None, keep: bool) -> Any:
    """One pass over a hook file: hashed always; with keep, also its content (bytes of a .json, the tensors of a
    .safetensors, or the ValueError saying why it is not a valid safetensors file)."""
    if keep and f.name.endswith(".safetensors"):
        try:
            return read_tensors(f, size, hasher)
        except ValueError as e:
            return e
    buf = read_hashed(f, size, hasher, keep=keep)
    return bytes(buf.numpy()) if buf is not None else None


def _check_file(p: Path, rel: str, info: dict, keep: bool) -> tuple[Any, str | None]:
    f = p / rel
    if not f.is_file():
        return None, f"{f}: missing (listed in the manifest)"
    size = f.stat().st_size
    if size != info["size"]:
        return None, f"{f}: size {size} != {info['size']} recorded in the manifest (truncated or modified)"
    h = Hasher()
    try:
        content = _read_file(f, size, h, keep)
    except OSError as e:
        return None, f"{f}: unreadable ({e})"
    if h.hexdigest() != info["sha256"]:
        return None, f"{f}: sha256 does not match the manifest (corrupted or modified)"
    return content, None


def _check_files(p: Path, m: dict, keep: bool) -> tuple[dict[str, Any], list[str]]:
    """Hash every listed file once (WORKERS files at a time: hashing is slower than the disk); with keep, also
    return each file's content for decoding (see _read_file)."""
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="rlswift-read") as pool:
        results = {rel: pool.submit(_check_file, p, rel, info, keep) for rel, info in m["files"].items()}
        results = {rel: f.result() for rel, f in results.items()}
    problems = [why for _content, why in results.values() if why]
    blobs = {rel: content for rel, (content, why) in results.items() if keep and not why}
    return blobs, problems


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem that makes `path` an unusable checkpoint (empty list: complete and intact).

    Checks: folder exists, manifest present and parseable, format_version supported, every listed file
    present with the recorded size and sha256, every hook's files listed. Does not decode (see read_checkpoint).
    """
    p = Path(path)
    m, problems = _check_manifest(p)
    if m is None:
        return problems
    return _check_files(p, m, keep=False)[1]


def _decode_hook(p: Path, name: str, rels: list[str], blob) -> Any:
    """Decode one hook from its files' contents; `blob(rel)` returns what `_read_file` read (keep=True)."""
    tree, tensors = None, {}
    for rel in rels:
        try:
            if rel.endswith(".json"):
                tree = orjson.loads(blob(rel))
            elif rel.endswith(".safetensors"):  # one file, or several shards of one hook
                part = blob(rel)
                if isinstance(part, Exception):
                    raise part
                if dup := sorted(set(part) & set(tensors)):
                    raise ValueError(f"tensor {dup[0]!r} is also in another file of hook {name!r}")
                tensors.update(part)
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
    except (CodecError, KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{p}: hook {name!r} cannot be decoded ({type(e).__name__}: {e})") from e


def read_checkpoint(path: str | os.PathLike, context: str | None = "cannot load {path}") -> LoadedCheckpoint:
    """Verify and decode the checkpoint at `path`, reading each file once.

    CheckpointError listing every problem (missing/truncated/corrupted files, bad manifest), prefixed by
    `context` ("{path}" is filled in; None: no prefix), or naming the file or hook that cannot be parsed or
    decoded.
    """
    p = Path(path)
    m, problems = _check_manifest(p)
    if m is not None:
        blobs, problems = _check_files(p, m, keep=True)
    if problems:
        prefix = context.format(path=p) + ": " if context else ""
        raise CheckpointError(prefix + "; ".join(problems))
    states = {name: _decode_hook(p, name, rels, blobs.__getitem__) for name, rels in m["hooks"].items()}
    return LoadedCheckpoint(p, m, states)


def load_hook_state(path: str | os.PathLike, name: str, manifest: dict) -> Any:
    """Decode one hook's saved state from a checkpoint folder without verifying checksums (see read_checkpoint)."""
    p = Path(path)
    rels = manifest["hooks"][name]
    for rel in rels:
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise CheckpointError(f"{p}: hook {name!r} file {rel!r} points outside the checkpoint")

    def blob(rel: str) -> Any:
        f = p / rel
        return _read_file(f, f.stat().st_size, None, keep=True)

    return _decode_hook(p, name, rels, blob)
