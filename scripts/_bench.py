"""What bench_grpo.py and bench_dpo.py share: CLI, thread/env setup, statistics, the rlswift subprocess run, the TRL
worker subprocess, checkpoint size/load timing, the TRL step timer and matched TrainingArguments, and the driver that
repeats both sides interleaved (recording the machine's load before each run) and then reports.

Imported by the scripts (their folder is put on sys.path); it must not import torch at module level: `setup()` fixes
OMP_NUM_THREADS first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

try:
    LOAD0 = os.getloadavg()[0]  # 1-minute load average when the script started
except OSError:
    LOAD0 = 0.0

THREADS_HELP = ("OMP_NUM_THREADS for both sides (default: all cores on an idle machine, 1 when the 1-minute load "
                "average is >= 0.5: OpenMP threads competing with other processes for the cores make small models "
                "tens of times slower)")


def parser(doc: str, preset: Path, save_steps: int, learning_rate: float) -> argparse.ArgumentParser:
    """The options both benchmarks take; a script adds its own before parsing. ``learning_rate`` is the bench's
    default (a small one: both policies stay near their start, so both sides generate/score similar work)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10; step 1 is warm-up)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per side, interleaved (rlswift, TRL, TRL, rlswift, ...); min and median are reported")
    ap.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a local model folder (default tiny)")
    ap.add_argument("--save-steps", type=int, default=save_steps,
                    help=f"rlswift checkpoint interval (default {save_steps})")
    ap.add_argument("--config", default=str(preset), help="rlswift preset whose settings both sides use")
    ap.add_argument("--learning-rate", type=float, default=learning_rate,
                    help=f"learning rate of both sides (default {learning_rate:g}, not the preset's: see --help's "
                         "description)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra rlswift recipe override (repeatable), e.g. --set shared_prompt=false for an A/B run")
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    ap.add_argument("--skip-trl", action="store_true", help="only run rlswift")
    ap.add_argument("--skip-rlswift", action="store_true", help="only run TRL")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folders (their paths are printed)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)  # internal: run TRL once, JSON here
    return ap


def setup(threads: int | None, extra_env: dict[str, str] | None = None) -> None:
    """Fix OMP_NUM_THREADS (before torch is imported: in-process vLLM in the recipe makes set_num_threads a no-op, so
    both sides use this), run offline, and make `rlswift` importable."""
    os.environ["OMP_NUM_THREADS"] = str(threads or (1 if LOAD0 >= 0.5 else (os.cpu_count() or 1)))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1", **(extra_env or {})}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    sys.path.insert(0, str(REPO))


def threads_note() -> str:
    return f"threads={os.environ['OMP_NUM_THREADS']} (load avg {LOAD0:.1f} at start)"


def load1() -> float:
    """The 1-minute load average now (0.0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


# ------------------------------------------------------------------------------------------------ statistics


def mean(xs: list[float]) -> float:
    return statistics.mean(xs) if xs else float("nan")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean_sd(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def steady(runs: list[dict], key: str = "step_s") -> list[float]:
    """Steady-state values of all runs pooled: each run's steps 2..N (step 1 is warm-up)."""
    return [x for r in runs for x in r[key][1:]]


def side_summary(runs: list[dict]) -> dict:
    """min / median over the pooled steady steps, and each run's median: the numbers a side is quoted by."""
    xs = steady(runs)
    return {"min": min(xs) if xs else float("nan"), "median": median(xs), "n": len(xs),
            "run_medians": [median(r["step_s"][1:]) for r in runs], "loads": [r.get("load1", 0.0) for r in runs]}


def print_sides(runs: dict[str, list[dict]], names: dict[str, str], digits: int = 3) -> None:
    """Per side: min and median of the pooled steady steps, each run's median and the load before it; then the
    ratio rlswift / TRL (min and median, and per interleaved pair) and a warning where the machine was busy."""
    print(f"{'':38s} {'runs':>4s} {'steps':>5s} {'min (s)':>9s} {'median (s)':>10s}   per-run medians (s) "
          "[1-min load before the run]")
    summ = {}
    for side, rs in runs.items():
        if not rs:
            continue
        sm = summ[side] = side_summary(rs)
        per = ", ".join(f"{m:.{digits}f} [{ld:.1f}]" for m, ld in zip(sm["run_medians"], sm["loads"]))
        print(f"{names[side]:38s} {len(rs):4d} {sm['n']:5d} {sm['min']:9.{digits}f} {sm['median']:10.{digits}f}   "
              f"{per}")
    if "rlswift" in summ and "trl" in summ:
        a, b = summ["rlswift"], summ["trl"]
        pairs = [x / y for x, y in zip(a["run_medians"], b["run_medians"])]
        print(f"ratio rlswift / TRL step time: {a['min'] / b['min']:.2f}x (min), {a['median'] / b['median']:.2f}x "
              f"(median); per pair of runs (medians): " + ", ".join(f"{x:.2f}" for x in pairs))
    busy = [ld for rs in runs.values() for ld in (r.get("load1", 0.0) for r in rs) if ld > 1.0]
    if busy:
        print(f"WARNING: the 1-minute load average was > 1 before {len(busy)} run(s) (max {max(busy):.1f}): other "
              "processes shared the cores; trust min over median, and rerun on an idle machine before quoting")


