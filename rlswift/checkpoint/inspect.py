"""Human-readable views of checkpoints: summary, decoded hook states, and exact (bitwise) comparison.

Used by `rlswift ckpt inspect|diff` and by `rlswift verify-resume` to name the first differing hook.
Comparison is bitwise: -0.0 != 0.0, and two nans are equal only with the same payload; `max_abs_diff` is
reported for tensors/arrays/floats to show how far apart they are.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlswift.checkpoint.reader import (CheckpointError, is_multi_rank, load_hook_state, read_checkpoint, read_manifest,
                                       verify)

__all__ = ["Difference", "compare_states", "read_hook_states", "read_hook_state", "inspect_checkpoint",
           "diff_checkpoints"]


@dataclass(frozen=True)
class Difference:
    """One difference between two hook-state trees.

    kind: "missing" (present on one side only), "type", "shape", "dtype" or "value".
    """

    hook: str
    path: str
    kind: str
    max_abs_diff: float | None
    description: str

    def __str__(self) -> str:
        extra = f" (max |diff| {self.max_abs_diff:.3g})" if self.max_abs_diff is not None else ""
        return f"[{self.hook}]{self.path}: {self.kind}: {self.description}{extra}"


def _fmt(v: Any, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _tensor_bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.dtype == torch.bool or a.dtype.is_complex or a.numel() == 0:
        return None
    d = (a.detach().cpu().double() - b.detach().cpu().double()).abs()
    d = d[~torch.isnan(d)]
    return float(d.max()) if d.numel() else None


def _cmp(a: Any, b: Any, hook: str, path: str, out: list[Difference]) -> None:
    if type(a) is not type(b):
        out.append(Difference(hook, path, "type", None,
                              f"{type(a).__name__} vs {type(b).__name__}: {_fmt(a)} vs {_fmt(b)}"))
        return
    if isinstance(a, dict):
        for k in a:
            if k not in b:
                out.append(Difference(hook, f"{path}[{k!r}]", "missing", None, "only in the first"))
            else:
                _cmp(a[k], b[k], hook, f"{path}[{k!r}]", out)
        for k in b:
            if k not in a:
                out.append(Difference(hook, f"{path}[{k!r}]", "missing", None, "only in the second"))
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            out.append(Difference(hook, path, "shape", None, f"length {len(a)} vs {len(b)}"))
        for i, (x, y) in enumerate(zip(a, b)):
            _cmp(x, y, hook, f"{path}[{i}]", out)
    elif isinstance(a, torch.Tensor):
        if a.dtype != b.dtype:
            out.append(Difference(hook, path, "dtype", None, f"{a.dtype} vs {b.dtype}"))
        elif a.shape != b.shape:
            out.append(Difference(hook, path, "shape", None, f"{tuple(a.shape)} vs {tuple(b.shape)}"))
        elif not torch.equal(_tensor_bits(a), _tensor_bits(b)):
            n = int((_tensor_bits(a) != _tensor_bits(b)).sum()) if a.numel() else 0
            out.append(Difference(hook, path, "value", _max_abs(a, b),
                                  f"tensor {a.dtype}{list(a.shape)} differs ({n} differing bytes)"))
    elif isinstance(a, np.ndarray):
        if a.dtype != b.dtype:
            out.append(Difference(hook, path, "dtype", None, f"{a.dtype} vs {b.dtype}"))
        elif a.shape != b.shape:
            out.append(Difference(hook, path, "shape", None, f"{a.shape} vs {b.shape}"))
        elif a.tobytes() != b.tobytes():
            mad = None
            if a.dtype.kind in "iuf" and a.size:
                d = np.abs(a.astype(np.float64) - b.astype(np.float64))
                d = d[~np.isnan(d)]
                mad = float(d.max()) if d.size else None
            out.append(Difference(hook, path, "value", mad, f"array {a.dtype}{list(a.shape)} differs"))
    elif isinstance(a, np.generic):
        if a.dtype != b.dtype:
            out.append(Difference(hook, path, "dtype", None, f"{a.dtype} vs {b.dtype}"))
        elif a.tobytes() != b.tobytes():
            out.append(Difference(hook, path, "value", None, f"{_fmt(a)} vs {_fmt(b)}"))
    elif isinstance(a, float):
        if struct.pack("<d", a) != struct.pack("<d", b):
            mad = abs(a - b) if math.isfinite(a - b) else None
            out.append(Difference(hook, path, "value", mad, f"{a!r} vs {b!r}"))
    elif a != b:
        out.append(Difference(hook, path, "value", None, f"{_fmt(a)} vs {_fmt(b)}"))


def compare_states(a: dict, b: dict) -> list[Difference]:
    """Bitwise differences between two `{hook_name: decoded_state}` dicts, in hook order of `a` (then `b`)."""
    out: list[Difference] = []
    for name in a:
        if name not in b:
            out.append(Difference(name, "", "missing", None, "hook only in the first"))
        else:
            _cmp(a[name], b[name], name, "", out)
    for name in b:
        if name not in a:
            out.append(Difference(name, "", "missing", None, "hook only in the second"))
    return out


def read_hook_states(path: str | os.PathLike, check: bool = True) -> dict[str, Any]:
    """Decode every hook's saved state of the checkpoint at `path` without hook objects.

    check: verify sizes and checksums first (raises CheckpointError on any problem).
    A checkpoint of several ranks is shown as one process holds it, so checkpoints of any world size compare:
    the sharded policy + optimizer hook ("train_state") as "model" ({name: whole tensor}) and "optimizer"
    (``optimizer.state_dict()`` numbering), a per-rank hook as rank 0's state under its name and rank r's under
    "{name}[rank r]".
    """
    p = Path(path)
    manifest = read_manifest(p)
    if is_multi_rank(manifest):
        if check and (problems := verify(p)):
            raise CheckpointError(f"cannot read {p}: " + "; ".join(problems))
        return _multi_rank_states(p, manifest)
    if check:
        return read_checkpoint(p, context="cannot read {path}").states  # each file read once
    return {name: load_hook_state(p, name, manifest) for name in manifest["hooks"]}


def read_hook_state(path: str | os.PathLike, name: str, check: bool = True) -> Any:
    """One hook's saved state, as `read_hook_states` shows it (a checkpoint of several ranks: "model" and
    "optimizer" come from its sharded "train_state", whole tensors). KeyError naming the saved hooks when absent."""
    p = Path(path)
    manifest = read_manifest(p)
    if not is_multi_rank(manifest):
        if name not in manifest["hooks"]:
            raise KeyError(f"{p} has no hook {name!r} (saved: {list(manifest['hooks'])})")
        if check and (problems := verify(p)):
            raise CheckpointError(f"cannot read {p}: " + "; ".join(problems))
        return load_hook_state(p, name, manifest)
    states = read_hook_states(p, check=check)
    if name not in states:
        raise KeyError(f"{p} has no hook {name!r} (saved: {sorted(states)})")
    return states[name]


def _multi_rank_states(p: Path, manifest: dict) -> dict[str, Any]:
    from rlswift.checkpoint.writer import hook_file_stem
    from rlswift.distributed import DistInfo, load_rank_state, read_sharded_full, saved_world_size, sharded_subdir
    from rlswift.distributed.train_state import one_process_parts

    out: dict[str, Any] = {}
    for name, rels in manifest["hooks"].items():
        stem = hook_file_stem(name)
        if any(r.startswith(sharded_subdir(stem) + "/") for r in rels):
            state = read_sharded_full(p, sharded_subdir(stem))
            if isinstance(state, dict) and "model" in state and set(state) <= {"model", "optimizer"}:
                out.update(one_process_parts(state))
            else:
                out[name] = state
        elif any(f"hooks/{stem}.rank" in r for r in rels):
            world = saved_world_size(manifest["files"], stem)
            for r in range(world):
                info = DistInfo(r, world, r, torch.device("cpu"), r == 0)
                out[name if r == 0 else f"{name}[rank {r}]"] = load_rank_state(p, stem, info, world)
        else:
            out[name] = load_hook_state(p, name, manifest)
    return out


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect_checkpoint(path: str | os.PathLike) -> str:
    """A text summary: step, time, versions, checksum status, hooks with files and sizes, config summary."""
    p = Path(path)
    problems = verify(p)
    try:
        m = read_manifest(p)
    except CheckpointError as e:
        return f"{p}: not readable as a checkpoint ({e})\n" + "\n".join(f"  problem: {x}" for x in problems)
    lines = [f"checkpoint {p}", f"  step: {m.get('step')}  format_version: {m.get('format_version')}  "
             f"world_size: {m.get('world_size')}  rank: {m.get('rank')}"]
    if isinstance(m.get("time"), (int, float)):
        import datetime

        lines.append(f"  written: {datetime.datetime.fromtimestamp(m['time']).isoformat(timespec='seconds')}")
    lines.append("  versions: " + ", ".join(f"{k}={v}" for k, v in (m.get("versions") or {}).items()))
    lines.append("  checksums: OK" if not problems else f"  checksums: {len(problems)} problem(s)")
    lines += [f"    - {x}" for x in problems]
    files = m.get("files") or {}
    total = sum(int(f.get("size", 0)) for f in files.values())
    lines.append(f"  hooks ({len(m.get('hooks') or {})}, {_human(total)} total):")
    for name, rels in (m.get("hooks") or {}).items():
        desc = ", ".join(f"{Path(r).name} {_human(int(files.get(r, {}).get('size', 0)))}" for r in rels)
        lines.append(f"    {name}: {desc}")
    if m.get("metrics"):
        lines.append("  metrics: " + ", ".join(f"{k}={v}" for k, v in m["metrics"].items()))
    cfg = m.get("config") or {}
    lines.append(f"  config ({len(cfg)} keys):")
    for k, v in cfg.items():
        lines.append(f"    {k}: {_fmt(v, 70)}")
    return "\n".join(lines)


def diff_checkpoints(a: str | os.PathLike, b: str | os.PathLike, max_lines: int = 50) -> tuple[str, bool]:
    """Compare the decoded hook states of two checkpoints bitwise: (report, identical?).

    The report names the first differing hook and lists up to `max_lines` differences. Config and metric
    differences are reported too but do not count against `identical` (they are not state).
    """
    sa, sb = read_hook_states(a), read_hook_states(b)
    diffs = compare_states(sa, sb)
    lines = [f"diff {a} vs {b}"]
    ma, mb = read_manifest(a), read_manifest(b)
    for key in ("step", "config"):
        if ma.get(key) != mb.get(key):
            lines.append(f"  note: manifest {key} differs")
    if not diffs:
        lines.append(f"  identical: {len(sa)} hooks, bit for bit")
        return "\n".join(lines), True
    hooks = list(dict.fromkeys(d.hook for d in diffs))
    lines.append(f"  {len(diffs)} difference(s) in hooks {hooks}; first differing hook: {diffs[0].hook!r}")
    lines += [f"    {d}" for d in diffs[:max_lines]]
    if len(diffs) > max_lines:
        lines.append(f"    ... {len(diffs) - max_lines} more")
    return "\n".join(lines), False
