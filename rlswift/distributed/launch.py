"""Process-group setup from torchrun's environment, and small pickle-free collectives the recipes need.

`init_distributed()` reads what `torchrun` exports (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): with it,
one process group (gloo on CPU, nccl on CUDA with the device set from LOCAL_RANK); without it, a single process that
never touches torch.distributed. Every helper here takes a `DistInfo` and is a no-op (or the identity) for a single
process, so a recipe calls them unconditionally.

The object collectives of torch.distributed (`broadcast_object_list`, `all_gather_object`) pickle; the helpers here
move orjson bytes in uint8 tensors instead, so nothing a rank receives is ever unpickled by rlswift code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson
import torch

__all__ = [
    "DistInfo",
    "ConfigMismatchError",
    "init_distributed",
    "destroy_distributed",
    "torchrun_env",
    "single_process",
    "barrier",
    "broadcast_json",
    "all_gather_json",
    "any_rank",
    "agree_config",
    "config_differences",
]

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run. A single process is ``DistInfo(0, 1, 0, device, True)``."""

    rank: int
    """Global rank in [0, world_size)."""
    world_size: int
    """Number of processes (1: no torch.distributed at all)."""
    local_rank: int
    """Rank on this host (picks the CUDA device)."""
    device: torch.device
    """Where this rank computes: cuda:LOCAL_RANK with CUDA, else cpu."""
    is_main: bool
    """rank == 0: the one process that writes logs, the manifest and the `latest` pointer."""

    @property
    def distributed(self) -> bool:
        """True when collectives are needed (world_size > 1). torchrun with one process behaves as one process."""
        return self.world_size > 1


class ConfigMismatchError(RuntimeError):
    """Ranks resolved different configs; the message names every differing key and the ranks."""


def torchrun_env() -> dict[str, str] | None:
    """torchrun's variables when all of them are set; None when this process was not started by torchrun.

    A partial set (e.g. RANK without MASTER_ADDR) is an error naming the missing ones: half a launcher
    environment would otherwise hang at the rendezvous or silently train alone.
    """
    present = {k: os.environ[k] for k in _TORCHRUN_KEYS if k in os.environ}
    if not present:
        return None
    missing = [k for k in _TORCHRUN_KEYS if k not in present]
    if missing:
        raise RuntimeError(
            f"incomplete torchrun environment: {sorted(present)} are set but {missing} are not. Launch with "
            "`torchrun --nproc-per-node N -m ...`, or unset RANK/WORLD_SIZE/LOCAL_RANK to run one process")
    return present


def single_process(device: str | torch.device | None = None) -> DistInfo:
    """The DistInfo of a run without torchrun (cpu unless ``device`` says otherwise)."""
    return DistInfo(0, 1, 0, torch.device(device or "cpu"), True)


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes, or return the single-process DistInfo when not under torchrun.

    ``device``: "cpu" forces gloo on CPU even when CUDA is present; "cuda" requires CUDA; None picks cuda when
    available. With CUDA the device is ``cuda:LOCAL_RANK`` (set as current) and the backend nccl; on CPU, gloo.
    Idempotent: a second call returns the same DistInfo without re-initialising.
    """
    env = torchrun_env()
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} asks for CUDA but torch.cuda.is_available() is False; use device=cpu")
    if env is None:
        return single_process("cuda" if want_cuda else "cpu")
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    if want_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices are visible; "
                               "start at most that many processes per node (--nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    dist = torch.distributed
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if want_cuda:
            kwargs["device_id"] = dev  # binds the group to this device (eager NCCL init, no guessing)
        store = _attempt_store(env, world, timeout_s)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(**kwargs)
    if dist.get_rank() != rank or dist.get_world_size() != world:
        raise RuntimeError(f"process group says rank {dist.get_rank()}/{dist.get_world_size()}, torchrun's "
                           f"environment {rank}/{world}")
    return DistInfo(rank, world, local, dev, rank == 0)


def _attempt_store(env: dict[str, str], world: int, timeout_s: float):
    """After a torchrun restart: the agent's store, under a prefix of this attempt; None otherwise (env://).

    torchrun's workers share the elastic agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE) and the default group
    writes its keys there unprefixed, so a restarted group could read the previous attempt's addresses: measured
    here (torch 2.13, gloo) 2 of 3 restarts failed with "Gloo connectFullMesh failed ... Connection refused"
    (pytorch/pytorch#135712). Every group made later (vLLM's too) uses the default group's store, so they are
    scoped as well.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt in (None, "0"):
        return None
    base = torch.distributed.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False,
                                      timeout=timedelta(seconds=timeout_s))
    return torch.distributed.PrefixStore(f"rlswift/attempt_{attempt}", base)


def destroy_distributed() -> None:
    """Tear the process group down (end of main; harmless when there is none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.distributed:
        torch.distributed.barrier()


def _comm_device(info: DistInfo) -> torch.device:
    # nccl moves CUDA tensors only; gloo CPU tensors.
    return info.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def broadcast_json(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank, sent as orjson bytes (JSON types only; ranks != src may pass None)."""
    if not info.distributed:
        return obj
    dev = _comm_device(info)
    data = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS) if info.rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    torch.distributed.broadcast(size, src)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    if info.rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    torch.distributed.broadcast(buf, src)
    return orjson.loads(buf.cpu().numpy().tobytes())


def all_gather_json(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (JSON types), in rank order, on every rank."""
    if not info.distributed:
        return [obj]
    dev = _comm_device(info)
    data = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(info.world_size)]
    torch.distributed.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=dev))
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=dev)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    bufs = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in range(info.world_size)]
    torch.distributed.all_gather(bufs, mine)
    return [orjson.loads(b[: int(s.item())].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes)]


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on at least one (all_reduce MAX); the stop-signal agreement.

    Call it at the same point of every step on every rank (a collective): a SIGTERM that reached only one rank
    then stops all of them at the end of the same step.
    """
    if not info.distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device(info))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(reference: dict, mine: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts, as 'key: ref -> mine' lines (sorted)."""
    a, b = _flatten(reference), _flatten(mine)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def agree_config(config: dict, info: DistInfo) -> dict:
    """Rank 0's resolved config, checked against every rank's own; a difference raises on EVERY rank.

    ``config`` is the JSON-able dict of the resolved config (e.g. ``config.to_dict(cfg)``). Rank 0's copy is
    the truth: it is broadcast, every rank compares it with its own, the differences are gathered, and when any
    rank differs all ranks raise `ConfigMismatchError` naming the ranks and keys (no rank is left hanging in
    a later collective). Returns rank 0's config (JSON round-tripped: tuples become lists).
    """
    if not info.distributed:
        return config
    canonical = orjson.loads(orjson.dumps(config, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS))
    truth = broadcast_json(canonical if info.rank == 0 else None, info)
    diffs = all_gather_json(config_differences(truth, canonical), info)
    bad = {r: d for r, d in enumerate(diffs) if d}
    if bad:
        lines = [f"rank {r}: " + "; ".join(d) for r, d in bad.items()]
        raise ConfigMismatchError(
            "ranks resolved different configs (rank 0 -> other rank):\n  " + "\n  ".join(lines)
            + "\nEvery rank must get the same config file and overrides (and the same environment and files for "
              "paths it resolves); fix the launch command")
    return truth
