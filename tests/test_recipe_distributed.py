"""The recipes under torchrun (2 CPU processes, gloo, tiny model): exact resume on the same world size after SIGKILL,
SIGTERM and a torchrun restart, resume on another world size (2 -> 1, 1 -> 2) with what is exact and what is within
tolerance, a rank killed in the middle of a save, SIGTERM to torchrun itself, and verify-resume --nproc.

Launches share work: GRPO 5 (one with a restart inside), DPO 2 verify-resume runs (3 launches each) and 1 more.
About 4 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e import REPO, compare_runs, env_for

pytestmark = pytest.mark.slow

GRPO = ["max_steps=6", "save_steps=2", "reward_funcs=[length_penalty]",  # length_penalty: a gradient every step
        "vllm.kv_cache_gib=1"]  # two engines on one CI machine


def launch(nproc: int, recipe: str, out: Path, args: list[str], cache: Path, fault: str | None = None,
           restarts: int = 0, wait: bool = True):
    """The recipe on ``nproc`` processes (torchrun for more than one), output captured."""
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
              + (["--max-restarts", str(restarts)] if restarts else []) if nproc > 1 else [sys.executable])
    cmd = runner + ["-m", f"rlswift.recipes.{recipe}", "--config", f"recipes/{recipe}_tiny.yaml",
                    f"output_dir={out}", *args]
    extra = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"} | ({"RLSWIFT_FAULT": fault} if fault else {})
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env_for(cache, **extra), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env_for(cache, **extra), capture_output=True, text=True, timeout=900)


def output(proc) -> str:
    return (proc.stdout or "")[-4000:] + (proc.stderr or "")[-8000:]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo(tmp_path_factory, rlswift_cache):
    root = tmp_path_factory.mktemp("grpo-ranks")
    runs = {"root": root}
    runs["ref"] = launch(2, "grpo", root / "ref", GRPO + ["overwrite=true"], rlswift_cache)
    assert runs["ref"].returncode == 0, output(runs["ref"])
    # rank 1 SIGKILLed in the middle of step 3; torchrun restarts both ranks, which resume from checkpoint-2.
    runs["restart"] = launch(2, "grpo", root / "restart", GRPO + ["resume=auto"], rlswift_cache, fault="kill@3:1",
                             restarts=1)
    # SIGTERM to rank 1 only in step 3: both ranks stop after step 3 and save; then one process resumes (2 -> 1).
    runs["term"] = launch(2, "grpo", root / "two-to-one", GRPO + ["overwrite=true"], rlswift_cache, fault="term@3:1")
    shutil.copytree(root / "two-to-one", root / "two-to-two")  # the same stopped run, resumed on 2 ranks too
    runs["one"] = launch(1, "grpo", root / "two-to-one", GRPO + ["resume=auto"], rlswift_cache)
    runs["two"] = launch(2, "grpo", root / "two-to-two", GRPO + ["resume=auto"], rlswift_cache)
    return runs


def test_sigkill_of_one_rank_and_torchrun_restart_resume_exactly(grpo):
    proc = grpo["restart"]
    assert proc.returncode == 0, output(proc)
    text = output(proc)
    assert "exitcode: -9" in text  # the kill happened (rank 1), and torchrun restarted the group
    assert f"resumed from {grpo['root'] / 'restart' / 'checkpoint-2'}" in text
    compare_runs(grpo["root"] / "ref", grpo["root"] / "restart", 6)  # trajectories, metrics, every hook: bit for bit


def test_sigterm_to_one_rank_stops_every_rank_after_the_step_with_one_save(grpo):
    proc, run = grpo["term"], grpo["root"] / "two-to-one"
    assert proc.returncode == 0, output(proc)
    text = output(proc)
    assert "stopped by SIGTERM after step 3" in text  # rank 1
    assert "stopped by a stop signal to another rank after step 3" in text  # rank 0
    manifest = json.loads((run / "checkpoint-3" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 3
    files = set(manifest["files"])
    assert {"hooks/rng.rank00000-of-00002.json", "hooks/rng.rank00001-of-00002.json",
            "hooks/train_state.dcp/rank00000.safetensors", "hooks/train_state.dcp/rank00001.safetensors",
            "hooks/train_state.dcp/metadata.json", "hooks/sampler.json"} <= files
    assert not list(run.glob(".tmp-*"))


def test_sigterm_then_resume_on_two_ranks_is_exact(grpo):
    proc = grpo["two"]
    assert proc.returncode == 0, output(proc)
    assert f"resumed from {grpo['root'] / 'two-to-two' / 'checkpoint-3'}" in output(proc)
    compare_runs(grpo["root"] / "ref", grpo["root"] / "two-to-two", 6)


def test_two_ranks_to_one_process(grpo):
    """What stays bit-identical across 2 -> 1 (samples, seeds, tokens here, every replicated hook) and what is
    within tolerance (weights, optimizer moments, losses)."""
    from rlswift import verify

    proc, ref, run = grpo["one"], grpo["root"] / "ref", grpo["root"] / "two-to-one"
    assert proc.returncode == 0, output(proc)
    assert f"resumed from {run / 'checkpoint-3'}" in output(proc)
    # Steps 1-3 ran on the same world size: bit for bit.
    ta, tb = lines(ref / "trajectories.jsonl"), lines(run / "trajectories.jsonl")
    assert len(ta) == len(tb) == 96 and ta[:48] == tb[:48]
    checks = [
        verify._jsonl_within_tolerance(ref / "trajectories.jsonl", run / "trajectories.jsonl", "samples",
                                       verify.SAMPLE_KEYS),
        verify._jsonl_within_tolerance(ref / "trajectories.jsonl", run / "trajectories.jsonl", "tokens",
                                       ("completion_ids",)),
        verify._jsonl_within_tolerance(ref / "metrics.jsonl", run / "metrics.jsonl", "metrics",
                                       skip=verify.PARTITION_METRICS),
        *verify._compare_final_state(ref / "checkpoint-6", run / "checkpoint-6", tolerance=True),
    ]
    assert all(c.ok for c in checks), [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    exact = checks[3].detail
    for hook in ("sampler", "progress", "scheduler", "reward_cache", "episode_returns", "pending_groups"):
        assert hook in exact
    # Not bit-identical, and the tolerance is not vacuous: the weights did move and do differ in the last bits.
    bit = verify._compare_final_state(ref / "checkpoint-6", run / "checkpoint-6")
    assert not bit.ok and "model" in bit.detail
    assert sum(m["grad_norm"] > 0 for m in lines(ref / "metrics.jsonl")) >= 4  # the run did train


def test_one_process_loads_a_two_rank_checkpoint_bit_for_bit(grpo, rlswift_cache):
    """2 -> 1 at load time: the whole weights and optimizer state of the sharded checkpoint, exactly."""
    from rlswift.checkpoint import CheckpointManager
    from rlswift.checkpoint.inspect import compare_states, read_hook_states
    from rlswift.checkpoint.manager import read_manifest
    from rlswift.models import tiny_model_path
    from rlswift.models.policy import load_policy, policy_state_dict
    from rlswift.optim import build_optimizer
    from rlswift.recipes._common import ModelHook, _other_layout

    path = grpo["root"] / "ref" / "checkpoint-6"
    model = load_policy(tiny_model_path(rlswift_cache / "models"), seed=0)  # the runs' model (RLSWIFT_CACHE)
    optimizer = build_optimizer("adamw", model, lr=1e-3, implementation="fused")
    hooks, finish = _other_layout({"model": ModelHook(model), "optimizer": optimizer}, read_manifest(path)["hooks"])
    assert finish is None and set(hooks) == {"train_state"}
    CheckpointManager(grpo["root"] / "ref").load(path, hooks, strict=False)
    saved = read_hook_states(path)
    got = {"model": policy_state_dict(model), "optimizer": optimizer.state_dict()}
    assert compare_states({k: saved[k] for k in got}, got) == []
    assert float(got["optimizer"]["state"][0]["exp_avg"].abs().max()) > 0  # a trained state, not a fresh one
    assert isinstance(got["optimizer"]["param_groups"][0]["betas"], tuple)  # values as saved, types included


@pytest.fixture(scope="module")
def dpo_verify(tmp_path_factory, rlswift_cache):
    """verify-resume for DPO: on 2 ranks with rank 1 killed mid-save; and 1 process stopped, resumed on 2."""
    root = tmp_path_factory.mktemp("dpo-ranks")
    out = {}
    for name, args in [("mid_save", ["--nproc", "2", "--kill-at", "4", "--during-save", "--rank", "1"]),
                       ("one_to_two", ["--nproc", "1", "--resume-nproc", "2", "--kill-at", "3", "--signal", "TERM"])]:
        cmd = [sys.executable, "-m", "rlswift", "verify-resume", "--config", "recipes/dpo_tiny.yaml", "--steps", "6",
               "--workdir", str(root / name), *args, "save_steps=2"]
        out[name] = subprocess.run(cmd, cwd=REPO, env=env_for(rlswift_cache, OMP_NUM_THREADS="1",
                                                               PYTHONWARNINGS="ignore"),
                                   capture_output=True, text=True, timeout=900)
        out[name + "_dir"] = root / name
    return out


def test_verify_resume_nproc_2_with_one_rank_killed_mid_save(dpo_verify):
    proc, work = dpo_verify["mid_save"], dpo_verify["mid_save_dir"]
    assert proc.returncode == 0, output(proc)
    assert "verify-resume: IDENTICAL" in proc.stdout
    assert "kill-in-save@4:1" in proc.stdout and "first run exited 1" in proc.stdout
    log = (work / "runs.log").read_text()
    # Rank 1 died while checkpoint-4 was being written: no manifest, never loaded; the resume took checkpoint-2.
    assert f"resumed from {work / 'resumed' / 'checkpoint-2'}" in log
    assert "rng[rank 1]" in proc.stdout  # both ranks' RNG streams compared, bit for bit


def test_verify_resume_one_process_resumed_on_two(dpo_verify):
    proc, work = dpo_verify["one_to_two"], dpo_verify["one_to_two_dir"]
    assert proc.returncode == 0, output(proc)
    assert "EQUIVALENT across world sizes 1 -> 2" in proc.stdout and "within tolerance" in proc.stdout
    assert f"resumed from {work / 'resumed' / 'checkpoint-3'}" in (work / "runs.log").read_text()
    # The replicated state, the reference cache included, is bit-identical after the change of world size.
    exact = next(x for x in proc.stdout.splitlines() if "final state (exact part)" in x)
    assert "reference_cache" in exact and "sampler" in exact and "ok" in exact
    ma, mb = (lines(work / run / "metrics.jsonl") for run in ("uninterrupted", "resumed"))
    ma, mb = ([{k: v for k, v in m.items() if k not in ("timing", "perf")} for m in x] for x in (ma, mb))
    assert ma[:3] == mb[:3]  # before the change: the same process count, bit for bit
    assert ma[3:] != mb[3:]  # after it: equal within tolerance only (checked by verify-resume above)


def test_sigterm_to_torchrun_saves_once_on_every_rank(tmp_path, rlswift_cache):
    run = tmp_path / "run"
    proc = launch(2, "dpo", run, ["max_steps=200", "save_steps=1000"], rlswift_cache, wait=False)
    try:
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # what a scheduler does to the launcher: torchrun forwards it to each rank
        text = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    step = int((run / "latest").read_text().strip().removeprefix("checkpoint-"))
    assert 2 <= step < 200, text[-3000:]
    assert text.count(f"stopped by SIGTERM after step {step}") == 2, text[-3000:]  # each rank, the same step
    manifest = json.loads((run / f"checkpoint-{step}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and len(lines(run / "metrics.jsonl")) == step
    # The workers exited 0; torchrun itself re-raises the signal it got and exits non-zero.
    assert proc.returncode != 0 and "got signal: 15" in text
