"""Where the policy trains and in which precision: device choice, fp32-master mixed precision, memory readings.

Precision modes (as TRL and torchtune users know them):
- ``fp32``: weights, gradients, optimizer state and compute in float32 (the CPU default: exact and, on CPUs
  without bf16 units, also the fastest).
- ``bf16-mixed``: float32 master weights and optimizer state, forward/backward under ``torch.autocast(bfloat16)``
  (the GPU default; TRL's ``bf16=True``). Small updates are not rounded away.
- ``bf16``: weights and optimizer state stored in bfloat16 (half the memory of the weights and moments); updates
  smaller than a bf16 ulp of a weight round away (at lr 1e-6 most of them do), so use it only to fit memory.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from rlswift.errors import RlswiftError

PrecisionName = Literal["auto", "fp32", "bf16-mixed", "bf16"]


class DeviceError(RlswiftError):
    """The requested device is not available (e.g. device=cuda on a machine without a CUDA GPU)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device={name!r}: rlswift trains on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device={name!r} but torch sees no CUDA GPU here (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use device=cpu or device=auto, or install a CUDA build of torch"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Precision:
    """A resolved precision mode: how weights are stored, how compute runs, and the rollout engine's dtype."""

    name: str  # fp32 | bf16-mixed | bf16
    param_dtype: torch.dtype  # storage of weights, grads and optimizer moments
    autocast_dtype: torch.dtype | None  # forward/backward compute dtype under autocast (None: no autocast)
    engine_dtype: str  # dtype name for the rollout engine ("float32" | "bfloat16")


_PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, None, "float32"),
    "bf16-mixed": Precision("bf16-mixed", torch.float32, torch.bfloat16, "bfloat16"),
    "bf16": Precision("bf16", torch.bfloat16, None, "bfloat16"),
}


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto`` is ``bf16-mixed`` on CUDA and ``fp32`` on CPU; the others as named."""
    if name == "auto":
        name = "bf16-mixed" if device.type == "cuda" else "fp32"
    if name not in _PRECISIONS:
        raise DeviceError(f"precision={name!r} is not a precision; choose auto, {', '.join(_PRECISIONS)}")
    return _PRECISIONS[name]


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The compute context of a training forward/backward: ``torch.autocast`` for mixed precision, else nothing."""
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (transformers' non-reentrant checkpointing).

    Non-reentrant checkpointing needs no input that requires grad (so it works with LoRA's frozen embeddings) and
    restores the RNG state for the recomputation, so dropout draws the same numbers: results stay exact.
    """
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise RlswiftError(f"{type(target).__name__} does not support gradient checkpointing; set "
                           "gradient_checkpointing=false")
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    target.config.use_cache = False


@contextlib.contextmanager
def deterministic_kernels(enabled: bool = True):
    """Within the block, bit-reproducible training kernels across processes; the previous mode is restored after.

    Measured on an H200 (docs/reproducibility.md): SDPA's flash and memory-efficient attention backward are
    non-deterministic unless torch's deterministic algorithms are on in strict mode (warn_only=True keeps the
    non-deterministic kernels), so two processes computed different gradients from the same batch. Strict mode is
    turned on only around training: vLLM's sampling and compilation use ops that have no deterministic variant.
    cuDNN attention is turned off too (its backward has no deterministic mode).
    """
    if not enabled:
        yield
        return
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_sdp = torch.backends.cuda.cudnn_sdp_enabled() if torch.cuda.is_available() else None
    torch.use_deterministic_algorithms(True)
    if cudnn_sdp is not None:
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        if cudnn_sdp is not None:
            torch.backends.cuda.enable_cudnn_sdp(cudnn_sdp)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (per step) on CUDA; a no-op on CPU (RSS peaks are per process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory since the last `reset_peak_memory`, in GiB: CUDA allocated/reserved, or the process's peak RSS."""
    gib = 1024**3
    if device.type == "cuda":
        return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 3)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_rss_gib": round(rss_bytes / gib, 3)}


def describe(device: torch.device, precision: Precision) -> str:
    """'cuda:0 (NVIDIA H200), bf16-mixed' for the start line."""
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    return f"{where}, {precision.name}"
