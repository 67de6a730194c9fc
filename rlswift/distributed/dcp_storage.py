"""The storage layer under DCP for rlswift's sharded checkpoints: safetensors chunks and JSON metadata, no pickle.

`SafetensorsWriter` (each rank: one `rankNNNNN.safetensors` of its chunks, fsynced; rank 0: `metadata.json`) and
`SafetensorsReader` (orjson + safetensors `safe_open` slices) implement DCP's StorageWriter/StorageReader, so DCP's
planners do the resharding. Chunk files named anything but `rankNNNNN.safetensors` are refused unopened.
See dcp.py for the folder layout and the public API.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Any

import orjson
import safetensors
import safetensors.torch
import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner,
                                                  WriteItemType)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from rlswift.checkpoint.reader import CheckpointError

__all__ = ["SafetensorsWriter", "SafetensorsReader", "read_metadata_json", "write_durable", "fsync_path", "FORMAT",
           "METADATA"]

FORMAT = "rlswift-dcp/1"
METADATA = "metadata.json"
_RANK_FILE = re.compile(r"^rank\d{5}\.safetensors$")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_OVERLAP_BYTES = 64 << 20


def write_durable(path: Path, data: bytes) -> dict[str, Any]:
    """Write, flush, fsync; return the file's manifest entry (sha256 of the bytes in hand, size).

    For large files the hash runs in a thread while the bytes are written (both release the GIL): on a machine
    with a spare core the checksum costs no extra time.
    """
    digest = hashlib.sha256()
    hasher = None
    if len(data) >= _OVERLAP_BYTES:
        hasher = threading.Thread(target=digest.update, args=(data,), daemon=True)
        hasher.start()
    else:
        digest.update(data)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if hasher is not None:
        hasher.join()
    return {"sha256": digest.hexdigest(), "size": len(data)}


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
            entry = write_durable(self.folder / fname, safetensors.torch.save(tensors))
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
        self.files[METADATA] = write_durable(self.folder / METADATA, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        fsync_path(self.folder)

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


