"""Shared-prompt training forward: each distinct prompt of a micro-batch is computed once, its completions on top.

The G samples of a GRPO group share one prompt, and a plain forward computes that prompt G times. Here:
1. rows are split into runs of consecutive rows with the same prompt (ids and mask): ``prompt_runs``;
2. one decoder pass over the first row of each run, positions ``[0, p)`` with ``p = L - T - 1``, records every
   layer's keys/values (``_RecordLayer``);
3. the recorded K/V are expanded over each run's rows (``expand``; autograd sums the G gradients back into the one
   prompt: deterministic, no atomics) and a second pass runs positions ``[p, L - 1)`` (the last prompt token and the
   completion tokens but the last) on top of them (``_ReadLayer``);
4. the LM head scores the T completion tokens from the second pass's hidden states (plain or chunked).
With ``pack=True`` and sdpa attention, steps 3-4 run padding-free when the completions are padded (``packed.py``):
the real tokens of all rows as one sequence through the layers and the LM head, attention per row as before.
Position ids are ``arange`` over the padded row and the 2-D attention mask covers ``[0, L - 1)``, exactly what the
plain forward uses, so left-padded prompts of different lengths give the plain forward's values (up to fp32
rounding: kernels see other shapes). Works under peft LoRA (the adapters live inside the decoder's modules) and under
non-reentrant gradient checkpointing (both cache layers are replay-safe; see ``_cache_through_checkpointing``).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rlswift.algorithms.logprobs import (
    causal_lm_parts,
    check_completion_args,
    completion_logprobs,
    hidden_states_fallback_reason,
    lm_head_logprobs,
    unwrap_peft,
    warn_fallback,
)
from rlswift.algorithms.packed import PackedLayout, flat_prompt_cache, pack_layout, packed_mask, unpack_rows

__all__ = ["prompt_runs", "shared_prompt_fallback_reason", "shared_prompt_logprobs"]

_ATTENTION = ("sdpa", "eager")  # attention implementations checked against the plain forward


class _RecordLayer(DynamicLayer):
    """Prompt pass: keeps the K/V it is given, replacing (not appending), so a gradient-checkpointing replay of the
    layer during backward records the same states again instead of growing the cache."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _ReadLayer(DynamicLayer):
    """Completion pass: prompt K/V (already expanded to the rows) + the new K/V, never stored (replay-safe too)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values
        self.reads = 0  # proof that the model really used the prefix (checked after the pass)

    def update(self, key_states, value_states, *args, **kwargs):
        self.reads += 1
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prompt_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_len: int) -> tuple[list[int], list[int]]:
    """Runs of consecutive rows whose first ``prefix_len`` ids and mask values are equal: ``(starts, counts)``.

    input_ids, attention_mask: ``[B, L]``. Only neighbours are compared, so a micro-batch that cuts a group (or a
    prompt that appears twice, apart) still works: each piece is its own run.
    """
    n = input_ids.shape[0]
    if n == 0:
        return [], []
    ids, mask = input_ids[:, :prefix_len], attention_mask[:, :prefix_len]
    same = (ids[1:] == ids[:-1]).all(1) & (mask[1:] == mask[:-1]).all(1)
    starts = [0] + (torch.nonzero(~same).flatten() + 1).tolist()
    counts = [b - a for a, b in zip(starts, starts[1:] + [n])]
    return starts, counts


def expand(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row u of ``x [U, ...]`` repeated ``counts[u]`` times -> ``[sum(counts), ...]``; backward sums the copies."""
    rest = x.shape[1:]
    if len(set(counts)) == 1:  # the usual case: whole groups of G
        return x.unsqueeze(1).expand(x.shape[0], counts[0], *rest).reshape(-1, *rest)
    return torch.cat([x[u:u + 1].expand(c, *rest) for u, c in enumerate(counts)])


def _checkpointing_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in decoder.modules() if getattr(m, "gradient_checkpointing", False)]


def shared_prompt_fallback_reason(model: torch.nn.Module) -> str | None:
    """Why the shared-prompt forward can't run on ``model`` (None: it can). Recipes log this once at start."""
    reason = hidden_states_fallback_reason(model)
    if reason is not None:
        return reason
    base = unwrap_peft(model)
    config = base.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))}: only full-attention layers are supported (no sliding window)"
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in _ATTENTION:
        return f"attention implementation {attn!r} (supported: {', '.join(_ATTENTION)})"
    layers = _checkpointing_layers(base.get_decoder())
    if model.training and layers:
        from transformers.modeling_layers import GradientCheckpointingLayer

        if not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"):
            return "gradient checkpointing: this transformers version drops the KV cache inside checkpointed layers"
        keywords = getattr(getattr(layers[0], "_gradient_checkpointing_func", None), "keywords", {}) or {}
        if keywords.get("use_reentrant", True) is not False:
            return ("reentrant gradient checkpointing runs layers without autograd, so no gradient would reach the "
                    "shared prompt; enable it with gradient_checkpointing_kwargs={'use_reentrant': False}")
    return None


