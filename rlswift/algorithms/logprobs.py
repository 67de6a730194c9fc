"""Per-token log-probabilities and entropies of a causal LM, computed the way TRL 1.16 does.

All math is done in float32 whatever the model dtype (bf16 logsumexp loses ~1e-2 per token). Two ways to get there:
- plain (``chunk_size=None``): the model's logits, one batch row at a time through the fp32 log-softmax. Autograd
  keeps the fp32 ``[B, T, V]`` logits alive until backward, and the peak holds two of them (measured:
  scripts/bench_train_forward.py --memory).
- chunked (``chunk_size=n``): the decoder's last hidden states go through the LM head ``n`` positions at a time inside
  one autograd function that keeps no logits; backward recomputes each chunk's logits (as Liger's fused linear
  cross-entropy does). Peak extra memory is a few ``[n, V]`` fp32 buffers plus the weight gradient instead of
  ``2 x [B, T, V]``, for one extra LM-head matmul in backward. Values equal the plain path's up to fp32 rounding.
``completion_logprobs(..., shared_prompt=True)`` computes each distinct prompt once (see ``shared_prompt.py``), and
``pack_completions=True`` on top of it drops the completions' padding (see ``packed.py``).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = [
    "selective_log_softmax",
    "completion_logprobs",
    "entropy_from_logits",
    "lm_head_logprobs",
    "chunked_linear_logprobs",
    "causal_lm_parts",
    "hidden_states_fallback_reason",
    "unwrap_peft",
    "check_completion_args",
    "warn_fallback",
    "HIDDEN_STATE_MODEL_TYPES",
]

# Model types whose causal-LM forward is exactly ``logits = lm_head(decoder(...).last_hidden_state)`` (no logit
# soft-capping or scaling) and whose decoder takes ``position_ids``/``past_key_values`` the standard way; each is
# checked against the plain forward in tests/test_algorithms_logprobs.py and tests/test_shared_prompt.py.
HIDDEN_STATE_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_WARNED: set[str] = set()


def warn_fallback(what: str, reason: str) -> None:
    """Warn once per (feature, reason) that a fast path is off and the plain forward runs instead."""
    msg = f"{what} is off: {reason}; using the plain forward (same values, more time/memory)"
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


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


def _chunk_logits(hidden, weight, bias, temperature: float) -> torch.Tensor:
    # Same ops as the plain path: the head in the compute dtype (bf16 under autocast), then fp32, then / temperature.
    logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    if temperature != 1.0:
        logits = logits.div_(temperature)
    return logits


class _LinearHeadLogprobs(torch.autograd.Function):
    """``log_softmax((hidden @ weight.T + bias) / T)[targets]`` (and the entropy), ``chunk`` positions at a time.

    Saves hidden, weight, bias, targets and the per-position log-sum-exp (fp32 ``[M]``), never the logits; backward
    recomputes each chunk's logits and forms ``d logp / d logits = (onehot(target) - softmax) / T``. Under autocast the
    head runs in the autocast dtype like ``nn.Linear`` would; softmax math and the weight-gradient sum are fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, want_entropy):
        dev = hidden.device.type
        compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        m = hidden.shape[0]
        lp = torch.empty(m, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp) if want_entropy else lp.new_empty(0)
        with torch.autocast(dev, enabled=False):
            w = weight.to(compute)  # one cast per call, as autocast's weight cache does
            b = bias.to(compute) if bias is not None else None
            for s in range(0, m, chunk):
                e = min(s + chunk, m)
                logits = _chunk_logits(hidden[s:e], w, b, temperature)
                lse[s:e] = torch.logsumexp(logits, dim=-1)
                lp[s:e] = logits.gather(1, targets[s:e, None])[:, 0] - lse[s:e]
                if want_entropy:  # entropy_from_logits' formula, so the two paths agree to the last bit or two
                    logp = F.log_softmax(logits, dim=-1)
                    ent[s:e] = -logp.exp().mul_(logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.chunk, ctx.compute = temperature, chunk, compute
        ctx.mark_non_differentiable(ent)  # entropy is a metric (the plain path computes it under no_grad)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_lp is None or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None
        dev, m, chunk, temperature = hidden.device.type, hidden.shape[0], ctx.chunk, ctx.temperature
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(dev, enabled=False):
            w = weight.to(ctx.compute)
            b = bias.to(ctx.compute) if bias is not None else None
            for s in range(0, m, chunk):
                e = min(s + chunk, m)
                go = grad_lp[s:e].float() / temperature  # d/d(raw logits) carries the 1/T of the forward
                g = _chunk_logits(hidden[s:e], w, b, temperature).sub_(lse[s:e, None]).exp_()  # softmax [c, V]
                g.mul_(-go[:, None]).scatter_add_(1, targets[s:e, None], go[:, None])  # (onehot - p) * go / T
                if need_b:
                    grad_b.add_(g.sum(0))
                g = g.to(ctx.compute)
                if need_h:
                    grad_h[s:e] = g @ w
                if need_w:
                    h = hidden[s:e].to(ctx.compute)
                    if ctx.compute == torch.float32:
                        grad_w.addmm_(g.t(), h)
                    else:  # bf16 matmul as autocast's backward would do, summed over chunks in fp32
                        grad_w.add_(g.t() @ h)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 512,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[...]`` (and entropies, else an empty tensor) of ``targets`` under a linear LM head, chunked.

    hidden: ``[..., H]``; weight: ``[V, H]``; bias: ``[V]`` or None; targets: ``[...]`` token ids. Gradients flow to
    hidden, weight and bias; entropy carries none. Peak extra memory: about three ``[chunk_size, V]`` fp32 buffers.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for the plain path), got {chunk_size}")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"chunked_linear_logprobs: hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} plus the "
            f"head's input size {weight.shape[-1]}"
        )
    shape = targets.shape
    lp, ent = _LinearHeadLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), float(temperature), int(chunk_size),
        bool(return_entropy),
    )
    return lp.view(shape), (ent.view(shape) if return_entropy else ent)


