"""`rlswift plot`: one panel per metric, runs overlaid, missing metrics noted, bad folders one clear error."""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from rlswift.plot import _moving_average, metric_value, plot_runs

REPO = Path(__file__).resolve().parents[1]


def write_run(folder: Path, steps: int, kl: bool = False, dpo: bool = False) -> Path:
    """A run folder whose metrics.jsonl has the records the recipes write (GRPO or DPO fields)."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "wb") as f:
        for s in range(1, steps + 1):
            if dpo:
                rec = {"step": s, "loss": 0.69 - 0.01 * s, "rewards/margins": 0.1 * s,
                       "timing": {"train": 0.05, "step": 0.08}}
            else:
                rec = {"step": s, "loss": 0.01 * s, "reward": s / steps, "completion_length": 10.0 + s,
                       "rewards/accuracy": 0.5, "timing": {"rollout": 0.4, "step": 1.0 + 0.1 * s}}
                if kl:
                    rec["kl"] = 0.001 * s
            f.write(orjson.dumps(rec) + b"\n")
    return folder


def lines_per_panel(result) -> dict[str, int]:
    return {ax.get_title(): len(ax.get_lines()) for ax in result.figure.axes}


def test_panels_runs_overlaid_and_missing_metrics_noted(tmp_path):
    from PIL import Image

    a = write_run(tmp_path / "uninterrupted", 8, kl=True)
    b = write_run(tmp_path / "resumed", 8)
    c = write_run(tmp_path / "dpo", 5, dpo=True)
    png = tmp_path / "out" / "plot.png"
    result = plot_runs([a, b, c], png, keep_open=True)
    assert result.panels == ["reward", "loss", "kl", "completion_length", "timing/step"]
    # One line per run that logged the metric: kl only in the first run, reward/length not in the DPO run.
    assert lines_per_panel(result) == {"reward": 2, "loss": 3, "kl": 1, "completion_length": 2, "timing/step": 3}
    assert [t.get_text() for t in result.figure.legends[0].get_texts()] == ["uninterrupted", "resumed", "dpo"]
    assert "dpo has no 'reward'" in result.notes and "resumed has no 'kl'" in result.notes
    kl_line = next(ax for ax in result.figure.axes if ax.get_title() == "kl").get_lines()[0]
    assert list(kl_line.get_xdata()) == list(range(1, 9))
    assert [round(v, 6) for v in kl_line.get_ydata()] == [round(0.001 * s, 6) for s in range(1, 9)]
    with Image.open(png) as im:  # 5 panels: 2 rows of 3 panels of 4.5 x 3.2 inches at 100 dpi
        assert im.format == "PNG" and im.size == (1350, 640)
    import matplotlib.pyplot as plt

    plt.close(result.figure)


def test_chosen_metrics_nested_and_flat_names_and_skips(tmp_path):
    run = write_run(tmp_path / "r", 4)
    result = plot_runs([run], tmp_path / "p.png", metrics=["rewards/accuracy", "timing/rollout", "nope"])
    assert result.panels == ["rewards/accuracy", "timing/rollout"]
    assert result.notes == ["skipped 'nope': no run logged it"]
    assert metric_value({"timing": {"step": 2}}, "timing/step") == 2.0
    assert metric_value({"rewards/accuracy": 0.5}, "rewards/accuracy") == 0.5
    assert metric_value({"flag": True, "s": "x"}, "flag") is None and metric_value({}, "timing/step") is None


def test_moving_average_by_hand():
    assert _moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert _moving_average([1.0, math.nan, 3.0], 3) == [1.0, 1.0, 2.0]


def test_same_folder_names_get_distinct_labels(tmp_path):
    a = write_run(tmp_path / "x" / "run", 3)
    b = write_run(tmp_path / "y" / "run", 3)
    result = plot_runs([a, b], tmp_path / "p.png", keep_open=True)
    assert [t.get_text() for t in result.figure.legends[0].get_texts()] == ["x/run", "y/run"]
    import matplotlib.pyplot as plt

    plt.close(result.figure)


def test_bad_folders_are_one_clear_error(tmp_path):
    from rlswift.cli import main

    (tmp_path / "empty-run").mkdir()
    (tmp_path / "empty-run" / "metrics.jsonl").write_bytes(b"")
    (tmp_path / "no-metrics").mkdir()
    good = write_run(tmp_path / "good", 3, dpo=True)
    cases = [
        ([str(tmp_path / "missing")], "is not a folder"),
        ([str(tmp_path / "no-metrics")], "has no metrics.jsonl"),
        ([str(tmp_path / "empty-run")], "is empty"),
        ([str(good), "--metrics", "reward,kl"], "none of the metrics reward, kl"),
        ([str(good), "--smooth", "0"], "smooth=0 must be >= 1"),
    ]
    for args, message in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["plot", *args, "--out", str(tmp_path / "x.png")]) == 2
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: ") and message in err.getvalue()
    assert not (tmp_path / "x.png").exists()


def test_cli_writes_the_png(tmp_path):
    a = write_run(tmp_path / "a", 6, kl=True)
    b = write_run(tmp_path / "b", 6)
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "-m", "rlswift", "plot", str(a), str(b), "--out", str(out), "--smooth", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: reward, loss, kl, completion_length, timing/step for 2 run(s)" in proc.stdout
    assert "note: b has no 'kl'" in proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
