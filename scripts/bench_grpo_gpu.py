"""GRPO on the GPU, side by side: rlswift's recipe vs TRL 1.16 GRPOTrainer (colocated vLLM on one GPU, or TRL's server
mode with `trl vllm-serve` on a second GPU), same cards, same lease.

    python scripts/bench_grpo_gpu.py --model DIR [--steps 10] [--order trl,rlswift] [--out DIR] [--no-gc] \
        [--rlswift key=value ...] [--variant NAME "key=value ..."]...
    # 2 GPUs: trainer on GPU 0, engine on GPU 1 (sync and one-step-async rlswift vs TRL's server mode)
    python scripts/bench_grpo_gpu.py --model DIR --order remote,remote_async,trl_server \
        --variant remote "engine=remote remote.cuda_visible_devices=1 device=cuda:0" \
        --variant remote_async "engine=remote remote.cuda_visible_devices=1 device=cuda:0 async_generation=true"

Sides in --order: `trl` (colocate), `trl_server` (`trl vllm-serve` started on --server-gpu, the trainer on GPU 0),
`rlswift` (the recipe with --rlswift overrides) and each --variant NAME (the recipe with --rlswift and its overrides).

The workload is the TRL anchor's (scripts/gpu/trl_anchor/): a Qwen2.5-0.5B-shaped model folder (build it with
`scripts/gpu/trl_anchor/build_model.py DIR --tokenizer-from scripts/gpu/trl_anchor`), its 2000 two-shot arithmetic
prompts, reward = min(len(text), 1000) / 1000, 8 prompts x 8 samples x <= 256 tokens, fp32 master weights with bf16
autocast on both, lr 1e-6, beta 0, loss dapo, vLLM gpu_memory_utilization 0.3 and max_model_len 384, gradient
checkpointing on both (or off on both with --no-gc). Each side runs in its own process; step 1 is warm-up.
Prints the steady-state step time of each (mean/min/max over steps 2..N), rlswift / TRL, both peak GPU memories
(torch max_memory_allocated over training), and rlswift's split (rollout, reward, train, sync, other).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU = REPO / "scripts" / "gpu"
sys.path.insert(0, str(GPU))
from bench_rewards import anchor_prompts  # noqa: E402


def rlswift_args(model: str, prompts: Path, out: Path, steps: int, gc: bool, extra: list[str]) -> list[str]:
    """The recipe settings that match the TRL anchor's GRPOConfig."""
    return [f"model={model}", f"dataset={prompts}", "reward_funcs=[bench_rewards.length_reward]",
            "prompts_per_step=8", "num_generations=8", "max_completion_length=256", "max_prompt_length=128",
            "temperature=1.0", "learning_rate=1e-6", "beta=0", "loss_type=dapo", "precision=bf16-mixed",
            f"gradient_checkpointing={str(gc).lower()}", "vllm.gpu_memory_utilization=0.3", f"max_steps={steps}",
            f"save_steps={steps}", "save_total_limit=1", "progress_bar=false", "plot=false", f"output_dir={out}",
            "overwrite=true", *extra]


def run(cmd: list[str], env: dict, log: Path, timeout: float) -> int:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    print(f"  exit {rc} after {time.perf_counter() - t0:.0f}s; log {log}", flush=True)
    return rc


