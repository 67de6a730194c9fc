"""Policy and reference loading (transformers + optional peft LoRA), checkpoint state and engine weight export.

Exact resume rests on three rules here:
- LoRA initialisation draws from a forked, explicitly seeded torch stream, never from the caller's global stream.
- The checkpoint stores exactly what training changes: every parameter for full fine-tuning, only the trainable
  adapter tensors for LoRA (the base is re-loaded from the model folder, bit-identical).
- Weights for the rollout engine are merged OUT OF PLACE (W + delta into a new tensor). peft's merge/unmerge mutates
  the base in place and `W + d - d != W` in floating point, so a resumed run (which never merged) would differ.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from rlswift.errors import MissingError
from rlswift.state.rng import forked_seed

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (float32/fp32, bfloat16/bf16, float16/fp16) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def is_peft_model(model: torch.nn.Module) -> bool:
    """True when ``model`` is a peft-wrapped model (LoRA)."""
    if "peft" not in sys.modules:  # a model can only be wrapped once peft was imported; importing it takes seconds
        return False
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep full fine-tuning usable without it
        return False
    return isinstance(model, PeftModel)


def load_policy(
    path: str | Path,
    dtype: str = "float32",
    lora_rank: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: str | list[str] = "all-linear",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Load a causal LM from a local folder; wrap it with peft LoRA when ``lora_rank > 0``.

    The LoRA A matrices are initialised under ``torch.random.fork_rng`` seeded with ``seed``: the same seed gives the
    same adapter, and the caller's global torch RNG state is left untouched. The model is moved to ``device``
    before the adapter is made (LoRA init runs where the weights are). It is returned in eval mode
    (the recipe switches it to train mode); with LoRA only the adapter tensors require grad.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MissingError(f"{folder} is not a model folder (no config.json); pass a folder made by save_pretrained")
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {lora_rank}")
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch_dtype(dtype), attn_implementation=attn_implementation
    ).to(device)
    model.eval()
    if lora_rank == 0:
        return model

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    # Seed every device the model lives on: kaiming init of lora_A runs on the base layer's device.
    with forked_seed(seed, {p.device.index for p in model.parameters() if p.device.type == "cuda"}):
        peft_model = get_peft_model(model, config)
    peft_model.eval()
    return peft_model


def load_tokenizer(path: str | Path) -> Any:
    """The model folder's tokenizer with a pad token (EOS if it had none) and left padding (for generation)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def policy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the checkpoint stores for the policy: the parameters (detached, not copied), keyed by name.

    Full fine-tuning: every parameter (tied weights once). LoRA: only the trainable adapter tensors; the frozen base
    is re-loaded from the model folder on resume. No copies: a sync save writes before it returns, and an async save
    fences the optimizer (its next step waits for the write), so a saved state never sees a later update.
    """
    return {name: p.detach() for name, p in policy_state_dict_names(model).items()}


def load_policy_state(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy a `policy_state_dict` back into ``model`` in place (bit-exact); names and shapes must match exactly."""
    expected = policy_state_dict_names(model)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"policy state does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)}). Resume with the same model and the same LoRA settings as the checkpoint."
        )
    with torch.no_grad():
        for name, param in expected.items():
            value = sd[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(
                    f"policy state {name!r} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
                )
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def policy_state_dict_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters `policy_state_dict` covers, by name (no copies)."""
    params = model.named_parameters()
    if is_peft_model(model):
        return {name: p for name, p in params if p.requires_grad}
    return dict(params)


def _strip_peft_name(name: str) -> str:
    # peft prefixes the HF model with "base_model.model." and moves wrapped weights under ".base_layer.".
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer.", ".")


def engine_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for every weight the rollout engine needs, LoRA merged out of place.

    Names are those of the model folder (``model.layers.0.self_attn.q_proj.weight``). Tied weights are yielded under
    EVERY name (``model.embed_tokens.weight`` and ``lm_head.weight``): vLLM's CPU reload does not re-tie the LM head,
    measured on the tiny model after changing the embeddings: logprob error 71 without ``lm_head.weight``, 0.0 with it.
    Full fine-tuning yields detached parameters (they share storage: consume them before the next optimizer step).
    For peft models each adapted weight is ``W + delta`` in a NEW tensor (delta from peft's ``get_delta_weight``,
    i.e. B @ A * scaling), computed in fp32 and cast to W's dtype; the model is not modified. A model whose adapter
    was merged in place (``merge_adapter``) is refused: its base no longer holds the loaded weights.
    """
    if not is_peft_model(model):
        # remove_duplicate=False: a tied parameter comes once per name it has.
        for name, p in model.named_parameters(remove_duplicate=False):
            yield name, p.detach()
        return

    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora_layers: dict[str, LoraLayer] = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    adapter_parts = tuple(f".{n}." for n in LoraLayer.adapter_layer_names)
    for layer_name, layer in lora_layers.items():
        if layer.merged:
            raise RuntimeError(
                f"LoRA layer {layer_name} has its adapter merged into the base weights (merge_adapter was called); "
                "engine_weights merges out of place and cannot work from merged weights. Reload the policy."
            )
        if any(a in layer.lora_variant for a in layer.active_adapters):
            raise NotImplementedError(f"{layer_name}: LoRA variants (DoRA, ...) are not supported by engine_weights")

    done: dict[int, torch.Tensor] = {}  # id(param) -> yielded tensor, so a tied weight is merged only once
    with torch.no_grad():
        for name, p in base.named_parameters(remove_duplicate=False):
            if any(part in name for part in adapter_parts):
                continue  # adapter tensors are folded into their base weight below
            if ".original_module." in name:
                continue  # modules_to_save: the trained copy is yielded instead
            clean = _strip_peft_name(name)
            clean = _strip_modules_to_save(clean, model.active_adapter)
            if id(p) not in done:
                if ".base_layer." in name:
                    layer_name, leaf = name.split(".base_layer.", 1)
                    done[id(p)] = _merged(lora_layers[layer_name], leaf, p)
                else:
                    done[id(p)] = p.detach()
            yield clean, done[id(p)]


def changed_engine_names(model: torch.nn.Module) -> list[str] | None:
    """Names of the engine weights (as `engine_weights` yields them) that training can change; None means all.

    Full fine-tuning: None. LoRA: each adapted layer's merged weight (and bias) and the trained copies of
    ``modules_to_save``; the frozen rest never changes, so an engine that already holds it needs only these.
    """
    if not is_peft_model(model):
        return None
    marker = f".modules_to_save.{model.active_adapter}."
    names = []
    for name, _ in model.get_base_model().named_parameters(remove_duplicate=False):
        if ".base_layer." in name or marker in name:
            names.append(_strip_modules_to_save(_strip_peft_name(name), model.active_adapter))
    return names


def _strip_modules_to_save(name: str, adapter: str) -> str:
    marker = f".modules_to_save.{adapter}."
    return name.replace(marker, ".")


def _merged(layer: Any, leaf: str, p: torch.Tensor) -> torch.Tensor:
    """``p`` plus the active adapters' contribution, as a new tensor (``p`` itself is never written)."""
    if layer.disable_adapters:
        return p.detach()
    out = p.detach().to(torch.float32, copy=True)
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue
        if leaf == "weight":
            out += layer.get_delta_weight(adapter).to(torch.float32)
        elif leaf == "bias" and layer.lora_bias.get(adapter, False):
            out += layer.lora_B[adapter].bias.to(torch.float32) * layer.scaling[adapter]
    return out.to(p.dtype)


def reference_logprobs_context(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """For a LoRA policy: a context in which the model computes the reference (base) logprobs, adapter disabled.

    Full fine-tuning has no adapter to switch off: use `make_reference` (a frozen copy) instead.
    """
    if not is_peft_model(model):
        raise TypeError(
            "reference_logprobs_context needs a LoRA (peft) policy; for full fine-tuning build the reference once "
            "with make_reference(policy) right after load_policy, before any training or checkpoint load"
        )
    return model.disable_adapter()


def make_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of a full fine-tuning policy (eval mode, requires_grad False) to serve as the reference.

    Call it on the freshly loaded policy, before training or `load_policy_state`: the reference must be the initial
    weights, also in a resumed run. LoRA policies use `reference_logprobs_context` (no copy needed).
    """
    if is_peft_model(model):
        raise TypeError(
            "make_reference copies full fine-tuning policies; a LoRA policy's reference is its base model: "
            "use `with reference_logprobs_context(policy): ...`"
        )
    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
