"""safetensors files written while hashing, and read back straight into tensors: one pass over the bytes each way.

The format is safetensors' own (8-byte little-endian header length, a JSON header, then the tensors' bytes back to
back), so `safetensors.torch.load_file` reads what we write and we read what it writes. What this module adds:

- `write_tensors(f, tensors, hasher)` streams each tensor's memory straight to the file and into the sha256 (no
  serialized copy of the whole file in memory, no read-back hashing afterwards);
- `read_tensors(path, size, hasher)` reads a file once, each tensor's bytes straight into a tensor of its own
  while hashing them, after checking the header as strictly as safetensors does: a hostile file can fail to
  parse, never run code, allocate more than its own size or read outside its data.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import orjson
import torch

__all__ = ["DTYPES", "CHUNK", "Hasher", "write_all", "shards", "write_tensors", "start_writeback", "read_hashed",
           "read_tensors"]

if sys.byteorder != "little":  # safetensors is little-endian; raw tensor memory is written as is
    raise ImportError("rlswift checkpoints need a little-endian machine")

CHUNK = 16 << 20  # bytes per write/hash call: large enough for full disk speed, small enough to pipeline
_MAX_HEADER = 100_000_000  # safetensors' own limit

# safetensors dtype names <-> torch dtypes (the ones the codec accepts).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
}
for _st, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        DTYPES[_st] = getattr(torch, _name)
_NAMES = {v: k for k, v in DTYPES.items()}

# Files are written and verified by WORKERS threads at once, each hashing its own file: sha256 (~1.5 GB/s per core
# with SHA-NI here) is slower than this disk with early writeback (~1.5 GB/s), so one core hashing alone would set
# the pace. hashlib and file I/O release the GIL on large buffers.
WORKERS = max(2, min(8, os.cpu_count() or 2))
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="rlswift-sha256")
        return _pool


class Hasher:
    """sha256 of a byte stream fed in order; each chunk is hashed on a helper thread while the caller does the
    I/O of the next one (one chunk in flight per Hasher, so updates stay in order with a shared pool).

    The caller must not change a buffer passed to `update` until the next `update` or `drain` returns.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._pending: Future | None = None
        self.size = 0

    def update(self, data) -> None:
        self.drain()
        self.size += len(data)
        if len(data) < (1 << 16):  # small: cheaper inline
            self._h.update(data)
        else:
            self._pending = _hash_pool().submit(self._h.update, data)

    def drain(self) -> None:
        """Wait until every chunk passed so far is hashed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def hexdigest(self) -> str:
        self.drain()
        return self._h.hexdigest()


def write_all(f: BinaryIO, data) -> None:
    """write() until every byte is written (an unbuffered file may write less than asked)."""
    mv = memoryview(data).cast("B")
    while mv:
        n = f.write(mv)
        mv = mv[n:]


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def header_for(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix + padded JSON) and the order the tensors' bytes follow in."""
    # Larger elements first: with an 8-aligned data start every tensor then starts at a multiple of its item
    # size, so a reader can view it in place (safetensors orders them the same way).
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    entries, off = {}, 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    head = orjson.dumps(entries)
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, order


SHARD = 256 << 20  # a hook's tensors are split into files of about this size, so WORKERS can write them at once


