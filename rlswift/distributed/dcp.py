"""Sharded, pickle-free checkpoints of model and optimizer state through torch.distributed.checkpoint (DCP).

DCP plans who writes which chunk and, on load, which saved chunks overlap each rank's shard (that is the
resharding: saved on N ranks, loaded on M). Its stock `FileSystemWriter`/`FileSystemReader` store the global
metadata with pickle (and non-tensor values with torch.save), which rlswift never loads. So DCP runs here with
its planners and a small storage layer of our own:

    {subdir}/rank00000.safetensors   the chunks rank 0 wrote (safetensors: one entry per chunk)
    {subdir}/rank00001.safetensors   ... one file per rank that wrote anything
    {subdir}/metadata.json           written by rank 0 last: per tensor dtype, global size, and its chunks
                                     (offsets, sizes, file, key)
    {subdir}/skeleton.json           written by rank 0: every non-tensor value of the state (codec tree, e.g.
                                     the optimizer's param_groups) and where each tensor sits in it

Only tensors ever go through DCP (a value that is not a tensor would become a pickled BYTE_IO item: refused).
Reading parses JSON with orjson and tensors with safetensors only; a file name in metadata.json that is not
`rankNNNNN.safetensors` is refused, so a planted `.metadata`/`*.distcp` pickle is never even opened.

DCP's planning step exchanges plan objects between the LIVE ranks with torch.distributed's object collectives
(pickle over the process group, in memory, between processes of the same run); nothing read from disk is unpickled.

Every tensor in `state` must be a DTensor (each rank holds its shard) or identical on every rank (replicated:
DCP keeps one copy); state that differs per rank belongs in `rank_state.py`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import orjson
import torch
import torch.distributed.checkpoint as dcp

from rlswift.checkpoint.codec import decode, encode
from rlswift.checkpoint.reader import CheckpointError
from rlswift.distributed.dcp_storage import (FORMAT, METADATA, SafetensorsReader, SafetensorsWriter, fsync_path,
                                             write_durable, read_metadata_json)
from rlswift.distributed.launch import DistInfo, all_gather_json, single_process

__all__ = ["save_sharded", "load_sharded", "read_sharded_full", "sharded_files", "split_tensors", "SafetensorsWriter", "SafetensorsReader",
           "DEFAULT_SUBDIR", "FORMAT"]

DEFAULT_SUBDIR = "dcp"
SKELETON = "skeleton.json"


# ---------------------------------------------------------------------------------------------- state splitting
def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def split_tensors(state: Any) -> tuple[dict[str, torch.Tensor], Any, list[tuple[tuple, str]]]:
    """Split ``state`` into (flat ``{key: tensor}`` for DCP, the skeleton with None where tensors were, slots).

    Walks dicts, lists and tuples. ``key`` is the path joined with "/" (e.g. ``optimizer/state/lm_head.weight/
    exp_avg``); ``slots`` lists ``(path, key)`` so the tensors can be put back. Two paths with the same key are
    refused (a dict key containing "/" that collides with a nested path).
    """
    flat: dict[str, torch.Tensor] = {}
    slots: list[tuple[tuple, str]] = []

    def walk(obj: Any, path: tuple) -> Any:
        if isinstance(obj, torch.Tensor):
            key = _key(path)
            if key in flat:
                raise ValueError(f"two tensors of the state map to the same checkpoint key {key!r}; rename a key "
                                 "so that no dict key contains '/'")
            flat[key] = obj
            slots.append((path, key))
            return None
        if isinstance(obj, dict):
            return type(obj)((k, walk(v, path + (k,))) for k, v in obj.items())
        if isinstance(obj, list):
            return [walk(v, path + (i,)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(walk(v, path + (i,)) for i, v in enumerate(obj))
        return obj

    skeleton = walk(state, ())
    return flat, skeleton, slots


def _put(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, tuple):
        items = list(tree)
        items[head] = _put(items[head], rest, value)
        return tuple(items)
    tree[head] = _put(tree[head], rest, value)
    return tree


def _run_dcp(what: str, folder: Path, fn, *args, **kwargs) -> Any:
    """Run dcp.save/dcp.load; DCP's CheckpointException (a BaseException) becomes a CheckpointError."""
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():  # DCP warns that no_dist means one process: that is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            return fn(*args, **kwargs)
        except CheckpointException as e:
            # failures: {rank: (exception, traceback summary)}; name the first rank's exception.
            rank, (first, _tb) = next(iter(e.failures.items()))
            if isinstance(first, CheckpointError):
                raise CheckpointError(f"{first} (rank {rank})") from e
            raise CheckpointError(f"sharded {what} of {folder} failed on rank {rank}: {type(first).__name__}: "
                                  f"{first}") from e


