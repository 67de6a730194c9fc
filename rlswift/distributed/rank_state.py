"""Per-rank state (each rank's RNG streams): one file set per rank, and the rule that remaps it on a new world size.

Files: ``hooks/{stem}.rank{r:05d}-of-{w:05d}.json`` (+ ``.safetensors`` when the state has tensors), written by
rank r with the checkpoint codec (orjson + safetensors, no pickle) and fsynced.

Remap rule when a checkpoint saved on W ranks is loaded on W' ranks (`source_rank`):
  - new rank r < W takes old rank r's state (so W' == W restores every rank exactly);
  - new rank r >= W has no saved state: it starts fresh from seed ``rank_seed(run_seed, r, step)`` (a keyed hash,
    like `sample_seed`), ``step`` being the checkpoint's step. `derived_rng_state` builds that fresh RNG state.
  - old ranks r >= W' are dropped (their streams are not continued by anyone).
At a fresh start rank 0 seeds with ``run_seed`` itself (identical to one process) and rank r > 0 with
``rank_seed(run_seed, r, 0)``: `fresh_seed`.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import orjson
import safetensors.torch
import torch

from rlswift.checkpoint.codec import decode, encode
from rlswift.checkpoint.reader import CheckpointError
from rlswift.distributed.dcp_storage import write_durable
from rlswift.distributed.launch import DistInfo

__all__ = ["rank_seed", "fresh_seed", "source_rank", "rank_stem", "save_rank_state", "load_rank_state",
           "saved_world_size", "derived_rng_state", "PerRankState"]

_KEY = b"rlswift.rank_seed.v1"
_RANK_RE = re.compile(r"\.rank(\d{5})-of-(\d{5})\.json$")


def rank_seed(run_seed: int, rank: int, step: int) -> int:
    """Seed in [0, 2**63) for rank ``rank``'s fresh streams at ``step`` of run ``run_seed`` (keyed blake2b)."""
    for name, v in (("run_seed", run_seed), ("rank", rank), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int) or not -(2**63) <= v < 2**63:
            raise ValueError(f"rank_seed: {name} must be an int64, got {v!r}")
    digest = hashlib.blake2b(struct.pack("<3q", run_seed, rank, step), key=_KEY, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def fresh_seed(run_seed: int, rank: int) -> int:
    """The seed rank ``rank`` seeds its global streams with at a fresh start (rank 0: ``run_seed`` itself)."""
    return run_seed if rank == 0 else rank_seed(run_seed, rank, 0)


def source_rank(new_rank: int, saved_world_size: int) -> int | None:
    """Which saved rank's state new rank ``new_rank`` takes: itself when it existed, else None (fresh seed)."""
    if saved_world_size < 1 or new_rank < 0:
        raise ValueError(f"source_rank: bad arguments new_rank={new_rank}, saved_world_size={saved_world_size}")
    return new_rank if new_rank < saved_world_size else None


def rank_stem(stem: str, rank: int, world_size: int) -> str:
    """``{stem}.rank{rank:05d}-of-{world_size:05d}``."""
    return f"{stem}.rank{rank:05d}-of-{world_size:05d}"



def save_rank_state(state: Any, folder: str | os.PathLike, stem: str, info: DistInfo,
                    subdir: str = "hooks") -> dict[str, dict[str, Any]]:
    """Write THIS rank's ``state`` (any codec-able structure) and return ``{relpath: {sha256, size}}`` (fsynced).

    Not a collective; the manager gathers every rank's table to rank 0 (`launch.all_gather_json`) for the manifest.
    """
    out = Path(folder) / subdir
    out.mkdir(parents=True, exist_ok=True)
    base = rank_stem(stem, info.rank, info.world_size)
    tree, tensors = encode(state, hook=f"{stem} (rank {info.rank})")
    files = {f"{subdir}/{base}.json": write_durable(out / f"{base}.json", orjson.dumps(tree))}
    if tensors:
        files[f"{subdir}/{base}.safetensors"] = write_durable(out / f"{base}.safetensors",
                                                              safetensors.torch.save(tensors))
    return files


def saved_world_size(files: list[str] | dict, stem: str, subdir: str = "hooks") -> int:
    """The world size a per-rank hook was saved with, read from its file names (a manifest's `files` keys)."""
    sizes = set()
    for rel in files:
        if rel.startswith(f"{subdir}/{stem}.rank") and (m := _RANK_RE.search(rel)):
            sizes.add(int(m.group(2)))
    if len(sizes) != 1:
        raise CheckpointError(f"per-rank hook {stem!r}: expected files of one world size, found {sorted(sizes)}")
    return sizes.pop()


def load_rank_state(folder: str | os.PathLike, stem: str, info: DistInfo, saved_world: int,
                    subdir: str = "hooks") -> Any | None:
    """This rank's saved state by the remap rule, or None when it has no source (the caller seeds it fresh)."""
    src = source_rank(info.rank, saved_world)
    if src is None:
        return None
    base = Path(folder) / subdir / rank_stem(stem, src, saved_world)
    tree_path, tensor_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".safetensors")
    if not tree_path.is_file():
        raise CheckpointError(f"{tree_path} is missing: per-rank state of rank {src} (of {saved_world})")
    tree = orjson.loads(tree_path.read_bytes())
    tensors = safetensors.torch.load_file(str(tensor_path)) if tensor_path.is_file() else {}
    return decode(tree, tensors, hook=f"{stem} (rank {src})")


