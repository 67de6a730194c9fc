"""The few places where a recipe step differs on several ranks (torchrun): rollouts, batch rows, metrics.

Everything here is the identity for one process, so a recipe calls it unconditionally. docs/distributed.md has the
design: every rank holds the same global batch; generation is split by prompts (each rank its own engine, seeds
from `sample_seed`, so a sample's tokens do not depend on which rank drew it); rewards, advantages and every
replicated hook are computed on the whole batch on every rank; training splits rows (FSDP2 sums gradients).
"""

from __future__ import annotations

import dataclasses

import torch

from rlswift.distributed import (DistInfo, all_gather_json, all_gather_rows, global_sum, micro_batches, rank_items,
                                 rank_rows)
from rollout import Rollout

__all__ = ["generate_split", "shared_prompt_agreed", "gather_rows", "global_stats", "global_float"]


def generate_split(engine, requests: list, info: DistInfo, what: str = "prompts_per_step") -> list[Rollout]:
    """``engine.generate(requests)`` with the requests split over ranks (whole requests: a prompt's samples stay on
    one rank), the results gathered: every rank returns every rollout, in request order.

    Each rank's engine samples its block; per-sample seeds make the tokens independent of the split. Rollouts of
    other ranks come without their per-token logprobs (the recipes do not use them).
    """
    if not info.distributed:
        return engine.generate(requests)
    block = rank_items(len(requests), info, what)
    mine = engine.generate(requests[block])
    parts = all_gather_json([[r.request_index + block.start, r.sample_index, r.seed, r.completion_ids,
                              r.finish_reason, r.text] for r in mine], info)
    out = []
    for part in parts:
        for req, j, seed, ids, finish, text in part:
            out.append(Rollout(req, j, seed, list(requests[req].prompt_ids), ids, [], finish, text))
    return out


def shared_prompt_agreed(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int, info: DistInfo,
                         micro_batch: int, accumulation_steps: int) -> bool:
    """Whether micro-batch ``micro_batch`` takes the shared-prompt path on EVERY rank (then all do; else none).

    The shared-prompt forward falls back to the plain one for a micro-batch without a repeated prompt, and the two
    run each layer a different number of times: under FSDP2 (one gather per layer call) every rank must take the
    same path. Every rank holds the whole batch, so each decides for all ranks without a collective.
    """
    from rlswift.algorithms.shared_prompt import prompt_runs

    p = input_ids.shape[1] - logits_to_keep - 1
    if p < 1:
        return False
    for r in range(info.world_size):
        other = dataclasses.replace(info, rank=r, is_main=r == 0)
        rows = micro_batches(rank_rows(input_ids.shape[0], other, accumulation_steps), accumulation_steps)[micro_batch]
        starts, _ = prompt_runs(input_ids[rows], attention_mask[rows], p)
        if len(starts) == rows.stop - rows.start:
            return False
    return True


def gather_rows(t: torch.Tensor | None, info: DistInfo) -> torch.Tensor | None:
    """This rank's rows of a per-row tensor -> the whole batch's rows on every rank (bit for bit)."""
    return t if t is None else all_gather_rows(t, info)


def global_stats(sums: dict[str, float], count: int, info: DistInfo) -> dict[str, float]:
    """Means over every rank's micro-batches of per-micro-batch metrics, from each rank's sums over its own."""
    if not info.distributed:
        raise ValueError("global_stats is for several ranks; one process keeps its own averages")
    keys = list(sums)  # the same keys, in the same order, on every rank
    total = global_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64), info)
    return {k: float(v) / (count * info.world_size) for k, v in zip(keys, total.tolist())}


def global_float(x: float, info: DistInfo) -> float:
    """Sum of a float over ranks (float64), as a float; the value itself for one process."""
    return float(global_sum(float(x), info)) if info.distributed else x
