"""GRPO step time: rlswift's GRPO recipe vs TRL 1.16 GRPOTrainer (no vLLM) on the same model, prompts and settings.

    python scripts/bench_grpo.py [--steps 10] [--model tiny|smollm2-135m] [--engine vllm|hf] [--save-steps 3]

rlswift runs as a subprocess (`python -m rlswift.recipes.grpo --config recipes/grpo_tiny.yaml ...`); its per-step
times and breakdown come from metrics.jsonl's `timing` field, its checkpoint save time from `timing.last_save` of the
step after each save, its load time from `CheckpointManager.load` on the final checkpoint. TRL runs in this process
with GRPOConfig matched to the recipe (use_vllm=False: TRL's colocated vLLM mode crashes on CPU), timed by a
TrainerCallback. Step 1 (warm-up) is left out of both means. Nothing is downloaded (HF_HUB_OFFLINE=1).
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

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "recipes" / "grpo_tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10; step 1 is warm-up)")
    ap.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a local model folder (default tiny)")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"], help="rlswift rollout engine (default vllm)")
    ap.add_argument("--save-steps", type=int, default=3, help="rlswift checkpoint interval (default 3)")
    ap.add_argument("--config", default=str(PRESET), help="rlswift preset whose settings both sides use")
    ap.add_argument("--learning-rate", type=float, default=None, help="override the preset's learning_rate")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both sides (default: all cores on an idle machine, 1 when the 1-minute "
                         "load average is >= 0.5: OpenMP threads competing with other processes for the cores make "
                         "small models tens of times slower)")
    ap.add_argument("--skip-trl", action="store_true", help="only run rlswift")
    ap.add_argument("--skip-rlswift", action="store_true", help="only run TRL")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run folders (their paths are printed)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
# Fixed before torch is imported (in-process vLLM in the recipe makes set_num_threads a no-op, so both sides use this).


try:
    LOAD0 = os.getloadavg()[0]
except OSError:
    LOAD0 = 0.0


def _default_threads() -> int:
    return 1 if LOAD0 >= 0.5 else (os.cpu_count() or 1)


os.environ["OMP_NUM_THREADS"] = str((ARGS and ARGS.threads) or _default_threads())
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(REPO))


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: list[float]) -> float:
    return statistics.mean(xs) if xs else float("nan")


def load_preset(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


def settings(a: argparse.Namespace) -> dict:
    """The settings both sides share: the preset's values (with defaults for keys it leaves out) + CLI overrides."""
    p = load_preset(a.config)
    s = {
        "num_prompts": int(p.get("num_prompts", 64)),
        "prompts_per_step": int(p.get("prompts_per_step", 4)),
        "num_generations": int(p.get("num_generations", 4)),
        "max_completion_length": int(p.get("max_completion_length", 16)),
        "temperature": float(p.get("temperature", 1.0)),
        "top_p": float(p.get("top_p", 1.0)),
        "top_k": int(p.get("top_k", 0)),
        "learning_rate": float(a.learning_rate if a.learning_rate is not None else p.get("learning_rate", 1e-3)),
        "reward_funcs": list(p.get("reward_funcs", ["accuracy", "format"])),
        "loss_type": "dapo", "beta": 0.0, "epsilon": 0.2, "scale_rewards": "group", "num_iterations": 1,
        "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 0,
    }
    return s


# ------------------------------------------------------------------------------------------------ rlswift side


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
    from rlswift.checkpoint import CheckpointManager
    from rlswift.checkpoint.manager import read_manifest

    mgr = CheckpointManager(run_dir)
    cks = mgr.checkpoints()
    if not cks:
        return {}
    step, path = cks[-1]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    manifest = read_manifest(path)
    per_hook: dict[str, int] = {}
    for rel, info in manifest.get("files", {}).items():
        name = Path(rel).name.split(".")[0] if rel.startswith("hooks/") else rel
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


