"""Device choice and precision modes, on the CPU: clear errors, what each mode stores, and why bf16-mixed is the default."""

from __future__ import annotations

import pytest
import torch

from rlswift.models import load_policy
from rlswift.models.device import (
    DeviceError,
    autocast,
    enable_gradient_checkpointing,
    peak_memory,
    resolve_device,
    resolve_precision,
)


def test_device_names_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for name in ("cuda", "cuda:0"):
            with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
                resolve_device(name)
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(DeviceError, match="trains on cpu or cuda"):
        resolve_device("meta")


def test_precision_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu).name == "fp32"
    mixed = resolve_precision("auto", cuda)
    assert (mixed.name, mixed.param_dtype, mixed.autocast_dtype, mixed.engine_dtype) == \
        ("bf16-mixed", torch.float32, torch.bfloat16, "bfloat16")
    pure = resolve_precision("bf16", cpu)
    assert (pure.param_dtype, pure.autocast_dtype) == (torch.bfloat16, None)
    with pytest.raises(DeviceError, match="choose auto, fp32, bf16-mixed, bf16"):
        resolve_precision("fp16", cpu)
    assert "peak_rss_gib" in peak_memory(cpu)


def _changed_fraction(model_dir, precision_name: str, lr: float) -> float:
    """Fraction of weight elements that one AdamW step at ``lr`` actually changes."""
    device = torch.device("cpu")
    precision = resolve_precision(precision_name, device)
    model = load_policy(model_dir, dtype=precision.param_dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.arange(2, 34).view(2, 16)
    with autocast(device, precision):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    return changed / sum(b.numel() for b in before)


def test_a_tiny_learning_rate_moves_the_weights_in_mixed_precision_not_in_pure_bf16(tiny_model_dir):
    # AdamW's first step moves every weight with a gradient by about lr; fp32 master weights keep it, bf16 weights
    # (8 bits of mantissa) round it away unless |w| < ~lr * 256.
    mixed = _changed_fraction(tiny_model_dir, "bf16-mixed", lr=1e-6)
    pure = _changed_fraction(tiny_model_dir, "bf16", lr=1e-6)
    assert mixed > 0.9
    assert pure < 0.2
    with autocast(torch.device("cpu"), resolve_precision("bf16-mixed", torch.device("cpu"))):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    ids = torch.arange(2, 34).view(2, 16)
    grads = []
    for gc in (False, True):
        model = load_policy(tiny_model_dir, lora_rank=4, seed=0)
        if gc:
            enable_gradient_checkpointing(model)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert len(grads[0]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
