"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for transformers causal LMs: policy (full or LoRA) and reference.

`shard_model` shards each decoder layer, then the root (embeddings, final norm and a tied LM head stay in the
root's group). Gradients are SUMMED over ranks, not averaged: the recipe normalises each rank's loss by counts of
the whole global batch (see `batch.py`), so the sum is the gradient one process computes on the global batch, up
to the order of the additions.

Checked on torch 2.13 CPU + gloo (tests/test_distributed_gloo.py): forward, backward, `clip_grad_norm_` (returns a
replicated DTensor: use `float(norm.full_tensor())` or `grad_norm_value`), AdamW, peft LoRA with frozen base weights
in the same groups, and a frozen reference under `torch.no_grad()`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from rlswift.distributed.launch import DistInfo

__all__ = ["shard_model", "decoder_layers", "is_sharded", "grad_norm_value", "full_named_parameters",
           "full_tensor"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a (possibly peft-wrapped) transformers model, in order.

    Found by the model's ``_no_split_modules`` class names (what transformers and accelerate use), else by the
    first ``nn.ModuleList`` named ``layers``/``h``/``blocks``. Raises naming the model class when there is none.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return list(mod)
    raise ValueError(f"cannot find the decoder layers of {type(base).__name__}: no _no_split_modules match and no "
                     "ModuleList named layers/h/blocks; shard it yourself with fully_shard")


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (the root) was sharded by `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, info: DistInfo, reshard_after_forward: bool = True,
                mp_policy=None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks of ``info`` and return it (same object, new class).

    Each decoder layer becomes one FSDP group, the root gets the rest. Gradient reduction is a plain SUM
    (`set_gradient_divide_factor(1.0)` + sum-only comms, which gloo also supports). ``mp_policy``: an optional
    `torch.distributed.fsdp.MixedPrecisionPolicy` (GPU bf16 training); None keeps the parameter dtype.

    A single process (``info.world_size == 1``) gets the model back unchanged: nothing to shard, and the
    checkpoint format (`dcp.save_sharded`) is the same for plain and sharded models.

    Call it after LoRA wrapping and after `make_reference` copied the policy, before building the optimizer
    (the optimizer must hold the sharded parameters).
    """
    if info.world_size == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if is_sharded(model):
        raise ValueError("model is already sharded (fully_shard was applied); shard each model once")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if info.device.type != "cpu":
        model.to(info.device)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            _sum_gradients(m)
    return model


def _sum_gradients(m) -> None:
    """Sum, never average, gradients over ranks: the loss is already normalised over the global batch."""
    m.set_gradient_divide_factor(1.0)
    if hasattr(m, "set_force_sum_reduction_for_comms"):
        m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    elif torch.distributed.get_backend() != "nccl":
        # Older torch: divide factor 1.0 becomes NCCL's PREMUL_SUM, which gloo lacks.
        raise RuntimeError(f"FSDP2 gradient sums on {torch.distributed.get_backend()} need a torch with "
                           "FSDPModule.set_force_sum_reduction_for_comms (this one is " + torch.__version__ + ")")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind ``t``: DTensors are gathered (a collective: every rank must call), plain returned."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_norm_value(norm: torch.Tensor) -> float:
    """A python float from what `clip_grad_norm_` returned (a replicated DTensor under FSDP2)."""
    return float(full_tensor(norm).detach().float().cpu())


def full_named_parameters(model: nn.Module, remove_duplicate: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor)`` for every parameter, gathered ONE AT A TIME (peak extra memory: one tensor).

    A collective: every rank must iterate to the end in the same order. Names are those of the unsharded module
    (FSDP2 keeps them). For the rollout engine of a full fine-tuning policy this replaces
    `models.engine_weights`; for LoRA, merge per layer after gathering (not provided here yet).
    """
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=remove_duplicate):
            yield name, full_tensor(p.detach())
