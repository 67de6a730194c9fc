"""GRPO training forward+backward: plain vs shared-prompt (packed or not, chunked head), and the LM head's peak memory.

    python scripts/bench_train_forward.py [--model smollm2-135m] [--threads 1] [--reps 3]
                                          [--shapes 4x4x46x24,4x4x46x128] [--chunk-size 256]
    python scripts/bench_train_forward.py --memory [--threads 1]
    # on a GPU, as the recipe trains there: bf16 autocast, deterministic kernels, gradient checkpointing
    python scripts/bench_train_forward.py --model DIR --device cuda --autocast --deterministic --gc \
                                          --shapes 8x8x100x256 --reps 5

Time mode: the recipe's batch layout (G consecutive rows per prompt; prompts of prompt_len-2..prompt_len+2 random
tokens left-padded, completions of T/2..T tokens right-padded), the recipe's call (``completion_logprobs`` with
temperature and entropy) and a GRPO-like loss, fp32, model in train mode. Each variant runs once as warm-up, then
``--reps`` rounds in interleaved order; min and median per variant and the ratio to the plain forward are printed,
with how far the shared path's log-probs and gradients are from the plain ones on this model.

Memory mode: the LM head alone (last hidden states -> log-probs + entropy -> backward), each measurement in a fresh
subprocess: peak RSS above the process's RSS before the call, for a 49152 vocab (SmolLM2, hidden 576) and a 151936
vocab (Qwen2.5-0.5B, hidden 896), fp32 and bf16 autocast, at two small B*T, fitted linearly and extrapolated to
B=64, T=256: the plain path grows by a few fp32 [V] rows per position, the chunked one by a hidden state.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import _bench

MEM_CASES = [(49152, 576), (151936, 896)]  # (vocab, hidden): SmolLM2-135M, Qwen2.5-0.5B
MEM_ROWS = (512, 1024)  # B*T positions measured (B=2 and 4 at T=256); peaks are fitted linearly in B*T
MEM_CHUNK = 128


def make_batch(n_prompts: int, group: int, prompt_len: int, T: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = [prompt_len + int(torch.randint(-2, 3, (1,), generator=g)) for _ in range(n_prompts)]
    P = max(lens)
    ids = torch.full((n_prompts * group, P + T), 0, dtype=torch.long)
    am = torch.zeros_like(ids)
    cm = torch.zeros(n_prompts * group, T)
    for i, plen in enumerate(lens):
        prompt = torch.randint(3, vocab, (plen,), generator=g)
        for j in range(group):
            r, clen = i * group + j, int(torch.randint(T // 2, T + 1, (1,), generator=g))
            ids[r, P - plen:P] = prompt
            ids[r, P:P + clen] = torch.randint(3, vocab, (clen,), generator=g)
            am[r, P - plen:P + clen] = 1
            cm[r, :clen] = 1
    adv = torch.randn(n_prompts * group, generator=g)
    return ids, am, cm, adv


def step(model, ids, am, cm, adv, T, autocast=False, deterministic=False, **kw):
    """One forward+backward as the recipe does it: returns (seconds, log-probs, grads)."""
    import torch

    from rlswift.algorithms.logprobs import completion_logprobs
    from rlswift.models.device import deterministic_kernels

    model.zero_grad(set_to_none=True)
    dev = ids.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with deterministic_kernels(deterministic), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        lp, ent = completion_logprobs(model, ids, am, T, temperature=0.9, return_entropy=True, **kw)
        loss = -(adv[:, None] * lp.float() * cm).sum() / cm.sum()  # the dapo-style token sum the recipe's default uses
        loss.backward()
    sync()
    dt = time.perf_counter() - t0
    return dt, lp.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def time_mode(a) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rlswift.algorithms.shared_prompt import shared_prompt_fallback_reason
    from rlswift.models import resolve_model

    path = resolve_model(a.model)
    device = torch.device(a.device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
    if a.gc:
        from rlswift.models.device import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    run = {"autocast": a.autocast, "deterministic": a.deterministic}
    print(f"model {path.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), fp32 weights"
          f"{', bf16 autocast' if a.autocast else ''}, on {device}"
          f"{', deterministic kernels' if a.deterministic else ''}"
          f"{', gradient checkpointing' if a.gc else ''}, {_bench.threads_note()}; shared-prompt support: "
          f"{shared_prompt_fallback_reason(model) or 'yes'}")
    variants = {"plain": {}, "shared": {"shared_prompt": True},
                "shared+packed": {"shared_prompt": True, "pack_completions": True},
                f"plain+chunk{a.chunk_size}": {"chunk_size": a.chunk_size},
                f"shared+chunk{a.chunk_size}": {"shared_prompt": True, "chunk_size": a.chunk_size}}
    results = []
    for shape in a.shapes.split(","):
        n, G, plen, T = map(int, shape.split("x"))
        ids, am, cm, adv = (x.to(device) for x in make_batch(n, G, plen, T, model.config.vocab_size))
        print(f"\n== {n} prompts x {G} samples, prompts ~{plen} tokens (P={ids.shape[1] - T}), completions <= {T} "
              f"(batch {tuple(ids.shape)})")
        times = {k: [] for k in variants}
        _, lp0, g0 = step(model, ids, am, cm, adv, T, **run)  # warm-up + the reference for the accuracy line
        g0 = {k: v.clone() for k, v in g0.items()}
        _, lp1, g1 = step(model, ids, am, cm, adv, T, shared_prompt=True, **run)
        lp_diff = float((lp1 - lp0).abs()[cm.bool()].max())  # padding positions are masked out of the loss
        grad_rel = max(float((g1[k] - g0[k]).abs().max() / g0[k].abs().max()) for k in g0)
        for _ in range(a.reps):
            for name, kw in variants.items():
                times[name].append(step(model, ids, am, cm, adv, T, **run, **kw)[0])
        base = _bench.median(times["plain"])
        print(f"{'variant':<22}{'min (s)':>10}{'median (s)':>12}{'median / plain':>16}")
        for name, ts in times.items():
            print(f"{name:<22}{min(ts):>10.3f}{_bench.median(ts):>12.3f}{_bench.median(ts) / base:>15.2f}x")
        print(f"shared vs plain: max |d logprob| on completion tokens {lp_diff:.2e}, max over parameters of "
              f"max |d grad| / max |grad| {grad_rel:.2e}")
        results.append({"shape": shape, "times": times, "lp_diff": lp_diff, "grad_rel": grad_rel})
        for name in (a.profile.split(",") if a.profile else []):
            profile(name, lambda: step(model, ids, am, cm, adv, T, **run, **variants[name]), device)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": str(path), "threads": os.environ["OMP_NUM_THREADS"], "results": results}, f, indent=1)


def profile(name: str, fn, device) -> None:
    """torch.profiler of one more call of ``fn``: the ops that took the most (device) time, and the kernel count."""
    import torch
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"\n-- profile of {name}: {kernels} device kernels launched")
    print(events.table(sort_by=key, row_limit=22, max_name_column_width=60))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(vocab: int, hidden: int, rows: int, chunk: int, autocast: bool) -> None:
    """Run one LM-head forward+backward and print the peak RSS above the RSS before it (bytes) as JSON."""
    import torch
    import torch.nn.functional as F

    from rlswift.algorithms.logprobs import chunked_linear_logprobs, entropy_from_logits, selective_log_softmax

    g = torch.Generator().manual_seed(0)
    shape = (rows // 256, 256)  # [B, T] with T = 256: per-row temporaries stay the same size at every B
    h = (torch.randn(*shape, hidden, generator=g) * 0.5).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.02).requires_grad_(True)
    ids = torch.randint(0, vocab, shape, generator=g)
    before = _rss_bytes()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if chunk:
            lp, _ = chunked_linear_logprobs(h, w, None, ids, 0.9, chunk_size=chunk, return_entropy=True)
        else:  # completion_logprobs' plain path on these hidden states
            logits = F.linear(h, w).float() / 0.9
            lp = selective_log_softmax(logits, ids)
            with torch.no_grad():
                entropy_from_logits(logits)
            del logits
    lp.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_above_before": peak - before}))


def _measure(vocab: int, hidden: int, rows: int, chunk: int, autocast: bool) -> int:
    cmd = [sys.executable, __file__, "--threads", os.environ["OMP_NUM_THREADS"],
           "--_memory-child", f"{vocab},{hidden},{rows},{chunk},{int(autocast)}"]
    # A fixed mmap threshold: glibc then maps every large tensor on its own and unmaps it when freed, so RSS follows
    # the live tensor bytes (its default threshold grows after frees and keeps ~32 MB buffers in the heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above_before"]


def memory_mode(a) -> None:
    B, T = 64, 256
    r1, r2 = MEM_ROWS
    print(f"LM head only (hidden states -> log-probs + entropy -> backward; temperature 0.9), peak RSS above the RSS "
          f"before the call, measured at B*T = {r1} and {r2} (fresh process each), fit peak = a + b * B*T and "
          f"extrapolated to B={B}, T={T} (B*T = {B * T}); chunked: chunk_size={MEM_CHUNK}; {_bench.threads_note()}")
    print(f"{'vocab':>7}{'hidden':>7}  {'precision':<10}{'variant':<11}{f'MiB @{r1}':>10}{f'MiB @{r2}':>10}"
          f"{'b (KiB/position)':>18}{'b / (V*4 bytes)':>17}{f'GiB @B*T={B * T}':>17}")
    rows = []
    for vocab, hidden in MEM_CASES:
        for autocast in (False, True):
            fits = {}
            for chunk in (0, MEM_CHUNK):
                p1, p2 = (_measure(vocab, hidden, r, chunk, autocast) for r in (r1, r2))
                b = (p2 - p1) / (r2 - r1)
                full = p1 + b * (B * T - r1)
                fits[chunk] = full
                print(f"{vocab:>7}{hidden:>7}  {'bf16-auto' if autocast else 'fp32':<10}"
                      f"{('chunk' + str(chunk)) if chunk else 'plain':<11}{p1 / 2**20:>10.0f}{p2 / 2**20:>10.0f}"
                      f"{b / 1024:>18.1f}{b / (vocab * 4):>17.2f}{full / 2**30:>17.2f}", flush=True)
                rows.append({"vocab": vocab, "hidden": hidden, "autocast": autocast, "chunk": chunk, "peak": [p1, p2],
                             "extrapolated": full})
            print(f"{'':>16}-> chunked / plain at B*T={B * T}: {fits[MEM_CHUNK] / fits[0]:.3f} "
                  f"(saves {(fits[0] - fits[MEM_CHUNK]) / 2**30:.1f} GiB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": os.environ["OMP_NUM_THREADS"], "rows": rows}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | a local model folder")
    ap.add_argument("--shapes", default="4x4x46x24,4x4x46x128",
                    help="comma list of PROMPTSxSAMPLESxPROMPT_LENxCOMPLETION_LEN (default: the demo shape and a "
                         "longer completion)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per variant after one warm-up (default 3)")
    ap.add_argument("--chunk-size", type=int, default=256, help="chunk size of the chunked-head variants")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (default 1)")
    ap.add_argument("--device", default="cpu", help="time mode: cpu or cuda (default cpu)")
    ap.add_argument("--autocast", action="store_true", help="time mode: bf16 autocast (the recipe's bf16-mixed)")
    ap.add_argument("--deterministic", action="store_true", help="time mode: the recipe's deterministic kernels")
    ap.add_argument("--gc", action="store_true", help="time mode: gradient checkpointing (non-reentrant)")
    ap.add_argument("--profile", default="", help="time mode: variants to profile once per shape (e.g. plain,shared)")
    ap.add_argument("--memory", action="store_true", help="measure the LM head's peak memory instead of time")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--_memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    _bench.setup(a.threads)
    if a._memory_child:
        vocab, hidden, rows, chunk, autocast = map(int, a._memory_child.split(","))
        memory_child(vocab, hidden, rows, chunk, bool(autocast))
    elif a.memory:
        memory_mode(a)
    else:
        time_mode(a)


if __name__ == "__main__":
    main()
