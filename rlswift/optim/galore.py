"""GaLore and Q-GaLore optimizers whose whole state (projection matrices, update intervals) checkpoints exactly.

The maths comes from the libraries made for them: `galore-torch` (GaLoreAdamW, GaLoreProjector) and
`q-galore-torch` (its INT4-quantized, adaptive-interval GaLoreProjector), with 8-bit Adam states from
`bitsandbytes`. Three things are added here:

1. Projector state. The libraries keep a projector OBJECT in each parameter's optimizer state, which rlswift's
   pickle-free codec refuses. `state_dict()` stores each projector as its plain fields (tensors, numbers, the
   Q-GaLore cosine queue as a list) and `load_state_dict()` rebuilds the object, refusing fields this version
   of the library would not have.
2. The 8-bit step loop. galore-torch 1.0's GaLoreAdamW8bit and q-galore-torch 1.0's AdamW8bit were written for
   bitsandbytes < 0.45; with bitsandbytes 0.50 they fail or misbehave:
     - both call `torch.cuda.synchronize()` after every parameter: on CPU torch that raises
       `AssertionError: Torch not compiled with CUDA enabled`;
     - both pass `percentile_clipping=100, block_wise=True` positionally, which bitsandbytes 0.50's
       Optimizer2State reads as `max_unorm=100, skip_zeros=True`;
     - q-galore's own `update_step` reads `config["percentile_clipping"]` (`KeyError: 'percentile_clipping'`)
       and calls the pre-0.45 `F.optimizer_update_8bit_blockwise` signature.
   `_BnbGaLore.step` below is their loop, unchanged in arithmetic (project -> bitsandbytes 8-bit Adam update of
   the low-rank gradient with weight decay off -> project back -> decoupled weight decay on the full weight),
   calling bitsandbytes' own `Optimizer2State.update_step`, syncing only on accelerators, and leaving `p.grad`
   as the full-rank gradient it found (the libraries leave the low-rank one and, in galore-torch, a full copy of
   the weight in `p.saved_data`). `tests/test_optim.py` checks it equals galore-torch's loop bit for bit.
3. Q-GaLore here is its optimizer half (INT4 projection, layer-adaptive update interval, 8-bit Adam states).
   Its INT8 weights need the repo's quantized Linear modules (`p.float_grad`); they are not supported.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Iterator

import torch

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "QGaLoreAdamW8bit", "galore_adamw_class", "galore_adamw_8bit_class",
           "q_galore_adamw_8bit_class", "compact_projector", "import_bitsandbytes"]


def import_bitsandbytes():
    """Import bitsandbytes, silencing its CPU backend's note about an optional 4-bit matmul kernel package."""
    quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise ImportError(f"the 8-bit optimizers need bitsandbytes: pip install 'rlswift[optim]' ({e})") from e
    finally:
        quiet.setLevel(level)
    return bitsandbytes


def _import_galore():
    import_bitsandbytes()  # galore_torch imports bitsandbytes at import time
    try:
        import galore_torch
    except ImportError as e:
        raise ImportError(f"GaLore optimizers need galore-torch: pip install 'rlswift[optim]' ({e})") from e
    return galore_torch


def _import_q_galore():
    import_bitsandbytes()
    try:
        from q_galore_torch import q_galore_projector
    except ImportError as e:
        raise ImportError(f"Q-GaLore needs q-galore-torch: pip install 'rlswift[optim]' ({e})") from e
    return q_galore_projector


def _check_field(name: str, value: Any, where: str) -> None:
    """Projector fields must be values the checkpoint codec stores; say which one is not."""
    ok = (value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size))
          or (isinstance(value, list) and all(isinstance(v, (int, float, torch.Tensor)) for v in value)))
    if not ok:
        raise TypeError(f"{where}: projector field {name!r} has type {type(value).__name__}, which a checkpoint "
                        "cannot store; this GaLore library version is not supported by rlswift.optim")


