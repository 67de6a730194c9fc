"""CheckpointManager: atomic save layout, verified load, strictness, resume resolution, retention."""

import hashlib
import random
import warnings
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from rlswift.checkpoint import CheckpointError, CheckpointManager, FORMAT_VERSION, read_manifest, verify
from rlswift.checkpoint.manager import hook_file_stem
from rlswift.checkpoint.retention import best_checkpoint, select_deletions


class Box:
    """A minimal hook: holds any codec-able state; records load calls."""

    def __init__(self, state=None):
        self.state = state
        self.loaded = 0

    def state_dict(self):
        return self.state

    def load_state_dict(self, sd):
        self.state = sd
        self.loaded += 1


class RNGHook:
    def __init__(self, seed):
        self.py = random.Random(seed)
        self.np = np.random.default_rng(seed)

    def state_dict(self):
        return {"py": self.py.getstate(), "np": self.np.bit_generator.state}

    def load_state_dict(self, sd):
        self.py.setstate(sd["py"])
        self.np.bit_generator.state = sd["np"]


def make_hooks(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7))
    model[1].weight = model[0].weight  # tied embeddings: shared storage
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    return {"model": model, "optim": opt, "rng": RNGHook(seed), "progress": Box({"step": 3, "big": 2**100})}


def test_save_layout_manifest_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    hooks = make_hooks()
    out = mgr.save(5, hooks, config={"lr": 0.01, "model": "tiny"}, metrics={"reward": 0.5})
    assert out == tmp_path / "checkpoint-5" and out.is_dir()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-5"
    assert mgr.latest_pointer() == out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
    m = read_manifest(out)
    assert m["format_version"] == FORMAT_VERSION == 2 and m["step"] == 5
    assert m["world_size"] == 1 and m["rank"] == 0
    assert m["config"] == {"lr": 0.01, "model": "tiny"} and m["metrics"] == {"reward": 0.5}
    assert set(m["versions"]) == {"rlswift", "torch", "transformers", "vllm", "python"}
    assert m["versions"]["torch"] == torch.__version__.split("+")[0] or m["versions"]["torch"] == torch.__version__
    assert m["hooks"]["progress"] == ["hooks/progress.json"]  # no tensors -> no safetensors file
    assert m["hooks"]["model"] == ["hooks/model.json", "hooks/model.safetensors"]
    for rel, info in m["files"].items():
        data = (out / rel).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert verify(out) == []


def test_load_restores_every_hook_exactly(tmp_path):
    mgr = CheckpointManager(tmp_path)
    a = make_hooks(seed=0)
    mgr.save(1, a, config={})
    b = make_hooks(seed=1)
    manifest = mgr.load(tmp_path / "checkpoint-1", b)
    assert manifest["step"] == 1
    for (k, t1), t2 in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.equal(t1, t2), k
    assert b["model"][1].weight is b["model"][0].weight  # still tied after load
    s1, s2 = a["optim"].state_dict(), b["optim"].state_dict()
    assert torch.equal(s1["state"][0]["exp_avg_sq"], s2["state"][0]["exp_avg_sq"])
    assert [b["rng"].py.random() for _ in range(3)] == [a["rng"].py.random() for _ in range(3)]
    assert np.array_equal(b["rng"].np.random(3), a["rng"].np.random(3))
    assert b["progress"].state == {"step": 3, "big": 2**100}


class ItemsOnly:
    """A registry-like mapping exposing only .items() (like rlswift.state.StateRegistry)."""

    def __init__(self, hooks):
        self._h = hooks

    def items(self):
        return iter(self._h.items())


def test_hooks_may_be_any_items_provider(tmp_path):
    mgr = CheckpointManager(tmp_path)
    out = mgr.save(1, ItemsOnly({"a": Box(1), "b": Box(2)}), config={})
    hooks = {"a": Box(), "b": Box()}
    mgr.load(out, ItemsOnly(hooks))
    assert hooks["a"].state == 1 and hooks["b"].state == 2


