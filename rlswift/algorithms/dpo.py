"""DPO: preference losses, the concatenated chosen+rejected batch and summed completion log-probs.

Mirrors TRL 1.16 ``DPOTrainer`` (f_divergence ``reverse_kl``, no ``ld_alpha``, no WPO weighting): one forward over
``[chosen rows; rejected rows]``, prompt tokens masked, per-sequence log-probs summed over completion tokens.

Loss variants live in ``DPO_LOSS_TYPES``; a variant is
``fn(chosen_logratios [B], rejected_logratios [B], ctx: DPOContext) -> per-sequence losses [B]`` where a logratio is
``policy_logps - ref_logps``. Register your own with ``DPO_LOSS_TYPES.register(name, fn)`` or pass a dotted path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rlswift.algorithms.logprobs import selective_log_softmax
from rlswift.registry import Registry

__all__ = [
    "DPO_LOSS_TYPES",
    "DPOContext",
    "dpo_loss",
    "concatenated_batch",
    "sequence_logps",
    "completion_lengths",
    "dpo_metrics",
]


@dataclass(frozen=True)
class DPOContext:
    """Settings a DPO loss variant may read."""

    beta: float
    label_smoothing: float = 0.0
    chosen_lengths: torch.Tensor | None = None  # completion tokens per chosen row (ipo normalises by them)
    rejected_lengths: torch.Tensor | None = None


DPOLossFn = Callable[[torch.Tensor, torch.Tensor, DPOContext], torch.Tensor]
DPO_LOSS_TYPES: Registry[DPOLossFn] = Registry("dpo loss type")


def _sigmoid(c: torch.Tensor, r: torch.Tensor, ctx: DPOContext) -> torch.Tensor:
    """-log sigmoid(beta * (c - r)). (TRL 1.16's sigmoid ignores label_smoothing; use 'robust' for noisy labels.)"""
    return -F.logsigmoid(ctx.beta * (c - r))


def _hinge(c: torch.Tensor, r: torch.Tensor, ctx: DPOContext) -> torch.Tensor:
    """relu(1 - beta * (c - r)) (SLiC)."""
    return torch.relu(1 - ctx.beta * (c - r))


def _ipo(c: torch.Tensor, r: torch.Tensor, ctx: DPOContext) -> torch.Tensor:
    """(c/|chosen| - r/|rejected| - 1/(2 beta))^2: IPO on per-token-averaged log ratios, as TRL computes it."""
    if ctx.chosen_lengths is None or ctx.rejected_lengths is None:
        raise ValueError(
            "loss_type 'ipo' needs chosen_lengths and rejected_lengths (completion token counts; "
            "see completion_lengths(batch)) because TRL normalises the log ratios per token"
        )
    delta = c / ctx.chosen_lengths.clamp(min=1.0) - r / ctx.rejected_lengths.clamp(min=1.0)
    return (delta - 1 / (2 * ctx.beta)) ** 2


def _robust(c: torch.Tensor, r: torch.Tensor, ctx: DPOContext) -> torch.Tensor:
    """Robust DPO (Chowdhury et al.): unbiased under label flips with probability label_smoothing (< 0.5)."""
    ls = ctx.label_smoothing
    if not 0.0 <= ls < 0.5:
        raise ValueError(f"loss_type 'robust' needs 0 <= label_smoothing < 0.5, got {ls}")
    z = ctx.beta * (c - r)
    return (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)


DPO_LOSS_TYPES.register("sigmoid", _sigmoid)
DPO_LOSS_TYPES.register("hinge", _hinge)
DPO_LOSS_TYPES.register("ipo", _ipo)
DPO_LOSS_TYPES.register("robust", _robust)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str | DPOLossFn = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards.

    All inputs ``[B]`` summed completion log-probs. Returns ``(losses [B], chosen_rewards [B], rejected_rewards
    [B])`` with ``reward = beta * (logps - ref_logps)`` (detached). The batch loss is ``losses.mean()``.
    ``chosen_lengths`` / ``rejected_lengths`` (completion token counts) are required by ``ipo`` only.
    """
    fn = loss_type if callable(loss_type) else DPO_LOSS_TYPES.get(loss_type)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    ctx = DPOContext(beta, label_smoothing, chosen_lengths, rejected_lengths)
    losses = fn(chosen_logratios, rejected_logratios, ctx)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _pad_id(tokenizer_or_pad_id: Any) -> int:
    if isinstance(tokenizer_or_pad_id, int):
        return tokenizer_or_pad_id
    pad = getattr(tokenizer_or_pad_id, "pad_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has no pad_token_id; set tokenizer.pad_token or pass the pad id as an int")
    return int(pad)


def concatenated_batch(
    tokenizer_or_pad_id: Any,
    prompt_ids: Sequence[Sequence[int]],
    chosen_ids: Sequence[Sequence[int]],
    rejected_ids: Sequence[Sequence[int]],
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's ``DataCollatorForPreference``: rows ``prompt+chosen`` for all pairs, then ``prompt+rejected``.

    Each sequence is truncated to ``max_length`` keeping its start, then right-padded. Returns ``input_ids``,
    ``attention_mask`` and ``completion_mask`` (1 on completion tokens), each ``[2B, L]`` long.
    """
    pad = _pad_id(tokenizer_or_pad_id)
    if not (len(prompt_ids) == len(chosen_ids) == len(rejected_ids)):
        raise ValueError(
            f"prompt_ids ({len(prompt_ids)}), chosen_ids ({len(chosen_ids)}) and rejected_ids "
            f"({len(rejected_ids)}) must have one entry per pair"
        )
    seqs, comp = [], []
    for completions in (chosen_ids, rejected_ids):
        for p, c in zip(prompt_ids, completions):
            seqs.append(list(p) + list(c))
            comp.append([0] * len(p) + [1] * len(c))
    if max_length is not None:
        seqs = [s[:max_length] for s in seqs]
        comp = [m[:max_length] for m in comp]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, comp)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
        completion_mask[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def completion_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion token counts ``(chosen [B], rejected [B])`` of a ``concatenated_batch`` (float32)."""
    lengths = batch["completion_mask"].sum(dim=1).float()
    return lengths.chunk(2, dim=0)  # type: ignore[return-value]


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Summed completion log-probs of the chosen and rejected rows of ``batch``, in one forward.

    Returns ``(chosen_logps [B], rejected_logps [B], {"logits/chosen": ..., "logits/rejected": ...})``, the logits
    metrics being TRL's: the vocab-mean logit averaged over all chosen (rejected) completion tokens of the batch.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    # Position t predicts token t+1: shift labels and mask by one.
    logits = out.logits[:, :-1, :]
    labels = input_ids[:, 1:]
    mask = batch["completion_mask"][:, 1:].to(torch.float32)
    per_token = selective_log_softmax(logits, labels) * mask
    logps = per_token.sum(dim=1)
    chosen_logps, rejected_logps = logps.chunk(2, dim=0)
    with torch.no_grad():
        mean_logits = logits.float().mean(dim=-1)
        metrics = {}
        for name, rows, m in zip(("chosen", "rejected"), mean_logits.chunk(2, dim=0), mask.chunk(2, dim=0)):
            total = float(m.sum())
            metrics[f"logits/{name}"] = float((rows * m).sum()) / total if total > 0 else 0.0
    return chosen_logps, rejected_logps, metrics


def dpo_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    logits_metrics: dict[str, float] | None = None,
) -> dict[str, float]:
    """TRL's DPO metrics for one batch: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}
    (batch means) and logits/{chosen,rejected} (from ``sequence_logps``, when given)."""
    out = {
        "rewards/chosen": float(chosen_rewards.float().mean()),
        "rewards/rejected": float(rejected_rewards.float().mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).float().mean()),
        "logps/chosen": float(chosen_logps.detach().float().mean()),
        "logps/rejected": float(rejected_logps.detach().float().mean()),
    }
    if logits_metrics:
        out.update(logits_metrics)
    return out
