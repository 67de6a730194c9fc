"""`rlswift verify-resume` as users run it: passes on exact recipes, fails on hidden randomness, inspects checkpoints."""

from __future__ import annotations

import pytest

from e2e import run_cli

pytestmark = pytest.mark.slow


def test_dpo_random_kill_point_is_identical(tmp_path, rlswift_cache):
    proc = run_cli(["-m", "rlswift", "verify-resume", "--config", "recipes/dpo_tiny.yaml", "--steps", "6",
                    "--kill-at", "random", "--kill-seed", "3", "--workdir", str(tmp_path / "v")], rlswift_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "IDENTICAL" in proc.stdout and "final state" in proc.stdout


def test_grpo_during_save_is_identical(tmp_path, rlswift_cache):
    proc = run_cli(["-m", "rlswift", "verify-resume", "--config", "recipes/grpo_tiny.yaml", "--steps", "4",
                    "--kill-at", "2", "--during-save", "--workdir", str(tmp_path / "v"), "save_steps=2",
                    "reward_funcs=[userland.custom.digit_reward]"], rlswift_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "kill-in-save@2" in proc.stdout and "IDENTICAL" in proc.stdout


def test_unregistered_randomness_is_caught(tmp_path, rlswift_cache):
    """A reward drawing from os.urandom makes the resumed run differ: verify-resume must say so and exit non-zero."""
    proc = run_cli(["-m", "rlswift", "verify-resume", "--config", "recipes/grpo_tiny.yaml", "--steps", "4",
                    "--kill-at", "3", "--workdir", str(tmp_path / "v"), "save_steps=2",
                    "reward_funcs=[userland.custom.leaky_reward]"], rlswift_cache)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "DIVERGED" in proc.stdout and "DIFF" in proc.stdout


def test_workdir_that_is_not_ours_is_never_deleted(tmp_path, rlswift_cache):
    (tmp_path / "keep.txt").write_text("user file")
    proc = run_cli(["-m", "rlswift", "verify-resume", "--config", "recipes/dpo_tiny.yaml", "--steps", "2",
                    "--workdir", str(tmp_path)], rlswift_cache)
    assert proc.returncode == 2 and "was not made by verify-resume" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "user file"


def test_ckpt_inspect_and_diff(tmp_path, rlswift_cache):
    out = tmp_path / "run"
    proc = run_cli(["-m", "rlswift.recipes.dpo", "--config", "recipes/dpo_tiny.yaml", f"output_dir={out}",
                    "max_steps=4", "save_steps=2"], rlswift_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    inspect = run_cli(["-m", "rlswift", "ckpt", "inspect", str(out / "checkpoint-4")], rlswift_cache)
    assert inspect.returncode == 0 and "optimizer" in inspect.stdout and "sampler" in inspect.stdout
    same = run_cli(["-m", "rlswift", "ckpt", "diff", str(out / "checkpoint-4"), str(out / "checkpoint-4")], rlswift_cache)
    assert same.returncode == 0
    diff = run_cli(["-m", "rlswift", "ckpt", "diff", str(out / "checkpoint-2"), str(out / "checkpoint-4")], rlswift_cache)
    assert diff.returncode == 1 and "model" in diff.stdout
