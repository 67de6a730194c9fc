"""GRPO step time: rlswift's GRPO recipe vs TRL 1.16 GRPOTrainer (no vLLM) on the same model, prompts and settings.

    python scripts/bench_grpo.py [--model tiny|smollm2-135m] [--steps 10] [--repeats 3] [--max-completion-length 24]
                                 [--engine vllm|hf] [--learning-rate 1e-5] [--set KEY=VALUE ...]

Both sides run as subprocesses, `--repeats` times each, interleaved (rlswift, TRL, TRL, rlswift, ...), the 1-minute
load average noted before each run. rlswift: `python -m rlswift.recipes.grpo --config recipes/grpo_tiny.yaml ...`;
per-step times and the split (sync, rollout, reward, train) from metrics.jsonl's `timing`, checkpoint save time from
`timing.last_save` of the step after each save, load time from `CheckpointManager.load` on the final checkpoint (first
run only). TRL: this script with GRPOConfig matched to the recipe (use_vllm=False: TRL's colocated vLLM mode crashes on
CPU), timed by a TrainerCallback. Step 1 (warm-up) of every run is left out; the steady steps of all runs of a side are
pooled and quoted by their min and median (a shared machine adds time, never removes it).

The default learning rate is 1e-5, not the preset's 1e-3: at 1e-3 the two policies drift apart within a few steps and
generate different lengths, so the sides no longer do the same work (that alone moved the ratio from 0.84x to 0.56x).
The mean completion length of each side is printed so a reader can see the work was equal. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _bench, also under `python -m` or an import
import _bench  # noqa: E402
from _bench import mean, mean_sd  # noqa: E402

PRESET = _bench.REPO / "recipes" / "grpo_tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    ap = _bench.parser(__doc__, PRESET, save_steps=3, learning_rate=1e-5)
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"], help="rlswift rollout engine (default vllm)")
    ap.add_argument("--max-completion-length", type=int, default=None, help="tokens per completion at most "
                    "(default: the preset's)")
    ap.add_argument("--prompts-per-step", type=int, default=None, help="groups per step (default: the preset's)")
    ap.add_argument("--num-generations", type=int, default=None, help="samples per prompt (default: the preset's)")
    ap.add_argument("--py-spy", default=None, metavar="OUT.txt",
                    help="first, one extra rlswift run (not timed) under `py-spy record` (pip install py-spy): its "
                         "raw profile goes to OUT.txt and the samples per part of the step are printed")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
_bench.setup(ARGS and ARGS.threads, {"VLLM_NO_USAGE_STATS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})


def settings(a: argparse.Namespace) -> dict:
    """The settings both sides share: the preset's values (with defaults for keys it leaves out) + CLI overrides."""
    import yaml

    p = yaml.safe_load(Path(a.config).read_text()) or {}
    for key in ("max_completion_length", "prompts_per_step", "num_generations"):
        if getattr(a, key) is not None:
            p[key] = getattr(a, key)
    return {
        "num_prompts": int(p.get("num_prompts", 64)),
        "prompts_per_step": int(p.get("prompts_per_step", 4)),
        "num_generations": int(p.get("num_generations", 4)),
        "max_completion_length": int(p.get("max_completion_length", 16)),
        "temperature": float(p.get("temperature", 1.0)),
        "top_p": float(p.get("top_p", 1.0)),
        "top_k": int(p.get("top_k", 0)),
        "learning_rate": float(a.learning_rate),
        "reward_funcs": list(p.get("reward_funcs", ["accuracy", "format"])),
        "loss_type": "dapo", "beta": 0.0, "epsilon": 0.2, "scale_rewards": "group", "num_iterations": 1,
        "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "weight_decay": 0.0, "seed": 0,
    }


# ------------------------------------------------------------------------------------------------ rlswift side


