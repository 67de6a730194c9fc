"""Padding-free (packed) completions for the shared-prompt forward's second pass.

The unpacked second pass runs every row's last prompt token and completion as a ``[B, T]`` block, T = the longest
completion of the micro-batch, so a batch of mixed lengths computes padding. Packed, the real tokens of each prompt
run's rows are concatenated into one sequence per run, ``[U, Q]`` (Q = the longest run's total), on top of that run's
prompt K/V (once per run, not expanded over its rows), with a 4-D attention mask that lets each token see its
prompt's valid positions and the earlier tokens of its own completion only (block-diagonal causal). A token keeps
the position id the plain forward gives it (its column in the padded row), so every real position computes what the
plain forward computes, up to fp32 rounding. Padding positions of the returned ``[B, T]`` log-probs and entropies
are 0 (the plain forward scores the pad tokens; both are masked downstream).

The mask is dense, so attention costs ``Q x (p + Q)`` per run instead of ``G x T x (p + T)``: for large groups of
long completions the quadratic term can outweigh the padding saved, so ``pack_layout`` packs only when an estimate
of the layer FLOPs (linear layers + attention) says it is cheaper. The decision depends on the batch and the model
config only, so a resumed run decides the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedLayout", "pack_layout", "packed_attention_mask", "unpack_rows", "token_cost_in_keys"]


@dataclass
class PackedLayout:
    """Where each real completion token sits in the packed batch. B rows, U runs, M real tokens, Q slots per run."""

    input_ids: torch.Tensor  # [U, Q] long: row i's columns [p, p + n_i) in row order, pad id after a run's tokens
    position_ids: torch.Tensor  # [U, Q] long: p + offset in the completion (pad slots: p)
    visible: torch.Tensor  # [U, 1, Q, p + Q] bool: True = the query (dim 2) attends to the key (dim 3)
    slots: torch.Tensor  # [M] long: flat index u * Q + q of each real token, in row order
    targets: torch.Tensor  # [M] long: the token each real position scores (the next column of its row)
    unpack: torch.Tensor  # [B, T] long: index into the [M] scores of each completion position, M at padding
    lengths: list[int]  # [B] completion tokens per row


def token_cost_in_keys(config) -> float:
    """Linear-layer multiply-adds of one token per attention multiply-adds of one (query, key) pair, per layer.

    A token that attends to k keys costs about ``token_cost_in_keys + k`` units in forward and backward alike.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    linear = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    return linear / (2 * heads * head_dim)  # QK^T and attention x V: head_dim each, per head


def pack_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, counts: list[int],
                cost_in_keys: float) -> PackedLayout | None:
    """The packed layout of the rows, or None where packing does not apply or would not save work.

    input_ids, attention_mask: ``[B, L]`` as in ``shared_prompt_logprobs`` (prefix ``[0, p)``, ``p = L - T - 1``);
    counts: rows per prompt run (``prompt_runs``). None when a row's completion mask is not a prefix of its T columns
    (or its last prompt token is masked), when no row has a completion token, or when the estimated cost (see
    ``token_cost_in_keys``) is not below the unpacked pass's.
    """
    n, L = input_ids.shape
    T = logits_to_keep
    p = L - T - 1
    comp = attention_mask[:, L - T:].bool()
    lengths = comp.sum(1)
    cols = torch.arange(T, device=input_ids.device)
    if not torch.equal(comp, cols < lengths[:, None]) or not bool(attention_mask[:, p].bool().all()):
        return None  # not right-padded completions after a real last prompt token: the unpacked pass handles it
    lengths_l = lengths.tolist()
    totals = [sum(lengths_l[a:a + c]) for a, c in zip(_starts(counts), counts)]
    U, Q, M = len(counts), max(totals), sum(totals)
    if M == 0 or U * Q * (cost_in_keys + p + Q) >= n * T * (cost_in_keys + p + T):
        return None
    dev = input_ids.device
    row = torch.repeat_interleave(torch.arange(n, device=dev), lengths)  # [M] the row of each real token
    row_start = torch.cumsum(lengths, 0) - lengths  # [B] first real token of each row in the [M] order
    t = torch.arange(M, device=dev) - row_start[row]  # [M] offset of each token in its completion
    run = torch.repeat_interleave(torch.arange(U, device=dev), torch.tensor(counts, device=dev))  # [B]
    run_start = torch.tensor([0] + totals[:-1], device=dev).cumsum(0)  # [U] first real token of each run
    slots = run[row] * Q + (torch.arange(M, device=dev) - run_start[run[row]])  # [M]

    ids = torch.zeros(U * Q, dtype=input_ids.dtype, device=dev)
    ids[slots] = input_ids[row, p + t]
    positions = torch.full((U * Q,), p, dtype=torch.long, device=dev)
    positions[slots] = p + t
    # Segment ids: the row for real slots, a distinct negative number for each pad slot (it sees itself only, so
    # no query row of the mask is empty: an all-masked row would give NaN in sdpa's softmax).
    segment = -1 - torch.arange(U * Q, device=dev)
    segment[slots] = row
    segment = segment.view(U, Q)
    real = segment >= 0
    causal = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
    own = (segment[:, :, None] == segment[:, None, :]) & causal  # [U, Q, Q] own completion, earlier or same
    prompt_valid = attention_mask[_starts(counts), :p].bool()  # [U, p]
    sees_prompt = prompt_valid[:, None, :] & real[:, :, None]  # [U, Q, p]
    visible = torch.cat([sees_prompt, own], dim=-1).unsqueeze(1)

    unpack = torch.where(cols < lengths[:, None], row_start[:, None] + cols, torch.full_like(cols, M))
    return PackedLayout(input_ids=ids.view(U, Q), position_ids=positions.view(U, Q), visible=visible, slots=slots,
                        targets=input_ids[row, p + 1 + t], unpack=unpack, lengths=lengths_l)


def _starts(counts: list[int]) -> list[int]:
    out, s = [], 0
    for c in counts:
        out.append(s)
        s += c
    return out


def packed_attention_mask(visible: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask in the convention transformers' own mask functions give the attention implementation: sdpa a
    bool mask (True = attend), eager an additive float mask (0, or ``finfo(dtype).min`` where masked) in ``dtype``
    (transformers uses the input embeddings' dtype). A 4-D mask reaches the attention unchanged."""
    if attn_implementation == "sdpa":
        return visible
    return torch.where(visible, torch.tensor(0.0, dtype=dtype, device=visible.device), torch.finfo(dtype).min)


def unpack_rows(scores: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Scores of the M real tokens ``[M]`` -> ``[B, T]`` in the rows' completion columns, 0 at padding.

    Differentiable (an index: its backward adds each position's gradient to its one source)."""
    padded = torch.cat([scores, scores.new_zeros(1)])
    return padded[layout.unpack]
