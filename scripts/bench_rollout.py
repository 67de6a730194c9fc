"""Rollout engine numbers: vLLM throughput with per-sample seeds vs without (at several batch sizes), weight-sync time
(full, steady, only-what-changed), optionally a remote engine's sync over HTTP / gloo / NCCL, and the HF engine.

    python scripts/bench_rollout.py [--models tiny,smollm2-135m,DIR] [--samples 64,512] [--tokens 32] [--reps 3]
        [--dtype float32|bfloat16] [--set gpu_memory_utilization=0.3 ...] [--remote gloo|http|nccl] [--sleep-check]
        [--hf]

Runs on CPU (the tiny model in seconds) and on a GPU (pass a model folder, e.g. a 0.5B-shaped Qwen2; on CUDA the
default dtype is bfloat16 and the sync tensors live on the GPU, as a trainer's would). ``--remote nccl`` on a machine
with two GPUs puts the engine server on GPU 1 (``--remote-gpu``) and sends weights GPU to GPU. Importing this module
loads nothing heavy (torch, vLLM and rlswift are imported when it runs). Every ratio is measured in this process, in
alternating repetitions (seeded, unseeded, seeded, ...), so a load change on the machine hits both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_requests(n_samples: int, per_prompt: int, prompt_len: int, tokens: int, vocab: int):
    """n_samples / per_prompt prompts of prompt_len tokens, per_prompt seeds each (GRPO groups)."""
    from rollout.seeds import sample_seed
    from rollout.types import Request, SamplingSpec

    spec = SamplingSpec(temperature=1.0, max_tokens=tokens)
    n_prompts = max(1, n_samples // per_prompt)
    return [Request([(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(prompt_len)],
                    [sample_seed(0, 0, i, s) for s in range(per_prompt)], spec) for i in range(n_prompts)]


def throughput(eng, reqs, reps: int) -> dict:
    """vLLM tok/s with a seed per sample vs without, alternating (seeded, unseeded, seeded, ...); best of each and
    their ratio. Both arms send one vLLM request per sample with ``ignore_eos`` (every sample max_tokens long), so
    they differ only in the seed. Also engine.generate's own tok/s (natural lengths, Rollout records included)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t = reqs[0].sampling.max_tokens
    prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in reqs for _ in r.seeds]
    seeds = [s for r in reqs for s in r.seeds]

    def arm(seeded: bool):
        def run():
            sps = [SamplingParams(temperature=1.0, max_tokens=t, ignore_eos=True, logprobs=0,
                                  seed=s if seeded else None) for s in seeds]
            return sum(len(o.outputs[0].token_ids) for o in eng.llm.generate(prompts, sps, use_tqdm=False))
        return run

    def engine_generate():
        return sum(len(o.completion_ids) for o in eng.generate(reqs))

    arms = (("seeded", arm(True)), ("unseeded", arm(False)), ("engine", engine_generate))
    for _, fn in arms:
        fn()  # warm-up (first calls pay one-off costs)
    rates: dict[str, list[float]] = {name: [] for name, _ in arms}
    for _ in range(reps):
        for name, fn in arms:
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in rates.items()}
    return {"samples": len(prompts), **{f"{k}_tok_s": round(v, 1) for k, v in best.items()},
            "ratio": round(best["seeded"] / best["unseeded"], 3),
            "ratio_median": round(statistics.median(rates["seeded"]) / statistics.median(rates["unseeded"]), 3)}