class _ProjectorState:
    """Mixin for optimizers that keep a projector object at `state[p]["projector"]` (GaLore's convention)."""

    def _new_projector(self, group: dict) -> Any:
        raise NotImplementedError

    def state_dict(self) -> dict:
        sd = super().state_dict()
        states = {}
        for index, s in sd["state"].items():
            if isinstance(s, dict) and "projector" in s:
                fields = {}
                for k, v in vars(s["projector"]).items():
                    _check_field(k, v, f"optimizer state of parameter {index}")
                    fields[k] = list(v) if isinstance(v, list) else v  # Q-GaLore's queue changes in place
                s = {**s, "projector": fields}  # a new dict: the live state keeps its projector object
            states[index] = s
        sd["state"] = states
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        states, projectors = {}, {}
        for index, s in state_dict["state"].items():
            if isinstance(s, dict) and "projector" in s:
                s = dict(s)
                projectors[index] = s.pop("projector")
            states[index] = s
        super().load_state_dict({**state_dict, "state": states})
        slots = [(p, g) for g in self.param_groups for p in g["params"]]
        for index, fields in projectors.items():
            p, group = slots[index]
            self.state[p]["projector"] = self._restore_projector(fields, group, p.device, index)

    def _restore_projector(self, fields: dict, group: dict, device: torch.device, index: int) -> Any:
        proj = self._new_projector(group)
        expected, saved = set(vars(proj)), set(fields)
        if expected != saved:
            raise ValueError(
                f"optimizer state of parameter {index}: the checkpoint's {type(proj).__name__} has fields "
                f"{sorted(saved)}, the installed library's has {sorted(expected)}; resume with the GaLore library "
                "version that wrote the checkpoint")
        for k, v in fields.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device)
            elif isinstance(v, list):
                v = [x.to(device) if isinstance(x, torch.Tensor) else x for x in v]
            setattr(proj, k, v)
        return proj


@functools.cache
def compact_projector(projector_cls: type) -> type:
    """`projector_cls` whose SVD factors are kept as compact row-major copies.

    torch's CPU SVD returns U and Vh column-major, and the libraries keep `U[:, :rank]` / `Vh[:rank]` as views:
    the whole U or Vh stays allocated, and a checkpoint (which stores dense row-major tensors) would bring them
    back with other strides, which changes the bits of later matmuls (measured: proj_type='full' drifted by 2e-4
    after 4 resumed steps). A fresh row-major copy is what a restore produces too, so live and resumed runs match.
    """

    class Compact(projector_cls):
        def get_orthogonal_matrix(self, weights, rank, type):
            out = super().get_orthogonal_matrix(weights, rank, type)
            if isinstance(out, list):
                return [t.clone(memory_format=torch.contiguous_format) for t in out]
            return out.clone(memory_format=torch.contiguous_format)

    Compact.__name__ = Compact.__qualname__ = projector_cls.__name__
    Compact.__module__ = __name__
    return Compact


@functools.cache
def galore_adamw_class():
    """galore-torch's 32-bit GaLoreAdamW (it runs on CPU as shipped) with checkpointable projector state."""
    galore_torch = _import_galore()

    class GaLoreAdamW(_ProjectorState, galore_torch.GaLoreAdamW):
        """galore_torch.GaLoreAdamW; `state_dict()` holds only tensors and plain values."""

        def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             no_deprecation_warning=True)

        def _new_projector(self, group: dict) -> Any:
            return compact_projector(galore_torch.galore_projector.GaLoreProjector)(
                group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                proj_type=group["proj_type"])

        @torch.no_grad()
        def step(self, closure=None):
            # galore-torch's step makes a projector only where none exists: give it ours first.
            for group in self.param_groups:
                if "rank" in group:
                    for p in group["params"]:
                        if p.grad is not None and "projector" not in self.state[p]:
                            self.state[p]["projector"] = self._new_projector(group)
            return super().step(closure)

    return GaLoreAdamW


