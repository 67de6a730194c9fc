"""Nothing lost, nothing silent (issue #9), through the real CLI on the tiny model.

One writer per run folder; overwrite deletes only a run's own files; data files are used whole and checked on
resume; a prompt drawn twice in one generation call gets new samples; bad rewards and unusable checkpoints end in one
`error:` line; unscorable samples (a reward returning None) train on.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from e2e import REPO, env_for, run_cli
from rlswift.runlog import read_jsonl

pytestmark = pytest.mark.slow
GRPO = ["-m", "rlswift.recipes.grpo", "--config", "recipes/grpo_tiny.yaml"]
DPO = ["-m", "rlswift.recipes.dpo", "--config", "recipes/dpo_tiny.yaml"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def one_line_error(proc, *needles: str) -> str:
    """The process failed with exit 2 and one `error:` line holding every needle, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write_prompts(path, n: int, offset: int = 0) -> None:
    rows = [{"prompt": [{"role": "user", "content": f"What is {i + offset} + {i}?"}], "answer": str(2 * i + offset)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_second_writer_is_refused_while_the_first_runs(tmp_path, rlswift_cache):
    out = tmp_path / "run"
    cmd = [sys.executable, *GRPO, f"output_dir={out}", "max_steps=200", "save_steps=100"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env_for(rlswift_cache), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").stat().st_size:
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        second = run_cli([*GRPO, f"output_dir={out}", "resume=auto", "max_steps=200", "save_steps=100"],
                         rlswift_cache)
        one_line_error(second, "in use by another rlswift run", f"pid {first.pid}")
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()
    # The SIGKILLed run left no stale lock: the folder can be resumed (from scratch: no checkpoint was saved yet).
    ok(run_cli([*GRPO, f"output_dir={out}", "resume=auto", "max_steps=1"], rlswift_cache))
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]


def test_overwrite_deletes_only_what_a_run_wrote(tmp_path, rlswift_cache):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    (project / "train.py").write_text("print('my code')\n")
    for args in (["overwrite=true"], [], ["resume=auto"]):
        one_line_error(run_cli([*DPO, f"output_dir={project}", *args], rlswift_cache), "not an rlswift run folder")
    assert (project / "config.yaml").read_text() == "mine: true\n" and (project / "train.py").exists()

    run = tmp_path / "run"
    ok(run_cli([*DPO, f"output_dir={run}", "max_steps=3", "save_steps=1", "save_total_limit=5"], rlswift_cache))
    (run / "notes.txt").write_text("keep me")
    one_line_error(run_cli([*DPO, f"output_dir={run}", "max_steps=1"], rlswift_cache), "already holds a run")
    ok(run_cli([*DPO, f"output_dir={run}", "overwrite=true", "max_steps=1"], rlswift_cache))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]  # the old 2 and 3 are gone
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1]
    assert (run / "notes.txt").read_text() == "keep me"


def test_prompt_file_is_used_whole_and_checked_on_resume(tmp_path, rlswift_cache):
    data = tmp_path / "prompts.jsonl"
    write_prompts(data, 100)
    out = tmp_path / "run"
    args = [*GRPO, f"output_dir={out}", f"dataset={data}", "reward_funcs=[accuracy]", "max_steps=2", "save_steps=1"]
    proc = ok(run_cli(args, rlswift_cache))  # the preset sets num_prompts=64: it does not cut a file
    assert f"num_prompts=64 applies to the built-in arithmetic task only; {data} is used whole (100 rows)" in proc.stderr
    from rlswift.checkpoint.inspect import read_hook_states

    assert read_hook_states(out / "checkpoint-2")["sampler"]["num_items"] == 100  # not cut to num_prompts

    write_prompts(data, 100, offset=1)  # same row count, other content
    one_line_error(run_cli([*args, "resume=auto", "max_steps=3"], rlswift_cache),
                   f"the prompt data '{data}' changed since the checkpoint")
    write_prompts(data, 100)  # the original data resumes fine
    ok(run_cli([*args, "resume=auto", "max_steps=3"], rlswift_cache))


def test_preference_file_edit_is_refused_on_resume(tmp_path, rlswift_cache):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = [*DPO, f"output_dir={out}", f"dataset={data}", "max_steps=2", "save_steps=1"]
    ok(run_cli(args, rlswift_cache))
    rows[3]["chosen"] = " 7"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one_line_error(run_cli([*args, "resume=auto", "max_steps=3"], rlswift_cache),
                   f"the preference data '{data}' changed since the checkpoint")


