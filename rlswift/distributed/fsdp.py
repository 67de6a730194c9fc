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

from collections.abc import Collection, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_map

from rlswift.distributed.launch import DistInfo

__all__ = ["shard_model", "decoder_layers", "is_sharded", "grad_norm_value", "full_named_parameters",
           "full_tensor", "ModelRunner", "shard_for_calls", "engine_weight_chunks"]


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
    from torch.distributed.fsdp import FSDPModule, fully_shard

    fully_shard(model, **_shard_layers(model, info, reshard_after_forward, mp_policy))
    for m in model.modules():
        if isinstance(m, FSDPModule):
            _sum_gradients(m)
    return model


def _shard_layers(model: nn.Module, info: DistInfo, reshard_after_forward: bool, mp_policy) -> dict:
    """Move ``model`` to the rank's device and make each decoder layer an FSDP2 group; -> the ``fully_shard``
    arguments for the root, which the caller shards last."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if is_sharded(model) or any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("model is already sharded (fully_shard was applied); shard each model once")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if info.device.type != "cpu":
        model.to(info.device)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    return kwargs


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
    `models.engine_weights`; `engine_weight_chunks` does it layer by layer, LoRA merged.
    """
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=remove_duplicate):
            yield name, full_tensor(p.detach())


# ---------------------------------------------------------------------------------------------- recipe runner
class _CallRoot(nn.Module):
    """The FSDP2 root over a causal LM: ``root(fn, *args)`` runs ``fn(model, *args)`` inside ONE root forward.

    Code that calls a model's parts directly (the shared-prompt forward runs the decoder twice and then the LM
    head; the chunked head reads ``lm_head.weight``) would otherwise bypass the root's hooks, which gather the
    root's parameters (embeddings, final norm, a tied head) and reduce their gradients.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, fn, *args, **kwargs):
        # FSDP2 hooks the root's outputs for backward; an in-place op on an output that is a view would drop that
        # hook (torch warns on every call), so views leave as their own tensors (per-token values: cheap).
        out = fn(self.module, *args, **kwargs)
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t._is_view() else t, out)


class ModelRunner:
    """How a recipe calls its policy (or reference): ``runner(fn, *args)`` is ``fn(model, *args)``.

    One process: exactly that call. Sharded (`shard_for_calls`): the call runs inside the FSDP2 root's forward, so
    any function of the model works (``completion_logprobs`` with or without the shared-prompt and chunked paths,
    ``sequence_logps``). ``release()`` ends a forward/backward phase: with ``keep_gathered`` the gathered layer
    parameters are freed there (a no-op otherwise, and for one process).
    """

    def __init__(self, model: nn.Module, root: nn.Module | None = None, keep_gathered: bool = False) -> None:
        self.model = model
        self.root = root
        self.keep_gathered = keep_gathered

    @property
    def sharded(self) -> bool:
        return self.root is not None

    def __call__(self, fn, *args, **kwargs):
        if self.root is None:
            return fn(self.model, *args, **kwargs)
        return self.root(fn, *args, **kwargs)

    def release(self) -> None:
        """Free the parameters a ``keep_gathered`` forward/backward left gathered (call before optimizer.step)."""
        if self.root is None or not self.keep_gathered:
            return
        from torch.distributed.fsdp import FSDPModule

        for m in self.root.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def shard_for_calls(model: nn.Module, info: DistInfo, keep_gathered: bool = False, mp_policy=None) -> ModelRunner:
    """Shard ``model`` in place with FSDP2 (each decoder layer a group, the rest under a call root) -> its runner.

    World size 1: nothing is sharded; the runner calls functions on the model as they are.

    ``keep_gathered``: layers keep their gathered parameters from the forward until ``runner.release()`` (FSDP2's
    ``reshard_after_forward=False`` and ``reshard_after_backward=False``). Needed by the shared-prompt forward
    without gradient checkpointing: it reads each layer's keys/values from a cache that is not among the layer's
    outputs, so their backward can run before FSDP2's per-layer pre-backward hook re-gathers the weights
    (measured: "setStorage ... storage of size 0"). Cost: every layer's full parameters live through the forward
    and backward of a step (gradients and optimizer state stay sharded). With gradient checkpointing the layers
    recompute, and re-gather, in backward: then it is not needed.

    After it, the model's parameters are DTensors; build the optimizer over them, and run every forward through the
    runner (calling the model directly would meet un-gathered root parameters).
    """
    if info.world_size == 1:
        return ModelRunner(model)
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kwargs = _shard_layers(model, info, not keep_gathered, mp_policy)
    root = _CallRoot(model)
    fully_shard(root, **kwargs)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            _sum_gradients(m)
            if keep_gathered:
                m.set_reshard_after_backward(False)
    return ModelRunner(model, root, keep_gathered)


# ---------------------------------------------------------------------------------------------- engine weights
def _layer_key(name: str) -> str:
    """The decoder layer a weight belongs to ("model.layers.3"), or "" for the rest (embeddings, norm, head)."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ""


def engine_weight_chunks(model: nn.Module, changed: Collection[str] | None = None
                         ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The rollout engine's weights (`models.policy.engine_weights`) of a sharded model, one decoder layer at a time.

    Yields lists of ``(hf_name, whole tensor)``: the weights outside decoder layers (embeddings, final norm, LM
    head) and each decoder layer as one chunk, so fused engine layers (q/k/v, gate/up) arrive whole. Each tensor is
    gathered when its chunk is complete and dropped after the caller consumed the chunk: peak extra memory is one
    layer, never the model. LoRA weights are merged out of place on the shards (peft's ``get_delta_weight`` runs
    on DTensors) before the gather. A tied weight is sent once, under its first name (engines fold the tied head
    into the embedding). ``changed``: names that may have changed since the previous sync (None: all): only chunks
    holding one of them are gathered and yielded (whole, so fused layers stay complete).

    A collective: every rank must consume every chunk, in order.
    """
    from rlswift.models.policy import engine_weights

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    unique = {n for n, _ in base.named_parameters()}
    aliases = {n for n, _ in base.named_parameters(remove_duplicate=False) if n not in unique}  # a tied head
    pending: list[tuple[str, torch.Tensor]] = []
    key: str | None = None

    def flush():
        if pending and (changed is None or any(n in changed for n, _ in pending)):
            return [(n, full_tensor(t)) for n, t in pending]
        return None

    with torch.no_grad():
        for name, t in engine_weights(model):
            k = _layer_key(name)
            if key is not None and k != key:
                out = flush()
                pending = []
                if out is not None:
                    yield out
            key = k
            if name not in aliases:
                pending.append((name, t))
        out = flush()
        if out is not None:
            yield out
