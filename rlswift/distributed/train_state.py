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

__all__ = ["ShardedState", "MainOnly", "checkpoint_kind", "KINDS", "OneProcessParts", "optimizer_by_name",
           "optimizer_by_index", "one_process_parts"]


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

    def _options(self, full: bool = False) -> StateDictOptions:
        # strict=False: the model part holds exactly `model_names()` (no frozen base for LoRA, a tied head once);
        # the key sets are compared here and in `dcp.load_sharded` instead.
        return StateDictOptions(ignore_frozen_params=self.trainable_only, strict=False, full_state_dict=full)

    def model_names(self) -> list[str]:
        """The parameter names the model part holds: those of the one-process `ModelHook` (every parameter once,
        a tied LM head under its first name; for LoRA only the trainable adapter tensors)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad or not self.trainable_only]

    def _filtered(self, model_sd: dict[str, Any]) -> dict[str, Any]:
        names = set(self.model_names())
        return {k: v for k, v in model_sd.items() if k in names}

    def optimizer_names(self) -> list[str]:
        """The fully qualified name of each optimizer parameter, in the optimizer's order (its param_groups)."""
        fqn = {id(p): n for n, p in self.model.named_parameters()}
        return [fqn[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": self._filtered(get_model_state_dict(self.model, options=self._options()))}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        return {"model": self._filtered(model_sd), "optimizer": optim_sd}

    def _check_parts(self, state: dict[str, Any]) -> None:
        want = {"model"} if self.optimizer is None else {"model", "optimizer"}
        if set(state) != want:
            raise KeyError(f"sharded state has parts {sorted(state)}, this hook expects {sorted(want)} (a checkpoint "
                           "saved with an optimizer loads only into a hook with one, and the other way round)")
        names = self.model_names()
        missing, unexpected = sorted(set(names) - set(state["model"])), sorted(set(state["model"]) - set(names))
        if missing or unexpected:
            raise KeyError(f"policy state does not match the model: missing {missing[:5]} ({len(missing)}), "
                           f"unexpected {unexpected[:5]} ({len(unexpected)}). Resume with the same model and the "
                           "same LoRA settings as the checkpoint.")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_parts(state)
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"], options=self._options())
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self._options())
        self._restore_group_values(state["optimizer"])

    def _restore_group_values(self, optim_sd: dict) -> None:
        # torch's set_state_dict hands param_group values through its own conversions (a tuple of betas comes back
        # a list): put back exactly what was saved, as optimizer.load_state_dict does.
        groups = optim_sd["param_groups"]
        if len(groups) != len(self.optimizer.param_groups):
            raise KeyError(f"the optimizer state has {len(groups)} parameter groups, this run's optimizer "
                           f"{len(self.optimizer.param_groups)}")
        for live, saved in zip(self.optimizer.param_groups, groups):
            live.update({k: v for k, v in saved.items() if k != "params"})

    def load_one_process(self, model_sd: dict[str, torch.Tensor], optim_sd: dict | None) -> None:
        """Load the one-process checkpoint format (`ModelHook` tensors and ``optimizer.state_dict()``) into a model
        on any world size: every rank passes the whole tensors and keeps its shard (COLLECTIVE; bit-exact)."""
        state = {"model": dict(model_sd)}
        if self.optimizer is not None:
            if optim_sd is None:
                raise KeyError("the checkpoint has no optimizer state but this run has an optimizer")
            state["optimizer"] = optimizer_by_name(optim_sd, self.optimizer_names())
        self._check_parts(state)
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"], options=self._options(full=True))
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self._options(full=True))
        self._restore_group_values(state["optimizer"])


def optimizer_by_name(optim_sd: dict, names: list[str]) -> dict:
    """``optimizer.state_dict()`` (parameters numbered 0..n-1 in param_groups order) keyed by parameter names, the
    format of `ShardedState`'s optimizer part; ``names[i]`` is the name of parameter i."""
    order = [i for g in optim_sd["param_groups"] for i in g["params"]]
    if sorted(order) != list(range(len(names))):
        raise KeyError(f"the optimizer state has {len(order)} parameters, this run's optimizer {len(names)}: resume "
                       "with the same model, LoRA settings and optimizer")
    return {"state": {names[i]: st for i, st in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}


def optimizer_by_index(optim_sd: dict) -> dict:
    """Inverse of `optimizer_by_name`: parameters numbered in param_groups order, as ``optimizer.state_dict()``."""
    names = [n for g in optim_sd["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    if len(index) != len(names):
        raise ValueError("a parameter appears twice in the optimizer's param_groups")
    return {"state": {index[n]: st for n, st in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_sd["param_groups"]]}


def one_process_parts(state: dict) -> dict[str, Any]:
    """A `ShardedState` state (whole tensors) as the one-process hooks hold it: ``{"model": {name: tensor},
    "optimizer": optimizer.state_dict()}`` (what `read_hook_states` shows and verify-resume compares)."""
    out = {"model": state["model"]}
    if "optimizer" in state:
        out["optimizer"] = optimizer_by_index(state["optimizer"])
    return out


class OneProcessParts:
    """Reads a one-process checkpoint (hooks "model" and "optimizer") into a `ShardedState` (resume 1 -> N ranks).

    ``hooks()`` gives two stand-in hooks to load in place of the `ShardedState` (they keep what they are given);
    ``finish()`` then loads both into the sharded model and optimizer (a collective).
    """

    def __init__(self, sharded: ShardedState) -> None:
        self.sharded = sharded
        self.parts: dict[str, Any] = {}

    def hooks(self) -> dict[str, Any]:
        return {"model": _Part(self.parts, "model"), "optimizer": _Part(self.parts, "optimizer")}

    def finish(self) -> None:
        self.sharded.load_one_process(self.parts["model"], self.parts.get("optimizer"))


class _Part:
    checkpoint_kind = "replicated"

    def __init__(self, parts: dict, name: str) -> None:
        self.parts, self.name = parts, name

    def state_dict(self) -> Any:
        raise RuntimeError(f"the {self.name!r} stand-in only loads a one-process checkpoint into a sharded run")

    def load_state_dict(self, state: Any) -> None:
        self.parts[self.name] = state
