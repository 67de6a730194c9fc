"""Data parallelism with the same global batch on any world size, and loss normalisation over that global batch.

The split rule (one for GRPO and DPO):
  1. A step's global batch is the same ordered list of rows for every world size: the sampler's prompt uids
     (GRPO: each prompt's G samples are contiguous rows) or preference pairs (DPO). Every rank draws the same uids
     from the replicated sampler.
  2. Rank r owns the contiguous block ``[r*B/W, (r+1)*B/W)`` of the B rows (`rank_rows`); GRPO splits by whole
     prompts (`rank_items` over prompts), so a rank generates and scores whole groups.
  3. Gradient accumulation cuts each rank's block into A contiguous micro-batches (`micro_batches`).
  4. Each rank's loss is normalised by counts of the GLOBAL batch, and FSDP2 SUMS gradients over ranks
     (`fsdp.shard_model`), so the summed gradient is the one-process gradient of the global batch up to the order of
     the additions. The counts are sums of integers (all_reduce of exact integer-valued floats): bit-identical on
     every rank and world size.

What each GRPO loss type needs (`grpo_loss_scale`, applied to the loss that `algorithms.grpo.policy_loss` returns
for a rank's micro-batch):
  - dapo (``normalises_globally``): pass ``num_items_in_batch = global_sum(mask.sum())`` of the whole step's
    completion tokens; scale 1.
  - grpo, dr_grpo (per-sequence means / a per-row constant): scale ``local_rows / global_rows``; one process with A
    micro-batches gets ``1/A``, exactly `accumulation_scale`.
  - bnpo (tokens of the micro-batch): scale ``local_tokens / (global_tokens_of_micro_batch_k * A)``. With A > 1 the
    global micro-batch k is the union of every rank's k-th micro-batch, a different set of rows than one process's
    k-th micro-batch: bnpo with gradient accumulation changes with the world size (as in TRL). With A = 1 it doesn't.
DPO (`dpo_loss_scale`): per-pair losses summed over the rank's micro-batch divided by the global number of pairs.

Padding: pad every rank's rows to the widths of the GLOBAL batch (assemble the global batch on every rank, then
slice its rows): transformers models take positions from the column index, so a left-padded prompt padded
differently would be a different input.
"""

from __future__ import annotations

import torch

from rlswift.distributed.launch import DistInfo

__all__ = ["rank_items", "rank_rows", "micro_batches", "global_sum", "global_max", "grpo_loss_scale",
           "all_gather_rows", "dpo_loss_scale", "global_mean", "GRPO_NORMALISATION"]

# How each built-in GRPO loss type normalises a micro-batch: "global" (by a count given for the whole step),
# "rows" (by the micro-batch's row count), "tokens" (by the micro-batch's completion tokens).
GRPO_NORMALISATION = {"dapo": "global", "grpo": "rows", "dr_grpo": "rows", "bnpo": "tokens"}


def rank_items(n: int, info: DistInfo, what: str = "rows", multiple_of: int = 1) -> slice:
    """The contiguous block of ``n`` items rank ``info.rank`` owns: ``[r*n/W, (r+1)*n/W)``.

    ``n`` must split evenly into ``W * multiple_of`` (``multiple_of``: gradient accumulation steps, so every rank
    has the same number of equal micro-batches); otherwise an error names ``what`` and the sizes that would work.
    """
    w = info.world_size
    unit = w * multiple_of
    if n < 1 or n % unit:
        ok = [k * unit for k in range(1, 4)]
        raise ValueError(f"{what}={n} does not split into {w} ranks x {multiple_of} micro-batches of equal size; "
                         f"use a multiple of {unit} (e.g. {ok}), or change --nproc-per-node or the accumulation steps")
    per = n // w
    return slice(info.rank * per, (info.rank + 1) * per)


def rank_rows(n: int, info: DistInfo, multiple_of: int = 1) -> slice:
    """`rank_items` for batch rows."""
    return rank_items(n, info, "rows", multiple_of)


