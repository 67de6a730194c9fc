"""Which parts of a GRPO training step are bit-reproducible on this GPU? usage: [CASES=a,b] determinism.py MODEL_DIR

Run it twice and compare the digests to check reproducibility across processes too.

Runs the recipe's training forward+backward (completion log-probs -> a dapo-like loss) twice on the same batch for each
setting and reports whether the gradients are bit-identical, and the time of one forward+backward.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time

import torch

from rlswift.algorithms.logprobs import completion_logprobs
from rlswift.models.device import enable_gradient_checkpointing
from rlswift.models.policy import load_policy


def grad_digest(model) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        if p.grad is not None:
            h.update(p.grad.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    path = sys.argv[1]
    torch.manual_seed(0)
    N, P, T, G = 64, 100, 128, 8
    prompts = torch.randint(10, 2000, (N // G, P)).repeat_interleave(G, 0)
    comps = torch.randint(10, 2000, (N, T))
    ids = torch.cat([prompts, comps], 1).cuda()
    mask = torch.ones_like(ids)
    adv = torch.randn(N, 1).cuda()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cases = [
        ("plain autocast", dict()),
        ("plain autocast gc", dict(gc=True)),
        ("shared autocast", dict(shared=True)),
        ("shared autocast gc", dict(shared=True, gc=True)),
        ("plain autocast math-sdpa", dict(backend=SDPBackend.MATH)),
        ("plain autocast efficient-sdpa", dict(backend=SDPBackend.EFFICIENT_ATTENTION)),
        ("plain autocast flash-sdpa", dict(backend=SDPBackend.FLASH_ATTENTION)),
        ("shared autocast gc deterministic", dict(shared=True, gc=True, det=True)),
        ("plain fp32", dict(fp32=True)),
    ]
    only = os.environ.get("CASES")
    for name, c in cases:
        if only and name not in only.split(","):
            continue
        model = load_policy(path, dtype="float32", device="cuda")
        if c.get("gc"):
            enable_gradient_checkpointing(model)
        model.train()
        torch.use_deterministic_algorithms(bool(c.get("det")), warn_only=True)
        digests, times = [], []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ctx = contextlib.nullcontext() if c.get("fp32") else torch.autocast("cuda", dtype=torch.bfloat16)
            kern = sdpa_kernel(c["backend"]) if "backend" in c else contextlib.nullcontext()
            try:
                with ctx, kern:
                    lp = completion_logprobs(model, ids, mask, T, temperature=1.0, shared_prompt=c.get("shared", False))
                (-(lp * adv).sum() / lp.numel()).backward()
            except RuntimeError as e:
                print(f"{name:36s} failed: {str(e)[:120]}", flush=True)
                break
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            digests.append(grad_digest(model))
        else:
            print(f"{name:36s} identical={len(set(digests)) == 1} digests={digests} fwd+bwd {min(times[1:]):.3f}s",
                  flush=True)
        torch.use_deterministic_algorithms(False)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    main()