def part_table(runs: dict[str, list[dict]], names: dict[str, str], keys: tuple[str, ...], digits: int = 3) -> None:
    """Per side, the mean and min (over pooled steady steps) of each part of a step, and 'other' (step - parts)."""
    print(f"{'':38s} " + " ".join(f"{k:>9s}" for k in keys + ("other", "step")))
    for side, rs in runs.items():
        if not rs or not all(r.get("parts") for r in rs):
            continue
        step = steady(rs)
        cols = {k: [x for r in rs for x in r["parts"].get(k, [])] for k in keys}
        for stat, fn in (("mean", mean), ("min", lambda v: min(v) if v else float("nan"))):
            vals = [fn(cols[k]) if cols[k] else float("nan") for k in keys]
            other = fn(step) - sum(v for v in vals if v == v) if stat == "mean" else float("nan")
            cells = [f"{v:9.{digits}f}" if v == v else f"{'-':>9s}" for v in vals + [other, fn(step)]]
            print(f"{names[side] + ' (' + stat + ')':38s} " + " ".join(cells))


# ------------------------------------------------------------------------------------------------ rlswift side


def run_recipe(recipe: str, a: argparse.Namespace, out: Path, overrides: list[str],
               prefix: list[str] | None = None) -> tuple[list[dict], float]:
    """Run `python -m rlswift.recipes.<recipe>` with the bench's fixed overrides + `overrides`, into `out`
    (``prefix``: a command to run it under, e.g. a profiler).

    Returns (metrics.jsonl records, wall seconds); raises RuntimeError with the output's tail when the recipe fails.
    """
    from rlswift.runlog import read_jsonl

    cmd = [*(prefix or []), sys.executable, "-m", f"rlswift.recipes.{recipe}", "--config", a.config,
           f"output_dir={out}", "overwrite=true", f"model={a.model}", f"max_steps={a.steps}",
           f"save_steps={a.save_steps}", "save_total_limit=2", "progress_bar=false", "plot=false",
           "lr_scheduler=constant", "warmup_steps=0", "precision=fp32", *overrides, *a.set]  # --set last: it wins
    shown = cmd[len(prefix or []) + 1:]  # from "-m": the recipe's own arguments
    print("$ " + " ".join(shown).replace(str(REPO) + "/", ""), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-4000:]
        raise RuntimeError(f"rlswift {recipe.upper()} recipe exited with {proc.returncode}:\n{tail}")
    return list(read_jsonl(out / "metrics.jsonl")), wall


class _Sink:
    """A stand-in hook for CheckpointManager.load: takes the decoded state and keeps it."""

    def __init__(self):
        self.state = None

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        self.state = sd


def _load_hooks(model_path: Path, s: dict, names: list[str]) -> dict:
    """Real model + optimizer hooks (the heavy ones, loaded as a resume would), sinks for the rest."""
    hooks = {n: _Sink() for n in names}
    try:
        import torch

        from rlswift.models import load_policy
        from rlswift.recipes._common import ModelHook

        model = load_policy(model_path, dtype="float32")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s["learning_rate"], weight_decay=s["weight_decay"], foreach=False)
        if "model" in hooks:
            hooks["model"] = ModelHook(model)
        if "optimizer" in hooks:
            hooks["optimizer"] = opt
    except Exception as e:  # noqa: BLE001 - a sink still times verify + decode
        print(f"  (load timing: real model/optimizer hooks unavailable, using sinks: {type(e).__name__}: {e})")
    return hooks


def checkpoint_stats(run_dir: Path, model_path: Path, s: dict, reps: int = 3) -> dict:
    """Size (total and per hook) of the newest checkpoint and `reps` CheckpointManager.load times into fresh hooks."""
    from rlswift.checkpoint import CheckpointManager, read_manifest

    mgr = CheckpointManager(run_dir)
    cks = mgr.checkpoints()
    if not cks:
        return {}
    step, path = cks[-1]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    manifest = read_manifest(path)
    per_hook: dict[str, int] = {}
    for rel, info in manifest.get("files", {}).items():
        name = Path(rel).name.split(".")[0].split("@")[0] if rel.startswith("hooks/") else rel  # shards: name@k
        sz = info.get("size", 0) if isinstance(info, dict) else 0
        per_hook[name] = per_hook.get(name, 0) + sz
    loads = []
    for _ in range(reps):
        hooks = _load_hooks(model_path, s, list(manifest["hooks"]))
        t0 = time.perf_counter()
        mgr.load(path, hooks)
        loads.append(time.perf_counter() - t0)
    return {"checkpoint": str(path), "step": step, "size_bytes": size, "per_hook_bytes": per_hook,
            "load_s": loads, "num_checkpoints_kept": len(cks)}


