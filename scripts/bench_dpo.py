"""DPO step time: rlswift's DPO recipe vs TRL 1.16 DPOTrainer on the same model, preference rows and settings.

    python scripts/bench_dpo.py [--steps 10] [--model tiny|smollm2-135m] [--save-steps 5]

rlswift runs as a subprocess (`python -m rlswift.recipes.dpo --config recipes/dpo_tiny.yaml ...`); its per-step times
and breakdown (reference / train) come from metrics.jsonl's `timing` field, plus the final checkpoint's size and
`CheckpointManager.load` time. TRL runs in this process with DPOConfig matched to the recipe (same batch size, max
lengths, beta, loss, lr, steps; reference log-probs computed during training, as rlswift does on a cache miss), timed
by a TrainerCallback; its reference time is measured with forward hooks on the reference model. Step 1 (warm-up) is
left out of both means. Nothing is downloaded (HF_HUB_OFFLINE=1).
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
PRESET = REPO / "recipes" / "dpo_tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10; step 1 is warm-up)")
    ap.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a local model folder (default tiny)")
    ap.add_argument("--save-steps", type=int, default=5, help="rlswift checkpoint interval (default 5)")
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


try:
    LOAD0 = os.getloadavg()[0]
except OSError:
    LOAD0 = 0.0


def _default_threads() -> int:
    return 1 if LOAD0 >= 0.5 else (os.cpu_count() or 1)


os.environ["OMP_NUM_THREADS"] = str((ARGS and ARGS.threads) or _default_threads())
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(REPO))


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def mean(xs: list[float]) -> float:
    return statistics.mean(xs) if xs else float("nan")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def settings(a: argparse.Namespace) -> dict:
    """The settings both sides share: the preset's values (defaults for keys it leaves out) + CLI overrides."""
    import yaml

    p = yaml.safe_load(Path(a.config).read_text()) or {}
    return {
        "batch_size": int(p.get("batch_size", 4)),
        "max_prompt_length": int(p.get("max_prompt_length", 256)),
        "max_completion_length": int(p.get("max_completion_length", 16)),
        "learning_rate": float(a.learning_rate if a.learning_rate is not None else p.get("learning_rate", 1e-3)),
        "beta": float(p.get("beta", 0.1)),
        "loss_type": str(p.get("loss_type", "sigmoid")),
        "label_smoothing": float(p.get("label_smoothing", 0.0)),
        "max_grad_norm": 1.0, "weight_decay": 0.0, "gradient_accumulation_steps": 1, "seed": 0,
    }


# ------------------------------------------------------------------------------------------------ rlswift side


class _Sink:
    def __init__(self):
        self.state = None

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        self.state = sd


def checkpoint_stats(run_dir: Path, model_path: Path, s: dict, reps: int = 3) -> dict:
    """Size of the newest checkpoint and CheckpointManager.load time (real model + optimizer hooks, sinks else)."""
    import torch

    from rlswift.checkpoint import CheckpointManager
    from rlswift.checkpoint.manager import read_manifest

    mgr = CheckpointManager(run_dir)
    cks = mgr.checkpoints()
    if not cks:
        return {}
    step, path = cks[-1]
    manifest = read_manifest(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    loads = []
    for _ in range(reps):
        hooks = {n: _Sink() for n in manifest["hooks"]}
        try:
            from rlswift.models import load_policy
            from rlswift.recipes._common import ModelHook

            model = load_policy(model_path, dtype="float32")
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s["learning_rate"],
                                    weight_decay=s["weight_decay"], foreach=False)
            hooks.update({k: v for k, v in (("model", ModelHook(model)), ("optimizer", opt)) if k in hooks})
        except Exception as e:  # noqa: BLE001
            print(f"  (load timing with sinks only: {type(e).__name__}: {e})")
        t0 = time.perf_counter()
        mgr.load(path, hooks)
        loads.append(time.perf_counter() - t0)
    return {"checkpoint": str(path), "step": step, "size_bytes": size, "load_s": loads}


