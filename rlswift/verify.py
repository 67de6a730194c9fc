"""`rlswift verify-resume`: prove that a recipe resumes exactly.

Runs the recipe uninterrupted for N steps and, in fresh processes, the same recipe stopped at step K (SIGKILL or
SIGTERM in the middle of the step, or SIGKILL in the middle of writing a checkpoint) and resumed with resume=auto.
Then compares trajectories token for token, metrics (timings aside), and the final state of every hook.

With ``nproc > 1`` every run goes through torchrun (``python -m torch.distributed.run --standalone``); the stop hits
every rank or one (``rank``). With ``resume_nproc`` != ``nproc`` the resumed run uses another world size: what must
stay bit-identical (which samples, with which seeds, the sampler, progress, schedules, the replicated hooks) is
checked exactly, and what depends on the order of floating-point additions (weights, optimizer moments, losses)
within stated tolerances (docs/distributed.md).
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
# Across a world-size change: weights and optimizer moments may differ by this much (measured: ~2e-7 after 6 steps
# of the tiny GRPO at lr 1e-3; one AdamW step can move a weight by up to ~2e-5 where its gradient is near AdamW's
# eps), numeric metrics by ATOL + RTOL * |value|.
WEIGHTS_ATOL = 1e-4
METRIC_ATOL, METRIC_RTOL = 1e-5, 1e-4
SAMPLE_KEYS = ("step", "call", "prompt_uid", "sample_idx", "seed", "prompt")  # which samples were drawn, and how
TOLERANT_HOOKS = ("model", "optimizer")  # what reduction order changes
TOLERANT_KEYS = ("['old_logprobs']", "['ref_logprobs']")  # policy outputs kept in a buffer (GRPO num_iterations > 1)
# Metrics that are means over each micro-batch's tokens (GRPO's clip ratios, entropy, KL; DPO's logits/*), averaged
# over micro-batches: with W ranks there are W x A micro-batches of 1/W the rows, so they equal one process's with
# W x A accumulation steps, not with A. Across world sizes they are not compared.
PARTITION_METRICS = ("entropy", "clip_ratio/", "kl", "logits/")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def torchrun_command(nproc: int, *extra: str) -> list[str]:
    """The launcher prefix for ``nproc`` processes on this host (one process: plain ``python -m``)."""
    if nproc <= 1:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *extra,
            "-m"]


def run_recipe(recipe: str, config: str | None, overrides: list[str], env_extra: dict[str, str],
               log_path: Path, nproc: int = 1) -> int:
    """Run the recipe in fresh processes (``nproc`` > 1: under torchrun); stdout+stderr go to ``log_path``;
    returns the exit code (torchrun's with ``nproc`` > 1)."""
    cmd = torchrun_command(nproc) + [RECIPES[recipe]]
    if config:
        cmd += ["--config", config]
    cmd += overrides
    env = dict(os.environ, **env_extra)
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(cmd) + f"   # env {env_extra}\n").encode())
        log.flush()
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def _close(x, y) -> bool:
    """Equal, or floats within METRIC_ATOL + METRIC_RTOL * |y| (recursively for dicts and lists; ints exact)."""
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_close(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_close(a, b) for a, b in zip(x, y))
    if isinstance(x, float) or isinstance(y, float):  # ints (seeds, token ids, steps) stay exact
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            return x == y or abs(x - y) <= METRIC_ATOL + METRIC_RTOL * abs(y)
    return x == y


def _jsonl_within_tolerance(a: Path, b: Path, what: str, keys: tuple[str, ...] | None = None,
                            skip: tuple[str, ...] = ()) -> Check:
    """Every line: ``keys`` (all keys when None, but those starting with one of ``skip``) equal, floats within
    tolerance (timings aside)."""
    ra = list(read_jsonl(a)) if a.exists() else []
    rb = list(read_jsonl(b)) if b.exists() else []
    if len(ra) != len(rb):
        return Check(what, False, f"{len(ra)} lines uninterrupted vs {len(rb)} resumed")
    worst, floats = 0.0, False
    skipped: set[str] = set()
    for i, (x, y) in enumerate(zip(ra, rb)):
        ks = [k for k in (keys or sorted(set(x) | set(y))) if k not in IGNORED_METRICS]
        skipped |= {k for k in ks if k.startswith(skip)} if skip else set()
        ks = [k for k in ks if k not in skipped]
        for k in ks:
            if not _close(x.get(k), y.get(k)):
                return Check(what, False, f"line {i + 1} (step={x.get('step')}): {k} = {x.get(k)!r} vs {y.get(k)!r}")
            if isinstance(x.get(k), float) and isinstance(y.get(k), float):
                worst = max(worst, abs(x[k] - y[k]))
                floats = True
    note = f"; not compared (means over micro-batches): {', '.join(sorted(skipped))}" if skipped else ""
    if not ra:
        return Check(what, True, "absent in both (recipe writes none)")
    if not floats or worst == 0.0:
        return Check(what, True, f"{len(ra)} lines identical{note}")
    return Check(what, True, f"{len(ra)} lines equal within {METRIC_ATOL} + {METRIC_RTOL}*|x| (max |diff| "
                             f"{worst:.3g}){note}")


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


