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

import dataclasses
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import orjson
import safetensors
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from rlswift.checkpoint.codec import decode, encode
from rlswift.checkpoint.reader import CheckpointError
from rlswift.distributed.launch import DistInfo, all_gather_json, single_process

__all__ = ["save_sharded", "load_sharded", "split_tensors", "SafetensorsWriter", "SafetensorsReader",
           "DEFAULT_SUBDIR", "FORMAT"]

FORMAT = "rlswift-dcp/1"
DEFAULT_SUBDIR = "dcp"
METADATA = "metadata.json"
SKELETON = "skeleton.json"
_RANK_FILE = re.compile(r"^rank\d{5}\.safetensors$")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> dict[str, Any]:
    """Write, flush, fsync; return the file's manifest entry (sha256 of the bytes in hand, size)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


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


# ---------------------------------------------------------------------------------------------- storage layer
@dataclasses.dataclass(frozen=True)
class _Chunk:
    """Where one written chunk lives, plus its file's checksum (it rides to rank 0 with DCP's write results)."""

    file: str
    key: str
    sizes: tuple[int, ...]
    file_sha256: str
    file_size: int


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown tensor dtype {name!r} in a sharded checkpoint")
    return dt


class SafetensorsWriter(StorageWriter):
    """DCP StorageWriter: each rank's chunks in one safetensors file, the global metadata as JSON (no pickle)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.rank = 0
        self.is_coordinator = True
        self.files: dict[str, dict[str, Any]] = {}  # this rank's files; on the coordinator, every rank's

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.folder = Path(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.folder.mkdir(parents=True, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=f"rank{i:05d}.safetensors") for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fname: str = plan.storage_data
        tensors: dict[str, torch.Tensor] = {}
        pending: list[tuple[Any, str, tuple[int, ...]]] = []
        seen: set[int] = set()
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise CheckpointError(f"sharded checkpoint: {item.index.fqn!r} is not a tensor; only tensors go "
                                      "through DCP (non-tensor values belong in the skeleton)")
            t = planner.resolve_data(item).detach()
            storage = t.untyped_storage()
            whole = (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0
                     and storage.nbytes() == t.numel() * t.element_size() and storage.data_ptr() not in seen)
            if not whole:  # safetensors wants dense tensors that own their bytes (tied weights share storage)
                t = t.to("cpu").clone(memory_format=torch.contiguous_format)
            seen.add(t.untyped_storage().data_ptr())
            key = item.index.fqn
            if key in tensors:  # two chunks of one tensor on one rank (not FSDP2's 1-D layout, but legal DCP)
                key = f"{key}@{','.join(map(str, item.index.offset or ()))}"
            tensors[key] = t
            pending.append((item.index, key, tuple(t.shape)))
        results: list[WriteResult] = []
        if tensors:
            entry = _write_durable(self.folder / fname, safetensors.torch.save(tensors))
            self.files[fname] = entry
            for index, key, sizes in pending:
                nbytes = tensors[key].numel() * tensors[key].element_size()
                results.append(WriteResult(index=index, size_in_bytes=nbytes,
                                           storage_data=_Chunk(fname, key, sizes, entry["sha256"], entry["size"])))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # Runs on the coordinator only, after every rank's write_data returned (its files are fsynced).
        tensors: dict[str, Any] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"sharded checkpoint: {fqn!r} is not a tensor (only tensors go through DCP)")
            tensors[fqn] = {"dtype": _dtype_name(md.properties.dtype), "size": list(md.size), "chunks": []}
        for wr_list in results:
            for wr in wr_list:
                c: _Chunk = wr.storage_data
                tensors[wr.index.fqn]["chunks"].append(
                    {"offsets": list(wr.index.offset or ()), "sizes": list(c.sizes), "file": c.file, "key": c.key})
                self.files[c.file] = {"sha256": c.file_sha256, "size": c.file_size}
        for fqn, md in tensors.items():
            want = len(metadata.state_dict_metadata[fqn].chunks)  # type: ignore[union-attr]
            if len(md["chunks"]) != want:
                raise CheckpointError(f"sharded checkpoint: tensor {fqn!r} has {len(md['chunks'])} written chunks, "
                                      f"the plan has {want}")
        doc = {"format": FORMAT, "tensors": tensors}
        self.files[METADATA] = _write_durable(self.folder / METADATA, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        _fsync_path(self.folder)

    def storage_meta(self):
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True


class SafetensorsReader(StorageReader):
    """DCP StorageReader for `SafetensorsWriter` folders: orjson + safetensors only, never pickle."""

    def __init__(self, folder: str | os.PathLike) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.storage_data: dict[MetadataIndex, tuple[str, str]] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.folder = Path(checkpoint_id)
        self.storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if args or kwargs:  # DCP's rank-local fallback; this format has one global metadata file only
            raise CheckpointError(f"{self.folder}: no rank-local metadata in rlswift sharded checkpoints")
        doc = read_metadata_json(self.folder)
        sd_md: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, tuple[str, str]] = {}
        for fqn, md in doc["tensors"].items():
            chunks = []
            for c in md["chunks"]:
                if not _RANK_FILE.match(c["file"]):
                    raise CheckpointError(f"{self.folder / METADATA}: chunk file {c['file']!r} of {fqn!r} is not a "
                                          "rankNNNNN.safetensors file; refusing to open it")
                chunks.append(ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"])))
                storage[MetadataIndex(fqn, c["offsets"])] = (c["file"], c["key"])
            sd_md[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=_dtype(md["dtype"])),
                                               size=torch.Size(md["size"]), chunks=chunks)
        return Metadata(state_dict_metadata=sd_md, storage_data=storage)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list] = {}
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                raise CheckpointError(f"sharded checkpoint: {req.storage_index.fqn!r} is not a tensor")
            per_file.setdefault(self.storage_data[req.storage_index][0], []).append(req)
        for fname, reqs in per_file.items():
            with safetensors.safe_open(str(self.folder / fname), framework="pt") as f:
                for req in reqs:
                    key = self.storage_data[req.storage_index][1]
                    if len(req.lengths) == 0:
                        src = f.get_tensor(key)
                    else:
                        sl = tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))
                        src = f.get_slice(key)[sl]
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != src.size():
                        raise CheckpointError(f"{self.folder / fname}: chunk {key!r} slice has shape "
                                              f"{tuple(src.shape)}, the destination {tuple(target.shape)}")
                    target.copy_(src)
                    planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True


