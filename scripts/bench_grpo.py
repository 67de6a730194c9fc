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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench, also under `python -m` or an import
import _bench  # noqa: E402
from _bench import mean, mean_sd, median  # noqa: E402

PRESET = _bench.REPO / "recipes" / "grpo_tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    ap = _bench.parser(__doc__, PRESET, save_steps=3)
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"], help="rlswift rollout engine (default vllm)")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
_bench.setup(ARGS and ARGS.threads, {"VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def settings(a: argparse.Namespace) -> dict:
    """The settings both sides share: the preset's values (with defaults for keys it leaves out) + CLI overrides."""
    import yaml

    p = yaml.safe_load(Path(a.config).read_text()) or {}
    return {
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


# ------------------------------------------------------------------------------------------------ rlswift side


def run_rlswift(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path) -> dict:
    out = tmp / "rlswift-grpo"
    # Every shared setting is passed explicitly; reward_funcs come from the same preset.
    overrides = [f"engine={a.engine}"] + [f"{k}={v}" for k, v in s.items() if k != "reward_funcs"]
    recs, wall = _bench.run_recipe("grpo", a, out, overrides)
    timing = [r["timing"] for r in recs]
    steady = timing[1:]
    parts = {k: [t.get(k, 0.0) for t in steady] for k in ("rollout", "reward", "train", "sync", "step")}
    saves = [r["timing"]["last_save"] for r in recs
             if r["step"] > 1 and (r["step"] - 1) % a.save_steps == 0 and "last_save" in r["timing"]]
    return {"wall_s": wall, "steps": len(recs), "step_s": [t["step"] for t in timing], "parts": parts,
            "save_s": saves, "reward_first": recs[0]["reward"], "reward_last": recs[-1]["reward"],
            "run_dir": str(out), "checkpoint": _bench.checkpoint_stats(out, model_path, s)}


# ------------------------------------------------------------------------------------------------ TRL side


def run_trl(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlswift.data.prompts import load_prompt_dataset
    from rlswift.rewards import REWARD_FUNCS

    rows = list(load_prompt_dataset("arithmetic", num_rows=s["num_prompts"], seed=s["seed"]))
    ds = Dataset.from_list(rows)
    funcs = [REWARD_FUNCS.get(n) for n in s["reward_funcs"]]

    timer = _bench.step_timer()
    cfg = GRPOConfig(
        **_bench.matched_trainer_args(a, s, tmp / "trl-grpo"), use_vllm=False,
        per_device_train_batch_size=s["prompts_per_step"] * s["num_generations"],  # TRL counts completions
        num_generations=s["num_generations"], steps_per_generation=1, num_iterations=s["num_iterations"],
        max_completion_length=s["max_completion_length"], temperature=s["temperature"], top_p=s["top_p"],
        top_k=s["top_k"], loss_type=s["loss_type"], beta=s["beta"], epsilon=s["epsilon"],
        scale_rewards=s["scale_rewards"],
    )
    tok, model = _bench.load_hf(model_path)
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


def report(a, s, model_path, rl: dict | None, trl: dict | None) -> None:
    G, P = s["num_generations"], s["prompts_per_step"]
    print(f"\n== GRPO step time: model={a.model} ({model_path}), {P} prompts x {G} samples x <= "
          f"{s['max_completion_length']} tokens, T={s['temperature']}, lr={s['learning_rate']}, fp32, "
          f"{a.steps} steps, {_bench.threads_note()}, step 1 excluded from means")
    rows = []
    if rl:
        rows.append((f"rlswift (engine={a.engine})", rl["step_s"][0], rl["step_s"][1:], rl["wall_s"]))
    if trl:
        rows.append(("TRL 1.16 GRPOTrainer (HF generate)", trl["step_s"][0], trl["step_s"][1:], trl["wall_s"]))
    print(f"{'':38s} {'step 1 (s)':>10s} {'mean step (s), steps 2..N':>26s} {'median (s)':>10s} "
          f"{'whole run (s)':>14s}")
    for name, first, rest, wall in rows:
        print(f"{name:38s} {first:10.3f} {mean_sd(rest):>26s} {median(rest):10.3f} {wall:14.1f}")
    _bench.print_ratio(rl, trl)
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
            print(f"size on disk: {_bench.human(ck['size_bytes'])} ({ck['size_bytes']} bytes); by hook: "
                  + ", ".join(f"{k} {_bench.human(v)}" for k, v in top[:8]))
    for name, res in (("rlswift", rl), ("TRL", trl)):
        if res:
            print(f"mean reward {name}: step 1 {res['reward_first']:.3f}, step {res['steps']} {res['reward_last']:.3f}")


def main() -> int:
    return _bench.main(ARGS, settings(ARGS), "bench_grpo", "GRPOTrainer", run_rlswift, run_trl, report)


if __name__ == "__main__":
    sys.exit(main())
