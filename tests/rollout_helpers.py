"""Helpers shared by the in-process engine tests (HFEngine, VLLMEngine): prompts, sampling spec, reference logprobs."""

from __future__ import annotations

import torch

from rollout.types import SamplingSpec

SPEC = SamplingSpec(temperature=1.0, top_k=50, top_p=0.95, max_tokens=12)


def prompts(n: int, base: int = 5) -> list[list[int]]:
    return [[(base + 7 * i + 3 * k) % 500 + 3 for k in range(4 + i % 5)] for i in range(n)]


def ref_logprobs(model, rollout) -> torch.Tensor:
    """log p(completion token | prefix) from one fp32 transformers forward over prompt + completion."""
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        lp = model(ids).logits[0].float().log_softmax(-1)
    p = len(rollout.prompt_ids)
    return lp[p - 1 : -1].gather(-1, torch.tensor(rollout.completion_ids)[:, None])[:, 0]


def max_err(model, outs) -> float:
    """Largest |engine logprob - reference logprob| over all tokens of the rollouts."""
    return max(float((ref_logprobs(model, o) - torch.tensor(o.logprobs)).abs().max()) for o in outs)


def perturb_(model, noise: float) -> None:
    """Move every parameter in place: p * 1.01 + noise * N(0, 1), from a generator seeded 0."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.mul_(1.01).add_(noise * torch.randn(p.shape, generator=g))
