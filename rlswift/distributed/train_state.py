"""`ShardedState`: the state hook of the policy and its optimizer on any world size (plain or FSDP2-sharded).

Keys are fully qualified parameter names without FSDP or wrapper prefixes (torch's `get_state_dict`), so the same
checkpoint loads into a plain model (one process) and into an FSDP2 model on any number of ranks. The checkpoint
manager writes it with `dcp.save_sharded` and reads it with `dcp.load_sharded` (its `checkpoint_kind` is
"sharded"); every other hook keeps the ordinary replicated or per-rank path.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)


def _is_peft(model: nn.Module) -> bool:
    # A peft model exists only if peft was imported; importing it just to ask costs seconds (it pulls
    # transformers and bitsandbytes), so look at sys.modules first.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)

__all__ = ["ShardedState", "MainOnly", "checkpoint_kind", "KINDS"]


KINDS = ("sharded", "per_rank", "replicated", "main_only")


def checkpoint_kind(hook: Any) -> str:
    """How the checkpoint manager writes ``hook``: "sharded", "per_rank", "main_only" or "replicated" (default).

    replicated: identical on every rank; rank 0 writes it, every rank loads it. main_only: exists on rank 0 only
    (run logs: only rank 0 writes lines); rank 0 writes and loads it, other ranks hold a `MainOnly(None)`.
    """
    kind = getattr(hook, "checkpoint_kind", "replicated")
    if kind not in KINDS:
        raise ValueError(f"hook {type(hook).__name__} has checkpoint_kind={kind!r}; use one of {', '.join(KINDS)}")
    return kind


class MainOnly:
    """A hook that lives on rank 0 only (e.g. a `JsonlLog`): ``MainOnly(log if info.is_main else None)``.

    Every rank registers it under the same name; only rank 0's is saved and loaded (so no other rank ever
    truncates the log file on resume).
    """

    checkpoint_kind = "main_only"

    def __init__(self, hook: Any | None) -> None:
        self.hook = hook

    def state_dict(self) -> Any:
        if self.hook is None:
            raise RuntimeError("MainOnly(None).state_dict() called on a rank other than 0")
        return self.hook.state_dict()

    def load_state_dict(self, state: Any) -> None:
        if self.hook is not None:
            self.hook.load_state_dict(state)


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
        self.trainable_only = _is_peft(model) if trainable_only is None else trainable_only

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
