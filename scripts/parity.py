"""Learning-curve parity, rlswift vs TRL 1.16 on CPU: the same rows in the same order, the same schedule, fixed seeds.

    python scripts/parity.py dpo  [--model smollm2-135m] [--steps 30] [--batch-size 4] [--learning-rate 5e-6]
    python scripts/parity.py grpo [--model tiny] [--steps 30] [--learning-rate 1e-3] [--no-free-run]

DPO: rlswift's recipe runs `--steps` steps; its rows are what its `EpochSampler` draws (`epoch_permutation(n, seed,
epoch)`, batch after batch). TRL's DPOTrainer gets a dataset already in that order and a sequential sampler (no
shuffling), the same batch size, learning rate and schedule, beta, loss, fp32 and AdamW (both fused, eps 1e-8, no
weight decay, clip 1.0). Before comparing numbers the script checks that every TRL batch holds exactly rlswift's tokens
(input ids, attention and completion masks). Then it compares the per-step loss, margins, log-probs, grad norm and lr.

GRPO: exact parity of the free-running loop is not expected (vLLM and HF generate sample different tokens). Two checks:
  replay: TRL trains on rlswift's own rollouts (a `rollout_func` hands it, step by step, the prompt and completion ids
          rlswift sampled, from trajectories.jsonl; TRL scores them with the same reward functions itself). Same
          batches, so rewards, advantages (hence the loss), grad norms, entropies and the final weights must agree.
  free run: TRL generates its own completions (HF generate) for the same prompts in the same order; the reward
          curves are compared by 10-step window means against their sampling noise (3 standard errors).
The tiny random model cannot solve arithmetic (every accuracy reward is 0, so every advantage and gradient is 0), so
for `--model tiny` both sides use `even_token_fraction` below: a reward that varies per sample and that a random
model learns within 30 steps. Other models use the preset's rewards (accuracy, format). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import _bench  # noqa: E402

REPO = _bench.REPO


def even_token_fraction(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """Fraction of even token ids in each completion: varies per sample, learnable by a random tiny model."""
    return [sum(1 for t in ids if t % 2 == 0) / max(1, len(ids)) for ids in completion_ids]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", choices=["dpo", "grpo", "all"])
    ap.add_argument("--model", default=None, help="default: smollm2-135m for dpo, tiny for grpo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--learning-rate", type=float, default=None,
                    help="default: dpo 5e-6 (smollm2) / 1e-3 (tiny); grpo 1e-3 (tiny) / 1e-5 (smollm2)")
    ap.add_argument("--lr-scheduler", default="linear", choices=["constant", "linear", "cosine"],
                    help="both sides (default linear, TRL's default)")
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="linear warmup steps, both sides (rlswift's warmup starts at lr/(w+1), TRL's at 0: the lr "
                         "check shows where they differ)")
    ap.add_argument("--batch-size", type=int, default=4, help="DPO pairs per step (default 4)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="DPO micro-batches per step, both sides (rlswift gradient_accumulation_steps; TRL "
                         "per_device_train_batch_size = batch-size / grad-accum)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-free-run", action="store_true", help="GRPO: only the replay check")
    ap.add_argument("--trl-shuffle", action="store_true",
                    help="DPO: give TRL the rows in dataset order and let it shuffle them itself (what bench_dpo.py "
                         "does): shows how far apart the curves of two row orders are")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (default 1)")
    ap.add_argument("--json", default=None, help="also write curves and results to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (their path is printed)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ shared


def run_recipe(recipe: str, out: Path, overrides: list[str]) -> tuple[list[dict], float]:
    """rlswift's recipe as a subprocess (scripts/ importable: the tiny GRPO reward lives here); (metrics, seconds)."""
    from rlswift.runlog import read_jsonl

    cmd = [sys.executable, "-m", f"rlswift.recipes.{recipe}", f"output_dir={out}", "overwrite=true",
           "progress_bar=false", "plot=false", "precision=fp32", *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(SCRIPTS), os.environ.get("PYTHONPATH", "")])}
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"rlswift {recipe} exited with {proc.returncode}:\n{(proc.stderr or proc.stdout)[-4000:]}")
    return list(read_jsonl(out / "metrics.jsonl")), time.perf_counter() - t0