# ---------------------------------------------------------------------------------------------- public API
def save_sharded(state: dict, folder: str | os.PathLike, info: DistInfo | None = None,
                 subdir: str = DEFAULT_SUBDIR) -> dict[str, dict[str, Any]]:
    """Write ``state`` under ``folder/subdir`` collectively; returns ``{relpath: {sha256, size}}``.

    COLLECTIVE: every rank calls it with its own view of the same state (DTensor shards or replicated tensors,
    identical non-tensor values). Each rank writes and fsyncs its own chunk file; rank 0 then writes
    `metadata.json` and `skeleton.json` and fsyncs the folder. On rank 0 the returned table lists EVERY file of
    every rank (relpaths relative to ``folder``, ready for the manifest); other ranks get their own files only.
    When it returns on rank 0, every rank's files are complete and durable.
    """
    info = info or single_process()
    folder = Path(folder)
    out = folder / subdir
    flat, skeleton, slots = split_tensors(state)
    tree, extra = encode(skeleton, hook=f"{subdir} (sharded)")
    if extra:
        raise CheckpointError(f"sharded state under {subdir!r} holds numpy arrays at {sorted(extra)[:3]}; use torch "
                              "tensors (they are sharded or replicated) or move them to a replicated hook")
    slot_tree, _ = encode([list(p) for p, _k in slots])
    doc = orjson.dumps({"format": FORMAT, "tree": tree, "slots": slot_tree, "keys": [k for _p, k in slots]},
                       option=orjson.OPT_INDENT_2)
    # Non-tensor values are written once (by rank 0), so they must agree: compare digests (cheap, JSON-free).
    digests = all_gather_json(hashlib.sha256(doc).hexdigest(), info)
    if len(set(digests)) > 1:
        raise CheckpointError(f"sharded state under {subdir!r}: its non-tensor values differ between ranks "
                              f"(skeleton digests {digests}); per-rank values belong in a per-rank hook")
    out.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(out)
    _run_dcp("save", out, dcp.save, flat, storage_writer=writer, no_dist=not info.distributed)
    files = {f"{subdir}/{name}": entry for name, entry in writer.files.items()}
    if info.is_main:
        files[f"{subdir}/{SKELETON}"] = write_durable(out / SKELETON, doc)
        fsync_path(out)
    return files


def sharded_files(folder: str | os.PathLike, subdir: str = DEFAULT_SUBDIR) -> list[str]:
    """Relpaths (under ``folder``) of every file a complete sharded state consists of, from its metadata."""
    out = Path(folder) / subdir
    doc = read_metadata_json(out)
    names = {c["file"] for md in doc["tensors"].values() for c in md["chunks"]}
    return sorted(f"{subdir}/{n}" for n in names | {METADATA, SKELETON})


def _read_skeleton(src: Path) -> dict:
    """The skeleton document of a `save_sharded` folder (keys, tree, slots), checked to be this format."""
    skel_path = src / SKELETON
    if not skel_path.is_file():
        raise CheckpointError(f"{skel_path} is missing: not a complete rlswift sharded state")
    doc = orjson.loads(skel_path.read_bytes())
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{skel_path}: not an {FORMAT} skeleton")
    return doc