@contextlib.contextmanager
def _cache_through_checkpointing(decoder: torch.nn.Module):
    """Let checkpointed layers keep our cache while training (transformers drops ``past_key_values`` there).

    transformers' ``GradientCheckpointingLayer._can_checkpoint_with_cache`` is meant for layers whose cache reads
    are the same on a replay; both of our cache layers are (record replaces, read never stores).
    """
    layers = [m for m in _checkpointing_layers(decoder) if decoder.training]
    had = [("_can_checkpoint_with_cache" in vars(m), vars(m).get("_can_checkpoint_with_cache")) for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, (present, value) in zip(layers, had):
            if present:
                m._can_checkpoint_with_cache = value
            else:
                del m._can_checkpoint_with_cache


def shared_prompt_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    chunk_size: int | None = None,
    pack: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``completion_logprobs`` with each run of rows sharing a prompt computed once (same arguments and results).

    input_ids, attention_mask: ``[B, L]``, prompt columns ``[0, L - T)`` (left-padded), completion columns
    ``[L - T, L)`` (right-padded), ``T = logits_to_keep``. Returns ``logprobs [B, T]`` (and ``entropy [B, T]``).
    Rows are grouped by ``prompt_runs``; a batch without repeated prompts, or a model that
    ``shared_prompt_fallback_reason`` rejects (warned once), goes through the plain forward.
    pack: run the completions' real tokens only (``packed.py``; sdpa attention) when there is padding; the
    log-probs and entropies of padding positions are then 0 (the plain forward scores the pad tokens).
    """
    check_completion_args(input_ids, attention_mask, logits_to_keep, temperature, chunk_size)
    plain = dict(temperature=temperature, return_entropy=return_entropy, chunk_size=chunk_size)
    reason = shared_prompt_fallback_reason(model)
    if reason is not None:
        warn_fallback("shared-prompt forward", reason)
        return completion_logprobs(model, input_ids, attention_mask, logits_to_keep, **plain)
    n, L = input_ids.shape
    p = L - logits_to_keep - 1  # the shared prefix; the last prompt token goes with the completion (it scores token 1)
    starts, counts = prompt_runs(input_ids, attention_mask, p) if p > 0 else ([], [])
    if p < 1 or len(starts) == n:  # a one-token prompt, or nothing shared: the plain forward is the same work
        return completion_logprobs(model, input_ids, attention_mask, logits_to_keep, **plain)

    decoder, head = causal_lm_parts(model)
    config = unwrap_peft(model).config.get_text_config()
    packing = pack and config._attn_implementation == "sdpa"  # eager attention runs its own matmuls: not packed
    layout = pack_layout(input_ids, attention_mask, logits_to_keep, counts) if packing else None
    positions = torch.arange(L - 1, device=input_ids.device).unsqueeze(0)  # what the plain forward uses (no cache)
    record = Cache(layers=[_RecordLayer() for _ in range(config.num_hidden_layers)])
    with _cache_through_checkpointing(decoder):
        # use_cache=False: the cache object is passed and filled anyway, and checkpointed layers don't warn.
        decoder(input_ids=input_ids[starts, :p], attention_mask=attention_mask[starts, :p],
                position_ids=positions[:, :p], past_key_values=record, use_cache=False)
        if not all(layer.is_initialized for layer in record.layers):
            warn_fallback("shared-prompt forward", "the model did not fill the prompt cache")
            return completion_logprobs(model, input_ids, attention_mask, logits_to_keep, **plain)
        if layout is not None:  # the real tokens as one sequence; the mask runs attention per row
            read = Cache(layers=[_ReadLayer(flat_prompt_cache(r.keys), flat_prompt_cache(r.values))
                                 for r in record.layers])
            mask = packed_mask(attention_mask, layout)
            hidden = decoder(input_ids=layout.input_ids, attention_mask=mask, position_ids=layout.position_ids,
                             past_key_values=read, use_cache=False).last_hidden_state
            if mask.calls < len(read.layers):
                raise RuntimeError(f"packed completions: the mask ran {mask.calls} of {len(read.layers)} layers' "
                                   "attention (an attention path that does not call scaled_dot_product_attention?)")
        else:
            read = Cache(layers=[_ReadLayer(expand(r.keys, counts), expand(r.values, counts))
                                 for r in record.layers])
            hidden = decoder(input_ids=input_ids[:, p:L - 1], attention_mask=attention_mask[:, :L - 1],
                             position_ids=positions[:, p:], past_key_values=read, use_cache=False).last_hidden_state
    if not all(layer.reads for layer in read.layers):
        warn_fallback("shared-prompt forward", "the model did not read the prompt cache")
        return completion_logprobs(model, input_ids, attention_mask, logits_to_keep, **plain)
    if layout is None:
        return lm_head_logprobs(hidden, head, input_ids[:, -logits_to_keep:], temperature, return_entropy, chunk_size)
    return _packed_head(hidden[0], head, layout, logits_to_keep, plain)


def _packed_head(hidden: torch.Tensor, head: torch.nn.Module, layout: PackedLayout, T: int, plain: dict):
    """LM-head scores of the M real positions (``hidden [M, H]``) put back into ``[B, T]`` rows (0 at padding)."""
    m = hidden.shape[0]
    if plain["chunk_size"] is None:
        # Rows of T positions, as the unpacked path's [B, T]: the plain log-softmax holds one row's fp32 logits.
        rows = -(-m // T)
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, rows * T - m)).view(rows, T, -1)
        targets = torch.nn.functional.pad(layout.targets, (0, rows * T - m)).view(rows, T)
    else:
        hidden, targets = hidden.unsqueeze(0), layout.targets.unsqueeze(0)
    out = lm_head_logprobs(hidden, head, targets, plain["temperature"], plain["return_entropy"], plain["chunk_size"])
    if not plain["return_entropy"]:
        return unpack_rows(out.reshape(-1)[:m], layout)
    return tuple(unpack_rows(x.reshape(-1)[:m], layout) for x in out)
