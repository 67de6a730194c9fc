"""The memory-saving optimizers through the real DPO CLI: a run killed mid-way resumes exactly (projection matrices,
8-bit moments and update intervals are state too)."""

from __future__ import annotations

import pytest

from e2e import compare_runs, run_cli

pytestmark = pytest.mark.slow
BASE = ["-m", "rlswift.recipes.dpo", "--config", "recipes/dpo_tiny.yaml", "max_steps=7", "save_steps=3"]


@pytest.mark.parametrize("optimizer", [
    ["optimizer=adamw_8bit"],
    # A projection update every 2 steps: one falls right after the resume at step 6 (kill@5 resumes from 3).
    ["optimizer=galore_adamw_8bit", "optimizer.galore_rank=4", "optimizer.galore_update_proj_gap=2"],
    ["optimizer=q_galore_adamw_8bit", "optimizer.galore_rank=4", "optimizer.galore_update_proj_gap=2"],
])
def test_optimizer_state_resumes_exactly(tmp_path, rlswift_cache, optimizer):
    pytest.importorskip("bitsandbytes", reason="the optim extra is not installed (pip install 'rlswift[optim]')")
    ref, res = tmp_path / "ref", tmp_path / "res"
    proc = run_cli([*BASE, f"output_dir={ref}", *optimizer], rlswift_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = run_cli([*BASE, f"output_dir={res}", *optimizer], rlswift_cache, fault="kill@5")
    assert first.returncode == -9, first.stderr[-3000:]
    proc = run_cli([*BASE, f"output_dir={res}", "resume=auto", *optimizer], rlswift_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compare_runs(ref, res, 7)