def trl_args(a: argparse.Namespace, lr: float, out: Path, grad_accum: int = 1) -> dict:
    """TrainingArguments both TRL trainers get: fp32, the schedule and seed of the rlswift run, fused AdamW (TRL's
    default and rlswift's), no weight decay, clip 1.0, one log line per step."""
    return dict(output_dir=str(out), report_to="none", save_strategy="no", use_cpu=True, bf16=False, fp16=False,
                gradient_checkpointing=False, learning_rate=lr, lr_scheduler_type=a.lr_scheduler,
                warmup_steps=a.warmup_steps,
                weight_decay=0.0, max_grad_norm=1.0, max_steps=a.steps, seed=a.seed, data_seed=a.seed,
                logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, optim="adamw_torch_fused",
                gradient_accumulation_steps=grad_accum)


def trl_history(trainer) -> list[dict]:
    """TRL's per-step log lines (the ones with a loss), in step order."""
    return [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


def curve_diff(name: str, rl: list[float], trl: list[float], tol: float, relative: bool = False) -> dict:
    """Max abs (or relative) difference of two per-step curves and whether it is within ``tol``."""
    n = min(len(rl), len(trl))
    diffs = [abs(x - y) / (max(abs(x), abs(y)) or 1.0) if relative else abs(x - y) for x, y in zip(rl[:n], trl[:n])]
    worst = max(range(n), key=lambda i: diffs[i]) if n else 0
    d = {"metric": name, "max_diff": max(diffs) if n else float("nan"), "at_step": worst + 1, "tol": tol,
         "relative": relative, "steps": n}
    d["ok"] = bool(n == len(rl) == len(trl) and d["max_diff"] <= tol)
    return d


def print_curves(title: str, rows: dict[str, tuple[list[float], list[float]]], every: int = 5) -> None:
    """A few steps of each curve side by side."""
    n = max(len(v[0]) for v in rows.values())
    shown = sorted({1, 2, 3, n, *range(every, n + 1, every)})
    print(f"\n-- {title}: rlswift | TRL at steps {shown}")
    for name, (rl, trl) in rows.items():
        cells = "  ".join(f"{rl[i - 1]:.5g}|{trl[i - 1]:.5g}" for i in shown if i <= min(len(rl), len(trl)))
        print(f"{name:>18s}  {cells}")


def lr_used(recorded: list[float], peak: float, warmup_steps: int) -> list[float]:
    """rlswift's ``lr`` field is read after ``scheduler.step()`` (the next step's rate); TRL logs the rate the step
    used. Shift rlswift's by one (the first: its schedule's rate at step 1) so both mean "the lr of this step"."""
    first = peak / (warmup_steps + 1) if warmup_steps else peak  # rlswift's build_scheduler at step index 0
    return [first, *recorded[:-1]]


def print_verdicts(verdicts: list[dict]) -> bool:
    ok = all(v["ok"] for v in verdicts)
    for v in verdicts:
        kind = "rel" if v["relative"] else "abs"
        print(f"  {v['metric']:<22s} max {kind} diff {v['max_diff']:.3g} (step {v['at_step']}) "
              f"{'<=' if v['ok'] else '>'} tol {v['tol']:g}: {'OK' if v['ok'] else 'DIFFERS'}")
    return ok


# ------------------------------------------------------------------------------------------------ DPO


def dpo(a: argparse.Namespace, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig, DPOTrainer

    from rlswift.algorithms.dpo import concatenated_batch
    from rlswift.data.preference import load_preference_dataset, tokenize_preference
    from rlswift.models import resolve_model
    from rlswift.models.policy import load_tokenizer
    from rlswift.state.sampler import EpochSampler

    model = a.model or "smollm2-135m"
    lr = a.learning_rate or (1e-3 if model == "tiny" else 5e-6)
    B, beta, max_p, max_c = a.batch_size, 0.1, 256, 64
    if B % a.grad_accum:
        raise SystemExit(f"--grad-accum {a.grad_accum} must divide --batch-size {B}")
    mb = B // a.grad_accum  # pairs per micro-batch
    model_path = resolve_model(model)
    print(f"\n== DPO parity: model={model}, {a.steps} steps x {B} pairs ({a.grad_accum} micro-batches), lr {lr} "
          f"({a.lr_scheduler}, warmup {a.warmup_steps}), beta "
          f"{beta}, sigmoid loss, fp32, seed {a.seed}, threads={os.environ['OMP_NUM_THREADS']}, "
          f"load {_bench.load1():.1f}", flush=True)

    recs, wall = run_recipe("dpo", tmp / "rlswift-dpo", [
        f"model={model}", "dataset=arithmetic", f"batch_size={B}", f"gradient_accumulation_steps={a.grad_accum}",
        f"learning_rate={lr}",
        f"lr_scheduler={a.lr_scheduler}", f"warmup_steps={a.warmup_steps}", f"max_steps={a.steps}",
        f"save_steps={a.steps}",
        f"seed={a.seed}", f"beta={beta}", "loss_type=sigmoid", "label_smoothing=0.0", f"max_prompt_length={max_p}",
        f"max_completion_length={max_c}", "max_grad_norm=1.0", "weight_decay=0.0"])
    print(f"rlswift: {len(recs)} steps in {wall:.0f} s", flush=True)

    # The rows rlswift's sampler drew, in its order; TRL gets them as its dataset and reads them sequentially.
    rows, _ = load_preference_dataset("arithmetic")
    sampler = EpochSampler(len(rows), B, seed=a.seed)
    batches = [sampler.next_batch() for _ in range(a.steps)]
    ordered = [{k: rows[i][k] for k in ("prompt", "chosen", "rejected")} for b in batches for i in b]
    tok = load_tokenizer(model_path)
    examples = [tokenize_preference(tok, r, max_p, max_c) for r in ordered]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mismatched: list[int] = []
    seen: list[int] = []

    class InOrderDPOTrainer(DPOTrainer):
        """DPOTrainer reading its dataset front to back (rlswift's order) and checking each batch's tokens."""

        def _get_train_sampler(self, train_dataset=None):
            if a.trl_shuffle:
                return super()._get_train_sampler(train_dataset)
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training and not a.trl_shuffle:
                m = len(seen)  # micro-batches so far: rlswift's rows are cut the same way, in the same order
                seen.append(m)
                ex = examples[m * mb:(m + 1) * mb]
                want = concatenated_batch(pad, [e["prompt_ids"] for e in ex], [e["chosen_ids"] for e in ex],
                                          [e["rejected_ids"] for e in ex])
                got = {k: inputs[k].cpu() for k in ("input_ids", "attention_mask", "completion_mask")}
                same = all(got[k].shape == want[k].shape for k in got) and torch.equal(
                    got["attention_mask"], want["attention_mask"]) and torch.equal(
                    got["completion_mask"], want["completion_mask"]) and torch.equal(
                    got["input_ids"] * got["attention_mask"], want["input_ids"] * want["attention_mask"])
                if not same:
                    mismatched.append(m // a.grad_accum + 1)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    cfg = DPOConfig(**trl_args(a, lr, tmp / "trl-dpo", a.grad_accum), per_device_train_batch_size=mb,
                    max_length=max_p + max_c,
                    beta=beta, loss_type=["sigmoid"], label_smoothing=0.0, precompute_ref_log_probs=False)
    from transformers import AutoModelForCausalLM, PrinterCallback

    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    t0 = time.perf_counter()
    data = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] if a.trl_shuffle else ordered
    trainer = InOrderDPOTrainer(model=policy, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    print(f"TRL: {len(trl_history(trainer))} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    hist = trl_history(trainer)

    keys = {"loss": ("loss", "loss"), "margin": ("rewards/margins", "rewards/margins"),
            "chosen reward": ("rewards/chosen", "rewards/chosen"), "logps/chosen": ("logps/chosen", "logps/chosen"),
            "logps/rejected": ("logps/rejected", "logps/rejected"), "accuracy": ("rewards/accuracies",
                                                                                  "rewards/accuracies"),
            "grad_norm": ("grad_norm", "grad_norm"), "lr after step": ("lr", "learning_rate")}
    curves = {name: ([r[k1] for r in recs], [h[k2] for h in hist]) for name, (k1, k2) in keys.items()}
    rl_lr, trl_lr = curves.pop("lr after step")
    curves["lr of the step"] = (lr_used(rl_lr, lr, a.warmup_steps), trl_lr)
    print_curves("DPO curves", {k: v for k, v in curves.items() if k != "accuracy"})
    # Tolerances: the two sides run other fp32 kernels (TRL's fused LM-head log-probs vs log_softmax + gather), so
    # they agree to rounding, not bit for bit, and AdamW can turn a rounding-level gradient difference into an
    # lr-sized step. Measured on SmolLM2, 30 steps: loss 9e-7, margins 2e-6, logps 2e-5, grad norm 1e-5 relative;
    # the bounds leave 100x for other CPUs and kernels. A real difference (a row, the schedule, beta, the loss
    # reduction, the reference) moves the loss by 1e-2 or more within a few steps.
    verdicts = [curve_diff("loss", *curves["loss"], tol=1e-4),
                curve_diff("rewards/margins", *curves["margin"], tol=2e-4),
                curve_diff("logps/chosen (nats)", *curves["logps/chosen"], tol=2e-3),
                curve_diff("grad_norm (rel)", *curves["grad_norm"], tol=1e-3, relative=True),
                curve_diff("lr of the step", *curves["lr of the step"], tol=1e-12)]
    print("\nbatches with other tokens than rlswift's: "
          + ("all (--trl-shuffle: TRL drew its own rows)" if a.trl_shuffle else f"{mismatched or 'none'} "
             f"(of {len(hist)})"))
    print(f"loss step 1: rlswift {recs[0]['loss']:.6f}, TRL {hist[0]['loss']:.6f}, ln 2 = {math.log(2):.6f}")
    print(f"loss step {len(recs)}: rlswift {recs[-1]['loss']:.4f}, TRL {hist[-1]['loss']:.4f}; mean of the last 10: "
          f"rlswift {_bench.mean(curves['loss'][0][-10:]):.4f}, TRL {_bench.mean(curves['loss'][1][-10:]):.4f}")
    ok = print_verdicts(verdicts) and not mismatched and not a.trl_shuffle
    print(f"DPO parity: {'AGREE' if ok else 'DIFFER'} within the stated tolerances")
    return {"model": model, "lr": lr, "curves": curves, "verdicts": verdicts, "mismatched_batches": mismatched,
            "ok": ok}


# ------------------------------------------------------------------------------------------------ GRPO


def _window_means(xs: list[float], width: int = 10) -> list[tuple[float, float]]:
    """(mean, standard error) of consecutive windows of per-step values."""
    out = []
    for i in range(0, len(xs), width):
        w = xs[i:i + width]
        sd = (sum((x - sum(w) / len(w)) ** 2 for x in w) / (len(w) - 1)) ** 0.5 if len(w) > 1 else float("nan")
        out.append((sum(w) / len(w), sd / len(w) ** 0.5))
    return out


def grpo(a: argparse.Namespace, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlswift.checkpoint import CheckpointManager, read_hook_states
    from rlswift.data.prompts import load_prompt_dataset, render_prompt
    from rlswift.models import resolve_model
    from rlswift.models.policy import load_tokenizer
    from rlswift.rewards import REWARD_FUNCS
    from rlswift.runlog import read_jsonl

    model = a.model or "tiny"
    tiny = model == "tiny"
    lr = a.learning_rate or (1e-3 if tiny else 1e-5)
    P, G, T, temp, n_prompts, max_p = 4, 4, (16 if tiny else 24), 1.0, 64, 256
    rewards = ["parity.even_token_fraction"] if tiny else ["accuracy", "format"]
    funcs = [even_token_fraction] if tiny else [REWARD_FUNCS.get(n) for n in rewards]
    model_path = resolve_model(model)
    print(f"\n== GRPO parity: model={model}, {a.steps} steps x {P} prompts x {G} samples x <= {T} tokens, T={temp}, "
          f"lr {lr} ({a.lr_scheduler}, warmup {a.warmup_steps}), loss dapo, beta 0, rewards {rewards}, fp32, "
          f"seed {a.seed}, "
          f"threads={os.environ['OMP_NUM_THREADS']}, load {_bench.load1():.1f}", flush=True)

    out = tmp / "rlswift-grpo"
    recs, wall = run_recipe("grpo", out, [
        f"model={model}", "engine=vllm", "dataset=arithmetic", f"num_prompts={n_prompts}", f"prompts_per_step={P}",
        f"num_generations={G}", f"max_completion_length={T}", f"max_prompt_length={max_p}", f"temperature={temp}",
        "top_p=1.0", "top_k=0", f"learning_rate={lr}", f"lr_scheduler={a.lr_scheduler}",
        f"warmup_steps={a.warmup_steps}",
        f"max_steps={a.steps}", f"save_steps={a.steps}", f"seed={a.seed}", "reward_funcs=" + ",".join(rewards),
        "loss_type=dapo", "beta=0.0", "epsilon=0.2", "scale_rewards=group", "num_iterations=1",
        "gradient_accumulation_steps=1", "max_grad_norm=1.0", "weight_decay=0.0"])
    print(f"rlswift: {len(recs)} steps in {wall:.0f} s", flush=True)
    traj = list(read_jsonl(out / "trajectories.jsonl"))
    by_step = [[t for t in traj if t["step"] == k] for k in range(1, a.steps + 1)]
    rl_final = read_hook_states(CheckpointManager(out).checkpoints()[-1][1])["model"]

    dataset = load_prompt_dataset("arithmetic", num_rows=n_prompts, seed=a.seed)
    step_uids = [[lines[g * G]["prompt_uid"] for g in range(P)] for lines in by_step]
    ordered = [dict(dataset[u]) for uids in step_uids for u in uids]  # rlswift's prompts, in its order
    tok = load_tokenizer(model_path)
    bad_prompts: list[int] = []

    def replay(prompts, trainer):
        """TRL's rollout_func: the prompt and completion ids rlswift sampled at this step, in its row order."""
        lines = by_step[trainer.state.global_step]
        if [dataset[t["prompt_uid"]]["prompt"] for t in lines] != list(prompts):
            bad_prompts.append(trainer.state.global_step + 1)
        return {"prompt_ids": [render_prompt(tok, dataset[t["prompt_uid"]]["prompt"], max_p) for t in lines],
                "completion_ids": [list(t["completion_ids"]) for t in lines], "logprobs": None}

    def train_trl(name: str, rollout_func) -> tuple[list[dict], dict]:
        cfg = GRPOConfig(**trl_args(a, lr, tmp / f"trl-{name}"), use_vllm=False, shuffle_dataset=False,
                         per_device_train_batch_size=P * G, num_generations=G, steps_per_generation=1,
                         num_iterations=1, max_completion_length=T, temperature=temp, top_p=1.0, top_k=0,
                         loss_type="dapo", beta=0.0, epsilon=0.2, scale_rewards="group")
        policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=cfg, train_dataset=Dataset.from_list(ordered),
                              processing_class=tok, rollout_func=rollout_func)
        trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        trainer.train()
        hist = trl_history(trainer)
        print(f"TRL {name}: {len(hist)} steps in {time.perf_counter() - t0:.0f} s", flush=True)
        return hist, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's "experimental" banner
    hist, trl_final = train_trl("replay", replay)
    w0 = {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
          .named_parameters()}
    names = sorted(set(rl_final) & set(trl_final))
    gap = max(float((rl_final[n] - trl_final[n]).abs().max()) for n in names)
    moved = max(float((rl_final[n] - w0[n]).abs().max()) for n in names)
    gap_norm = math.sqrt(sum(float((rl_final[n] - trl_final[n]).pow(2).sum()) for n in names))
    moved_norm = math.sqrt(sum(float((rl_final[n] - w0[n]).pow(2).sum()) for n in names))

    keys = {"reward": ("reward", "reward"), "loss": ("loss", "loss"), "grad_norm": ("grad_norm", "grad_norm"),
            "entropy": ("entropy", "entropy"), "completion_length": ("completion_length", "completions/mean_length"),
            "lr after step": ("lr", "learning_rate")}
    curves = {k: ([r[k1] for r in recs], [h[k2] for h in hist]) for k, (k1, k2) in keys.items()}
    rl_lr, trl_lr = curves.pop("lr after step")
    curves["lr of the step"] = (lr_used(rl_lr, lr, a.warmup_steps), trl_lr)
    print_curves("GRPO replay (TRL trains on rlswift's rollouts)", curves)
    # Same batches: rewards, advantages and the loss are exact arithmetic on equal inputs (the on-policy loss is
    # -sum(A * |completion|) / tokens, independent of the weights); grad norms, entropies and weights carry the fp32
    # kernel differences (rlswift's shared-prompt forward vs TRL's per-row forward). Measured on the tiny model, 30
    # steps: grad norm 2e-7 relative, entropy 1e-6, weights 6e-6 of the distance trained; bounds leave >= 100x.
    verdicts = [curve_diff("reward", *curves["reward"], tol=1e-6),
                curve_diff("loss", *curves["loss"], tol=1e-5),
                curve_diff("completion_length", *curves["completion_length"], tol=0.0),
                curve_diff("grad_norm (rel)", *curves["grad_norm"], tol=1e-3, relative=True),
                curve_diff("entropy", *curves["entropy"], tol=1e-3),
                curve_diff("lr of the step", *curves["lr of the step"], tol=1e-12)]
    weights_ok = gap_norm <= 1e-3 * moved_norm
    print(f"\nprompts TRL was handed that were not rlswift's: {bad_prompts or 'none'}")
    print(f"final weights after {a.steps} steps: max |rlswift - TRL| {gap:.3g} (max |rlswift - start| {moved:.3g}); "
          f"||rlswift - TRL|| / ||rlswift - start|| = {gap_norm / moved_norm if moved_norm else float('nan'):.2e} "
          f"({'<=' if weights_ok else '>'} 1e-3)")
    ok = print_verdicts(verdicts) and weights_ok and not bad_prompts
    print(f"GRPO replay parity: {'AGREE' if ok else 'DIFFER'} within the stated tolerances")
    result = {"model": model, "lr": lr, "replay": {"curves": curves, "verdicts": verdicts, "ok": ok,
                                                   "weights": {"max_gap": gap, "max_moved": moved,
                                                               "gap_norm": gap_norm, "moved_norm": moved_norm}}}
    if a.no_free_run:
        return result

    fhist, _ = train_trl("free-run", None)
    rl_r, trl_r = curves["reward"][0], [h["reward"] for h in fhist]
    rl_len, trl_len = curves["completion_length"][0], [h["completions/mean_length"] for h in fhist]
    print("\n-- GRPO free run: rlswift (vLLM) vs TRL (HF generate), same prompts in the same order; 10-step windows: "
          "mean reward (standard error)")
    agree = True
    for i, ((m1, s1), (m2, s2)) in enumerate(zip(_window_means(rl_r), _window_means(trl_r))):
        tol = 3 * math.sqrt(s1 ** 2 + s2 ** 2)
        agree &= abs(m1 - m2) <= tol
        print(f"  steps {10 * i + 1:>2d}-{min(10 * i + 10, len(rl_r)):>2d}: rlswift {m1:.4f} ({s1:.4f})  TRL {m2:.4f} "
              f"({s2:.4f})  |diff| {abs(m1 - m2):.4f} {'<=' if abs(m1 - m2) <= tol else '>'} 3 se {tol:.4f}")
    print(f"  mean completion length: rlswift {_bench.mean(rl_len):.2f}, TRL {_bench.mean(trl_len):.2f}; reward "
          f"trend (last window - first): rlswift {_window_means(rl_r)[-1][0] - _window_means(rl_r)[0][0]:+.4f}, "
          f"TRL {_window_means(trl_r)[-1][0] - _window_means(trl_r)[0][0]:+.4f}")
    print(f"GRPO free-run reward curves: {'AGREE' if agree else 'DIFFER'} within 3 standard errors per window")
    result["free_run"] = {"rlswift_reward": rl_r, "trl_reward": trl_r, "rlswift_length": rl_len,
                          "trl_length": trl_len, "ok": agree}
    return result


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    a = parse_args()
    _bench.setup(a.threads, {"VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    tmp = Path(tempfile.mkdtemp(prefix="parity_"))
    results = {}
    try:
        if a.which in ("dpo", "all"):
            results["dpo"] = dpo(a, tmp)
        if a.which in ("grpo", "all"):
            results["grpo"] = grpo(a, tmp)
    finally:
        if a.keep:
            print(f"run folders kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": results}, indent=1, default=str))
    oks = [r.get("ok", r.get("replay", {}).get("ok")) for r in results.values()]
    return 0 if all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
