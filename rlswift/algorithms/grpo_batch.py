"""GRPO's typed records: a scored group of samples, and the padded training batch made of several groups.

Both live in state hooks between steps (pending groups of dynamic sampling, the generation batch of a
``num_iterations`` block), so each converts to and from a plain dict that the checkpoint codec stores exactly.
Shapes: G samples per group, N = groups * G rows, P = longest prompt, T = longest completion, F reward functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from rlswift.algorithms.grpo import group_advantages


@dataclass
class Group:
    """One prompt's G sampled completions and their rewards."""

    uid: int  # the prompt's stable row index in the dataset
    call: int  # the generation call that sampled it (part of every sample's seed)
    prompt_ids: list[int]  # [P_i] prompt token ids
    completion_ids: list[list[int]]  # [G][T_j] sampled token ids per sample
    seeds: list[int]  # [G] the seed of each sample (sample_seed(run_seed, call, uid, index))
    sample_indices: list[int]  # [G] the index each seed was made from (uid repeated in one call: k*G + j)
    texts: list[str]  # [G] decoded completions
    finish: list[str]  # [G] "stop" | "length"
    rewards: torch.Tensor  # [G] float32 weighted reward per sample (NaN: every function said "not applicable")
    per_func: torch.Tensor  # [G, F] float32 reward of each function (NaN where it returned None)

    def to_state(self) -> dict:
        """A plain dict for a state hook (the codec stores tensors, lists, ints and strings exactly)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "Group":
        """Inverse of to_state; groups saved before ``sample_indices`` existed get 0..G-1."""
        state = dict(state)
        state.setdefault("sample_indices", list(range(len(state["seeds"]))))
        return cls(**{f.name: state[f.name] for f in fields(cls)})

    @property
    def size(self) -> int:
        return len(self.completion_ids)


@dataclass
class GenerationBatch:
    """The padded training batch of one generation call (or block of ``num_iterations`` steps); kept on the CPU."""

    input_ids: torch.Tensor  # [N, P+T] long: prompt left-padded to P, then completion right-padded to T
    attention_mask: torch.Tensor  # [N, P+T] long: 1 on real prompt and completion tokens
    completion_mask: torch.Tensor  # [N, T] float32: 1 on real completion tokens
    advantages: torch.Tensor  # [N] float32 group-relative advantages
    rewards: torch.Tensor  # [N] float32 (NaN: unscorable sample)
    reward_func_means: torch.Tensor  # [F] float32 mean of each reward function over the batch (NaN-aware)
    logits_to_keep: int  # T
    group_size: int | None  # G: rows of one prompt are contiguous (None in batches saved by rlswift 0.1)
    dropped_groups: int = 0  # groups dropped by dynamic sampling while collecting this batch
    old_logprobs: torch.Tensor | None = None  # [N, T] float32 of the sampling policy (num_iterations > 1)
    ref_logprobs: torch.Tensor | None = None  # [N, T] float32 of the reference policy (beta > 0)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    def to_state(self) -> dict:
        """A plain dict for a state hook."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> "GenerationBatch":
        """Inverse of to_state (also reads the untyped dicts of rlswift 0.1 checkpoints)."""
        state = {"dropped_groups": 0, **state}
        return cls(**{f.name: state.get(f.name) for f in fields(cls)})


def assemble_batch(groups: list[Group], pad_id: int, scale_rewards: str, dropped_groups: int = 0) -> GenerationBatch:
    """Pad the groups into one training batch: prompts left-padded, completions right-padded; advantages per group."""
    group_size = groups[0].size
    if any(g.size != group_size for g in groups):
        raise ValueError(f"groups of different sizes {sorted({g.size for g in groups})}; GRPO needs equal groups")
    prompt_rows = [g.prompt_ids for g in groups for _ in range(g.size)]
    completion_rows = [c for g in groups for c in g.completion_ids]
    P = max(len(p) for p in prompt_rows)
    T = max(1, max(len(c) for c in completion_rows))
    n = len(prompt_rows)
    input_ids = torch.full((n, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, P + T), dtype=torch.long)
    completion_mask = torch.zeros((n, T), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompt_rows, completion_rows)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(c)] = 1
        if c:
            input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, :len(c)] = 1
    rewards = torch.cat([g.rewards for g in groups])
    advantages = group_advantages(rewards, group_size, scale_rewards=scale_rewards)
    per_func = torch.cat([g.per_func for g in groups])
    return GenerationBatch(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                           advantages=advantages, rewards=rewards, reward_func_means=per_func.nanmean(0),
                           logits_to_keep=T, group_size=group_size, dropped_groups=dropped_groups)