def _compare_final_state(a: Path, b: Path, tolerance: bool = False) -> Check | list[Check]:
    """The final checkpoints' hooks bit for bit; with ``tolerance`` (another world size) two checks: every hook
    but the weights and optimizer state bit for bit (RNG streams of ranks that only one side has aside), and
    those within WEIGHTS_ATOL."""
    from rlswift.checkpoint.inspect import compare_states, read_hook_states

    if not a.exists() or not b.exists():
        return Check("final state", False, f"missing final checkpoint: {a if not a.exists() else b}")
    sa, sb = read_hook_states(a), read_hook_states(b)
    sa = {k: v for k, v in sa.items() if k not in IGNORED_HOOKS}
    sb = {k: v for k, v in sb.items() if k not in IGNORED_HOOKS}
    if tolerance:
        return _compare_across_world_sizes(sa, sb)
    diffs = compare_states(sa, sb)
    if not diffs:
        return Check("final state", True, f"{len(sa)} hooks bit-identical ({', '.join(sorted(sa))})")
    d = diffs[0]
    hooks = sorted({x.hook for x in diffs})
    return Check("final state", False, f"{len(diffs)} differences in hooks {', '.join(hooks)}; first: {d}")


def _compare_across_world_sizes(sa: dict, sb: dict) -> list[Check]:
    from rlswift.checkpoint.inspect import compare_states

    # Per-rank hooks (the RNG streams): loaded exactly (rank r < saved world size), but later draws follow each
    # rank's share of the work (e.g. vLLM's sampler draws from torch's global stream per batch row), so after a
    # world-size change they are not expected to match.
    per_rank = sorted({k for k in set(sa) | set(sb) if "[rank " in k}
                      | {k.split("[rank ")[0] for k in set(sa) | set(sb) if "[rank " in k})
    exact_a = {k: v for k, v in sa.items() if k not in TOLERANT_HOOKS and k not in per_rank}
    exact_b = {k: v for k, v in sb.items() if k not in TOLERANT_HOOKS and k not in per_rank}
    diffs = compare_states(exact_a, exact_b)
    buffered = [d for d in diffs if d.kind == "value" and any(key in d.path for key in TOLERANT_KEYS)
                and d.max_abs_diff is not None and d.max_abs_diff <= WEIGHTS_ATOL]
    diffs = [d for d in diffs if d not in buffered]
    note = f"; per-rank, not compared: {', '.join(per_rank)}" if per_rank else ""
    if buffered:
        note += (f"; {', '.join(sorted({d.hook for d in buffered}))}: {len(buffered)} buffered policy log-prob "
                 f"tensors within {WEIGHTS_ATOL} (max |diff| {max(d.max_abs_diff for d in buffered):.3g}), the rest "
                 "bit-identical")
    if diffs:
        exact = Check("final state (exact part)", False, f"{len(diffs)} differences in hooks "
                      f"{', '.join(sorted({d.hook for d in diffs}))}; first: {diffs[0]}")
    else:
        same = sorted(set(exact_a) - {d.hook for d in buffered})
        exact = Check("final state (exact part)", True, f"{len(same)} hooks bit-identical ({', '.join(same)}){note}")
    tol_a = {k: sa[k] for k in TOLERANT_HOOKS if k in sa}
    tol_b = {k: sb[k] for k in TOLERANT_HOOKS if k in sb}
    diffs = compare_states(tol_a, tol_b)
    bad = [d for d in diffs if d.kind != "value" or d.max_abs_diff is None or d.max_abs_diff > WEIGHTS_ATOL]
    worst = max((d.max_abs_diff or 0.0 for d in diffs), default=0.0)
    if bad or set(tol_a) != set(tol_b):
        weights = Check("final state (weights)", False, f"beyond tolerance {WEIGHTS_ATOL}: {bad[0] if bad else ''}"
                        f"{' hooks ' + str(sorted(tol_a)) + ' vs ' + str(sorted(tol_b)) if set(tol_a) != set(tol_b) else ''}")
    else:
        weights = Check("final state (weights)", True,
                        f"{', '.join(sorted(tol_a))} within tolerance: max |diff| {worst:.3g} <= {WEIGHTS_ATOL} "
                        f"({len(diffs)} tensors not bit-identical: reduction order differs across world sizes)")
    return [exact, weights]


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
                  sig: str, during_save: bool, workdir: Path, nproc: int = 1, resume_nproc: int | None = None,
                  rank: int | None = None) -> int:
    """Run both ways, compare, print a table; return 0 only when everything is identical (across world sizes:
    identical where it must be, within tolerance where reduction order rules)."""
    resume_nproc = nproc if resume_nproc is None else resume_nproc
    if nproc < 1 or resume_nproc < 1:
        print(f"error: --nproc {nproc} / --resume-nproc {resume_nproc}: give at least 1", file=sys.stderr)
        return 2
    if rank is not None and not 0 <= rank < nproc:
        print(f"error: --rank {rank} is not a rank of --nproc {nproc} (0..{nproc - 1})", file=sys.stderr)
        return 2
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
    if rank is not None and nproc > 1:
        fault = f"{fault}:{rank}"  # only that rank is hit
    ref, res = workdir / "uninterrupted", workdir / "resumed"
    where = "" if nproc == 1 and resume_nproc == 1 else (
        f" ({nproc} process{'es' if nproc > 1 else ''}, resumed on {resume_nproc})")
    print(f"verify-resume: {recipe} {config or ''} {' '.join(overrides)}\n  {steps} steps uninterrupted vs stopped "
          f"({fault}) and resumed with resume=auto{where}; logs in {log}", flush=True)
    rc = run_recipe(recipe, config, common + [f"output_dir={ref}", "overwrite=true"], {}, log, nproc)
    if rc != 0:
        print(f"FAIL: the uninterrupted run exited {rc}; see {log}")
        return 2
    rc1 = run_recipe(recipe, config, common + [f"output_dir={res}", "overwrite=true"], {"RLSWIFT_FAULT": fault}, log,
                     nproc)
    # torchrun exits 1 when a worker dies (SIGKILL); a graceful stop on every rank exits 0 everywhere.
    expected = 0 if fault.startswith("term") else (-9 if nproc == 1 else 1)
    stopped = Check("stop", rc1 == expected, f"first run exited {rc1} (expected {expected} for {fault})")
    rc2 = run_recipe(recipe, config, common + [f"output_dir={res}", "resume=auto"], {}, log, resume_nproc)
    resumed = Check("resume", rc2 == 0, f"resumed run exited {rc2}")
    checks = [stopped, resumed]
    across = resume_nproc != nproc
    if rc2 == 0 and not across:
        checks += [
            _first_jsonl_divergence(ref / "trajectories.jsonl", res / "trajectories.jsonl", "trajectories"),
            _first_jsonl_divergence(ref / "metrics.jsonl", res / "metrics.jsonl", "metrics"),
            _compare_final_state(ref / f"checkpoint-{steps}", res / f"checkpoint-{steps}"),
        ]
    elif rc2 == 0:
        traj_a, traj_b = ref / "trajectories.jsonl", res / "trajectories.jsonl"
        checks += [
            _jsonl_within_tolerance(traj_a, traj_b, "samples (seeds, prompts)", SAMPLE_KEYS),
            _jsonl_within_tolerance(traj_a, traj_b, "tokens", ("completion_ids",)),
            _jsonl_within_tolerance(traj_a, traj_b, "trajectories"),
            _jsonl_within_tolerance(ref / "metrics.jsonl", res / "metrics.jsonl", "metrics", skip=PARTITION_METRICS),
            *_compare_final_state(ref / f"checkpoint-{steps}", res / f"checkpoint-{steps}", tolerance=True),
        ]
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'DIFF'} {c.name:<{width}}  {c.detail}")
    ok = all(c.ok for c in checks)
    if across:
        print(f"verify-resume: {'EQUIVALENT' if ok else 'DIVERGED'} across world sizes {nproc} -> {resume_nproc}: "
              "samples, seeds and replicated state bit-identical; weights, optimizer state and metrics compared "
              "within tolerance (reduction order differs), not bit for bit", flush=True)
    else:
        print("verify-resume: IDENTICAL" if ok else "verify-resume: DIVERGED", flush=True)
    return 0 if ok else 1


def _config_value(recipe: str, config: str | None, overrides: list[str], key: str):
    import importlib

    from rlswift import config as cfglib

    module = importlib.import_module(RECIPES[recipe])
    cls = module.GRPOConfig if recipe == "grpo" else module.DPOConfig
    return getattr(cfglib.load(cls, config, overrides), key)