@contextlib.contextmanager
def _swapped(p: torch.Tensor, data: torch.Tensor, grad: torch.Tensor) -> Iterator[None]:
    """Let bitsandbytes update a low-rank stand-in through `p`, then put the weight and full gradient back."""
    weight, full_grad = p.data, p.grad
    p.data, p.grad = data, grad
    try:
        yield
    finally:
        p.data, p.grad = weight, full_grad


@functools.cache
def _bnb_galore_base():
    import_bitsandbytes()
    from bitsandbytes.optim.optimizer import Optimizer2State
    from bitsandbytes.utils import sync_gpu

    class _BnbGaLore(_ProjectorState, Optimizer2State):
        """8-bit AdamW (bitsandbytes) with GaLore projection for groups that carry a "rank" key."""

        def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                     min_8bit_size: int = 4096):
            super().__init__("adam", params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=8,
                             min_8bit_size=min_8bit_size)

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if "rank" in group:
                        self._galore_update(group, p, gindex, pindex)
                    else:  # a plain 8-bit AdamW step, as bitsandbytes' own step does it
                        if len(self.state[p]) == 0:
                            self.init_state(group, p, gindex, pindex)
                        self.prefetch_state(p)
                        self.update_step(group, p, gindex, pindex)
                        sync_gpu(p)
            return loss

        def _galore_update(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
            state = self.state[p]
            state.setdefault("step", 0)
            if "projector" not in state:
                state["projector"] = self._new_projector(group)
            low_rank_grad = state["projector"].project(p.grad, state["step"])
            # bitsandbytes adds -lr * adam_direction to p.data: starting from zeros leaves exactly the update.
            update = torch.zeros_like(low_rank_grad, dtype=p.dtype)
            decay, group["weight_decay"] = group["weight_decay"], 0.0  # decay applies to the full weight below
            try:
                with _swapped(p, update, low_rank_grad):
                    if "state1" not in state:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
                    sync_gpu(p)
                    update = p.data  # update_step may have made p.data contiguous (a new tensor)
            finally:
                group["weight_decay"] = decay
            p.data.add_(state["projector"].project_back(update))
            if decay > 0:
                p.data.add_(p.data, alpha=-group["lr"] * decay)

    return _BnbGaLore


@functools.cache
def galore_adamw_8bit_class():
    """GaLore with bitsandbytes 8-bit AdamW states; projector from galore-torch."""
    galore_torch = _import_galore()
    base = _bnb_galore_base()

    class GaLoreAdamW8bit(base):
        def _new_projector(self, group: dict) -> Any:
            return compact_projector(galore_torch.galore_projector.GaLoreProjector)(
                group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                proj_type=group["proj_type"])

    return GaLoreAdamW8bit


@functools.cache
def q_galore_adamw_8bit_class():
    """Q-GaLore: q-galore-torch's INT-n projector with adaptive update interval, bitsandbytes 8-bit AdamW states."""
    q_proj = _import_q_galore()
    base = _bnb_galore_base()

    class QGaLoreAdamW8bit(base):
        def _new_projector(self, group: dict) -> Any:
            return compact_projector(q_proj.GaLoreProjector)(
                group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                proj_type=group["proj_type"], quant=group["quant"], group_size=group["quant_group_size"],
                n_bit=group["quant_n_bit"], cos_threshold=group["cos_threshold"], gamma_proj=group["gamma_proj"],
                queue_size=group["queue_size"])

    return QGaLoreAdamW8bit


def __getattr__(name: str):
    # `from rlswift.optim.galore import GaLoreAdamW` works without importing the libraries at module import.
    makers = {"GaLoreAdamW": galore_adamw_class, "GaLoreAdamW8bit": galore_adamw_8bit_class,
              "QGaLoreAdamW8bit": q_galore_adamw_8bit_class}
    if name in makers:
        return makers[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