def run_rlswift(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path) -> dict:
    out = tmp / "rlswift-grpo"
    cmd = [sys.executable, "-m", "rlswift.recipes.grpo", "--config", a.config, f"output_dir={out}", "overwrite=true",
           f"model={a.model}", f"engine={a.engine}", f"max_steps={a.steps}", f"save_steps={a.save_steps}",
           "save_total_limit=2", "progress_bar=false", "plot=false", f"seed={s['seed']}",
           f"num_prompts={s['num_prompts']}", f"prompts_per_step={s['prompts_per_step']}",
           f"num_generations={s['num_generations']}", f"max_completion_length={s['max_completion_length']}",
           f"temperature={s['temperature']}", f"top_p={s['top_p']}", f"top_k={s['top_k']}",
           f"learning_rate={s['learning_rate']}", f"loss_type={s['loss_type']}", f"beta={s['beta']}",
           f"epsilon={s['epsilon']}", f"scale_rewards={s['scale_rewards']}", f"num_iterations={s['num_iterations']}",
           f"gradient_accumulation_steps={s['gradient_accumulation_steps']}", f"max_grad_norm={s['max_grad_norm']}",
           f"weight_decay={s['weight_decay']}", "lr_scheduler=constant", "warmup_steps=0", "dtype=float32"]
    print("$ " + " ".join(cmd[1:]).replace(str(REPO) + "/", ""), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-4000:]
        raise RuntimeError(f"rlswift GRPO recipe exited with {proc.returncode}:\n{tail}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timing = [r["timing"] for r in recs]
    steady = timing[1:]
    parts = {k: [t.get(k, 0.0) for t in steady] for k in ("rollout", "reward", "train", "sync", "step")}
    saves = [r["timing"]["last_save"] for r in recs
             if r["step"] > 1 and (r["step"] - 1) % a.save_steps == 0 and "last_save" in r["timing"]]
    res = {"wall_s": wall, "steps": len(recs), "step_s": [t["step"] for t in timing], "parts": parts,
           "save_s": saves, "reward_first": recs[0]["reward"], "reward_last": recs[-1]["reward"], "run_dir": str(out)}
    res["checkpoint"] = checkpoint_stats(out, model_path, s)
    return res


# ------------------------------------------------------------------------------------------------ TRL side


def run_trl(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlswift.data.prompts import load_prompt_dataset
    from rlswift.rewards import REWARD_FUNCS

    rows = list(load_prompt_dataset("arithmetic", num_rows=s["num_prompts"], seed=s["seed"]))
    ds = Dataset.from_list(rows)
    funcs = [REWARD_FUNCS.get(n) for n in s["reward_funcs"]]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.step_s, self.ends = None, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.step_s.append(now - self.begin)
            self.ends.append(now)

    timer = StepTimer()
    cfg = GRPOConfig(
        output_dir=str(tmp / "trl-grpo"), report_to="none", save_strategy="no", use_cpu=True, use_vllm=False,
        bf16=False, fp16=False, gradient_checkpointing=False,  # rlswift trains fp32 without checkpointing
        per_device_train_batch_size=s["prompts_per_step"] * s["num_generations"],  # TRL counts completions
        num_generations=s["num_generations"], steps_per_generation=1,
        gradient_accumulation_steps=s["gradient_accumulation_steps"], num_iterations=s["num_iterations"],
        max_completion_length=s["max_completion_length"], temperature=s["temperature"], top_p=s["top_p"],
        top_k=s["top_k"], learning_rate=s["learning_rate"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], max_steps=a.steps,
        loss_type=s["loss_type"], beta=s["beta"], epsilon=s["epsilon"], scale_rewards=s["scale_rewards"],
        seed=s["seed"], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # keep the output to the table (log_history still fills)

    # Breakdown: wrap TRL's own methods on the instance (generation, reward scoring, the whole batch preparation).
    spent: dict[str, list[float]] = {"rollout": [], "reward": [], "prepare": []}

    def wrap(name: str, key: str):
        fn = getattr(trainer, name, None)
        if fn is None:
            return

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                spent[key].append(time.perf_counter() - t0)

        setattr(trainer, name, timed)

    wrap("_generate", "rollout")
    wrap("_calculate_rewards", "reward")
    wrap("_generate_and_score_completions", "prepare")
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    hist = [h for h in trainer.state.log_history if "reward" in h]
    n = len(timer.step_s)
    parts = {}
    if all(len(v) == n for v in spent.values()):
        parts = {"rollout": spent["rollout"][1:], "reward": spent["reward"][1:],
                 "train": [st - p for st, p in zip(timer.step_s[1:], spent["prepare"][1:])]}
    return {"wall_s": wall, "steps": n, "step_s": timer.step_s, "parts": parts,
            "interval_s": [b - e for e, b in zip(timer.ends, timer.ends[1:])],
            "reward_first": hist[0]["reward"] if hist else float("nan"),
            "reward_last": hist[-1]["reward"] if hist else float("nan")}


# ------------------------------------------------------------------------------------------------ report


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def report(a, s, model_path, rl: dict | None, trl: dict | None) -> None:
    G, P = s["num_generations"], s["prompts_per_step"]
    print(f"\n== GRPO step time: model={a.model} ({model_path}), {P} prompts x {G} samples x <= "
          f"{s['max_completion_length']} tokens, T={s['temperature']}, lr={s['learning_rate']}, fp32, "
          f"{a.steps} steps, threads={os.environ['OMP_NUM_THREADS']} (load avg {LOAD0:.1f} at start), "
          f"step 1 excluded from means")
    rows = []
    if rl:
        rows.append((f"rlswift (engine={a.engine})", rl["step_s"][0], rl["step_s"][1:], rl["wall_s"]))
    if trl:
        rows.append(("TRL 1.16 GRPOTrainer (HF generate)", trl["step_s"][0], trl["step_s"][1:], trl["wall_s"]))
    print(f"{'':38s} {'step 1 (s)':>10s} {'mean step (s), steps 2..N':>26s} {'median (s)':>10s} "
          f"{'whole run (s)':>14s}")
    for name, first, rest, wall in rows:
        print(f"{name:38s} {first:10.3f} {mean_sd(rest):>26s} {median(rest):10.3f} {wall:14.1f}")
    if rl and trl:
        r = mean(trl["step_s"][1:]) / mean(rl["step_s"][1:])
        rm = median(trl["step_s"][1:]) / median(rl["step_s"][1:])
        print(f"ratio TRL / rlswift: {r:.2f}x (mean step time), {rm:.2f}x (median)")
    print("  (whole run = subprocess wall time incl. imports, model load and engine start for rlswift; "
          "trainer.train() for TRL)")
    print("\n-- breakdown, mean seconds per step (steps 2..N)")
    keys = ("rollout", "reward", "train", "sync")
    print(f"{'':38s} " + " ".join(f"{k:>9s}" for k in keys + ("other",)))
    for name, res in (("rlswift", rl), ("TRL", trl)):
        if not res or not res["parts"]:
            continue
        vals = [mean(res["parts"][k]) if k in res["parts"] else float("nan") for k in keys]
        other = mean(res["step_s"][1:]) - sum(v for v in vals if v == v)
        print(f"{name:38s} " + " ".join(f"{v:9.3f}" if v == v else f"{'-':>9s}" for v in vals + [other]))
    print("  rlswift: timing.{rollout,reward,train,sync} from metrics.jsonl (train = forward+backward+optimizer).")
    print("  TRL: rollout = GRPOTrainer._generate, reward = _calculate_rewards, train = step - "
          "_generate_and_score_completions; other = tokenizing/padding/logprob prep/logging.")
    if rl:
        ck = rl.get("checkpoint") or {}
        print("\n-- rlswift checkpoints")
        print(f"save time (timing.last_save after save steps): {mean_sd(rl['save_s'])} s  (n={len(rl['save_s'])}: "
              + ", ".join(f"{x:.3f}" for x in rl["save_s"]) + ")")
        if ck:
            print(f"load time (CheckpointManager.load of {Path(ck['checkpoint']).name}: verify sha256 + decode + "
                  f"model/optimizer load_state_dict): {mean_sd(ck['load_s'])} s  (first {ck['load_s'][0]:.3f})")
            top = sorted(ck["per_hook_bytes"].items(), key=lambda kv: -kv[1])
            print(f"size on disk: {human(ck['size_bytes'])} ({ck['size_bytes']} bytes); by hook: "
                  + ", ".join(f"{k} {human(v)}" for k, v in top[:8]))
    for name, res in (("rlswift", rl), ("TRL", trl)):
        if res:
            print(f"mean reward {name}: step 1 {res['reward_first']:.3f}, step {res['steps']} {res['reward_last']:.3f}")


def main() -> int:
    a = ARGS
    s = settings(a)
    from rlswift.models import resolve_model

    model_path = resolve_model(a.model)  # built or converted now, so neither timed run pays for it
    tmp = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    rl = trl = None
    failed = False
    try:
        if not a.skip_rlswift:
            try:
                rl = run_rlswift(a, s, model_path, tmp)
            except RuntimeError as e:
                failed = True
                print(f"\n!! {e}", flush=True)
        if not a.skip_trl:
            print("TRL GRPOTrainer: running in this process ...", flush=True)
            trl = run_trl(a, s, model_path, tmp)
        report(a, s, model_path, rl, trl)
        if a.json:
            Path(a.json).write_text(json.dumps({"args": vars(a), "settings": s, "rlswift": rl, "trl": trl},
                                               indent=1, default=str))
    finally:
        if a.keep:
            print(f"run folders kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