def run_rlswift(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path) -> dict:
    out = tmp / "rlswift-dpo"
    cmd = [sys.executable, "-m", "rlswift.recipes.dpo", "--config", a.config, f"output_dir={out}", "overwrite=true",
           f"model={a.model}", f"max_steps={a.steps}", f"save_steps={a.save_steps}", "save_total_limit=2",
           "progress_bar=false", "plot=false", f"seed={s['seed']}", "dataset=arithmetic", "dtype=float32",
           f"batch_size={s['batch_size']}", f"max_prompt_length={s['max_prompt_length']}",
           f"max_completion_length={s['max_completion_length']}", f"learning_rate={s['learning_rate']}",
           f"beta={s['beta']}", f"loss_type={s['loss_type']}", f"label_smoothing={s['label_smoothing']}",
           f"max_grad_norm={s['max_grad_norm']}", f"weight_decay={s['weight_decay']}",
           f"gradient_accumulation_steps={s['gradient_accumulation_steps']}", "lr_scheduler=constant",
           "warmup_steps=0"]
    print("$ " + " ".join(cmd[1:]).replace(str(REPO) + "/", ""), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"rlswift DPO recipe exited with {proc.returncode}:\n{(proc.stderr or proc.stdout)[-4000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timing = [r["timing"] for r in recs]
    return {"wall_s": wall, "steps": len(recs), "step_s": [t["step"] for t in timing],
            "parts": {k: [t.get(k, 0.0) for t in timing[1:]] for k in ("reference", "train")},
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
            "acc_mean": mean([r.get("rewards/accuracies", float("nan")) for r in recs]),
            "checkpoint": checkpoint_stats(out, model_path, s)}


# ------------------------------------------------------------------------------------------------ TRL side


def run_trl(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rlswift.data.preference import load_preference_dataset

    rows, _ = load_preference_dataset("arithmetic")  # the recipe's dataset=arithmetic rows
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.step_s, self.ref_s, self.ref_acc = None, [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.ref_acc = 0.0
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.begin)
            self.ref_s.append(self.ref_acc)

    timer = StepTimer()
    cfg = DPOConfig(
        output_dir=str(tmp / "trl-dpo"), report_to="none", save_strategy="no", use_cpu=True,
        bf16=False, fp16=False, gradient_checkpointing=False,  # rlswift trains fp32 without checkpointing
        per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=s["gradient_accumulation_steps"],
        # TRL 1.16 has one max_length (prompt + completion); the arithmetic rows are far shorter than either limit.
        max_length=s["max_prompt_length"] + s["max_completion_length"],
        beta=s["beta"], loss_type=[s["loss_type"]], label_smoothing=s["label_smoothing"],
        precompute_ref_log_probs=False, learning_rate=s["learning_rate"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], max_steps=a.steps,
        seed=s["seed"], logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
    setup = time.perf_counter() - t0
    trainer.remove_callback(PrinterCallback)

    ref = getattr(trainer, "ref_model", None)
    if ref is not None:  # time the reference forwards (TRL calls the model inline in _compute_loss)
        starts: list[float] = []

        def pre(_m, _args):
            starts.append(time.perf_counter())

        def post(_m, _args, _out):
            timer.ref_acc += time.perf_counter() - starts.pop()

        ref.register_forward_pre_hook(pre)
        ref.register_forward_hook(post)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    hist = [h for h in trainer.state.log_history if "loss" in h]
    parts = {}
    if ref is not None:
        parts = {"reference": timer.ref_s[1:], "train": [a - b for a, b in zip(timer.step_s[1:], timer.ref_s[1:])]}
    return {"wall_s": wall, "setup_s": setup, "steps": len(timer.step_s), "step_s": timer.step_s, "parts": parts,
            "loss_first": hist[0]["loss"] if hist else float("nan"),
            "loss_last": hist[-1]["loss"] if hist else float("nan"),
            "acc_mean": mean([h.get("rewards/accuracies", float("nan")) for h in hist])}


# ------------------------------------------------------------------------------------------------ report


def report(a, s, model_path, rl, trl) -> None:
    print(f"\n== DPO step time: model={a.model} ({model_path}), batch {s['batch_size']} pairs, max_prompt_length "
          f"{s['max_prompt_length']}, max_completion_length {s['max_completion_length']}, beta {s['beta']}, "
          f"loss {s['loss_type']}, lr {s['learning_rate']}, fp32, {a.steps} steps, "
          f"threads={os.environ['OMP_NUM_THREADS']} (load avg {LOAD0:.1f} at start), "
          f"step 1 excluded from means")
    print(f"{'':32s} {'step 1 (s)':>10s} {'mean step (s), steps 2..N':>26s} {'median (s)':>10s} "
          f"{'reference':>10s} {'train':>8s} {'whole run (s)':>14s}")
    for name, res in (("rlswift", rl), ("TRL 1.16 DPOTrainer", trl)):
        if not res:
            continue
        rest = res["step_s"][1:]
        ref = mean(res["parts"].get("reference", []))
        tr = mean(res["parts"].get("train", []))
        print(f"{name:32s} {res['step_s'][0]:10.4f} {mean_sd(rest):>26s} {median(rest):10.4f} {ref:10.4f} "
              f"{tr:8.4f} {res['wall_s']:14.1f}")
    if rl and trl:
        r = mean(trl["step_s"][1:]) / mean(rl["step_s"][1:])
        rm = median(trl["step_s"][1:]) / median(rl["step_s"][1:])
        print(f"ratio TRL / rlswift: {r:.2f}x (mean step time), {rm:.2f}x (median)")
    print("  rlswift: timing.{reference,train,step} from metrics.jsonl (reference = cached ref log-probs, computed on "
          "a miss; each row is new in the first epoch). TRL: reference = forward hooks on ref_model; train = step - "
          "reference.\n  whole run = subprocess wall time incl. imports, model load and tokenizing for rlswift; "
          "trainer.train() for TRL" + (f" (DPOTrainer init, which tokenizes the rows: {trl['setup_s']:.1f} s)"
                                        if trl else ""))
    if rl and rl.get("checkpoint"):
        ck = rl["checkpoint"]
        print(f"rlswift checkpoint {Path(ck['checkpoint']).name}: {human(ck['size_bytes'])} on disk; "
              f"CheckpointManager.load {mean_sd(ck['load_s'])} s (first {ck['load_s'][0]:.4f})")
    for name, res in (("rlswift", rl), ("TRL", trl)):
        if res:
            print(f"{name}: loss step 1 {res['loss_first']:.4f} -> step {res['steps']} {res['loss_last']:.4f}, "
                  f"mean preference accuracy {res['acc_mean']:.3f}")


def main() -> int:
    a = ARGS
    s = settings(a)
    from rlswift.models import resolve_model

    model_path = resolve_model(a.model)  # built or converted now, so neither timed run pays for it
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
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
            print("TRL DPOTrainer: running in this process ...", flush=True)
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
