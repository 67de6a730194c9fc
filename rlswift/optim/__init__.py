"""Optimizers by name, each a `torch.optim.Optimizer` whose `state_dict()` checkpoints exactly.

    optimizer = build_optimizer("galore_adamw_8bit", model, lr=1e-5, weight_decay=0.0, rank=128)
    scheduler = LambdaLR(optimizer, ...)            # any torch scheduler, clip_grad_norm_ on the params
    registry.register("optimizer", optimizer)       # the optimizer itself is the state hook

Names (transformers' / TRL's `optim` names where they exist; aliases in parentheses):
  adamw                  torch AdamW, fused kernel where the device has one (CPU, CUDA, ...), else foreach
                         (adamw_torch_fused forces fused; adamw_torch is torch's own default choice)
  adamw_8bit             bitsandbytes AdamW8bit: block-wise 8-bit moments (adamw_bnb_8bit)
  galore_adamw           galore-torch GaLoreAdamW: low-rank projected moments for the target Linear weights
  galore_adamw_8bit      GaLore with bitsandbytes 8-bit moments
  q_galore_adamw_8bit    Q-GaLore: INT4-quantized projection, adaptive update interval, 8-bit moments
A dotted path (`my_pkg.optim.make`) names a factory with the same signature as the built-ins:
`factory(model_or_named_params, *, lr, weight_decay, **options) -> torch.optim.Optimizer`. docs/optimizers.md
documents every option.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import torch

from rlswift.registry import Registry

__all__ = ["OPTIMIZERS", "build_optimizer", "register_optimizer", "named_trainable", "galore_targets",
           "galore_param_groups", "target_module_matches", "adamw_implementation", "GALORE_PROJ_TYPES"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
GALORE_PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for-loop", "torch-default")


def register_optimizer(name: str, factory: OptimizerFactory) -> OptimizerFactory:
    """Add a factory under `name` (refused when taken; the error lists the registered names)."""
    return OPTIMIZERS.register(name, factory)


def build_optimizer(
    name: str,
    model_or_named_params: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
    lr: float,
    weight_decay: float = 0.0,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    implementation: str | None = None,
    min_8bit_size: int = 4096,
    target_modules: str | list[str] = "all-linear",
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    proj_bits: int = 4,
    proj_group_size: int = 256,
    cos_threshold: float = 0.4,
    gamma_proj: float = 2,
    queue_size: int = 5,
) -> torch.optim.Optimizer:
    """The optimizer `name` over the trainable parameters of a model (or of `(name, param)` pairs).

    Options only some optimizers read (others ignore them): `implementation` (adamw: fused|foreach|for-loop|
    torch-default, default fused where supported), `min_8bit_size` (8-bit: tensors with fewer elements keep fp32
    moments), GaLore's `target_modules` (transformers' `optim_target_modules` convention), `rank`,
    `update_proj_gap`, `scale`, `proj_type`, and Q-GaLore's `proj_bits`, `proj_group_size`, `cos_threshold`,
    `gamma_proj`, `queue_size`. Each option is described in docs/optimizers.md.
    """
    factory = OPTIMIZERS.get(name)
    if not callable(factory):
        raise TypeError(f"optimizer {name!r} resolved to {factory!r}, which is not callable; a dotted path must name "
                        "a factory(model_or_named_params, *, lr, weight_decay, **options)")
    optimizer = factory(model_or_named_params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                        implementation=implementation, min_8bit_size=min_8bit_size, target_modules=target_modules,
                        rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                        proj_bits=proj_bits, proj_group_size=proj_group_size, cos_threshold=cos_threshold,
                        gamma_proj=gamma_proj, queue_size=queue_size)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer factory {name!r} returned {type(optimizer).__name__}, not a "
                        "torch.optim.Optimizer (schedulers and grad clipping need one)")
    return optimizer


# ------------------------------------------------------------------------------------------ parameters


def named_trainable(model_or_named_params: Any) -> tuple[list[tuple[str, torch.nn.Parameter]], torch.nn.Module | None]:
    """(trainable `(name, param)` pairs, the model or None) from a model or from named parameters."""
    if isinstance(model_or_named_params, torch.nn.Module):
        model = model_or_named_params
        named = list(model.named_parameters())
    else:
        model = None
        named = list(model_or_named_params)
        bad = [x for x in named if not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                                       and isinstance(x[1], torch.Tensor))]
        if bad:
            raise TypeError(f"expected a model or (name, parameter) pairs such as model.named_parameters(); got "
                            f"{type(bad[0]).__name__} items")
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters (all have requires_grad=False); unfreeze some or pass another model")
    return named, model


def target_module_matches(target_modules: str | list[str], module_name: str) -> bool:
    """transformers' `optim_target_modules` rule: a str is a regex that must match the whole name; a list matches
    a name equal to an entry, containing an entry, or fully matching an entry as a regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    return (module_name in target_modules or any(t in module_name for t in target_modules)
            or any(re.fullmatch(t, module_name) for t in target_modules))


