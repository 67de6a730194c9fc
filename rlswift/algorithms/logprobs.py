"""Per-token log-probabilities and entropies of a causal LM, computed the way TRL 1.16 does.

All math is done in float32 whatever the model dtype (bf16 logsumexp loses ~1e-2 per token), one batch row at a
time so the fp32 copy of the ``[T, V]`` logits is the only extra memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_log_softmax", "completion_logprobs", "entropy_from_logits"]


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., ids]`` without materialising the full log-softmax.

    logits: ``[B, T, V]`` (any float dtype); ids: ``[B, T]`` integer token ids. Returns ``[B, T]`` float32.
    Equivalent to ``torch.gather(logits.float().log_softmax(-1), -1, ids[..., None])[..., 0]``.
    """
    if logits.dim() != ids.dim() + 1 or logits.shape[:-1] != ids.shape:
        raise ValueError(
            f"selective_log_softmax: logits {tuple(logits.shape)} must be ids {tuple(ids.shape)} plus a vocab axis"
        )
    rows = []
    # Loop over the leading axis: one row's fp32 logits at a time keeps the peak memory at [T, V] floats.
    for row_logits, row_ids in zip(logits, ids):
        row = row_logits.float()
        selected = torch.gather(row, -1, row_ids.unsqueeze(-1)).squeeze(-1)
        rows.append(selected - torch.logsumexp(row, dim=-1))
    if not rows:  # empty batch
        return torch.zeros(ids.shape, dtype=torch.float32, device=logits.device)
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` over the last axis, in fp32, ``chunk_size`` rows at a time.

    logits: ``[..., V]``; returns ``logits.shape[:-1]`` float32.
    """
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = F.log_softmax(chunk.float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    if not parts:
        return torch.zeros(shape, dtype=torch.float32, device=logits.device)
    return torch.cat(parts).reshape(shape)


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the last ``logits_to_keep`` tokens of ``input_ids`` under ``model``.

    input_ids, attention_mask: ``[B, L]`` (prompt + completion; prompts may be left-padded, completions
    right-padded). Returns ``logprobs [B, T]`` with ``T = logits_to_keep`` (and ``entropy [B, T]`` when
    ``return_entropy``). Logits are divided by ``temperature`` first, as TRL's GRPO does, so the values are those
    of the distribution the rollout engine sampled from. Padding positions get values too; mask them downstream.
    """
    if logits_to_keep < 1 or logits_to_keep >= input_ids.shape[1]:
        raise ValueError(
            f"logits_to_keep={logits_to_keep} must be in [1, {input_ids.shape[1] - 1}] for sequences of length "
            f"{input_ids.shape[1]} (at least one prompt token must precede the completion)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # One extra logit: position t predicts token t+1, so the logits for the T completion tokens sit at
    # positions [L-T-1, L-1); the last position's logit (next token after the sequence) is dropped.
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1, use_cache=False)
    logits = out.logits[:, :-1, :]
    logits = logits[:, -logits_to_keep:, :]  # models that ignore logits_to_keep return all L positions
    if temperature != 1.0:
        logits = logits.float() / temperature
    targets = input_ids[:, -logits_to_keep:]
    logprobs = selective_log_softmax(logits, targets)
    if return_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        return logprobs, entropy
    return logprobs
