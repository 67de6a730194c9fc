"""Pure tensor functions of the RL algorithms: log-probs, GRPO advantages and losses, DPO losses."""

from rlswift.algorithms.dpo import (
    DPO_LOSS_TYPES,
    concatenated_batch,
    completion_lengths,
    dpo_loss,
    dpo_metrics,
    sequence_logps,
)
from rlswift.algorithms.grpo import LOSS_TYPES, LossContext, accumulation_scale, group_advantages, policy_loss
from rlswift.algorithms.logprobs import completion_logprobs, entropy_from_logits, selective_log_softmax

__all__ = [
    "DPO_LOSS_TYPES",
    "LOSS_TYPES",
    "LossContext",
    "accumulation_scale",
    "completion_lengths",
    "completion_logprobs",
    "concatenated_batch",
    "dpo_loss",
    "dpo_metrics",
    "entropy_from_logits",
    "group_advantages",
    "policy_loss",
    "selective_log_softmax",
    "sequence_logps",
]