def micro_batches(rows: slice, steps: int) -> list[slice]:
    """Cut a rank's contiguous ``rows`` into ``steps`` contiguous equal micro-batches (global row indices)."""
    n = rows.stop - rows.start
    if steps < 1 or n % steps:
        raise ValueError(f"{n} rows do not split into {steps} equal micro-batches")
    mb = n // steps
    return [slice(rows.start + k * mb, rows.start + (k + 1) * mb) for k in range(steps)]


def _reduce(x: torch.Tensor | float | int, info: DistInfo, op) -> torch.Tensor:
    t = torch.as_tensor(x).detach().clone()
    if t.dtype not in (torch.float64, torch.int64):
        t = t.to(torch.float64 if t.is_floating_point() else torch.int64)
    if info.distributed:
        dev = info.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(dev)
        torch.distributed.all_reduce(t, op=op)
    return t.cpu()


def global_sum(x: torch.Tensor | float | int, info: DistInfo) -> torch.Tensor:
    """Sum of ``x`` over ranks (float64/int64 on CPU, identical on every rank). A collective."""
    return _reduce(x, info, torch.distributed.ReduceOp.SUM if info.distributed else None)


def global_max(x: torch.Tensor | float | int, info: DistInfo) -> torch.Tensor:
    """Max of ``x`` over ranks (e.g. the global padded width). A collective."""
    return _reduce(x, info, torch.distributed.ReduceOp.MAX if info.distributed else None)


def global_mean(total: torch.Tensor | float, count: torch.Tensor | float, info: DistInfo) -> float:
    """``sum(total) / sum(count)`` over ranks, for logging means of per-rank sums (0.0 when the count is 0)."""
    t, c = global_sum(total, info), global_sum(count, info)
    return float(t / c) if float(c) > 0 else 0.0


def grpo_loss_scale(loss_type: str, info: DistInfo, accumulation_steps: int, local_rows: int, global_rows: int,
                    local_tokens: float | None = None, normalisation: str | None = None) -> float:
    """Factor for a rank's micro-batch GRPO loss so the ranks' SUMMED gradients equal one process's.

    ``local_rows``: rows of this micro-batch on this rank; ``global_rows``: rows of the whole step (all ranks,
    all micro-batches). ``local_tokens``: completion tokens of this micro-batch (bnpo only; a collective then:
    every rank must call it for the same micro-batch k). ``normalisation`` overrides the table for user loss
    variants ("global", "rows" or "tokens"; default: `GRPO_NORMALISATION`, else "rows").
    """
    kind = normalisation or GRPO_NORMALISATION.get(loss_type, "rows")
    if kind == "global":
        return 1.0
    if kind == "rows":
        return local_rows / global_rows
    if kind == "tokens":
        if local_tokens is None:
            raise ValueError(f"loss_type {loss_type!r} normalises by tokens: pass local_tokens")
        tokens_k = float(global_sum(float(local_tokens), info))
        return local_tokens / (max(tokens_k, 1.0) * accumulation_steps)
    raise ValueError(f"normalisation={kind!r}: use 'global', 'rows' or 'tokens'")


def dpo_loss_scale(local_pairs: int, global_pairs: int) -> float:
    """Factor for ``losses.mean()`` of a rank's micro-batch: ``local_pairs / global_pairs``.

    Equivalent to ``losses.sum() / global_pairs``: with FSDP2's summed gradients, the global batch mean.
    """
    if global_pairs < 1:
        raise ValueError(f"global_pairs must be >= 1, got {global_pairs}")
    return local_pairs / global_pairs


def all_gather_rows(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's ``t`` (its block of rows, the same shape on every rank) concatenated in rank order: the global
    batch's rows on every rank, bit for bit. A collective; the identity for one process."""
    if not info.distributed:
        return t
    dev = info.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    local = t.detach().to(dev).contiguous()
    parts = [torch.empty_like(local) for _ in range(info.world_size)]
    torch.distributed.all_gather(parts, local)
    return torch.cat(parts).to(t.device)
