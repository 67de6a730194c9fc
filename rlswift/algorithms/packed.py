"""Padding-free (packed) completions for the shared-prompt forward's second pass.

The unpacked second pass runs every row's last prompt token and completion as a ``[B, T]`` block, T = the longest
completion of the micro-batch, so a batch of mixed lengths pushes padding through every linear layer and the LM
head. Packed, the real tokens of all rows run as one sequence ``[1, M]`` (M = the real completion tokens), each with
the position id the plain forward gives it (its column in the padded row), so the linear layers, norms, rotary
embeddings and the LM head see only real tokens.

Attention is the one op that needs the rows apart. The pass hands the decoder a 4-D mask (transformers passes a
4-D ``attention_mask`` to the attention unchanged) that is a ``PackedMask``: the ``[B, 1, T, p + T]`` boolean mask
of the unpacked pass (True = attend), carrying the layout. The read cache returns the U prompts' K/V flattened in
front of the new K/V; when sdpa's ``scaled_dot_product_attention`` receives the mask, ``PackedMask`` (a tensor
subclass) takes the call and runs it in the unpacked pass's shapes: queries and new K/V scattered to ``[B, h, T, d]``
(zeros at padding, which the mask hides), each run's prompt K/V expanded over its rows (backward sums them: one
gradient per prompt), the real attention kernel, and the outputs gathered back to ``[1, h, M, d]``. So attention
costs what it did unpacked and every real position computes what the unpacked pass computes. It works wherever the
layer's own call runs again (gradient-checkpointing replays carry the mask), under LoRA and FSDP2 alike; the eager
attention (its own matmuls) is not packed. Padding positions of the returned log-probs and entropies are 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedLayout", "PackedMask", "pack_layout", "packed_mask", "unpack_rows", "flat_prompt_cache"]


@dataclass
class PackedLayout:
    """Where each real completion token sits. B rows, T completion columns, M real tokens, U prompt runs."""

    input_ids: torch.Tensor  # [1, M] long: row i's columns [p, p + n_i) (last prompt token, completion but its last)
    position_ids: torch.Tensor  # [1, M] long: the columns themselves, as in the padded row
    targets: torch.Tensor  # [M] long: the token each position scores (the next column of its row)
    flat: torch.Tensor  # [M] long: i * T + t of each real token in the [B, T] block
    unpack: torch.Tensor  # [B, T] long: the index of each [B, T] position among the M, or M at padding
    counts: list[int]  # [U] rows per prompt run
    prefix: int  # p: the shared prefix columns [0, p)


def pack_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                counts: list[int]) -> PackedLayout | None:
    """The packed layout of the rows, or None where packing does not apply or saves nothing.

    input_ids, attention_mask: ``[B, L]`` as in ``shared_prompt_logprobs`` (prefix ``[0, p)``, ``p = L - T - 1``);
    counts: rows per prompt run (``prompt_runs``). None when a row's completion mask is not a prefix of its T columns
    or its last prompt token is masked (not the recipe's layout), when there is no padding, or no real token.
    """
    n, L = input_ids.shape
    T = logits_to_keep
    p = L - T - 1
    comp = attention_mask[:, L - T:].bool()
    lengths = comp.sum(1)
    cols = torch.arange(T, device=input_ids.device)
    if not torch.equal(comp, cols < lengths[:, None]) or not bool(attention_mask[:, p].bool().all()):
        return None
    m = int(lengths.sum())
    if m == 0 or m == n * T:
        return None
    row = torch.repeat_interleave(torch.arange(n, device=input_ids.device), lengths)  # [M]
    row_start = torch.cumsum(lengths, 0) - lengths  # [B] first of each row's tokens among the M
    t = torch.arange(m, device=input_ids.device) - row_start[row]  # [M] offset in its completion
    unpack = torch.where(comp, row_start[:, None] + cols, torch.full_like(cols, m))
    return PackedLayout(input_ids=input_ids[row, p + t][None], position_ids=(p + t)[None],
                        targets=input_ids[row, p + 1 + t], flat=row * T + t, unpack=unpack, counts=list(counts),
                        prefix=p)


def packed_mask(attention_mask: torch.Tensor, layout: PackedLayout) -> "PackedMask":
    """The unpacked pass's sdpa mask ``[B, 1, T, p + T]`` (key visible, no later than the query) as a ``PackedMask``.

    Query t of a row is column ``p + t``; it sees the valid columns ``<= p + t`` of ``[0, p + T)``: what transformers'
    sdpa mask of the 2-D ``attention_mask[:, :L - 1]`` holds for those queries."""
    T = layout.unpack.shape[1]
    keys = attention_mask[:, :layout.prefix + T].bool()  # [B, p + T]
    k = torch.arange(layout.prefix + T, device=keys.device)
    q = layout.prefix + torch.arange(T, device=keys.device)
    visible = keys[:, None, None, :] & (k[None, :] <= q[:, None])[None, None]
    out = visible.as_subclass(PackedMask)
    out.packing, out.calls = layout, 0
    return out


def flat_prompt_cache(x: torch.Tensor) -> torch.Tensor:
    """Prompt K/V of the U runs ``[U, h, p, d]`` -> ``[1, h, U * p, d]``, the form the packed pass's cache returns."""
    U, h, p, d = x.shape
    return x.transpose(0, 1).reshape(1, h, U * p, d)


class _Move(torch.autograd.Function):
    """``x.index_select(dim, index)``, where ``index == x.shape[dim]`` reads zeros, with a gather for its backward.

    Every source position lands in at most one place (``inverse[i]``: where position i went, or the output's size
    where nowhere), so the gradient is moved back, never added up. Indexing's own backward (``index_put_`` with
    accumulate) would give the same values, but under deterministic algorithms on CUDA it sorts the indices: 43% of
    a packed training step's GPU time on an H200 (scripts/README.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        ctx.save_for_backward(inverse)
        return _select(x, dim, index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _select(grad.contiguous(), ctx.dim, inverse), None, None, None


def _select(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    zeros = x.new_zeros(*x.shape[:dim], 1, *x.shape[dim + 1:])
    return torch.cat([x, zeros], dim=dim).index_select(dim, index)


def _rows(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``[1, h, M, d]`` -> ``[B, h, T, d]``, zeros at padding (``_Move``: each real token goes to one place)."""
    h, d = x.shape[1], x.shape[3]
    B, T = layout.unpack.shape
    out = _Move.apply(x[0], 1, layout.unpack.reshape(-1), layout.flat)  # [h, B * T, d]
    return out.view(h, B, T, d).transpose(0, 1)


def _expand(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    from rlswift.algorithms.shared_prompt import expand  # it imports this module

    return expand(x, counts)


def _attend(query, key, value, attn_mask, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """sdpa over the packed tokens, computed per row in the unpacked pass's shapes (see the module docstring).

    query ``[1, nh, M, d]``; key, value ``[1, h, U * p + M, d]`` (h = kv heads, or nh once repeated)."""
    layout = attn_mask.packing
    attn_mask.calls += 1
    U, p = len(layout.counts), layout.prefix

    def kv(x):
        prompt = x[0, :, :U * p].reshape(x.shape[1], U, p, x.shape[3]).transpose(0, 1)  # [U, h, p, d]
        return torch.cat([_expand(prompt, layout.counts), _rows(x[:, :, U * p:], layout)], dim=2)  # [B, h, p+T, d]

    extra = {"enable_gqa": True} if enable_gqa else {}
    out = torch.nn.functional.scaled_dot_product_attention(
        _rows(query, layout), kv(key), kv(value), attn_mask=attn_mask.as_subclass(torch.Tensor), dropout_p=dropout_p,
        is_causal=is_causal, scale=scale, **extra)  # [B, nh, T, d]
    nh, d = out.shape[1], out.shape[3]
    rows = out.transpose(0, 1).reshape(nh, -1, d)  # [nh, B * T, d]
    return _Move.apply(rows, 1, layout.flat, layout.unpack.reshape(-1)).unsqueeze(0)  # [1, nh, M, d]


class PackedMask(torch.Tensor):
    """A boolean ``[B, 1, T, p + T]`` attention mask that runs the sdpa call it is given per row (``_attend``).

    Any other op sees a plain tensor. ``packing``: the ``PackedLayout`` (``layout`` is a tensor attribute);
    ``calls``: sdpa calls taken (one per layer and replay), so the pass can check the model attended through it."""

    packing: PackedLayout
    calls: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch._C._nn.scaled_dot_product_attention:
                return _attend(*args, **kwargs)
            return func(*args, **kwargs)


def unpack_rows(scores: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Scores of the M real tokens ``[M]`` -> ``[B, T]`` in the rows' completion columns, 0 at padding.

    Differentiable (``_Move``: its backward moves each position's gradient to its one source)."""
    return _Move.apply(scores, 0, layout.unpack.reshape(-1), layout.flat).view(layout.unpack.shape)