def stats(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {}


def rlswift_result(out: Path) -> dict:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = recs[1:]
    split = {k: statistics.mean(r["timing"].get(k, 0.0) for r in steady)
             for k in ("rollout", "reward", "train", "sync", "wait")} if steady else {}
    step = stats([r["timing"]["step"] for r in steady])
    if split and not split["wait"]:  # synchronous: the parts add up (async: the rollout overlaps training)
        del split["wait"]
        split["other"] = step["mean"] - sum(split.values())
    served = [r["timing"]["engine_generate"] for r in steady if "engine_generate" in r["timing"]]
    return {"step": step, "split": split, "engine_start_s": recs[0]["timing"].get("engine_start"),
            "engine_generate_s": statistics.mean(served) if served else None,  # engine=remote: the server's own time
            "peak_alloc_gib": max(r["perf"].get("peak_allocated_gib", 0) for r in recs),
            "peak_reserved_gib": max(r["perf"].get("peak_reserved_gib", 0) for r in recs),
            "tokens_per_s": stats([r["perf"]["generated_tokens_per_s"] for r in steady
                                   if r["perf"].get("generated_tokens_per_s")]),
            "reward_first": recs[0]["reward"], "reward_last": recs[-1]["reward"]}


def trl_server(cmd: list[str], env: dict, out: Path, tag: str, gpu: str, timeout: float, model: str) -> int:
    """TRL's server mode: `trl vllm-serve` (its own process group, on GPU ``gpu``), /health polled, then ``cmd`` (the
    trainer, on GPU 0); the server is stopped afterwards whatever happened."""
    import urllib.request

    senv = dict(env, CUDA_VISIBLE_DEVICES=gpu)
    with open(out / f"log_{tag}_serve.txt", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "trl.scripts.vllm_serve", "--model", model,
                                   "--gpu_memory_utilization", "0.3", "--max_model_len", "384"],
                                  env=senv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 300:
            if server.poll() is not None:
                print(f"  trl vllm-serve exited {server.returncode}; log {out / f'log_{tag}_serve.txt'}", flush=True)
                return 1
            try:
                urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        print(f"  trl vllm-serve answered /health after {time.perf_counter() - t0:.0f}s", flush=True)
        return run(cmd, dict(env, CUDA_VISIBLE_DEVICES="0", VLLM_MODE="server"), out / f"log_{tag}.txt", timeout)
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


def trl_result(path: Path) -> dict:
    r = json.loads(path.read_text())
    steady = r["step_wall_s"][1:]
    return {"step": stats(steady), "peak_alloc_gib": r["peak_alloc_GiB"], "peak_reserved_gib": r["peak_reserved_GiB"],
            "generate_s": r.get("vLLM.generate_steady_mean_s"), "sync_s": r.get("sync_weights_steady_mean_s"),
            "vllm_init_s": r["times"].get("vllm_LLM_init_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the 0.5B-shaped model folder (see the module doc)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--order", default="trl,rlswift", help="which sides to run, in order (comma-separated)")
    ap.add_argument("--out", default="/tmp/bench_grpo_gpu")
    ap.add_argument("--no-gc", action="store_true", help="gradient checkpointing off on both sides")
    ap.add_argument("--timeout", type=float, default=280, help="seconds per side at most")
    ap.add_argument("--tag", default="", help="suffix for this run's result names")
    ap.add_argument("--rlswift", nargs="*", default=[], help="extra key=value overrides for the rlswift side")
    ap.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "OVERRIDES"),
                    help="an rlswift side named NAME with these space-separated key=value overrides (repeatable)")
    ap.add_argument("--server-gpu", default="1", help="trl_server: the GPU of `trl vllm-serve`")
    a = ap.parse_args()
    variants = {name: overrides.split() for name, overrides in a.variant}
    unknown = [s for s in a.order.split(",") if s not in ("trl", "trl_server", "rlswift", *variants)]
    if unknown:
        ap.error(f"--order names {unknown}: use trl, trl_server, rlswift or a --variant name ({list(variants)})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "anchor_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in anchor_prompts()))
    env = dict(os.environ, PYTHONUNBUFFERED="1", OUT=str(out),
               PYTHONPATH=os.pathsep.join([str(GPU), str(REPO), os.environ.get("PYTHONPATH", "")]))
    results: dict[str, dict] = {}
    gc = ["--no-gc"] if a.no_gc else []
    for side in a.order.split(","):
        tag = side + a.tag
        if side == "trl":
            cmd = [sys.executable, str(GPU / "trl_anchor" / "run_grpo.py"), a.model, tag, *gc]
            if run(cmd, env, out / f"log_{tag}.txt", a.timeout) == 0:
                results[tag] = trl_result(out / f"result_{tag}.json")
        elif side == "trl_server":
            cmd = [sys.executable, str(GPU / "trl_anchor" / "run_grpo_server.py"), a.model, tag, *gc]
            if trl_server(cmd, env, out, tag, a.server_gpu, a.timeout, a.model) == 0:
                results[tag] = trl_result(out / f"result_{tag}.json")
        else:
            run_dir = out / f"run_{tag}"
            cmd = [sys.executable, "-m", "rlswift.recipes.grpo",
                   *rlswift_args(a.model, prompts, run_dir, a.steps, not a.no_gc, a.rlswift + variants.get(side, []))]
            if run(cmd, env, out / f"log_{tag}.txt", a.timeout) == 0:
                results[tag] = rlswift_result(run_dir)
        if tag in results:
            print(f"  {tag}: " + json.dumps(results[tag]), flush=True)
    (out / f"results{a.tag}.json").write_text(json.dumps(results, indent=1))

    print(f"\n== GRPO on {a.model}: 8 prompts x 8 samples x <= 256 tokens, bf16-mixed, gc={'off' if a.no_gc else 'on'}, "
          f"steps 2..{a.steps}")
    print(f"{'':24s} {'mean s/step':>11s} {'min':>7s} {'max':>7s} {'peak alloc GiB':>15s} {'peak reserved':>14s}")
    for tag, r in results.items():
        s = r["step"]
        print(f"{tag:24s} {s['mean']:11.3f} {s['min']:7.3f} {s['max']:7.3f} {r['peak_alloc_gib']:15.2f} "
              f"{r['peak_reserved_gib']:14.2f}")
    ours = [s for s in a.order.split(",") if s not in ("trl", "trl_server")]
    for base in ("trl", "trl_server"):
        b = results.get(base + a.tag)
        for side in ours if b else []:
            r = results.get(side + a.tag)
            if r:
                print(f"{side} / {base} step time: {r['step']['mean'] / b['step']['mean']:.3f}; peak allocated "
                      f"{r['peak_alloc_gib']:.2f} vs {b['peak_alloc_gib']:.2f} GiB")
    for side in ours:
        r = results.get(side + a.tag)
        if r and r["split"]:
            print(f"{side} split (s/step): " + ", ".join(f"{k} {v:.3f}" for k, v in r["split"].items())
                  + f"; step / rollout {r['step']['mean'] / max(r['split']['rollout'], 1e-9):.2f}"
                  + (f"; server-side generation {r['engine_generate_s']:.3f}" if r["engine_generate_s"] else "")
                  + f"; generated tokens/s {r['tokens_per_s'].get('mean', 0):.0f}; engine start {r['engine_start_s']}s")
    for base in ("trl", "trl_server"):
        b = results.get(base + a.tag)
        if b:
            print(f"{base} split: vLLM.generate {b['generate_s']}, sync_weights {b['sync_s']}, "
                  f"vLLM init {b['vllm_init_s']}")
    return 0 if all(s + a.tag in results for s in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