def test_strict_mismatch_names_both_lists(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"a": Box(1), "b": Box(2)}, config={})
    hooks = {"a": Box(), "c": Box()}
    with pytest.raises(CheckpointError) as e:
        mgr.load(tmp_path / "checkpoint-1", hooks)
    assert "registered but not saved ['c']" in str(e.value) and "saved but not registered ['b']" in str(e.value)
    assert hooks["a"].loaded == 0  # nothing touched
    with pytest.warns(UserWarning, match="skipping"):
        mgr.load(tmp_path / "checkpoint-1", hooks, strict=False)
    assert hooks["a"].state == 1 and hooks["a"].loaded == 1 and hooks["c"].loaded == 0


def test_unsafe_hook_names_get_safe_files(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"user/my hook": Box([1]), "../evil": Box([2])}, config={})
    m = read_manifest(tmp_path / "checkpoint-1")
    for rels in m["hooks"].values():
        for rel in rels:
            assert rel.startswith("hooks/") and "/" not in rel[len("hooks/"):] and ".." not in rel
    assert hook_file_stem("rng") == "rng"
    hooks = {"user/my hook": Box(), "../evil": Box()}
    mgr.load(tmp_path / "checkpoint-1", hooks)
    assert hooks["user/my hook"].state == [1] and hooks["../evil"].state == [2]


def test_resave_same_step_replaces(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(2, {"a": Box({"v": 1})}, config={})
    mgr.save(2, {"a": Box({"v": 2})}, config={})
    hooks = {"a": Box()}
    mgr.load(tmp_path / "checkpoint-2", hooks)
    assert hooks["a"].state == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "latest"]


def test_bad_state_fails_before_commit(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"a": Box(1)}, config={})
    with pytest.raises(CheckpointError, match="hook 'b'.*set") as e:
        mgr.save(2, {"a": Box(1), "b": Box({"x": {1, 2}})}, config={})
    assert isinstance(e.value.__cause__, TypeError)  # the codec's error, chained
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"


