"""Unattended relaunch with existing launchers: each run below is stopped and relaunched with `resume=auto`, and must
equal the uninterrupted run (trajectories, metrics, every hook's final state).

- torchrun --max-restarts 3: its elastic agent restarts the worker we SIGKILL twice (found as torchrun's child);
- the Slurm script (scripts/launch/slurm_grpo.sbatch) run by bash with a stub `scontrol`: SIGUSR1 to the batch shell
  (what `--signal=B:USR1@120` sends) reaches the trainer, which saves; the script requeues, the requeued start resumes;
- the Kubernetes Job's container command (scripts/launch/k8s_job.yaml): SIGTERM to it (what the kubelet sends) makes
  the trainer save, the pod exits 143 (not 0: that would complete the Job), the next pod resumes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e import REPO, compare_runs, env_for, run_cli

pytestmark = pytest.mark.slow

REWARDS = "reward_funcs=[accuracy,userland.custom.digit_reward]"  # a gradient at every step: the weights move
RECIPE = ["-m", "rlswift.recipes.grpo", "--config", "recipes/grpo_tiny.yaml", REWARDS]  # 8 steps, saves at 3, 6, 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rlswift_cache):
    out = tmp_path_factory.mktemp("relaunch") / "reference"
    proc = run_cli([*RECIPE, f"output_dir={out}"], rlswift_cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    lines = path.read_bytes().splitlines() if path.exists() else []
    return len([ln for ln in lines if ln.strip()])


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_torchrun_restarts_killed_worker_and_run_equals_uninterrupted(reference, tmp_path, rlswift_cache):
    out = tmp_path / "elastic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "--max-restarts", "3", *RECIPE, f"output_dir={out}", "resume=auto"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env_for(rlswift_cache), stdout=fh, stderr=subprocess.STDOUT)
        killed = []
        try:
            # Step 4 logged: checkpoint-3 is complete (saved before step 4 starts) and step 4 will be truncated away.
            for at in (4, 7):
                # After a kill, the restarted worker must have resumed (and cut metrics.jsonl back) first.
                wait_for(lambda: log.read_text().count("resumed from") >= len(killed), proc, "the restart")
                wait_for(lambda: last_step(out) >= at, proc, f"step {at}")
                workers = [c for c in children(proc.pid) if "rlswift.recipes.grpo" in cmdline(c)]
                assert len(workers) == 1, [cmdline(c) for c in children(proc.pid)]
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc == 0, text[-5000:]
    assert killed[0] != killed[1], "the second kill hit the same worker: torchrun did not restart it"
    # Each restart resumed from a newer checkpoint (at least checkpoint-3: step 4 was logged before the first kill).
    # Which one depends on how many steps finish before a kill lands: on a busy machine even the final checkpoint-8.
    resumed = [int(m) for m in re.findall(rf"resumed from {re.escape(str(out))}/checkpoint-(\d+)", text)]
    assert len(resumed) == 2 and 3 <= resumed[0] <= resumed[1], (resumed, text[-5000:])
    compare_runs(reference, out, 8)


def _script_env(cache: Path, out: Path, tmp_path: Path, **extra: str) -> dict:
    return env_for(cache, PYTHON=sys.executable, CONFIG="recipes/grpo_tiny.yaml", OUTPUT_DIR=str(out), **extra)


def assert_saved_where_it_stopped(out: Path, saved: str, max_steps: int = 8) -> None:
    """The stop saved the last finished step: past step 2 (when the signal went out), before the end. On a busy
    machine a step or two more can finish before the signal lands, so the exact step isn't fixed."""
    step = int(saved.removeprefix("checkpoint-"))
    assert 2 <= step < max_steps, saved
    assert last_step(out) == step, (last_step(out), saved)


def _stop_at_step_2(cmd: list[str], env: dict, signum: int) -> subprocess.CompletedProcess:
    """Start ``cmd``; when step 2 is logged, send ``signum`` to it (the launcher's shell, not the trainer)."""
    out = Path(env["OUTPUT_DIR"])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: last_step(out) >= 2, proc, "step 2")
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_slurm_script_saves_on_usr1_requeues_and_resumes(reference, tmp_path, rlswift_cache):
    out = tmp_path / "slurm"
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (stub / "scontrol").chmod(0o755)
    calls = tmp_path / "scontrol.log"
    env = _script_env(rlswift_cache, out, tmp_path, PATH=f"{stub}{os.pathsep}{os.environ['PATH']}",
                      SLURM_JOB_ID="4242", SCONTROL_LOG=str(calls))
    cmd = ["bash", "scripts/launch/slurm_grpo.sbatch", REWARDS]
    first = _stop_at_step_2(cmd, env, signal.SIGUSR1)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "stopped by SIGUSR1" in first.stderr and "requeueing job 4242" in first.stderr
    assert calls.read_text() == "requeue 4242\n"
    saved = (out / "latest").read_text().strip()
    assert_saved_where_it_stopped(out, saved)  # the step in flight finished, then it saved
    # The requeued job: same script, same job id, SLURM_RESTART_COUNT=1; it resumes and finishes (no requeue).
    second = subprocess.run(cmd, cwd=REPO, env=dict(env, SLURM_RESTART_COUNT="1"), capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"resumed from {out / saved}" in second.stderr
    assert calls.read_text() == "requeue 4242\n"
    compare_runs(reference, out, 8)


def test_kubernetes_job_command_exits_143_on_sigterm_and_next_pod_resumes(reference, tmp_path, rlswift_cache):
    job = yaml.safe_load((REPO / "scripts/launch/k8s_job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] >= 1
    assert pod["terminationGracePeriodSeconds"] >= 60
    script = container["args"][0]
    out = tmp_path / "k8s"
    env = _script_env(rlswift_cache, out, tmp_path, MAX_STEPS="8", RLSWIFT_ARGS=REWARDS)
    cmd = [*container["command"], script]  # bash -c SCRIPT, as the container runs it
    first = _stop_at_step_2(cmd, env, signal.SIGTERM)
    assert first.returncode == 143, first.stderr[-4000:]  # 0 would mark the Job complete
    assert "stopped by SIGTERM" in first.stderr
    saved = (out / "latest").read_text().strip()
    assert_saved_where_it_stopped(out, saved)
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-4000:]  # the run reached max_steps: the Job completes
    assert f"resumed from {out / saved}" in second.stderr
    compare_runs(reference, out, 8)