def lm_head_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[B, T]`` of ``targets [B, T]`` from the last hidden states ``hidden [B, T, H]`` through ``head``.

    ``chunk_size=None``: ``head(hidden)`` then the plain fp32 log-softmax. An int: the chunked function above (the head
    must be an ``nn.Linear``; any other module, e.g. a LoRA-adapted head, falls back to the plain path with a warning).
    """
    if chunk_size is not None:
        if isinstance(head, torch.nn.Linear):
            lp, ent = chunked_linear_logprobs(hidden, head.weight, head.bias, targets, temperature, chunk_size,
                                              return_entropy)
            return (lp, ent) if return_entropy else lp
        warn_fallback("chunked log-probs", f"the LM head is a {type(head).__name__}, not an nn.Linear")
    return _logprobs_from_logits(head(hidden), targets, temperature, return_entropy)


def _logprobs_from_logits(logits, targets, temperature, return_entropy):
    if temperature != 1.0:
        logits = logits.float() / temperature
    logprobs = selective_log_softmax(logits, targets)
    if return_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        return logprobs, entropy
    return logprobs


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (``model`` itself otherwise)."""
    # LoRA layers are injected into the wrapped model's modules, so calling its decoder runs the adapted layers.
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def hidden_states_fallback_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` can't be split into decoder + LM head for the chunked / shared-prompt paths (None: it can)."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        return "peft prompt learning adds virtual tokens in the wrapper's forward"
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    if config is None or not hasattr(base, "get_decoder") or not hasattr(base, "get_output_embeddings"):
        return f"{type(base).__name__} is not a transformers causal LM"
    model_type = getattr(config, "model_type", None)
    if model_type not in HIDDEN_STATE_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose logits are known to be lm_head(last hidden state) "
                f"(supported: {', '.join(HIDDEN_STATE_MODEL_TYPES)})")
    if base.get_decoder() is base or base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no separate decoder and LM head"
    return None


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(decoder, lm_head)`` of a transformers causal LM, peft-wrapped or not: logits = lm_head(decoder(...)[0])."""
    reason = hidden_states_fallback_reason(model)
    if reason is not None:
        raise ValueError(f"causal_lm_parts: {reason}")
    base = unwrap_peft(model)
    return base.get_decoder(), base.get_output_embeddings()


def check_completion_args(input_ids, attention_mask, logits_to_keep, temperature, chunk_size=None) -> None:
    """The argument checks shared by every completion log-prob path."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must "
                         "both be [B, L]")
    if logits_to_keep < 1 or logits_to_keep >= input_ids.shape[1]:
        raise ValueError(
            f"logits_to_keep={logits_to_keep} must be in [1, {input_ids.shape[1] - 1}] for sequences of length "
            f"{input_ids.shape[1]} (at least one prompt token must precede the completion)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for the plain path), got {chunk_size}")


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    shared_prompt: bool = False,
    chunk_size: int | None = None,
    pack_completions: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the last ``logits_to_keep`` tokens of ``input_ids`` under ``model``.

    input_ids, attention_mask: ``[B, L]`` (prompt + completion; prompts may be left-padded, completions
    right-padded). Returns ``logprobs [B, T]`` with ``T = logits_to_keep`` (and ``entropy [B, T]`` when
    ``return_entropy``). Logits are divided by ``temperature`` first, as TRL's GRPO does, so the values are those
    of the distribution the rollout engine sampled from. Padding positions get values too; mask them downstream.

    shared_prompt: compute each run of rows with the same prompt once (``shared_prompt_logprobs``).
    pack_completions: with shared_prompt, run only the completions' real tokens through the layers and the LM head
    (``packed.py``; sdpa attention); padding positions then get 0 instead of the pad tokens' values.
    chunk_size: None = plain logits; an int = LM head and log-softmax ``chunk_size`` positions at a time, logits
    recomputed in backward (``chunked_linear_logprobs``). Both are exact up to fp32 rounding, and fall back to this
    plain forward with a warning where the model does not support them (``hidden_states_fallback_reason``).
    """
    check_completion_args(input_ids, attention_mask, logits_to_keep, temperature, chunk_size)
    if shared_prompt:
        from rlswift.algorithms.shared_prompt import shared_prompt_logprobs  # it imports this module

        return shared_prompt_logprobs(model, input_ids, attention_mask, logits_to_keep, temperature, return_entropy,
                                      chunk_size=chunk_size, pack=pack_completions)
    if chunk_size is not None:
        reason = hidden_states_fallback_reason(model)
        if reason is None:
            decoder, head = causal_lm_parts(model)
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            # Position t predicts token t+1: the hidden states of positions [L-T-1, L-1) score the T completion tokens.
            hidden = hidden[:, -logits_to_keep - 1:-1]
            return lm_head_logprobs(hidden, head, input_ids[:, -logits_to_keep:], temperature, return_entropy,
                                    chunk_size)
        warn_fallback("chunked log-probs", reason)
    # One extra logit: position t predicts token t+1, so the logits for the T completion tokens sit at
    # positions [L-T-1, L-1); the last position's logit (next token after the sequence) is dropped.
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1, use_cache=False)
    logits = out.logits[:, :-1, :]
    logits = logits[:, -logits_to_keep:, :]  # models that ignore logits_to_keep return all L positions
    return _logprobs_from_logits(logits, input_ids[:, -logits_to_keep:], temperature, return_entropy)
