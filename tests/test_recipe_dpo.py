"""DPO through the real CLI on the tiny model: runs, learns, resumes exactly, refuses bad input clearly."""

from __future__ import annotations

import json

import pytest

from e2e import compare_runs, run_cli
from rlswift.runlog import read_jsonl

pytestmark = pytest.mark.slow
BASE = ["-m", "rlswift.recipes.dpo", "--config", "recipes/dpo_tiny.yaml", "gradient_accumulation_steps=2"]
TRL_NAMES = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}


def dpo(out, *overrides, cache, fault=None):
    return run_cli([*BASE, f"output_dir={out}", *overrides], cache, fault=fault)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rlswift_cache):
    out = tmp_path_factory.mktemp("dpo") / "reference"
    ok(dpo(out, cache=rlswift_cache))
    return out


def test_metrics_have_trl_names_and_margins_rise(reference):
    rows = list(read_jsonl(reference / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert TRL_NAMES <= set(rows[0])
    # lr 1e-3 on a tiny model: the chosen-vs-rejected margin grows over 8 steps.
    assert sum(r["rewards/margins"] for r in rows[-3:]) > sum(r["rewards/margins"] for r in rows[:3])


@pytest.mark.parametrize("fault", ["kill@5", "term@4", "kill-in-save@6"])
def test_resume_is_exact(reference, tmp_path, rlswift_cache, fault):
    out = tmp_path / "resumed"
    first = dpo(out, cache=rlswift_cache, fault=fault)
    assert first.returncode == (0 if fault.startswith("term") else -9), first.stderr[-3000:]
    ok(dpo(out, "resume=auto", cache=rlswift_cache))
    compare_runs(reference, out, 8)


def test_lora_epoch_boundary_from_jsonl(tmp_path, rlswift_cache):
    """8 rows, 4 per step: every checkpoint (save_steps=2) falls exactly on an epoch boundary; LoRA adapter only."""
    data = tmp_path / "prefs.jsonl"
    with open(data, "w") as fh:
        for i in range(8):
            fh.write(json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"}) + "\n")
    overrides = [f"dataset={data}", "lora.rank=4", "lora.alpha=8", "save_steps=2", "max_steps=5"]
    ref, res = tmp_path / "ref", tmp_path / "res"
    ok(dpo(ref, *overrides, cache=rlswift_cache))
    assert max(r["epoch"] for r in read_jsonl(ref / "metrics.jsonl")) >= 2
    assert dpo(res, *overrides, cache=rlswift_cache, fault="kill@5").returncode == -9
    ok(dpo(res, *overrides, "resume=auto", cache=rlswift_cache))
    compare_runs(ref, res, 5)
    from rlswift.checkpoint.inspect import read_hook_states

    model_state = read_hook_states(ref / "checkpoint-5")["model"]
    assert model_state and all("lora" in k for k in model_state)  # LoRA checkpoints hold the adapter only


def test_malformed_rows_are_named(tmp_path, rlswift_cache):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    proc = dpo(tmp_path / "out", f"dataset={data}", cache=rlswift_cache)
    assert proc.returncode != 0 and "rejected" in proc.stderr and "1" in proc.stderr, proc.stderr[-2000:]