def load_sharded(state: dict, folder: str | os.PathLike, info: DistInfo | None = None,
                 subdir: str = DEFAULT_SUBDIR) -> dict:
    """Read a `save_sharded` folder into ``state`` and return the restored state (COLLECTIVE).

    ``state`` is the template on THIS world size (e.g. `ShardedState.state_dict()` of a freshly built model and
    optimizer): its tensors (DTensor shards or plain tensors) are overwritten in place with the saved values,
    resharded from however many ranks wrote them. Returns the saved structure with those tensors in it, so
    non-tensor values (learning rates in param_groups, ...) come from the checkpoint. The template must have
    exactly the saved tensors with the saved global shapes; a difference is an error naming the keys.
    """
    info = info or single_process()
    src = Path(folder) / subdir
    doc = _read_skeleton(src)
    meta = read_metadata_json(src)["tensors"]
    flat, _skel, _slots = split_tensors(state)
    saved_keys = doc["keys"]
    missing = sorted(set(flat) - set(saved_keys))
    unexpected = sorted(set(saved_keys) - set(flat))
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: the sharded state does not match this run's: not in the checkpoint {missing[:5]} "
            f"({len(missing)}), only in the checkpoint {unexpected[:5]} ({len(unexpected)}). Resume with the same "
            "model, LoRA settings and optimizer as the run that saved it")
    for key, t in flat.items():
        if list(t.shape) != meta[key]["size"]:
            raise CheckpointError(f"{src}: {key!r} was saved with shape {meta[key]['size']}, this run has "
                                  f"{list(t.shape)}")
    _run_dcp("load", src, dcp.load, flat, storage_reader=SafetensorsReader(src), no_dist=not info.distributed)
    paths = decode(doc["slots"])
    restored = decode(doc["tree"], hook=f"{subdir} (sharded)")
    for path, key in zip(paths, saved_keys):
        restored = _put(restored, tuple(path), flat[key])
    return restored


def read_sharded_full(folder: str | os.PathLike, subdir: str = DEFAULT_SUBDIR) -> dict:
    """The state of a `save_sharded` folder with WHOLE tensors, read in this process without torch.distributed.

    Each tensor is assembled from its chunks (whatever world size wrote them): for inspecting and comparing
    checkpoints (`rlswift ckpt diff`, verify-resume), and for tools that want the full model in one process.
    Needs memory for the whole state.
    """
    from rlswift.distributed.dcp_storage import _dtype

    import safetensors

    src = Path(folder) / subdir
    doc = _read_skeleton(src)
    meta = read_metadata_json(src)["tensors"]
    full: dict[str, torch.Tensor] = {}
    per_file: dict[str, list[tuple[str, dict]]] = {}
    for key in doc["keys"]:
        if key not in meta:
            raise CheckpointError(f"{src}: {key!r} is in the skeleton but not in {METADATA}")
        full[key] = torch.empty(meta[key]["size"], dtype=_dtype(meta[key]["dtype"]))
        for c in meta[key]["chunks"]:
            per_file.setdefault(c["file"], []).append((key, c))
    for fname, chunks in per_file.items():
        with safetensors.safe_open(str(src / fname), framework="pt") as f:
            for key, c in chunks:
                part = f.get_tensor(c["key"])
                target = full[key][tuple(slice(o, o + n) for o, n in zip(c["offsets"], c["sizes"]))]
                if tuple(part.shape) != tuple(target.shape):
                    raise CheckpointError(f"{src / fname}: chunk {c['key']!r} has shape {tuple(part.shape)}, its "
                                          f"place in {key!r} {tuple(target.shape)}")
                target.copy_(part)
    restored = decode(doc["tree"], hook=f"{subdir} (sharded)")
    for path, key in zip(decode(doc["slots"]), doc["keys"]):
        restored = _put(restored, tuple(path), full[key])
    return restored
