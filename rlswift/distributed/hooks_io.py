"""The collective write and read of a whole hook registry inside one checkpoint folder, for `CheckpointManager`.

Each hook is written according to its `checkpoint_kind`:
  - "sharded" (`ShardedState`): `dcp.save_sharded` into ``hooks/{stem}.dcp/`` (every rank writes its chunks);
  - "per_rank" (`PerRankState`, e.g. the RNG streams): ``hooks/{stem}.rankRRRRR-of-WWWWW.json|.safetensors``
    by every rank;
  - "replicated" (everything else: progress, sampler, buffers, caches, scheduler, user hooks): rank 0 writes
    ``hooks/{stem}.json|.safetensors`` exactly as one process does; every rank loads it;
  - "main_only" (`MainOnly`, the run logs): written like a replicated hook, loaded on rank 0 only.
`write_hooks` returns ``(hooks, files)`` for the manifest: complete on rank 0 after every rank's files are
fsynced (the per-rank tables are gathered); rank 0 then writes manifest.json LAST. `read_hooks` is the inverse on
any world size (sharded state is resharded, per-rank state remapped by `rank_state.source_rank`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import orjson
import safetensors.torch
import torch

from rlswift.checkpoint.codec import CodecError, encode
from rlswift.checkpoint.manager import hook_file_stem
from rlswift.checkpoint.reader import CheckpointError, load_hook_state
from rlswift.distributed.dcp import load_sharded, save_sharded
from rlswift.distributed.dcp_storage import fsync_path, write_durable
from rlswift.distributed.launch import DistInfo, all_gather_json
from rlswift.distributed.rank_state import load_rank_state, save_rank_state, saved_world_size
from rlswift.distributed.train_state import checkpoint_kind
from rlswift.state.registry import hook_name_mismatch

__all__ = ["write_hooks", "read_hooks", "sharded_subdir", "agree"]


def sharded_subdir(stem: str) -> str:
    """Folder (relative to the checkpoint) of a sharded hook's DCP files."""
    return f"hooks/{stem}.dcp"


def _write_replicated(folder: Path, stem: str, name: str, state: Any) -> dict[str, dict[str, Any]]:
    try:
        tree, tensors = encode(state, hook=name)
    except CodecError as e:
        raise CheckpointError(str(e)) from e
    (folder / "hooks").mkdir(parents=True, exist_ok=True)
    files = {f"hooks/{stem}.json": write_durable(folder / f"hooks/{stem}.json", orjson.dumps(tree))}
    if tensors:
        files[f"hooks/{stem}.safetensors"] = write_durable(folder / f"hooks/{stem}.safetensors",
                                                      safetensors.torch.save(tensors))
    return files


def agree(fn: Callable[[], Any], info: DistInfo, what: str) -> Any:
    """Run ``fn()`` on every rank and agree on failure: if it raised on any rank, it raises on EVERY rank (the
    failing rank re-raises its own exception, the others a CheckpointError naming that rank), so no rank is left
    waiting in a later collective. COLLECTIVE (one small all-gather); a plain call for one process."""
    if not info.distributed or not torch.distributed.is_initialized():  # one process (or a test's stand-in)
        return fn()
    error: BaseException | None = None
    out = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        error = e
    told = all_gather_json(None if error is None else f"{type(error).__name__}: {error}", info)
    if error is not None:
        raise error
    for rank, msg in enumerate(told):
        if msg is not None:
            raise CheckpointError(f"{what} failed on rank {rank}: {msg}")
    return out


def _codec_errors(fn, *args):
    try:
        return fn(*args)
    except CodecError as e:
        raise CheckpointError(str(e)) from e


