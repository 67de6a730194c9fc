"""Weight transport between a trainer and a rollout server: a two-rank torch.distributed process group of its own.

Rank 0 is the trainer (it hosts the TCPStore and broadcasts), rank 1 the server (it receives). The group is built
directly from ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` over its own TCPStore, never through
``init_process_group``: a trainer running under torchrun keeps its default group untouched, and the two processes need
no shared world. Gloo carries CPU tensors (the CPU tests); NCCL carries CUDA tensors GPU to GPU (the trainer on one
GPU, the engine on another), never through host memory.

Tensors travel packed: consecutive tensors are copied into one uint8 buffer of at most ``bucket_bytes`` (each at a
16-byte aligned offset, so the receiver views them back without a copy), one broadcast per buffer.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import torch

BACKENDS = ("gloo", "nccl")
ALIGN = 16  # byte alignment of each tensor inside a bucket: every dtype can be viewed back in place
DEFAULT_BUCKET_BYTES = 512 * 2**20

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (the wire name of a dtype)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"weight transport: dtype {dtype} is not supported; use one of {sorted(_DTYPES)}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of dtype_name; refuses unknown names."""
    if name not in _DTYPES:
        raise ValueError(f"weight transport: unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class Slot:
    """Where one tensor lies in a bucket."""

    name: str
    dtype: str  # wire name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # byte offset in the bucket, a multiple of ALIGN
    nbytes: int


def plan_buckets(meta: Iterable[tuple[str, str, tuple[int, ...]]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
                 ) -> list[tuple[int, list[Slot]]]:
    """Group (name, dtype, shape) in order into buckets of at most ``bucket_bytes`` (a larger tensor gets a bucket
    of its own): [(bucket size in bytes, slots)]. Sender and receiver compute the same plan from the same meta."""
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
    buckets: list[tuple[int, list[Slot]]] = []
    slots: list[Slot] = []
    size = 0
    for name, dt, shape in meta:
        n = 1
        for d in shape:
            n *= int(d)
        nbytes = n * torch.empty((), dtype=dtype_from_name(dt)).element_size()
        if slots and size + nbytes > bucket_bytes:
            buckets.append((size, slots))
            slots, size = [], 0
        slots.append(Slot(name, dt, tuple(int(d) for d in shape), size, nbytes))
        size += -(-nbytes // ALIGN) * ALIGN
    if slots:
        buckets.append((size, slots))
    return buckets


def pack(tensors: list[torch.Tensor], slots: list[Slot], size: int, device: torch.device | str) -> torch.Tensor:
    """Copy tensors into one uint8 buffer on ``device`` at their slots' offsets."""
    buf = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    for t, s in zip(tensors, slots):
        if s.nbytes:
            buf[s.offset:s.offset + s.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return buf


def unpack(buf: torch.Tensor, slots: list[Slot]) -> list[tuple[str, torch.Tensor]]:
    """Views (no copy) of the tensors in a received buffer, as (name, tensor)."""
    return [(s.name, buf[s.offset:s.offset + s.nbytes].view(dtype_from_name(s.dtype)).view(s.shape)) for s in slots]


def local_address_for(host: str) -> str:
    """This machine's address as seen from ``host`` (loopback for a local server): where the server can reach the
    trainer's TCPStore. No packet is sent (a UDP socket only picks a route)."""
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def open_store(host: str, timeout_s: float) -> torch.distributed.TCPStore:
    """The trainer's TCPStore (master) on a free port of ``host``; its port is ``store.port``."""
    from torch.distributed import TCPStore

    return TCPStore(host, 0, 2, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class WeightChannel:
    """One end of the trainer->server weight group: rank 0 broadcasts buckets, rank 1 receives them."""

    def __init__(self, backend: str, host: str, port: int, rank: int, timeout_s: float = 600.0,
                 store: torch.distributed.Store | None = None, device: torch.device | str | None = None) -> None:
        """Join the group (blocks until both ranks joined). ``store``: the master store (rank 0), else a client
        store connects to host:port. ``device``: where buffers live (CPU for gloo; a CUDA device for NCCL)."""
        import torch.distributed as dist

        if backend not in BACKENDS:
            raise ValueError(f"weight transport backend must be one of {list(BACKENDS)}, got {backend!r}")
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build: use weight_transport='http'")
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(host, int(port), 2, False, timeout=timeout)
        self.store = store  # keep the master store alive as long as the group
        prefixed = dist.PrefixStore("rollout_weights", store)
        self.backend, self.rank = backend, rank
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # Gloo binds to this machine's interface that routes to the store's host (loopback for a local pair).
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_for(host))]
            self.pg = dist.ProcessGroupGloo(prefixed, rank, 2, opts)
            self.device = torch.device("cpu")
        else:
            if not hasattr(dist, "ProcessGroupNCCL") or not torch.cuda.is_available():
                raise RuntimeError("weight_transport='nccl' needs CUDA and a torch build with NCCL; "
                                   "use 'gloo' or 'http'")
            self.device = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
            torch.cuda.set_device(self.device)
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        # A first broadcast checks the link both ways before any weight depends on it.
        probe = torch.tensor([1234.0 if rank == 0 else 0.0], device=self.device)
        self._broadcast(probe)
        if float(probe.item()) != 1234.0:
            raise RuntimeError(f"weight transport ({backend}) handshake failed: got {float(probe.item())}")

    def _broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        if not t.is_cuda:
            self.pg.broadcast([t], opts).wait()
            return
        with torch.cuda.device(t.device):  # the calling thread's current device may be another one
            self.pg.broadcast([t], opts).wait()
            torch.cuda.current_stream(t.device).synchronize()

    def send(self, tensors: list[torch.Tensor], buckets: list[tuple[int, list[Slot]]]) -> None:
        """Rank 0: broadcast the tensors (in plan order) bucket by bucket."""
        i = 0
        for size, slots in buckets:
            buf = pack(tensors[i:i + len(slots)], slots, size, self.device)
            i += len(slots)
            self._broadcast(buf)

    def recv(self, buckets: list[tuple[int, list[Slot]]]) -> list[tuple[str, torch.Tensor]]:
        """Rank 1: receive every bucket of the plan; (name, tensor view) in plan order."""
        out: list[tuple[str, torch.Tensor]] = []
        for size, slots in buckets:
            buf = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            self._broadcast(buf)
            out.extend(unpack(buf, slots))
        return out

    def close(self) -> None:
        """Tear the group down (abort: the peer may be gone)."""
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None:
            try:
                pg.abort()
            except Exception:  # noqa: BLE001 - best effort on a possibly broken link
                pass
        self.store = None
