"""Weight-update bookkeeping (validation once per name, what to load given `changed`, fused layers) and the
process-group transport's packing; no model, no engine."""

import pytest
import torch

from rollout import weights as W
from rollout.transport import ALIGN, pack, plan_buckets, unpack
from rollout.weights import SyncPlanner, WeightValidator

SHAPES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.self_attn.k_proj.weight": (2, 4),
    "model.layers.0.self_attn.v_proj.weight": (2, 4),
    "model.layers.0.mlp.down_proj.weight": (4, 8),
    "model.norm.weight": (4,),
}
QKV = "model.layers.0.self_attn.qkv_proj"


def group_of(name):  # as VLLMEngine's reload path: q/k/v feed one fused layer
    module = name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.qkv_proj" if leaf in ("q_proj", "k_proj", "v_proj") else module


def full():
    return [(n, torch.full(s, float(i))) for i, (n, s) in enumerate(SHAPES.items())]


def test_names_are_validated_once_then_looked_up(monkeypatch):
    v = WeightValidator(SHAPES, tied=True)
    v.check(full())
    calls = []
    monkeypatch.setattr(W.difflib, "get_close_matches", lambda *a, **k: calls.append(a) or [])
    v.check(full())  # known (name, shape) pairs: no lookup in the model's shapes at all
    assert v._known == {n: s for n, s in SHAPES.items()}
    with pytest.raises(ValueError, match=r"wrong shape for 'model.norm.weight': got \(5,\)"):
        v.check([("model.norm.weight", torch.zeros(5))])  # a known name with a new shape is validated again
    with pytest.raises(ValueError, match="unknown weight name 'model.nrm.weight'"):
        v.check([("model.nrm.weight", torch.zeros(4))])
    assert len(calls) == 1


def test_tied_head_sharing_the_embedding_is_not_compared(monkeypatch):
    """The usual tied state_dict (two views of one tensor): accepted without reading the tensors (on a GPU that compare
    was a copy to the host on every sync)."""
    v = WeightValidator(SHAPES, tied=True)
    e = torch.randn(10, 4)
    monkeypatch.setattr(W.torch, "equal", lambda *a: pytest.fail("compared tensors that share storage"))
    out = v.check([("model.embed_tokens.weight", e.detach()), ("lm_head.weight", e.detach())])
    assert [n for n, _ in out] == ["model.embed_tokens.weight"] and out[0][1].data_ptr() == e.data_ptr()
    monkeypatch.undo()
    assert len(v.check([("model.embed_tokens.weight", e), ("lm_head.weight", e.clone())])) == 1
    with pytest.raises(ValueError, match="ties them"):
        v.check([("model.embed_tokens.weight", e), ("lm_head.weight", e[:, :].add(1))])


def test_check_meta_gives_canonical_and_given_names():
    v = WeightValidator(SHAPES, tied=True)
    assert v.check_meta([("lm_head.weight", (10, 4)), ("model.norm.weight", (4,))]) == [
        ("model.norm.weight", "model.norm.weight"), ("model.embed_tokens.weight", "lm_head.weight")]
    both = v.check_meta([("model.embed_tokens.weight", (10, 4)), ("lm_head.weight", (10, 4))])
    assert both == [("model.embed_tokens.weight", "model.embed_tokens.weight")]
    with pytest.raises(ValueError, match="given twice"):
        v.check_meta([("model.norm.weight", (4,)), ("model.norm.weight", (4,))])
    with pytest.raises(ValueError, match=r"got \(3,\), the model has \(4,\)"):
        v.check_meta([("model.norm.weight", (3,))])


def test_changed_is_ignored_until_a_full_set_was_loaded():
    p = SyncPlanner(WeightValidator(SHAPES, tied=True))
    names = list(SHAPES)
    assert p.select(names, ["model.norm.weight"]) == names  # engine still holds the folder's weights
    p.loaded(names[:3])
    assert not p.synced_all and p.select(names, ["model.norm.weight"]) == names
    p.loaded(names)
    assert p.synced_all
    assert p.select(names, ["model.norm.weight"]) == ["model.norm.weight"]
    assert p.select(names, ["lm_head.weight"]) == ["model.embed_tokens.weight"]  # the tied head is the embedding
    assert p.select(names, []) == [] and p.select(names, None) == names


def test_fused_layers_are_loaded_whole():
    p = SyncPlanner(WeightValidator(SHAPES, tied=True), group_of)
    names = list(SHAPES)
    p.loaded(names)
    # A LoRA on q and v only: k (unchanged) is loaded with them, since the fused layer is rebuilt from what it gets.
    got = p.select(names, ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"])
    assert got == [n for n in names if "_proj" in n and "down" not in n]
    with pytest.raises(ValueError, match=f"partial update of vLLM layer '{QKV}'.*k_proj.*lacks them too"):
        p.select([n for n in names if "k_proj" not in n], ["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ValueError, match=f"partial update of vLLM layer '{QKV}'"):
        p.check_whole_groups(["model.layers.0.self_attn.q_proj.weight"])
    assert p.plan([(n, SHAPES[n]) for n in names], ["model.norm.weight"]) == ["model.norm.weight"]


def test_buckets_pack_and_unpack_by_hand():
    meta = [("a", "float32", (3,)), ("b", "bfloat16", (5,)), ("c", "int64", (2, 2)), ("d", "float32", (100,))]
    buckets = plan_buckets(meta, bucket_bytes=64)
    # a: 12 bytes at 0 (next offset 16); b: 10 bytes at 16 (next 32); c: 32 bytes would end at 64 -> fits at 32;
    # d: 400 bytes > 64 -> a bucket of its own.
    assert [(size, [(s.name, s.offset, s.nbytes) for s in slots]) for size, slots in buckets] == [
        (64, [("a", 0, 12), ("b", 16, 10), ("c", 32, 32)]), (400, [("d", 0, 400)])]
    assert all(s.offset % ALIGN == 0 for _, slots in buckets for s in slots)
    ts = [torch.arange(3, dtype=torch.float32), torch.linspace(-1, 1, 5).bfloat16(),
          torch.tensor([[1, -2], [2**40, 7]]), torch.randn(100)]
    i, got = 0, []
    for size, slots in buckets:
        got += unpack(pack(ts[i:i + len(slots)], slots, size, "cpu"), slots)
        i += len(slots)
    assert [n for n, _ in got] == ["a", "b", "c", "d"]
    for (_, g), t in zip(got, ts):
        assert g.dtype == t.dtype and g.shape == t.shape and torch.equal(g, t)
