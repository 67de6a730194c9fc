"""GRPO through the real CLI on the tiny model: runs, writes its run folder, and resumes exactly.

Each resume test compares N steps in one process against: the same run stopped at step K (SIGKILL or SIGTERM in the
middle of the step, or SIGKILL in the middle of a checkpoint write) and resumed in a fresh process with resume=auto.
"""

from __future__ import annotations

import pytest

from e2e import compare_runs, run_cli
from rlswift.runlog import read_jsonl

pytestmark = pytest.mark.slow
# The digit reward gives the random tiny model a learning signal; the curriculum is a user state hook (with its own
# numpy generator) advanced by a reward function, loaded by dotted path as a user would.
BASE = ["-m", "rlswift.recipes.grpo", "--config", "recipes/grpo_tiny.yaml",
        "reward_funcs=[accuracy,userland.custom.digit_reward,userland.custom.curriculum_reward]",
        "state_hooks=[userland.custom.make_hooks]"]


def grpo(out, *overrides, cache, fault=None):
    proc = run_cli([*BASE, f"output_dir={out}", *overrides], cache, fault=fault)
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rlswift_cache):
    """8 uninterrupted steps with the vLLM engine, checkpoints at 3, 6, 8."""
    out = tmp_path_factory.mktemp("grpo") / "reference"
    ok(grpo(out, cache=rlswift_cache))
    return out


def test_run_folder_and_learning_signal(reference):
    metrics = list(read_jsonl(reference / "metrics.jsonl"))
    trajs = list(read_jsonl(reference / "trajectories.jsonl"))
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert len(trajs) == 8 * 4 * 4
    assert {"loss", "reward", "reward_std", "grad_norm", "entropy", "completion_length", "lr"} <= set(metrics[0])
    assert set(metrics[0]["timing"]) >= {"rollout", "reward", "train", "sync", "step"}
    t = trajs[0]
    assert {"step", "prompt_uid", "sample_idx", "seed", "prompt", "completion_ids", "completion", "rewards",
            "advantage"} <= set(t)
    # Seeds are distinct for every sample of the run.
    assert len({x["seed"] for x in trajs}) == len(trajs)
    # The digit reward varies, so the policy really moves: nonzero gradient at every step.
    assert all(m["grad_norm"] > 0 for m in metrics)
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert (reference / "latest").read_text().strip() == "checkpoint-8"
    import yaml

    resolved = yaml.safe_load((reference / "config.yaml").read_text())
    assert (resolved["device"], resolved["precision"], resolved["shared_prompt"]) == ("cpu", "fp32", True)
    from rlswift.checkpoint.inspect import read_hook_states

    state = read_hook_states(reference / "checkpoint-8")
    assert state["curriculum"]["calls"] == 8  # the user hook was saved with the run
    assert {"model", "optimizer", "scheduler", "rng", "progress", "sampler", "generation_batch", "pending_groups",
            "reward_cache", "episode_returns"} <= set(state)


@pytest.mark.parametrize("fault", ["kill@5", "term@4", "kill-in-save@6"])
def test_resume_is_exact(reference, tmp_path, rlswift_cache, fault):
    out = tmp_path / "resumed"
    first = grpo(out, cache=rlswift_cache, fault=fault)
    assert first.returncode == (0 if fault.startswith("term") else -9), first.stderr[-3000:]
    if fault.startswith("term"):
        assert (out / "latest").read_text().strip() == "checkpoint-4"
    ok(grpo(out, "resume=auto", cache=rlswift_cache))
    compare_runs(reference, out, 8)


# Each variant: one uninterrupted run and one or more stopped+resumed runs compared against it.
VARIANTS = {
    # Generation batches reused for 2 steps (blocks 1-2, 3-4, ...), gradient accumulation, 8 prompts = 2 blocks per
    # epoch. kill@4 resumes from checkpoint-3, in the middle of a block; term@4 saves exactly on an epoch boundary.
    "iterations_epoch": (["num_iterations=2", "gradient_accumulation_steps=2", "num_prompts=8", "max_steps=6"],
                         ["kill@4", "term@4"], 6),
    # One-step off-policy GRPO: the next batch is sampled while the policy trains. Stops before the next batch is
    # launched (term@5: saved with the next batch in it), while it is in flight, and after it was made.
    "async_generation": (["async_generation=true", "max_steps=6"],
                         ["term@5", "kill-inflight@5", "kill-generated@4"], 6),
    # LoRA, the transformers engine, KL to the reference (adapter off) and dynamic sampling, together.
    # bf16 autocast over fp32 master weights with a bf16 engine, gradient checkpointing: exact in every mode.
    "mixed_precision_gc": (["precision=bf16-mixed", "gradient_checkpointing=true", "max_steps=5"], ["kill@4"], 5),
    "lora_hf_kl_dynamic": (["lora.rank=4", "lora.alpha=8", "learning_rate=5e-3", "engine=hf", "beta=0.1",
                            "dynamic_sampling=true", "max_steps=5"], ["kill@4"], 5),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_resume_variants(tmp_path, rlswift_cache, name):
    overrides, faults, steps = VARIANTS[name]
    ref = tmp_path / "ref"
    ok(grpo(ref, *overrides, cache=rlswift_cache))
    for fault in faults:
        res = tmp_path / f"res-{fault.replace('@', '-')}"
        first = grpo(res, *overrides, cache=rlswift_cache, fault=fault)
        assert first.returncode == (0 if fault.startswith("term") else -9), first.stderr[-3000:]
        ok(grpo(res, *overrides, "resume=auto", cache=rlswift_cache))
        compare_runs(ref, res, steps)


def test_bad_input_is_refused_clearly(tmp_path, rlswift_cache):
    cases = [
        (["reward_funcs=[acuracy]"], "unknown reward function 'acuracy'"),
        (["num_generations=1"], "num_generations=1"),
        (["max_stpes=3"], "Did you mean 'max_steps'"),
        (["model=/nonexistent/model"], "/nonexistent/model"),
    ]
    for i, (overrides, expected) in enumerate(cases):
        proc = grpo(tmp_path / f"bad{i}", *overrides, cache=rlswift_cache)
        assert proc.returncode != 0
        assert expected in proc.stderr, (expected, proc.stderr[-2000:])


def test_resume_with_changed_model_is_refused(reference, tmp_path, rlswift_cache):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    proc = grpo(out, "resume=auto", "max_steps=9", "learning_rate=0.5", cache=rlswift_cache)
    assert proc.returncode != 0 and "learning_rate" in proc.stderr
    # Run-length keys may change: continuing to step 9 works and appends exactly one metrics line.
    ok(grpo(out, "resume=auto", "max_steps=9", cache=rlswift_cache))
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, 10))