def read_metadata_json(folder: Path) -> dict:
    """Parse and sanity-check `metadata.json` of a sharded state folder."""
    path = Path(folder) / METADATA
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a complete rlswift sharded state (interrupted save?)")
    try:
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("tensors"), dict):
        raise CheckpointError(f"{path}: not an {FORMAT} metadata file")
    for fqn, md in doc["tensors"].items():
        for c in md["chunks"]:
            if not _RANK_FILE.match(c["file"]):
                raise CheckpointError(f"{path}: chunk file {c['file']!r} of {fqn!r} is not a rankNNNNN.safetensors "
                                      "file; refusing to open it")
    return doc


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
        files[f"{subdir}/{SKELETON}"] = _write_durable(out / SKELETON, doc)
        _fsync_path(out)
    return files


def sharded_files(folder: str | os.PathLike, subdir: str = DEFAULT_SUBDIR) -> list[str]:
    """Relpaths (under ``folder``) of every file a complete sharded state consists of, from its metadata."""
    out = Path(folder) / subdir
    doc = read_metadata_json(out)
    names = {c["file"] for md in doc["tensors"].values() for c in md["chunks"]}
    return sorted(f"{subdir}/{n}" for n in names | {METADATA, SKELETON})


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
    skel_path = src / SKELETON
    if not skel_path.is_file():
        raise CheckpointError(f"{skel_path} is missing: not a complete rlswift sharded state")
    doc = orjson.loads(skel_path.read_bytes())
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{skel_path}: not an {FORMAT} skeleton")
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
