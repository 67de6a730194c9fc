"""DPO step time: rlswift's DPO recipe vs TRL 1.16 DPOTrainer on the same model, preference rows and settings.

    python scripts/bench_dpo.py [--steps 10] [--repeats 2] [--model tiny|smollm2-135m] [--save-steps 5]

Both sides run as subprocesses, `--repeats` times each, interleaved (rlswift, TRL, TRL, rlswift, ...), the 1-minute
load average noted before each run. rlswift: `python -m rlswift.recipes.dpo --config recipes/dpo_tiny.yaml ...`;
per-step times and breakdown (reference / train) from metrics.jsonl's `timing`, plus the final checkpoint's size and
`CheckpointManager.load` time (first run). TRL: this script with DPOConfig matched to the recipe (same batch size, max
lengths, beta, loss, lr, steps; reference log-probs computed during training, as rlswift does on a cache miss), timed
by a TrainerCallback; its reference time is measured with forward hooks on the reference model. Step 1 (warm-up) of
every run is left out; steady steps of all runs of a side are pooled and quoted by min and median. Default learning
rate 5e-6 (the recipe's; DPO's work per step does not depend on it). Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench, also under `python -m` or an import
import _bench  # noqa: E402
from _bench import mean  # noqa: E402

PRESET = _bench.REPO / "recipes" / "dpo_tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    return _bench.parser(__doc__, PRESET, save_steps=5, learning_rate=5e-6).parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
_bench.setup(ARGS and ARGS.threads)


def mean_sd(xs: list[float]) -> str:
    return _bench.mean_sd(xs, digits=4)


def settings(a: argparse.Namespace) -> dict:
    """The settings both sides share: the preset's values (defaults for keys it leaves out) + CLI overrides."""
    import yaml

    p = yaml.safe_load(Path(a.config).read_text()) or {}
    return {
        "batch_size": int(p.get("batch_size", 4)),
        "max_prompt_length": int(p.get("max_prompt_length", 256)),
        "max_completion_length": int(p.get("max_completion_length", 16)),
        "learning_rate": float(a.learning_rate),
        "beta": float(p.get("beta", 0.1)),
        "loss_type": str(p.get("loss_type", "sigmoid")),
        "label_smoothing": float(p.get("label_smoothing", 0.0)),
        "max_grad_norm": 1.0, "weight_decay": 0.0, "gradient_accumulation_steps": 1, "seed": 0,
    }


# ------------------------------------------------------------------------------------------------ rlswift side


def run_rlswift(a: argparse.Namespace, s: dict, model_path: Path, out: Path, ckpt_stats: bool) -> dict:
    recs, wall = _bench.run_recipe("dpo", a, out, ["dataset=arithmetic"] + [f"{k}={v}" for k, v in s.items()])
    timing = [r["timing"] for r in recs]
    return {"wall_s": wall, "steps": len(recs), "step_s": [t["step"] for t in timing],
            "parts": {k: [t.get(k, 0.0) for t in timing[1:]] for k in ("reference", "train")},
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
            "acc_mean": mean([r.get("rewards/accuracies", float("nan")) for r in recs]),
            "checkpoint": _bench.checkpoint_stats(out, model_path, s) if ckpt_stats else {}}


# ------------------------------------------------------------------------------------------------ TRL side


def run_trl(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path, _unused: bool = True) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from rlswift.data.preference import load_preference_dataset

    rows, _ = load_preference_dataset("arithmetic")  # the recipe's dataset=arithmetic rows
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])

    timer = _bench.step_timer()  # inner_s: reference forward time per step
    cfg = DPOConfig(
        **_bench.matched_trainer_args(a, s, tmp / "trl-dpo"), per_device_train_batch_size=s["batch_size"],
        # TRL 1.16 has one max_length (prompt + completion); the arithmetic rows are far shorter than either limit.
        max_length=s["max_prompt_length"] + s["max_completion_length"],
        beta=s["beta"], loss_type=[s["loss_type"]], label_smoothing=s["label_smoothing"],
        precompute_ref_log_probs=False,
    )
    tok, model = _bench.load_hf(model_path)
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
            timer.inner_acc += time.perf_counter() - starts.pop()

        ref.register_forward_pre_hook(pre)
        ref.register_forward_hook(post)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    hist = [h for h in trainer.state.log_history if "loss" in h]
    parts = {}
    if ref is not None:
        parts = {"reference": timer.inner_s[1:],
                 "train": [st - r for st, r in zip(timer.step_s[1:], timer.inner_s[1:])]}
    return {"wall_s": wall, "setup_s": setup, "steps": len(timer.step_s), "step_s": timer.step_s, "parts": parts,
            "loss_first": hist[0]["loss"] if hist else float("nan"),
            "loss_last": hist[-1]["loss"] if hist else float("nan"),
            "acc_mean": mean([h.get("rewards/accuracies", float("nan")) for h in hist])}


# ------------------------------------------------------------------------------------------------ report


def report(a, s, model_path, runs: dict[str, list[dict]]) -> None:
    names = {"rlswift": "rlswift", "trl": "TRL 1.16 DPOTrainer"}
    extra = f", rlswift overrides {' '.join(a.set)}" if a.set else ""
    print(f"\n== DPO step time: model={a.model} ({model_path}), batch {s['batch_size']} pairs, max_prompt_length "
          f"{s['max_prompt_length']}, max_completion_length {s['max_completion_length']}, beta {s['beta']}, "
          f"loss {s['loss_type']}, lr {s['learning_rate']}, fp32, {a.steps} steps x {a.repeats} run(s) per side, "
          f"{_bench.threads_note()}{extra}; steady steps = 2..N of every run, pooled")
    _bench.print_sides(runs, names, digits=4)
    print("\n-- split, seconds per step over the pooled steady steps")
    _bench.part_table(runs, names, ("reference", "train"), digits=4)
    print("  rlswift: timing.{reference,train,step} from metrics.jsonl (reference = cached ref log-probs, computed on "
          "a miss; each row is new in the first epoch). TRL: reference = forward hooks on ref_model; train = step - "
          "reference.")
    rl = runs.get("rlswift") or []
    if rl and rl[0].get("checkpoint"):
        ck = rl[0]["checkpoint"]
        print(f"rlswift checkpoint {Path(ck['checkpoint']).name}: {_bench.human(ck['size_bytes'])} on disk; "
              f"CheckpointManager.load {mean_sd(ck['load_s'])} s (first {ck['load_s'][0]:.4f})")
    for side, rs in runs.items():
        for r in rs:
            setup = f" + DPOTrainer init {r['setup_s']:.1f} s" if "setup_s" in r else ""
            print(f"{names[side]} run {r['repeat'] + 1}: loss step 1 {r['loss_first']:.4f} -> step {r['steps']} "
                  f"{r['loss_last']:.4f}, mean preference accuracy {r['acc_mean']:.3f}; whole run {r['wall_s']:.1f} s"
                  f"{setup}")


def main() -> int:
    return _bench.main(ARGS, settings(ARGS), "bench_dpo", "DPOTrainer", Path(__file__).resolve(), run_rlswift,
                       run_trl, report)


if __name__ == "__main__":
    sys.exit(main())