def write_hooks(folder: str | os.PathLike, hooks: Mapping[str, Any], info: DistInfo,
                after_hook: Callable[[int], None] | None = None
                ) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Write every hook into ``folder`` (the agreed tmp folder, the same path on every rank). COLLECTIVE.

    Every rank must pass the same hook names in the same order. Returns ``(hooks, files)``: ``hooks`` maps each
    name to its relpaths, ``files`` maps every relpath to ``{sha256, size}``; both complete on rank 0 (what the
    manifest needs), partial elsewhere. When it returns on rank 0, every rank's files are written and fsynced.
    A failure on any rank (disk full, a state the codec refuses) raises on every rank. ``after_hook(i)`` is called
    after the i-th hook's files are written (fault injection in tests).
    """
    folder = Path(folder)
    names = list(hooks.keys())
    seen = all_gather_json(names, info)
    if any(s != names for s in seen):
        raise CheckpointError(f"ranks register different hooks: {seen}; every rank must register the same names")
    stems: dict[str, str] = {}
    local: dict[str, dict[str, Any]] = {}
    hook_files: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        hook = hooks[name]
        stem = hook_file_stem(name)
        if stem in stems:
            raise CheckpointError(f"hooks {stems[stem]!r} and {name!r} map to the same file name {stem!r}; rename one")
        stems[stem] = name
        kind = checkpoint_kind(hook)
        if kind == "sharded":
            files = save_sharded(hook.state_dict(), folder, info, subdir=sharded_subdir(stem))
        elif kind == "per_rank":
            files = agree(lambda: _codec_errors(save_rank_state, hook.state_dict(), folder, stem, info), info,
                          f"writing {name!r}")
        else:  # replicated and main_only: rank 0's copy
            files = agree(lambda: _write_replicated(folder, stem, name, hook.state_dict()) if info.is_main else {},
                          info, f"writing {name!r}")
        local.update(files)
        hook_files[name] = sorted(files)
        if after_hook is not None:
            after_hook(i)
    # Gather the per-rank files (sharded tables are already complete on rank 0; re-sending them is harmless).
    tables = all_gather_json({"files": local, "hooks": hook_files}, info)
    if not info.is_main:
        return hook_files, local
    all_files: dict[str, dict[str, Any]] = {}
    all_hooks: dict[str, list[str]] = {n: [] for n in names}
    for t in tables:
        all_files.update(t["files"])
        for n, rels in t["hooks"].items():
            all_hooks[n] = sorted(set(all_hooks[n]) | set(rels))
    (folder / "hooks").mkdir(parents=True, exist_ok=True)
    fsync_path(folder / "hooks")  # the new names in hooks/ are durable before the manifest
    return all_hooks, all_files


def read_hooks(folder: str | os.PathLike, manifest: dict, hooks: Mapping[str, Any], info: DistInfo,
               step: int | None = None) -> None:
    """Load every hook from a VERIFIED checkpoint ``folder`` on this world size. COLLECTIVE.

    Replicated hooks: every rank decodes the same files. Sharded: `load_sharded` into the hook's current state
    (a template on this world size), resharding as needed. Per-rank: this rank's source by the remap rule; a rank
    without a source calls ``hook.fresh(rank, step)`` (``step`` defaults to the manifest's). Replicated and
    per-rank states are decoded before any hook is touched; sharded states load in place. The registered and the
    saved hook names must be the same sets (CheckpointError naming both lists); a failure on any rank raises on
    every rank.
    """
    folder = Path(folder)
    step = int(manifest.get("step", 0)) if step is None else step
    problem = hook_name_mismatch(manifest["hooks"], hooks)
    if problem:
        raise CheckpointError(f"checkpoint {folder} and the registered hooks differ: {problem}; register the same "
                              "hooks as the saving run")

    def decode_all() -> dict[str, Any]:
        decoded: dict[str, Any] = {}
        for name, hook in hooks.items():
            stem, kind = hook_file_stem(name), checkpoint_kind(hook)
            if kind == "replicated" or (kind == "main_only" and info.is_main):
                decoded[name] = load_hook_state(folder, name, manifest)
            elif kind == "per_rank":
                if any(".rank" in rel for rel in manifest["hooks"][name]):
                    state = load_rank_state(folder, stem, info, saved_world_size(manifest["files"], stem))
                else:  # written by the one-process manager (hooks/{stem}.json): saved world size 1
                    state = load_hook_state(folder, name, manifest) if info.rank == 0 else None
                decoded[name] = hook.fresh(info.rank, step) if state is None else state
        return decoded

    decoded = agree(decode_all, info, f"reading {folder}")
    for name, hook in hooks.items():
        if checkpoint_kind(hook) == "sharded":
            hook.load_state_dict(load_sharded(hook.state_dict(), folder, info,
                                              subdir=sharded_subdir(hook_file_stem(name))))

    def apply() -> None:
        for name, hook in hooks.items():
            if name in decoded:
                try:
                    hook.load_state_dict(decoded[name])
                except Exception as e:  # noqa: BLE001 - named, one line, with the original chained
                    raise CheckpointError(f"{folder}: hook {name!r} refused its saved state: {type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''}") from e

    agree(apply, info, f"loading {folder}")