def galore_targets(model_or_named_params: Any, target_modules: str | list[str]) -> list[str]:
    """Names of the trainable nn.Linear weights GaLore projects ("all-linear": every trainable Linear weight)."""
    if not isinstance(target_modules, (str, list)) or (isinstance(target_modules, list)
                                                      and not all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules must be 'all-linear', a regex string or a list of strings, got "
                        f"{target_modules!r}")
    named, model = named_trainable(model_or_named_params)
    trainable = dict(named)
    all_linear = isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    if model is not None:
        candidates = [f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
                      if isinstance(mod, torch.nn.Linear)]
    elif all_linear:
        raise ValueError("target_modules='all-linear' needs the model to tell Linear layers from embeddings; pass "
                         "the model, or name the modules (e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj'])")
    else:  # named parameters only: every 2-D "<module>.weight" may be a Linear weight
        candidates = [n for n, p in named if n.endswith(".weight") and p.dim() == 2]
    names = [n for n in candidates if n in trainable
             and (all_linear or target_module_matches(target_modules, n.removesuffix(".weight")))]
    if not names:
        linear = sorted({n.removesuffix(".weight") for n in candidates if n in trainable})[:8]
        raise ValueError(f"target_modules={target_modules!r} matches no trainable Linear weight; Linear modules "
                         f"look like: {', '.join(linear) or '(none trainable)'} (use 'all-linear', a regex over the "
                         "full module name, or a list of name parts)")
    return names


def galore_param_groups(model_or_named_params: Any, target_modules: str | list[str], **galore: Any) -> list[dict]:
    """[other params (plain AdamW), target Linear weights (with the GaLore keys)], as transformers builds them."""
    named, _ = named_trainable(model_or_named_params)
    targets = set(galore_targets(model_or_named_params, target_modules))
    rest = [p for n, p in named if n not in targets]
    low_rank = [p for n, p in named if n in targets]
    return ([{"params": rest}] if rest else []) + [{"params": low_rank, **galore}]


def _check_galore(rank: int, update_proj_gap: int, scale: float, proj_type: str) -> None:
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"GaLore rank={rank!r}: give a positive int (transformers' default is 128)")
    if not (isinstance(update_proj_gap, int) and update_proj_gap >= 1):
        raise ValueError(f"update_proj_gap={update_proj_gap!r}: give a positive int (steps between SVDs; default 200)")
    if not scale > 0:
        raise ValueError(f"GaLore scale={scale!r}: give a positive float (default 0.25)")
    if proj_type not in GALORE_PROJ_TYPES:
        raise ValueError(f"proj_type={proj_type!r}: choose one of {', '.join(GALORE_PROJ_TYPES)}")


# ------------------------------------------------------------------------------------------ built-in factories


