"""GRPO: group-relative advantages and the clipped token-level policy loss (TRL 1.16 GRPOTrainer semantics).

Loss variants live in the ``LOSS_TYPES`` registry. A variant is a function

    variant(per_token_loss: Tensor[B, T], mask: Tensor[B, T], context: LossContext) -> Tensor (scalar)

that reduces the per-token loss (clipped surrogate plus ``beta * kl``, already computed, NOT yet masked) to the
micro-batch loss. It must multiply by ``mask`` itself. ``context`` carries ``max_completion_length`` and
``num_items_in_batch`` (None when the caller did not give them). Set the function attribute
``normalises_globally = True`` when the variant already divides by a count spanning the whole accumulated batch
(like ``dapo``): ``accumulation_scale`` then tells the caller not to divide by the number of micro-batches.
Register your own with ``LOSS_TYPES.register("name", fn)`` or pass a dotted path as ``loss_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from rlswift.registry import Registry

__all__ = [
    "LOSS_TYPES",
    "LossContext",
    "group_advantages",
    "policy_loss",
    "accumulation_scale",
    "nanstd",
]

LossFn = Callable[[torch.Tensor, torch.Tensor, "LossContext"], torch.Tensor]
LOSS_TYPES: Registry[LossFn] = Registry("loss type")


@dataclass(frozen=True)
class LossContext:
    """What a loss variant may need besides the per-token loss and the mask."""

    max_completion_length: int | None = None
    num_items_in_batch: float | int | torch.Tensor | None = None


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaNs (TRL's ``nanstd``; NaN when fewer than 2 values)."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dims, keepdim=True)
    var = var * count / (count - 1)  # Bessel's correction, as torch.std
    out = torch.sqrt(var)
    return out if keepdim else out.squeeze(dims) if dim is not None else out.reshape(())


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_size: int,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Group-relative advantages ``(r - mean_group(r)) / (std + eps)`` for ``N = n_groups * group_size`` rewards.

    Rewards are ordered group by group (the ``group_size`` samples of a prompt are contiguous). ``scale_rewards``:
    ``"group"`` divides by each group's std, ``"batch"`` by the std of all N rewards, ``"none"`` only centres.
    Stds are unbiased (``torch.std``), as in TRL. NaN rewards (every reward function said "not applicable") are
    left out of the means and stds and get advantage 0. Returns float32 ``[N]``.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if r.numel() % group_size:
        raise ValueError(
            f"{r.numel()} rewards do not split into groups of {group_size}; give num_prompts * group_size rewards"
        )
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    grouped = r.view(-1, group_size)
    adv = r - torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    if scale_rewards == "group":
        std = nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(r)
        adv = adv / (std + eps)
    elif scale_rewards == "batch":
        std = nanstd(r).expand_as(r) if r.numel() > 1 else torch.zeros_like(r)
        adv = adv / (std + eps)
    # Unscorable samples carry no learning signal (TRL zeroes them too).
    return torch.nan_to_num(adv, nan=0.0)


def _grpo(per_token_loss: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """Mean over each sequence's own tokens, then mean over sequences (long answers weigh less per token)."""
    return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def _bnpo(per_token_loss: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """Sum over tokens / number of completion tokens in this micro-batch."""
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)


def _dr_grpo(per_token_loss: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """Sum over tokens / (B * max_completion_length): a constant normaliser, no length bias (Dr. GRPO)."""
    if ctx.max_completion_length is None:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length (the generation max_tokens)")
    return (per_token_loss * mask).sum() / (per_token_loss.size(0) * ctx.max_completion_length)


def _dapo(per_token_loss: torch.Tensor, mask: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """Sum over tokens / completion tokens of the whole accumulated batch (``num_items_in_batch``).

    Falls back to this micro-batch's token count when ``num_items_in_batch`` is None (then equal to bnpo).
    """
    n = ctx.num_items_in_batch
    normaliser = mask.sum() if n is None else torch.as_tensor(n, dtype=torch.float32, device=mask.device)
    return (per_token_loss * mask).sum() / normaliser.clamp(min=1.0)


_dapo.normalises_globally = True  # type: ignore[attr-defined]

LOSS_TYPES.register("grpo", _grpo)
LOSS_TYPES.register("bnpo", _bnpo)
LOSS_TYPES.register("dr_grpo", _dr_grpo)
LOSS_TYPES.register("dapo", _dapo)


def _resolve(loss_type: str | LossFn) -> LossFn:
    fn = loss_type if callable(loss_type) else LOSS_TYPES.get(loss_type)
    if not callable(fn):
        raise TypeError(f"loss type {loss_type!r} resolved to {fn!r}, which is not callable")
    return fn


def accumulation_scale(loss_type: str | LossFn, accumulation_steps: int) -> float:
    """Factor to multiply a micro-batch loss by before ``backward()`` under gradient accumulation.

    ``1 / accumulation_steps`` for per-micro-batch normalised variants (grpo, bnpo, dr_grpo: TRL divides them by
    the accumulation steps), ``1.0`` for variants that already normalise over the whole accumulated batch (dapo).
    """
    fn = _resolve(loss_type)
    return 1.0 if getattr(fn, "normalises_globally", False) else 1.0 / accumulation_steps


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1.0))


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str | LossFn = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped token-level GRPO loss of one micro-batch and its metrics.

    logprobs ``[B, T]`` (policy, with grad), old_logprobs ``[B, T]`` (the policy that generated the batch; None
    means on-policy: ``logprobs.detach()``), advantages ``[B]`` (or ``[B, T]``), mask ``[B, T]`` 0/1 completion
    tokens. Per token: ``r = exp(lp - old)``, loss ``-min(r A, clip(r, 1-epsilon_low, 1+epsilon_high) A)``, plus
    ``beta * kl`` with the k3 estimator ``kl = exp(ref - lp) - (ref - lp) - 1`` when ``beta != 0``; then the
    ``loss_type`` variant reduces it (see module docstring). Metrics (python floats, masked token means):
    ``clip_ratio/low_mean`` (r < 1-el and A < 0), ``clip_ratio/high_mean`` (r > 1+eh and A > 0),
    ``clip_ratio/region_mean`` (either), and ``kl`` when ``beta != 0``.
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    elif old_logprobs.shape != logprobs.shape:
        raise ValueError(f"old_logprobs {tuple(old_logprobs.shape)} must match logprobs {tuple(logprobs.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows, logprobs {logprobs.shape[0]}")
        advantages = advantages.unsqueeze(1)
    mask = mask.to(logprobs.dtype)
    fn = _resolve(loss_type)

    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)

    metrics: dict[str, float] = {}
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta != 0 needs ref_logprobs (the reference model's per-token log-probs)")
        d = ref_logprobs - logprobs
        per_token_kl = torch.exp(d) - d - 1
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)

    loss = fn(per_token_loss, mask, LossContext(max_completion_length, num_items_in_batch))

    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"] = _masked_mean(low, mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high, mask)
        metrics["clip_ratio/region_mean"] = _masked_mean(torch.maximum(low, high), mask)
    return loss, metrics