def shards(tensors: dict[str, torch.Tensor], limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Split `tensors` into groups of at most `limit` (default SHARD) bytes each (a larger tensor gets a group of
    its own), in insertion order; an empty dict gives one empty group."""
    limit = SHARD if limit is None else limit
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > limit:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def write_tensors(f: BinaryIO, tensors: dict[str, torch.Tensor], hasher: Hasher) -> int:
    """Write `tensors` (contiguous CPU tensors) as a safetensors file to `f`, feeding `hasher` the same bytes.

    Returns the byte count. The caller fsyncs. Writeback is started every few chunks so the final fsync is short.
    """
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: need a contiguous CPU tensor of a safetensors dtype, got "
                             f"{t.dtype} on {t.device} (contiguous={t.is_contiguous()})")
    head, order = header_for(tensors)
    write_all(f, head)
    hasher.update(head)
    fd, done = f.fileno(), len(head)
    for name in order:
        if tensors[name].numel() == 0:
            continue
        mv = _tensor_bytes(tensors[name])
        for i in range(0, len(mv), CHUNK):
            chunk = mv[i:i + CHUNK]
            hasher.update(chunk)
            write_all(f, chunk)
            start_writeback(fd, done, len(chunk))
            done += len(chunk)
    hasher.drain()  # the tensors may be reused once we return
    return done


_sync_file_range = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these dirty pages to disk now (Linux sync_file_range, WRITE only: it
    does not wait for the disk), so disk writes overlap hashing and the next chunks instead of all happening in
    the final fsync. A no-op where unavailable; durability still comes from fsync."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _sync_file_range = fn
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE


def read_hashed(path: str | os.PathLike, size: int, hasher: Hasher | None,
                keep: bool = True) -> torch.Tensor | None:
    """Read the `size` bytes of `path` once, feeding `hasher` (if any); returns them as a uint8 tensor.

    keep=False (verification only): returns None, and only two chunk buffers are used, one hashed while the other
    is read into.

    Raises OSError if the file ends early (the caller has compared sizes; the file may change under us).
    """
    buf = torch.empty(size if keep else min(size, 2 * CHUNK), dtype=torch.uint8)
    mv = memoryview(buf.numpy()).cast("B")
    with open(path, "rb", buffering=0) as f:
        off, i = 0, 0
        while off < size:
            n = min(CHUNK, size - off)
            if keep:
                view = mv[off:off + n]
            else:  # the other half's chunk (two reads ago) is hashed: update() drains before queueing
                view = mv[(i % 2) * CHUNK:(i % 2) * CHUNK + n]
            got = 0
            while got < n:
                r = f.readinto(view[got:])
                if not r:
                    raise OSError(f"{path}: file ended after {off + got} of {size} bytes")
                got += r
            if hasher is not None:
                hasher.update(view)
            off, i = off + n, i + 1
    if hasher is not None:
        hasher.drain()
    return buf if keep else None


def _read_exact(f, view, hasher: Hasher | None) -> None:
    """Fill `view` from `f` in chunks, feeding each chunk to `hasher`; OSError if the file ends first."""
    off = 0
    while off < len(view):
        chunk = view[off:off + CHUNK]
        got = 0
        while got < len(chunk):
            r = f.readinto(chunk[got:])
            if not r:
                raise OSError(f"{f.name}: file ended early")
            got += r
        if hasher is not None:
            hasher.update(chunk)
        off += len(chunk)


def _entries(header: Any, data_size: int) -> list[tuple[str, torch.dtype, list[int], int]]:
    """(name, dtype, shape, nbytes) in file order, after checking the header as strictly as safetensors does."""
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    entries = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in e["shape"])
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and all(type(o) is int for o in e["data_offsets"])):
            raise ValueError(f"bad header entry for tensor {name!r}: {str(e)[:200]}")
        entries.append((e["data_offsets"][0], e["data_offsets"][1], name, DTYPES[e["dtype"]], e["shape"]))
    entries.sort(key=lambda x: (x[0], x[1]))
    out, pos = [], 0
    for begin, end, name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        if begin != pos or end - begin != nbytes:
            raise ValueError(f"tensor {name!r} has offsets [{begin}, {end}], expected [{pos}, "
                             f"{pos + nbytes}] (overlapping, gapped or wrongly sized data)")
        pos = end
        out.append((name, dtype, shape, nbytes))
    if pos != data_size:
        raise ValueError(f"the tensors cover {pos} bytes but the file holds {data_size} after the header")
    return out


def read_tensors(path: str | os.PathLike, size: int, hasher: Hasher | None) -> dict[str, torch.Tensor]:
    """Read a safetensors file of `size` bytes once: its header, then each tensor's bytes straight into a new
    tensor of its own (no intermediate buffer, no copy), feeding every byte to `hasher` in file order.

    ValueError naming the problem when the file is not a valid safetensors file; the rest of the file is still
    hashed first, so the caller can tell a corrupted file (checksum) from a malformed one.
    """
    with open(path, "rb", buffering=0) as f:
        try:
            if size < 8:
                raise ValueError(f"{size} bytes is too short for a safetensors file")
            head8 = bytearray(8)
            _read_exact(f, memoryview(head8), hasher)
            n = int.from_bytes(head8, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} is invalid for a {size}-byte safetensors file")
            head = bytearray(n)
            _read_exact(f, memoryview(head), hasher)
            entries = _entries(orjson.loads(head), size - 8 - n)
        except (ValueError, orjson.JSONDecodeError) as e:
            if hasher is not None:  # hash what is left, for the caller's checksum comparison
                scratch = memoryview(bytearray(CHUNK))
                while got := f.readinto(scratch):
                    hasher.update(bytes(scratch[:got]))  # a copy: the scratch buffer is reused
                hasher.drain()
            raise ValueError(str(e)) from e
        out: dict[str, torch.Tensor] = {}
        for name, dtype, shape, nbytes in entries:
            t = torch.empty(shape, dtype=dtype)
            if nbytes:
                _read_exact(f, _tensor_bytes(t), hasher)
            out[name] = t
    if hasher is not None:
        hasher.drain()
    return out