def adamw_implementation(params: list[torch.Tensor]) -> str:
    """"fused" when torch has a fused AdamW for every parameter's device and dtype, else "foreach"."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: the devices it has had fused AdamW for since 2.4
        devices = {"cpu", "cuda", "xpu", "mps"}
    ok = all(p.device.type in devices and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
             for p in params)
    return "fused" if ok else "foreach"


def _adamw(model_or_named_params, *, lr, weight_decay, betas, eps, implementation=None, **_) -> torch.optim.Optimizer:
    params = [p for _, p in named_trainable(model_or_named_params)[0]]
    impl = implementation or adamw_implementation(params)
    if impl not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"implementation={impl!r}: choose one of {', '.join(ADAMW_IMPLEMENTATIONS)}")
    kw = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False},
          "torch-default": {}}[impl]
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kw)


def _adamw_torch(model_or_named_params, **kw) -> torch.optim.Optimizer:
    return _adamw(model_or_named_params, **{**kw, "implementation": "torch-default"})


def _adamw_fused(model_or_named_params, **kw) -> torch.optim.Optimizer:
    return _adamw(model_or_named_params, **{**kw, "implementation": "fused"})


def _adamw_8bit(model_or_named_params, *, lr, weight_decay, betas, eps, min_8bit_size=4096, **_):
    from rlswift.optim.galore import import_bitsandbytes

    bnb = import_bitsandbytes()
    params = [p for _, p in named_trainable(model_or_named_params)[0]]
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                               min_8bit_size=min_8bit_size)


def _galore_adamw(model_or_named_params, *, lr, weight_decay, betas, eps, target_modules, rank, update_proj_gap,
                  scale, proj_type, **_):
    from rlswift.optim.galore import galore_adamw_class

    _check_galore(rank, update_proj_gap, scale, proj_type)
    groups = galore_param_groups(model_or_named_params, target_modules, rank=rank, update_proj_gap=update_proj_gap,
                                 scale=scale, proj_type=proj_type)
    return galore_adamw_class()(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _galore_adamw_8bit(model_or_named_params, *, lr, weight_decay, betas, eps, target_modules, rank,
                       update_proj_gap, scale, proj_type, min_8bit_size=4096, **_):
    from rlswift.optim.galore import galore_adamw_8bit_class

    _check_galore(rank, update_proj_gap, scale, proj_type)
    groups = galore_param_groups(model_or_named_params, target_modules, rank=rank, update_proj_gap=update_proj_gap,
                                 scale=scale, proj_type=proj_type)
    return galore_adamw_8bit_class()(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                     min_8bit_size=min_8bit_size)


def _q_galore_adamw_8bit(model_or_named_params, *, lr, weight_decay, betas, eps, target_modules, rank,
                         update_proj_gap, scale, proj_type, proj_bits, proj_group_size, cos_threshold, gamma_proj,
                         queue_size, min_8bit_size=4096, **_):
    from rlswift.optim.galore import q_galore_adamw_8bit_class

    _check_galore(rank, update_proj_gap, scale, proj_type)
    if proj_type != "std":
        raise ValueError(f"q_galore_adamw_8bit supports proj_type='std' only (q-galore-torch), got {proj_type!r}")
    if not (isinstance(proj_bits, int) and 1 <= proj_bits <= 8):
        raise ValueError(f"proj_bits={proj_bits!r}: give an int in 1..8 (Q-GaLore uses 4)")
    if not (isinstance(queue_size, int) and queue_size >= 1):
        raise ValueError(f"queue_size={queue_size!r}: give a positive int (default 5)")
    named, _ = named_trainable(model_or_named_params)
    shapes = dict((n, p.shape) for n, p in named)
    for n in galore_targets(model_or_named_params, target_modules):
        short = min(shapes[n])
        numel = short * min(rank, short)  # elements of the projection matrix q-galore quantizes in groups
        if proj_group_size > 0 and numel % proj_group_size:
            fit = max(d for d in range(1, proj_group_size + 1) if numel % d == 0)
            raise ValueError(f"proj_group_size={proj_group_size} does not divide the {numel} elements of the "
                             f"projection matrix of {n} (shape {tuple(shapes[n])}, rank {rank}); pick a divisor "
                             f"of {numel} (e.g. {fit}) or proj_group_size=-1 (one group per row)")
    groups = galore_param_groups(model_or_named_params, target_modules, rank=rank, update_proj_gap=update_proj_gap,
                                 scale=scale, proj_type=proj_type, quant=True, quant_n_bit=proj_bits,
                                 quant_group_size=proj_group_size, cos_threshold=cos_threshold,
                                 gamma_proj=gamma_proj, queue_size=queue_size)
    return q_galore_adamw_8bit_class()(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       min_8bit_size=min_8bit_size)


for _name, _factory in [("adamw", _adamw), ("adamw_torch", _adamw_torch), ("adamw_torch_fused", _adamw_fused),
                        ("adamw_8bit", _adamw_8bit), ("adamw_bnb_8bit", _adamw_8bit),
                        ("galore_adamw", _galore_adamw), ("galore_adamw_8bit", _galore_adamw_8bit),
                        ("q_galore_adamw_8bit", _q_galore_adamw_8bit)]:
    register_optimizer(_name, _factory)