def run_rlswift(a: argparse.Namespace, s: dict, model_path: Path, out: Path, ckpt_stats: bool) -> dict:
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
            "completion_length": [r["completion_length"] for r in recs], "run_dir": str(out),
            "checkpoint": _bench.checkpoint_stats(out, model_path, s) if ckpt_stats else {}}


# Parts of the GRPO step, matched in this order against a sample's Python frames: (part, frame markers, sub-parts).
PROFILE_PARTS = [
    ("sync", ("sync_engine",), (("vLLM repack (process_weights_after_loading)", "process_weights_after_loading"),
                                ("weight copy / load_weights", ""))),
    ("rollout", ("generate_groups",), (("vLLM model forward (execute_model)", "execute_model"),
                                       ("sampling", "sample"), ("other", ""))),
    ("train", ("update_policy",), (("clip_grad_norm", "clip_grad_norm"), ("optimizer.step", "optimizer_step"),
                                   ("backward", "backward"), ("forward (log-probs, entropy)", "batch_logprobs"),
                                   ("other (loss, metrics)", ""))),
    ("checkpoint save", ("CheckpointManager.save",), (("", ""),)),
    ("startup / shutdown", ("start_engine", "load_policy", "load_tokenizer", "resolve_model", "make_reference",
                            "build_run_optimizer", "load_prompt_dataset", "VLLMEngine.close", "summarize",
                            "plot_rewards"), (("", ""),)),
    ("other in the step loop (batch assembly, logging)", ("main (rlswift/recipes/grpo.py",), (("", ""),)),
]


def profile_split(raw: Path) -> dict[str, dict[str, int]]:
    """Samples of a `py-spy record -f raw` profile of the recipe by part of the step (and sub-part); samples outside
    the step loop (imports, model load, engine start and shutdown) go to "startup / shutdown"."""
    split: dict[str, dict[str, int]] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        part, sub = "startup / shutdown", ""
        for name, markers, subs in PROFILE_PARTS:
            if any(m in stack for m in markers):
                part, sub = name, next(label for label, m in subs if m in stack)
                break
        split.setdefault(part, {})
        split[part][sub] = split[part].get(sub, 0) + int(n)
    return split


