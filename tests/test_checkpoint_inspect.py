"""inspect_checkpoint / read_hook_states / compare_states / diff_checkpoints."""

import struct

import numpy as np
import pytest
import torch

from rlswift.checkpoint import (CheckpointError, CheckpointManager, compare_states, diff_checkpoints,
                                inspect_checkpoint, read_hook_states)
from test_checkpoint_manager import Box


def state(w_last=3.0, step=7):
    return {"model": Box({"w": torch.tensor([1.0, 2.0, w_last])}),
            "progress": Box({"step": step, "rng": (1, 2**70)}),
            "buf": Box({"arr": np.arange(3, dtype=np.int32)})}


def test_read_hook_states_without_hook_objects(tmp_path):
    out = CheckpointManager(tmp_path).save(4, state(), config={})
    st = read_hook_states(out)
    assert list(st) == ["model", "progress", "buf"]
    assert torch.equal(st["model"]["w"], torch.tensor([1.0, 2.0, 3.0]))
    assert st["progress"] == {"step": 7, "rng": (1, 2**70)}
    assert st["buf"]["arr"].dtype == np.int32


def test_read_hook_states_refuses_corrupt(tmp_path):
    out = CheckpointManager(tmp_path).save(4, state(), config={})
    (out / "hooks" / "progress.json").write_bytes(b"{}")
    with pytest.raises(CheckpointError, match="progress.json"):
        read_hook_states(out)


def test_compare_states_kinds_and_max_abs_diff():
    a = {"m": {"w": torch.tensor([1.0, 2.0]), "h": torch.zeros(2), "d": torch.zeros(2), "x": 1,
               "only_a": 0, "f": 0.0, "n": np.float32(1), "arr": np.array([1.0, 5.0]), "l": [1, 2]},
         "gone": {}}
    b = {"m": {"w": torch.tensor([1.0, 2.5]), "h": torch.zeros(3), "d": torch.zeros(2, dtype=torch.float64),
               "x": "1", "only_b": 0, "f": -0.0, "n": np.float32(1), "arr": np.array([1.0, 2.0]), "l": [1, 2, 3]}}
    diffs = {(d.hook, d.path): d for d in compare_states(a, b)}
    assert diffs[("m", "['w']")].kind == "value" and diffs[("m", "['w']")].max_abs_diff == 0.5
    assert diffs[("m", "['h']")].kind == "shape"
    assert diffs[("m", "['d']")].kind == "dtype"
    assert diffs[("m", "['x']")].kind == "type"
    assert diffs[("m", "['only_a']")].kind == "missing" and diffs[("m", "['only_b']")].kind == "missing"
    assert diffs[("m", "['f']")].kind == "value"  # -0.0 vs 0.0 differ bitwise
    assert diffs[("m", "['arr']")].max_abs_diff == 3.0
    assert diffs[("m", "['l']")].kind == "shape"
    assert diffs[("gone", "")].kind == "missing"
    assert ("m", "['n']") not in diffs
    assert len(diffs) == 10
    assert "max |diff| 0.5" in str(diffs[("m", "['w']")])


def test_compare_states_bitwise_nan():
    nan1 = struct.unpack("<d", bytes.fromhex("000000000000f87f"))[0]
    nan2 = struct.unpack("<d", bytes.fromhex("010000000000f87f"))[0]
    assert compare_states({"h": [nan1]}, {"h": [nan1]}) == []
    assert [d.kind for d in compare_states({"h": [nan1]}, {"h": [nan2]})] == ["value"]
    t = torch.tensor([float("nan"), 1.0])
    assert compare_states({"h": t}, {"h": t.clone()}) == []  # torch.equal would call these different


def test_diff_checkpoints_identical_and_different(tmp_path):
    a = CheckpointManager(tmp_path / "a").save(4, state(), config={"seed": 1})
    b = CheckpointManager(tmp_path / "b").save(4, state(), config={"seed": 1})
    report, same = diff_checkpoints(a, b)
    assert same and "identical: 3 hooks" in report
    c = CheckpointManager(tmp_path / "c").save(4, state(w_last=3.25, step=8), config={"seed": 1})
    report, same = diff_checkpoints(a, c)
    assert not same
    assert "first differing hook: 'model'" in report
    assert "max |diff| 0.25" in report and "['step']" in report


def test_inspect_checkpoint_text(tmp_path):
    out = CheckpointManager(tmp_path).save(4, state(), config={"model": "tiny", "lr": 1e-5},
                                           metrics={"reward": 0.5})
    text = inspect_checkpoint(out)
    assert "step: 4" in text and "checksums: OK" in text
    assert "model: model.json" in text and "model.safetensors" in text
    assert "torch=" in text and "python=" in text
    assert "lr: 1e-05" in text and "reward=0.5" in text
    (out / "hooks" / "buf.safetensors").write_bytes(b"xx")
    text = inspect_checkpoint(out)
    assert "checksums: 1 problem(s)" in text and "buf.safetensors" in text