def human(n: int) -> str:
    """Bytes as B / KiB / MiB / GiB (the formatting `rlswift-inspect` uses)."""
    from rlswift.checkpoint.inspect import _human

    return _human(n)


# ------------------------------------------------------------------------------------------------ TRL side


def step_timer():
    """A TrainerCallback timing each optimizer step (`on_step_begin` -> `on_step_end`): `step_s` durations, `ends`
    end times, and `inner_s`: per step, what was added to `inner_acc` during it (e.g. reference forwards)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.step_s, self.ends, self.inner_s, self.inner_acc = None, [], [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.inner_acc = 0.0
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.step_s.append(now - self.begin)
            self.ends.append(now)
            self.inner_s.append(self.inner_acc)

    return StepTimer()


def matched_trainer_args(a: argparse.Namespace, s: dict, output_dir: Path) -> dict:
    """TrainingArguments both TRL configs get, matched to the rlswift run (fp32, constant LR, no warmup, no
    checkpointing, no saving, CPU)."""
    return dict(
        output_dir=str(output_dir), report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False,  # rlswift trains fp32 without checkpointing
        gradient_accumulation_steps=s["gradient_accumulation_steps"], learning_rate=s["learning_rate"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"], max_steps=a.steps, seed=s["seed"], logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
    )


def load_hf(model_path: Path):
    """(tokenizer, fp32 model) for the TRL side."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(model_path),
            AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------ driver

Runner = Callable[[argparse.Namespace, dict, Path, Path, bool], dict]


def run_trl_worker(a: argparse.Namespace, script: Path, out_json: Path) -> dict:
    """Run the TRL side once in a fresh process (as rlswift is: same start state, no memory carried between runs):
    the script itself with ``--trl-worker out_json`` and the same options; returns what it wrote."""
    cmd = [sys.executable, str(script), *sys.argv[1:], "--threads", os.environ["OMP_NUM_THREADS"],
           "--trl-worker", str(out_json)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0 or not out_json.exists():
        raise RuntimeError(f"TRL worker exited with {proc.returncode}:\n{(proc.stderr or proc.stdout)[-4000:]}")
    return json.loads(out_json.read_text())


def main(a: argparse.Namespace, s: dict, name: str, trainer: str, script: Path, run_rlswift: Runner,
         run_trl: Runner, report: Callable[..., None]) -> int:
    """Run both sides ``a.repeats`` times, interleaved and alternating who goes first (rlswift, TRL, TRL, rlswift,
    ...: a load change hits both), each in its own process and temporary folder, the 1-minute load average noted
    before each run; then report, optionally write JSON. A failed run is reported and makes the exit status 1."""
    from rlswift.models import resolve_model

    model_path = resolve_model(a.model)  # built or converted now, so neither timed run pays for it
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}_"))
    if a.trl_worker:  # inside the worker process: one TRL run, its numbers to JSON
        try:
            res = run_trl(a, s, model_path, tmp, True)
            Path(a.trl_worker).write_text(json.dumps(res, default=str))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return 0
    sides = [side for side, skip in (("rlswift", a.skip_rlswift), ("trl", a.skip_trl)) if not skip]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    failed = False
    try:
        for rep in range(a.repeats):
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                load = load1()
                print(f"[repeat {rep + 1}/{a.repeats}] {side}: 1-min load {load:.2f}"
                      + ("  (> 1: busy machine)" if load > 1 else ""), flush=True)
                out = tmp / f"{side}-{rep}"
                try:
                    if side == "rlswift":
                        res = run_rlswift(a, s, model_path, out, rep == 0)  # checkpoint stats once
                    else:
                        res = run_trl_worker(a, script, tmp / f"trl-{rep}.json")
                except RuntimeError as e:
                    failed = True
                    print(f"\n!! {e}", flush=True)
                    continue
                finally:
                    if not a.keep:
                        shutil.rmtree(out, ignore_errors=True)
                res.update(load1=load, repeat=rep)
                runs[side].append(res)
        report(a, s, model_path, runs)
        if a.json:
            Path(a.json).write_text(json.dumps({"args": vars(a), "settings": s, "runs": runs}, indent=1,
                                               default=str))
    finally:
        if a.keep:
            print(f"run folders kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0