def run_profiled(a: argparse.Namespace, s: dict, model_path: Path) -> None:
    """One rlswift run under py-spy (25 samples/s, raw collapsed stacks to a.py_spy), then its split."""
    beside = Path(sys.executable).parent / "py-spy"  # a venv's bin is not always on PATH
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if not spy:
        raise SystemExit("--py-spy needs the py-spy command: pip install py-spy")
    out = Path(tempfile.mkdtemp(prefix="bench_grpo_profile_"))
    try:
        overrides = [f"engine={a.engine}"] + [f"{k}={v}" for k, v in s.items() if k != "reward_funcs"]
        _bench.run_recipe("grpo", a, out / "run", overrides,
                          prefix=[spy, "record", "-r", "25", "-f", "raw", "-o", a.py_spy, "--"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    split = profile_split(Path(a.py_spy))
    in_loop = sum(sum(v.values()) for k, v in split.items() if k != "startup / shutdown")
    print(f"\n-- py-spy profile of one rlswift run ({a.py_spy}): samples per part of the step, all steps (step 1 "
          "included); % of the samples inside the step loop")
    for part, subs in sorted(split.items(), key=lambda kv: -sum(kv[1].values())):
        n = sum(subs.values())
        print(f"{part:40s} {n:6d} " + (f"{100 * n / in_loop:5.1f}%" if part != "startup / shutdown" else ""))
        for sub, m in sorted(subs.items(), key=lambda kv: -kv[1]):
            if sub and part != "startup / shutdown":
                print(f"    {sub:36s} {m:6d} {100 * m / in_loop:5.1f}%")


# ------------------------------------------------------------------------------------------------ TRL side


def run_trl(a: argparse.Namespace, s: dict, model_path: Path, tmp: Path, _unused: bool = True) -> dict:
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
    lengths = [h["completions/mean_length"] for h in hist if "completions/mean_length" in h]
    n = len(timer.step_s)
    parts = {}
    if all(len(v) == n for v in spent.values()):
        parts = {"rollout": spent["rollout"][1:], "reward": spent["reward"][1:],
                 "train": [st - p for st, p in zip(timer.step_s[1:], spent["prepare"][1:])]}
    return {"wall_s": wall, "steps": n, "step_s": timer.step_s, "parts": parts, "completion_length": lengths,
            "interval_s": [b - e for e, b in zip(timer.ends, timer.ends[1:])],
            "reward_first": hist[0]["reward"] if hist else float("nan"),
            "reward_last": hist[-1]["reward"] if hist else float("nan")}


# ------------------------------------------------------------------------------------------------ report


def report(a, s, model_path, runs: dict[str, list[dict]]) -> None:
    G, P = s["num_generations"], s["prompts_per_step"]
    names = {"rlswift": f"rlswift (engine={a.engine})", "trl": "TRL 1.16 GRPOTrainer (HF generate)"}
    extra = f", rlswift overrides {' '.join(a.set)}" if a.set else ""
    print(f"\n== GRPO step time: model={a.model} ({model_path}), {P} prompts x {G} samples x <= "
          f"{s['max_completion_length']} tokens, T={s['temperature']}, lr={s['learning_rate']}, fp32, "
          f"{a.steps} steps x {a.repeats} run(s) per side, {_bench.threads_note()}{extra}; steady steps = 2..N of "
          f"every run, pooled")
    _bench.print_sides(runs, names)
    for side, rs in runs.items():
        if rs:
            lens = _bench.steady(rs, "completion_length")
            print(f"mean completion length {names[side]}: {mean(lens):.1f} tokens (steady steps; the work per step)")
    print("\n-- split, seconds per step over the pooled steady steps (mean row: other = step - parts)")
    _bench.part_table(runs, names, ("sync", "rollout", "reward", "train"))
    print("  rlswift: timing.{sync,rollout,reward,train} from metrics.jsonl (train = forward+backward+optimizer; sync "
          "= weights to vLLM, at the start of each step).\n  TRL: rollout = GRPOTrainer._generate, reward = "
          "_calculate_rewards, train = step - _generate_and_score_completions; other = tokenizing/padding/logging.")
    rl = runs.get("rlswift") or []
    if rl:
        ck = rl[0].get("checkpoint") or {}
        saves = [x for r in rl for x in r["save_s"]]
        print("\n-- rlswift checkpoints")
        print(f"save time (timing.last_save after save steps): {mean_sd(saves)} s  (n={len(saves)})")
        if ck:
            print(f"load time (CheckpointManager.load of {Path(ck['checkpoint']).name}: verify sha256 + decode + "
                  f"model/optimizer load_state_dict): {mean_sd(ck['load_s'])} s  (first {ck['load_s'][0]:.3f})")
            top = sorted(ck["per_hook_bytes"].items(), key=lambda kv: -kv[1])
            print(f"size on disk: {_bench.human(ck['size_bytes'])} ({ck['size_bytes']} bytes); by hook: "
                  + ", ".join(f"{k} {_bench.human(v)}" for k, v in top[:8]))
    for side, rs in runs.items():
        for r in rs:
            print(f"mean reward {names[side]} run {r['repeat'] + 1}: step 1 {r['reward_first']:.3f}, step {r['steps']} "
                  f"{r['reward_last']:.3f}; whole run {r['wall_s']:.1f} s")


def main() -> int:
    if ARGS.py_spy and not ARGS.trl_worker:
        from rlswift.models import resolve_model

        run_profiled(ARGS, settings(ARGS), resolve_model(ARGS.model))
    return _bench.main(ARGS, settings(ARGS), "bench_grpo", "GRPOTrainer", Path(__file__).resolve(), run_rlswift,
                       run_trl, report)


if __name__ == "__main__":
    sys.exit(main())