def derived_rng_state(template: dict, seed: int) -> dict:
    """An `RNGState` state dict shaped like ``template`` whose streams are freshly seeded from ``seed``.

    python: ``random.Random(seed)``; numpy global: ``RandomState(seed % 2**32)``; torch CPU and every CUDA device:
    ``manual_seed(seed)``; each named generator: seeded from ``rank_seed(seed, i, 0)`` (i = its position), torch
    ones with ``manual_seed``, numpy ones as a new bit generator of the same type. Touches no live stream.
    """
    out = dict(template)
    out["python"] = random.Random(seed).getstate()
    out["numpy"] = np.random.RandomState(seed % 2**32).get_state(legacy=True)
    gen = torch.Generator().manual_seed(seed)
    out["torch"] = gen.get_state()
    n_cuda = len(template.get("cuda", []))
    if n_cuda and torch.cuda.is_available():
        # fork_rng restores every device's stream afterwards: the live streams are untouched.
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            torch.cuda.manual_seed_all(seed)
            out["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()[:n_cuda]]
    gens = {}
    for i, (name, entry) in enumerate(template.get("generators", {}).items()):
        sub = rank_seed(seed, i, 0)
        if entry["kind"] == "torch":
            g = torch.Generator(device=entry.get("device", "cpu")).manual_seed(sub)
            gens[name] = {**entry, "state": g.get_state()}
        else:
            bitgen_name = entry["state"]["bit_generator"]
            bitgen = getattr(np.random, bitgen_name, None)
            if bitgen is None:
                raise ValueError(f"generator {name!r}: unknown numpy bit generator {bitgen_name!r}")
            gens[name] = {**entry, "state": bitgen(sub).state}
    out["generators"] = gens
    return out


class PerRankState:
    """Marks ``hook`` as per-rank (``checkpoint_kind = "per_rank"``) and carries its remap fallback.

    ``fresh(rank, step) -> state``: the state a rank without a saved source starts from (for `RNGState`:
    ``lambda r, s: derived_rng_state(rng.state_dict(), rank_seed(run_seed, r, s))``).
    """

    checkpoint_kind = "per_rank"

    def __init__(self, hook: Any, fresh: Callable[[int, int], Any]) -> None:
        self.hook = hook
        self.fresh = fresh

    def state_dict(self) -> Any:
        return self.hook.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.hook.load_state_dict(state)
