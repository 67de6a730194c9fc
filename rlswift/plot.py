"""`rlswift plot`: training curves of one or more runs, overlaid, from their `metrics.jsonl`.

One panel per metric (default: reward, loss, kl, completion_length, timing/step) against the step, one line per run
(the legend names the run folder). A metric no run logged is skipped with a note (DPO logs no reward or completion
length; GRPO logs kl only when beta > 0). Nested fields are named with '/': `timing/step` is
``record["timing"]["step"]``, and a flat key that itself holds '/' (`rewards/accuracy`) is found as written.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlswift.runlog import read_jsonl

__all__ = ["DEFAULT_METRICS", "PlotError", "PlotResult", "metric_value", "load_series", "plot_runs"]

DEFAULT_METRICS = ("reward", "loss", "kl", "completion_length", "timing/step")


class PlotError(ValueError):
    """A run folder or metric list cannot be plotted; the message names it and the fix."""


@dataclass
class PlotResult:
    """What `plot_runs` drew."""

    figure: Any
    """The matplotlib Figure (closed after saving when `plot_runs(..., keep_open=False)`)."""
    panels: list[str]
    """Metrics that got a panel, in order."""
    notes: list[str] = field(default_factory=list)
    """Metrics skipped, and runs that lack a plotted metric."""


def metric_value(record: dict, name: str) -> float | None:
    """``record[name]``, or the nested value ``record[a][b]`` for ``name = 'a/b'``; None when absent or not a number."""
    value: Any = record.get(name)
    if value is None and "/" in name:
        value = record
        for part in name.split("/"):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def load_series(run_dir: str | os.PathLike, metrics: list[str]) -> dict[str, tuple[list[int], list[float]]]:
    """``{metric: (steps, values)}`` for each metric the run logged at least once."""
    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if not run.is_dir():
        raise PlotError(f"{run} is not a folder; pass run folders (output_dir of a recipe)")
    if not path.is_file():
        raise PlotError(f"{run} has no metrics.jsonl: not a run folder, or the run has not finished a step yet")
    try:
        rows = list(read_jsonl(path))
    except Exception as e:  # noqa: BLE001 - orjson's error type is not public; any parse failure is the same problem
        raise PlotError(f"{path}: unreadable ({e})") from None
    if not rows:
        raise PlotError(f"{path} is empty: the run has not logged a step yet")
    out: dict[str, tuple[list[int], list[float]]] = {}
    for name in metrics:
        pts = [(r["step"], v) for r in rows if "step" in r and (v := metric_value(r, name)) is not None]
        if pts:
            out[name] = ([s for s, _ in pts], [v for _, v in pts])
    return out


def _labels(runs: list[Path]) -> list[str]:
    """The run folder names, or longer path tails where two names collide."""
    for depth in range(1, 8):
        labels = [str(Path(*r.resolve().parts[-depth:])) for r in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(r) for r in runs]


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        win = [v for v in values[max(0, i - window + 1):i + 1] if not math.isnan(v)]
        out.append(sum(win) / len(win) if win else math.nan)
    return out


def plot_runs(run_dirs: list[str | os.PathLike], out_png: str | os.PathLike,
              metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS, smooth: int = 1,
              keep_open: bool = False) -> PlotResult:
    """Draw one panel per metric with every run overlaid and save it to ``out_png``.

    ``smooth`` > 1 adds a moving average over that many steps (the raw line stays, faint). Raises PlotError for a
    folder that is not a run, and when none of ``metrics`` was logged by any run.
    """
    if not run_dirs:
        raise PlotError("no run folders given; pass one or more output_dir folders")
    metrics = [m.strip() for m in metrics if m.strip()]
    if not metrics:
        raise PlotError("no metrics asked for; e.g. --metrics reward,loss,timing/step")
    if smooth < 1:
        raise PlotError(f"smooth={smooth} must be >= 1 (1 = no moving average)")
    runs = [Path(r) for r in run_dirs]
    series = [load_series(r, metrics) for r in runs]
    labels = _labels(runs)
    panels = [m for m in metrics if any(m in s for s in series)]
    notes = [f"skipped {m!r}: no run logged it" for m in metrics if m not in panels]
    for label, s in zip(labels, series):
        notes += [f"{label} has no {m!r}" for m in panels if m not in s and len(runs) > 1]
    if not panels:
        raise PlotError(f"none of the metrics {', '.join(metrics)} is in any run's metrics.jsonl; "
                        f"fields logged: {', '.join(_fields(runs[0]))}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax in axes.flat[len(panels):]:
        fig.delaxes(ax)
    for ax, name in zip(axes.flat, panels):
        for i, (label, s) in enumerate(zip(labels, series)):
            if name not in s:
                continue
            steps, values = s[name]
            color = f"C{i % 10}"
            if smooth > 1:
                ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
                ax.plot(steps, _moving_average(values, smooth), color=color, linewidth=2)
            else:
                # Overlaid identical runs (e.g. interrupted vs uninterrupted) hide each other: dash the later ones.
                ax.plot(steps, values, color=color, linewidth=2 if i == 0 else 1.2,
                        linestyle="-" if i == 0 else "--", marker="." if len(steps) < 40 else None)
        ax.set_title(name + (f" (moving average {smooth})" if smooth > 1 else ""))
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # One legend for the figure: a run may lack the metric of any single panel.
    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=2 if i == 0 or smooth > 1 else 1.2,
                      linestyle="-" if i == 0 or smooth > 1 else "--") for i in range(len(runs))]
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), fontsize="small", frameon=False)
    legend_rows = math.ceil(len(labels) / 4)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.06 * legend_rows / rows))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    if not keep_open:
        plt.close(fig)
    return PlotResult(figure=fig, panels=panels, notes=notes)


def _fields(run: Path) -> list[str]:
    row = next(read_jsonl(run / "metrics.jsonl"))
    flat = [k for k, v in row.items() if not isinstance(v, dict)]
    return flat + [f"{k}/{k2}" for k, v in row.items() if isinstance(v, dict) for k2 in v]