def test_a_prompt_drawn_twice_in_one_call_gets_new_samples(tmp_path, rlswift_cache):
    data = tmp_path / "three.jsonl"
    write_prompts(data, 3)  # 3 prompts, 4 per step: every generation call holds one prompt twice
    out = tmp_path / "run"
    ok(run_cli([*GRPO, f"output_dir={out}", f"dataset={data}", "reward_funcs=[accuracy]", "max_steps=2"],
               rlswift_cache))
    trajs = list(read_jsonl(out / "trajectories.jsonl"))
    assert len({t["seed"] for t in trajs}) == len(trajs) == 2 * 4 * 4
    for call in {t["call"] for t in trajs}:
        rows = [t for t in trajs if t["call"] == call]
        uids = [t["prompt_uid"] for t in rows[::4]]
        dup = next(u for u in uids if uids.count(u) == 2)
        idx = sorted(t["sample_idx"] for t in rows if t["prompt_uid"] == dup)
        assert idx == list(range(8))  # the second copy holds samples 4..7, not copies of 0..3


@pytest.mark.parametrize("reward, needles", [
    ("userland.custom.inf_reward", ["reward function 'userland.custom.inf_reward' returned inf for prompt",
                                    "sample 1", "must be finite"]),
    ("userland.custom.raising_reward", ["reward function 'userland.custom.raising_reward' raised "
                                        "ZeroDivisionError: user bug"]),
])
def test_bad_rewards_end_in_one_line(tmp_path, rlswift_cache, reward, needles):
    one_line_error(run_cli([*GRPO, f"output_dir={tmp_path / 'run'}", f"reward_funcs=[{reward}]", "max_steps=1"],
                           rlswift_cache), *needles)


def test_unscorable_samples_train_on(tmp_path, rlswift_cache):
    out = tmp_path / "run"
    ok(run_cli([*GRPO, f"output_dir={out}", "reward_funcs=[userland.custom.sometimes_none_reward]", "max_steps=2"],
               rlswift_cache))
    trajs = list(read_jsonl(out / "trajectories.jsonl"))
    unscored = [t for t in trajs if t["reward"] is None]  # NaN is written as null
    assert unscored and all(t["advantage"] == 0.0 for t in unscored)
    assert len(unscored) < len(trajs)


def test_checkpoint_refusals_are_one_line(tmp_path, rlswift_cache):
    one_line_error(run_cli([*DPO, f"output_dir={tmp_path / 'a'}", f"resume={tmp_path / 'nope'}"], rlswift_cache),
                   "does not exist")
    out = tmp_path / "b"
    ok(run_cli([*DPO, f"output_dir={out}", "max_steps=1"], rlswift_cache))
    one_line_error(run_cli([*DPO, f"output_dir={out}", "resume=auto", "max_steps=2", "lr_scheduler=linear"],
                           rlswift_cache), "lr_scheduler")
    # Extending a decaying schedule would change every remaining learning rate: refused, naming the fix.
    out = tmp_path / "c"
    ok(run_cli([*DPO, f"output_dir={out}", "max_steps=2", "lr_scheduler=cosine"], rlswift_cache))
    one_line_error(run_cli([*DPO, f"output_dir={out}", "resume=auto", "max_steps=4", "lr_scheduler=cosine"],
                           rlswift_cache), "max_steps 2 -> 4", "lr_decay_steps")
    ok(run_cli([*DPO, f"output_dir={out}", "overwrite=true", "max_steps=2", "lr_scheduler=cosine",
                "lr_decay_steps=4"], rlswift_cache))
    ok(run_cli([*DPO, f"output_dir={out}", "resume=auto", "max_steps=4", "lr_scheduler=cosine", "lr_decay_steps=4"],
               rlswift_cache))
    # `lr` is the rate each step's update used (as TRL logs it): cosine over 4 steps from 1e-3, resumed at step 2.
    lrs = [r["lr"] for r in read_jsonl(out / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)], rel=1e-12), lrs


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, rlswift_cache):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(run_cli([*DPO, f"output_dir={tmp_path / 'r'}", "device=cuda"], rlswift_cache),
                   "device='cuda' but torch sees no CUDA GPU")
