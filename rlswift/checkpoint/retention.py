"""Which checkpoints to delete: a pure function, so the policy is testable without a filesystem."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable


def _metric(metrics: dict, name: str) -> float | None:
    v = metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None  # missing / nan (written as null) / non-numeric: never "best"
    return float(v)


def best_checkpoint(complete: list[tuple[int, Path, dict]], best_metric: str, best_mode: str) -> Path | None:
    """The checkpoint with the best finite `metrics[best_metric]` (ties: the earliest step), or None."""
    best: tuple[float, Path] | None = None
    for _step, path, metrics in sorted(complete, key=lambda c: c[0]):
        v = _metric(metrics, best_metric)
        if v is None:
            continue
        if best is None or (v > best[0] if best_mode == "max" else v < best[0]):
            best = (v, path)
    return best[1] if best else None


def select_deletions(complete: list[tuple[int, Path, dict]], save_total_limit: int | None,
                     best_metric: str | None, best_mode: str, keep: Iterable[Path | None] = ()) -> list[Path]:
    """Checkpoints to delete: all complete ones except the newest `save_total_limit` by step, the best one by
    `best_metric` (if set) and any path in `keep` (e.g. the one just saved and the one resumed from).

    `complete` holds (step, path, metrics) of complete checkpoints only. None limit: delete nothing.
    """
    if save_total_limit is None:
        return []
    ordered = sorted(complete, key=lambda c: c[0])
    kept = {p for _s, p, _m in ordered[-save_total_limit:]}
    kept |= {Path(k).resolve() for k in keep if k is not None}
    if best_metric is not None:
        b = best_checkpoint(ordered, best_metric, best_mode)
        if b is not None:
            kept.add(b)
    kept_resolved = {Path(k).resolve() for k in kept}
    return [p for _s, p, _m in ordered if p.resolve() not in kept_resolved]
