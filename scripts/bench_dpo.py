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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench, also under `python -m` or an import
import _bench  # noqa: E402
from _bench import mean, median  # noqa: E402

PRESET = _bench.REPO / "recipes" / "dpo_tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    return _bench.parser(__doc__, PRESET, save_steps=5).parse_args(argv)


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
        "learning_rate": float(a.learning_rate if a.learning_rate is not None else p.get("learning_rate", 1e-3)),
        "beta": float(p.get("beta", 0.1)),
        "loss_type": str(p.get("loss_type", "sigmoid")),
        "label_smoothing": float(p.get("label_smoothing", 0.0)),
        "max_grad_norm": 1.0, "weight_decay": 0.0, "gradient_accumulation_steps": 1, "seed": 0,
    }


# ------------------------------------------------------------------------------------------------ rlswift side


def run_rlswift(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path) -> dict:
    out = tmp / "rlswift-dpo"
    recs, wall = _bench.run_recipe("dpo", a, out, ["dataset=arithmetic"] + [f"{k}={v}" for k, v in s.items()])
    timing = [r["timing"] for r in recs]
    return {"wall_s": wall, "steps": len(recs), "step_s": [t["step"] for t in timing],
            "parts": {k: [t.get(k, 0.0) for t in timing[1:]] for k in ("reference", "train")},
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
            "acc_mean": mean([r.get("rewards/accuracies", float("nan")) for r in recs]),
            "checkpoint": _bench.checkpoint_stats(out, model_path, s)}


# ------------------------------------------------------------------------------------------------ TRL side


def run_trl(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path) -> dict:
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


def report(a, s, model_path, rl, trl) -> None:
    print(f"\n== DPO step time: model={a.model} ({model_path}), batch {s['batch_size']} pairs, max_prompt_length "
          f"{s['max_prompt_length']}, max_completion_length {s['max_completion_length']}, beta {s['beta']}, "
          f"loss {s['loss_type']}, lr {s['learning_rate']}, fp32, {a.steps} steps, "
          f"{_bench.threads_note()}, step 1 excluded from means")
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
    _bench.print_ratio(rl, trl)
    print("  rlswift: timing.{reference,train,step} from metrics.jsonl (reference = cached ref log-probs, computed on "
          "a miss; each row is new in the first epoch). TRL: reference = forward hooks on ref_model; train = step - "
          "reference.\n  whole run = subprocess wall time incl. imports, model load and tokenizing for rlswift; "
          "trainer.train() for TRL" + (f" (DPOTrainer init, which tokenizes the rows: {trl['setup_s']:.1f} s)"
                                        if trl else ""))
    if rl and rl.get("checkpoint"):
        ck = rl["checkpoint"]
        print(f"rlswift checkpoint {Path(ck['checkpoint']).name}: {_bench.human(ck['size_bytes'])} on disk; "
              f"CheckpointManager.load {mean_sd(ck['load_s'])} s (first {ck['load_s'][0]:.4f})")
    for name, res in (("rlswift", rl), ("TRL", trl)):
        if res:
            print(f"{name}: loss step 1 {res['loss_first']:.4f} -> step {res['steps']} {res['loss_last']:.4f}, "
                  f"mean preference accuracy {res['acc_mean']:.3f}")


def main() -> int:
    return _bench.main(ARGS, settings(ARGS), "bench_dpo", "DPOTrainer", run_rlswift, run_trl, report)


if __name__ == "__main__":
    sys.exit(main())
