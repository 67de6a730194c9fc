"""`rlswift verify-resume`: prove that a recipe resumes exactly.

Runs the recipe uninterrupted for N steps and, in fresh processes, the same recipe stopped at step K (SIGKILL or
SIGTERM in the middle of the step, or SIGKILL in the middle of writing a checkpoint) and resumed with resume=auto.
Then compares trajectories token for token, metrics (timings aside), and the final state of every hook.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rlswift.runlog import read_jsonl

RECIPES = {"grpo": "rlswift.recipes.grpo", "dpo": "rlswift.recipes.dpo"}
# Positions inside the log files differ with the width of timing numbers; the files themselves are compared.
IGNORED_HOOKS = {"metrics_log", "trajectories_log", "trackers"}  # run ids, log offsets
IGNORED_METRICS = {"timing", "perf"}  # wall-clock and memory readings
VERIFY_MARKER = ".rlswift-verify"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def run_recipe(recipe: str, config: str | None, overrides: list[str], env_extra: dict[str, str],
               log_path: Path) -> int:
    """Run the recipe in a fresh Python process; stdout+stderr go to ``log_path``; returns the exit code."""
    cmd = [sys.executable, "-m", RECIPES[recipe]]
    if config:
        cmd += ["--config", config]
    cmd += overrides
    env = dict(os.environ, **env_extra)
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(cmd) + f"   # env {env_extra}\n").encode())
        log.flush()
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def _first_jsonl_divergence(a: Path, b: Path, what: str) -> Check:
    if not a.exists() and not b.exists():
        return Check(what, True, "absent in both (recipe writes none)")
    ra = list(read_jsonl(a)) if a.exists() else []
    rb = list(read_jsonl(b)) if b.exists() else []
    for i, (x, y) in enumerate(zip(ra, rb)):
        x = {k: v for k, v in x.items() if k not in IGNORED_METRICS}
        y = {k: v for k, v in y.items() if k not in IGNORED_METRICS}
        if x == y:
            continue
        where = ", ".join(f"{k}={x[k]}" for k in ("step", "prompt_uid", "sample_idx") if k in x)
        if x.get("completion_ids") != y.get("completion_ids") and "completion_ids" in x:
            cx, cy = x["completion_ids"], y.get("completion_ids") or []
            pos = next((j for j, (p, q) in enumerate(zip(cx, cy)) if p != q), min(len(cx), len(cy)))
            return Check(what, False, f"line {i + 1} ({where}): tokens differ from position {pos}: "
                                      f"{cx[pos:pos + 4]} vs {cy[pos:pos + 4]}")
        keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        k = keys[0]
        return Check(what, False, f"line {i + 1} ({where}): {k} = {x.get(k)!r} vs {y.get(k)!r}"
                                  + (f" (+{len(keys) - 1} more keys)" if len(keys) > 1 else ""))
    if len(ra) != len(rb):
        return Check(what, False, f"{len(ra)} lines uninterrupted vs {len(rb)} resumed")
    return Check(what, True, f"{len(ra)} lines identical")


def _compare_final_state(a: Path, b: Path) -> Check:
    from rlswift.checkpoint.inspect import compare_states, read_hook_states

    if not a.exists() or not b.exists():
        return Check("final state", False, f"missing final checkpoint: {a if not a.exists() else b}")
    sa, sb = read_hook_states(a), read_hook_states(b)
    sa = {k: v for k, v in sa.items() if k not in IGNORED_HOOKS}
    sb = {k: v for k, v in sb.items() if k not in IGNORED_HOOKS}
    diffs = compare_states(sa, sb)
    if not diffs:
        return Check("final state", True, f"{len(sa)} hooks bit-identical ({', '.join(sorted(sa))})")
    d = diffs[0]
    hooks = sorted({x.hook for x in diffs})
    return Check("final state", False, f"{len(diffs)} differences in hooks {', '.join(hooks)}; first: {d}")


def plan_fault(kill_at: str, kill_seed: int, steps: int, save_steps: int, sig: str, during_save: bool) -> tuple[str, int]:
    """The RLSWIFT_FAULT value and the step it targets."""
    if kill_at == "random":
        k = random.Random(kill_seed).randint(1, max(1, steps - 1))
    else:
        k = int(kill_at)
    if not 1 <= k <= steps:
        raise SystemExit(f"error: --kill-at {k} is outside 1..{steps}")
    if during_save:
        # Kill while the first checkpoint at or after step k is being written.
        k = min(steps, -(-k // save_steps) * save_steps)
        return f"kill-in-save@{k}", k
    return f"{'kill' if sig == 'KILL' else 'term'}@{k}", k


def verify_resume(recipe: str, config: str | None, overrides: list[str], steps: int, kill_at: str, kill_seed: int,
                  sig: str, during_save: bool, workdir: Path) -> int:
    """Run both ways, compare, print a table; return 0 only when everything is identical."""
    if workdir.exists() and any(workdir.iterdir()):
        # Only a folder this command made is deleted (its marker, or the two runs and log of an older rlswift).
        names = {p.name for p in workdir.iterdir()}
        ours = VERIFY_MARKER in names or {"runs.log", "uninterrupted"} <= names
        if not ours:
            print(f"error: --workdir {workdir} is not empty and was not made by verify-resume; it is never deleted. "
                  "Pick a new or empty folder", file=sys.stderr)
            return 2
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / VERIFY_MARKER).write_text("rlswift verify-resume workdir\n")
    log = workdir / "runs.log"
    save_steps = _config_value(recipe, config, overrides, "save_steps")
    common = [*overrides, f"max_steps={steps}", "progress_bar=false", "plot=false"]
    fault, k = plan_fault(kill_at, kill_seed, steps, save_steps, sig, during_save)
    ref, res = workdir / "uninterrupted", workdir / "resumed"
    print(f"verify-resume: {recipe} {config or ''} {' '.join(overrides)}\n  {steps} steps uninterrupted vs stopped "
          f"({fault}) and resumed with resume=auto; logs in {log}", flush=True)
    rc = run_recipe(recipe, config, common + [f"output_dir={ref}", "overwrite=true"], {}, log)
    if rc != 0:
        print(f"FAIL: the uninterrupted run exited {rc}; see {log}")
        return 2
    rc1 = run_recipe(recipe, config, common + [f"output_dir={res}", "overwrite=true"], {"RLSWIFT_FAULT": fault}, log)
    expected = 0 if fault.startswith("term") else -9
    stopped = Check("stop", rc1 == expected, f"first process exited {rc1} (expected {expected} for {fault})")
    rc2 = run_recipe(recipe, config, common + [f"output_dir={res}", "resume=auto"], {}, log)
    resumed = Check("resume", rc2 == 0, f"resumed process exited {rc2}")
    checks = [stopped, resumed]
    if rc2 == 0:
        checks += [
            _first_jsonl_divergence(ref / "trajectories.jsonl", res / "trajectories.jsonl", "trajectories"),
            _first_jsonl_divergence(ref / "metrics.jsonl", res / "metrics.jsonl", "metrics"),
            _compare_final_state(ref / f"checkpoint-{steps}", res / f"checkpoint-{steps}"),
        ]
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'DIFF'} {c.name:<{width}}  {c.detail}")
    ok = all(c.ok for c in checks)
    print("verify-resume: IDENTICAL" if ok else "verify-resume: DIVERGED", flush=True)
    return 0 if ok else 1


def _config_value(recipe: str, config: str | None, overrides: list[str], key: str):
    import importlib

    from rlswift import config as cfglib

    module = importlib.import_module(RECIPES[recipe])
    cls = module.GRPOConfig if recipe == "grpo" else module.DPOConfig
    return getattr(cfglib.load(cls, config, overrides), key)