def sync_bench(eng, model, reps: int) -> dict:
    """Sync times in ms: the first full sync (names validated), then in alternating rounds (so load changes hit every
    arm): full syncs, the path before this change (emulated, in-process engines), and only-what-changed syncs for a
    LoRA on q/v (vLLM's reload path also reloads k: same fused layer) and on every linear layer. Median and min."""
    import torch

    def params():
        return ((n, p.detach()) for n, p in model.named_parameters(remove_duplicate=False))

    names = [n for n, _ in params()]
    arms = {"full": (params, None),
            "lora_qv": (params, [n for n in names if n.endswith(("q_proj.weight", "v_proj.weight"))]),
            "lora_all_linear": (params, [n for n in names if "_proj.weight" in n])}
    validator = getattr(eng, "validator", None)
    if validator is not None:
        sd = dict(params())
        head, emb = sd.get("lm_head.weight"), sd.get("model.embed_tokens.weight")

        def legacy():
            # Before: every name validated on every sync, and a tied head given beside the embedding (as HF models
            # yield it) compared to it on the host.
            validator._known.clear()
            if validator.tied and head is not None and emb is not None:
                torch.equal(emb.cpu(), head.to(emb.dtype).cpu())
            return params()

        arms["legacy_full"] = (legacy, None)
    t0 = time.perf_counter()
    eng.update_weights(params())
    out: dict = {"tensors": len(names), "first_full_ms": round((time.perf_counter() - t0) * 1e3, 2)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    counts: dict[str, int] = {}
    for _ in range(reps):
        for arm, (fn, changed) in arms.items():
            t0 = time.perf_counter()
            eng.update_weights(fn(), changed=changed)
            times[arm].append((time.perf_counter() - t0) * 1e3)
            counts[arm] = eng.stats().get("last_sync_tensors")
    for arm, ts in times.items():
        out[f"{arm}_ms"], out[f"{arm}_min_ms"] = round(statistics.median(ts), 2), round(min(ts), 2)
        out[f"{arm}_tensors"] = counts[arm]
    return out


def print_sync(title: str, s: dict) -> None:
    print(f"{title}: first {s['first_full_ms']:.1f} ms; median (min) ms: full {s['full_ms']:.1f} "
          f"({s['full_min_ms']:.1f})"
          + (f", before this change (emulated) {s['legacy_full_ms']:.1f} ({s['legacy_full_min_ms']:.1f})"
             if "legacy_full_ms" in s else "")
          + f"; changed-only: LoRA q/v {s['lora_qv_ms']:.1f} ({s['lora_qv_min_ms']:.1f}) [{s['lora_qv_tensors']} "
          f"tensors], LoRA all-linear {s['lora_all_linear_ms']:.1f} ({s['lora_all_linear_min_ms']:.1f}) "
          f"[{s['lora_all_linear_tensors']} tensors]", flush=True)


def parse_sets(items: list[str]) -> dict:
    kw = {}
    for item in items:
        key, _, val = item.partition("=")
        try:
            kw[key] = json.loads(val)
        except json.JSONDecodeError:
            kw[key] = val
    return kw


def bench_model(path: Path, a: argparse.Namespace, cuda: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.vllm_engine import VLLMEngine

    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    device = "cuda" if cuda else "cpu"
    print(f"\n== {path.name}: {dtype} on {device}, {a.per_prompt} samples per prompt, <= {a.tokens} tokens, "
          f"prompts of {a.prompt_len} tokens", flush=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    vocab = model.config.vocab_size
    res: dict = {"model": str(path), "dtype": dtype, "device": device}
    eng = VLLMEngine(path, dtype=dtype, max_model_len=a.max_model_len, **parse_sets(a.set))
    res["engine"] = {k: v for k, v in eng.stats().items() if k in ("start_s", "sync_method", "ignored_settings")}
    res["throughput"] = []
    for n in a.samples:
        r = throughput(eng, make_requests(n, a.per_prompt, a.prompt_len, a.tokens, vocab), a.reps)
        res["throughput"].append(r)
        print(f"vLLM {r['samples']:4d} samples: seeded {r['seeded_tok_s']:9.0f} tok/s, "
              f"unseeded {r['unseeded_tok_s']:9.0f} tok/s -> seeded/unseeded {r['ratio']:.3f} (best), "
              f"{r['ratio_median']:.3f} (median); "
              f"engine.generate {r['engine_tok_s']:.0f} tok/s", flush=True)
    res["sync"] = s = sync_bench(eng, model, a.reps + 2)
    print_sync(f"sync, in process ({eng.sync_method}, {s['tensors']} tensors)", s)
    reqs = make_requests(16, 4, a.prompt_len, a.tokens, vocab)
    reference = eng.generate(reqs)
    eng.close()
    if a.sleep_check:
        res["sleep"] = sleep_check(path, a, model, dtype, reqs, reference)
    if a.remote:
        res["remote"] = bench_remote(path, a, model, dtype, reqs, reference)
    if a.hf:
        res["hf"] = bench_hf(model, path, reqs)
    return res


def sleep_check(path: Path, a, model, dtype: str, reqs, reference) -> dict:
    """Sleep mode keeps rollouts exact: with the same synced weights, tokens after sleep/wake (level 1), after sleep
    then a changed-only sync (level 1), and after a level-2 sleep then a full sync equal those of the engine without
    sleep mode; also GPU memory freed by sleep (a no-op on CPU: vLLM has no sleep mode there)."""
    import torch

    from rollout.vllm_engine import VLLMEngine

    def params():
        return ((n, p.detach()) for n, p in model.named_parameters(remove_duplicate=False))

    def free_gib():
        return torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else float("nan")

    out: dict = {}
    for level in (1, 2):
        eng = VLLMEngine(path, dtype=dtype, max_model_len=a.max_model_len, enable_sleep_mode=True, sleep_level=level,
                         **parse_sets(a.set))
        try:
            eng.update_weights(params())
            runs = {"awake": eng.generate(reqs)}
            before = free_gib()
            eng.sleep()
            out[f"level{level}_freed_gib"] = round(free_gib() - before, 2)
            if level == 1:
                eng.wake_up()
                runs["sleep_wake"] = eng.generate(reqs)
                eng.sleep()
                eng.update_weights(params(), changed=["model.norm.weight"])
                runs["sleep_sync_changed"] = eng.generate(reqs)
            else:
                eng.update_weights(params())
                runs["sleep_full_sync"] = eng.generate(reqs)
            for name, got in runs.items():
                out[f"level{level}_{name}_same"] = [o.completion_ids for o in got] == [o.completion_ids for o in reference]
        finally:
            eng.close()
    print("sleep mode: " + ", ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    return out


def bench_remote(path: Path, a, model, dtype: str, reqs, reference) -> dict:
    """A vLLM server in another process (another GPU with --remote nccl): sync times over the chosen transport, and
    its rollouts against the in-process engine's for the same weights."""
    from rollout.client import RemoteEngine

    env = {"CUDA_VISIBLE_DEVICES": str(a.remote_gpu)} if a.remote == "nccl" else {}
    extra = ["--max-model-len", str(a.max_model_len)]
    t0 = time.perf_counter()
    remote = RemoteEngine.launch(path, engine="vllm", dtype=dtype, extra_args=extra, env=env,
                                 weight_transport=a.remote, startup_timeout=900)
    try:
        out = {"transport": a.remote, "launch_s": round(time.perf_counter() - t0, 1)}
        out.update(sync_bench(remote, model, a.reps + 2))
        got = remote.generate(reqs)
        same = [o.completion_ids for o in got] == [o.completion_ids for o in reference]
        err = max(abs(x - y) for g, r in zip(got, reference) for x, y in zip(g.logprobs, r.logprobs))
        out.update(same_tokens=same, max_logprob_diff=err)
        print_sync(f"sync, remote ({a.remote})", out)
        print(f"remote rollouts vs in-process: same tokens {same}, max logprob diff {err:.2e}", flush=True)
        return out
    finally:
        remote.close()


def bench_hf(model, path: Path, reqs) -> dict:
    import torch
    from transformers import AutoTokenizer

    from rollout.hf_engine import HFEngine

    hf = HFEngine(model, tokenizer=AutoTokenizer.from_pretrained(path), device=str(next(model.parameters()).device))
    t0 = time.perf_counter()
    n = sum(len(o.completion_ids) for o in hf.generate(reqs))
    dt = time.perf_counter() - t0
    ids = torch.tensor([r.prompt_ids for r in reqs for _ in r.seeds], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        t = reqs[0].sampling.max_tokens
        g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=t,
                           min_new_tokens=t, top_k=0, top_p=1.0, pad_token_id=0)
    dg = time.perf_counter() - t0
    ng = (g.shape[1] - ids.shape[1]) * g.shape[0]
    print(f"HF engine (exact, batch 1): {n / dt:.0f} tok/s; batched model.generate (unseeded): {ng / dg:.0f} tok/s",
          flush=True)
    return {"hf_engine_tok_s": round(n / dt, 1), "model_generate_tok_s": round(ng / dg, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2-135m, or model folders")
    p.add_argument("--samples", default="64,512", help="comma-separated total samples per generate call")
    p.add_argument("--per-prompt", type=int, default=8, help="samples per prompt (GRPO group size)")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--tokens", type=int, default=32, help="max new tokens per sample")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="VLLMEngine setting, e.g. gpu_memory_utilization=0.3, max_num_seqs=256, kv_cache_gib=4")
    p.add_argument("--remote", choices=["http", "gloo", "nccl"], default=None, help="also bench a remote engine")
    p.add_argument("--remote-gpu", type=int, default=1, help="CUDA device of the remote server (--remote nccl)")
    p.add_argument("--sleep-check", action="store_true",
                   help="also check that sleep mode (levels 1 and 2) keeps rollouts exact, and what it frees (GPU)")
    p.add_argument("--hf", action="store_true", help="also the HF engine and batched model.generate (slow on CPU)")
    p.add_argument("--json", default=None, help="write the numbers to this file")
    a = p.parse_args()
    a.samples = [int(x) for x in a.samples.split(",")]
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}.items():
        os.environ.setdefault(k, v)
    sys.path.insert(0, str(REPO))
    import torch

    from rlswift.models import resolve_model  # scripts may import rlswift; rollout/ never does

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    results = [bench_model(resolve_model(m), a, cuda) for m in a.models.split(",") if m]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
