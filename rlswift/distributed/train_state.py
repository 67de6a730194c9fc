"""`ShardedState`: the state hook of the policy and its optimizer on any world size (plain or FSDP2-sharded).

Keys are fully qualified parameter names without FSDP or wrapper prefixes (torch's `get_state_dict`), so the same
checkpoint loads into a plain model (one process) and into an FSDP2 model on any number of ranks. The checkpoint
manager writes it with `dcp.save_sharded` and reads it with `dcp.load_sharded` (its `checkpoint_kind` is
"sharded"); every other hook keeps the ordinary replicated or per-rank path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from rlswift.models.policy import is_peft_model

__all__ = ["ShardedState", "checkpoint_kind"]


def checkpoint_kind(hook: Any) -> str:
    """How the checkpoint manager must write ``hook``: "sharded", "per_rank" or "replicated" (the default)."""
    kind = getattr(hook, "checkpoint_kind", "replicated")
    if kind not in ("sharded", "per_rank", "replicated"):
        raise ValueError(f"hook {type(hook).__name__} has checkpoint_kind={kind!r}; use sharded, per_rank or "
                         "replicated")
    return kind


class ShardedState:
    """Stateful hook over ``model`` (+ ``optimizer``): ``{"model": {fqn: tensor}, "optimizer": {...}}``.

    Full fine-tuning stores every parameter; a peft (LoRA) model only its trainable tensors (the frozen base is
    re-loaded from the model folder, as in one process). Under FSDP2 the tensors are DTensors (each rank its
    shard); on one process plain tensors. `state_dict()` returns LIVE tensors, not copies: write them before the
    next optimizer step (DCP's async save stages them first).

    Note: `get_state_dict` gives a fresh optimizer (no step yet) its state by running one step with zero grads
    and lr 0 (AdamW's step counter then reads 1); call `state_dict()` on a fresh optimizer only to get a template
    for `load_sharded`, which overwrites that state.
    """

    checkpoint_kind = "sharded"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 trainable_only: bool | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.trainable_only = is_peft_model(model) if trainable_only is None else trainable_only

    def _options(self) -> StateDictOptions:
        # strict=False with trainable_only: the frozen base is not in the checkpoint by design.
        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)

    def _trainable(self, model_sd: dict[str, Any]) -> dict[str, Any]:
        if not self.trainable_only:
            return model_sd
        # ignore_frozen_params misses a frozen weight under its second name (a tied LM head): keep exactly the
        # trainable parameters, as the one-process ModelHook does.
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in model_sd.items() if k in names}

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": self._trainable(get_model_state_dict(self.model, options=self._options()))}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": self._trainable(model_sd), "optimizer": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = {"model"} if self.optimizer is None else {"model", "optimizer"}
        if set(state) != want:
            raise KeyError(f"sharded state has parts {sorted(state)}, this hook expects {sorted(want)} (a checkpoint "
                           "saved with an optimizer loads only into a hook with one, and the other way round)")
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"], options=self._options())
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self._options())