def test_resolve_resume(tmp_path):
    mgr = CheckpointManager(tmp_path / "out")
    assert mgr.resolve_resume(None) is None
    assert mgr.resolve_resume("auto") is None  # no folder yet
    for s in (1, 2, 10):
        mgr.save(s, {"a": Box(s)}, config={})
    assert mgr.resolve_resume("auto") == tmp_path / "out" / "checkpoint-10"  # by step, not by name order
    assert mgr.protect == tmp_path / "out" / "checkpoint-10"
    # Corrupt the newest: auto falls back to the previous one and warns naming the skipped one.
    f = tmp_path / "out" / "checkpoint-10" / "hooks" / "a.json"
    f.write_bytes(b"11")
    with pytest.warns(UserWarning, match="checkpoint-10.*sha256"):
        assert mgr.resolve_resume("auto") == tmp_path / "out" / "checkpoint-2"
    assert mgr.resolve_resume(tmp_path / "out" / "checkpoint-1") == tmp_path / "out" / "checkpoint-1"
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.resolve_resume(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="output folder"):
        mgr.resolve_resume(tmp_path / "out")
    with pytest.raises(CheckpointError, match="a.json.*sha256"):
        mgr.resolve_resume(str(tmp_path / "out" / "checkpoint-10"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        mgr.resolve_resume(tmp_path / "empty")


def test_retention_keeps_newest_best_and_protected(tmp_path):
    mgr = CheckpointManager(tmp_path, save_total_limit=2, best_metric="reward", best_mode="max")
    rewards = {1: 0.1, 2: 0.9, 3: 0.2, 4: float("nan"), 5: 0.3, 6: 0.4}
    for s, r in rewards.items():
        mgr.save(s, {"a": Box(s)}, config={}, metrics={"reward": r})
    assert [p.name for _s, p in mgr.checkpoints()] == ["checkpoint-2", "checkpoint-5", "checkpoint-6"]
    mgr.protect = tmp_path / "checkpoint-5"
    mgr.save(7, {"a": Box(7)}, config={})
    assert [s for s, _p in mgr.checkpoints()] == [2, 5, 6, 7]
    mgr.protect = None
    mgr.save(8, {"a": Box(8)}, config={})
    assert [s for s, _p in mgr.checkpoints()] == [2, 7, 8]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_retention_min_mode_and_no_limit(tmp_path):
    mgr = CheckpointManager(tmp_path, save_total_limit=1, best_metric="loss", best_mode="min")
    for s, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        mgr.save(s, {"a": Box(s)}, config={}, metrics={"loss": loss})
    assert [s for s, _p in mgr.checkpoints()] == [2, 3]
    unlimited = CheckpointManager(tmp_path / "u")
    for s in range(4):
        unlimited.save(s, {"a": Box(s)}, config={})
    assert len(unlimited.checkpoints()) == 4


def test_retention_policy_pure():
    c = [(s, Path(f"/x/checkpoint-{s}"), {"m": m}) for s, m in [(1, 5.0), (2, None), (3, 1.0), (4, 5.0)]]
    assert best_checkpoint(c, "m", "max") == Path("/x/checkpoint-1")  # ties: earliest
    assert best_checkpoint(c, "m", "min") == Path("/x/checkpoint-3")
    assert best_checkpoint(c, "other", "max") is None
    assert select_deletions(c, None, None, "max") == []
    assert select_deletions(c, 1, None, "max") == [Path(f"/x/checkpoint-{s}") for s in (1, 2, 3)]
    assert select_deletions(c, 1, "m", "min", keep=[Path("/x/checkpoint-2")]) == [Path("/x/checkpoint-1")]


def test_constructor_validation():
    with pytest.raises(ValueError, match="best_mode"):
        CheckpointManager("/tmp/x", best_mode="largest")
    with pytest.raises(ValueError, match="save_total_limit"):
        CheckpointManager("/tmp/x", save_total_limit=0)


def test_manifest_is_last_and_readable_json(tmp_path):
    mgr = CheckpointManager(tmp_path)
    out = mgr.save(0, {"a": Box({"k": [1, 2]})}, config={"path": Path("/some/where"), "t": (1, 2)})
    m = orjson.loads((out / "manifest.json").read_bytes())
    assert m["config"] == {"path": "/some/where", "t": [1, 2]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CheckpointManager(tmp_path).resolve_resume("auto") == out


def test_replace_without_rename_exchange(tmp_path, monkeypatch):
    import rlswift.checkpoint.writer as cw

    monkeypatch.setattr(cw, "_rename_exchange", lambda a, b: False)
    mgr = CheckpointManager(tmp_path)
    mgr.save(2, {"a": Box(1)}, config={})
    mgr.save(2, {"a": Box(2)}, config={})
    hooks = {"a": Box()}
    mgr.load(tmp_path / "checkpoint-2", hooks)
    assert hooks["a"].state == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "latest"]


def test_crash_between_fallback_renames_restores_old(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, {"a": Box(3)}, config={})
    # Simulate dying after `checkpoint-3 -> .tmp-replaced-...` but before the new one was renamed in.
    (tmp_path / "checkpoint-3").rename(tmp_path / ".tmp-replaced-checkpoint-3-999")
    mgr.save(4, {"a": Box(4)}, config={})
    hooks = {"a": Box()}
    mgr.load(tmp_path / "checkpoint-3", hooks)
    assert hooks["a"].state == 3


def test_hf_model_and_optimizer_roundtrip(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    def build():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt

    model, opt = build()
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    mgr = CheckpointManager(tmp_path)
    out = mgr.save(1, {"model": model, "optimizer": opt}, config={})
    model2, opt2 = build()
    mgr.load(out, {"model": model2, "optimizer": opt2})
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
    # One more identical step on both: same weights bit for bit (optimizer moments restored).
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    for (k, v), v2 in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(v, v2), k
