"""sample_seed stability and distinctness; request/spec validation; weight-update validation (no model needed)."""

import hashlib
import os
import struct
import subprocess
import sys

import pytest
import torch

from rollout.engine import WeightValidator
from rollout.seeds import sample_seed
from rollout.types import Request, Rollout, SamplingSpec, request_from_dict, request_to_dict

EXPECTED = {
    (0, 0, 0, 0): 6424139637670018036,
    (1, 2, 3, 4): 4863708717821548647,
    (42, 100, 7, 3): 5674065058289733067,
    (-1, 0, 2**63 - 1, -(2**63)): 127918782915652340,
}


def test_sample_seed_hard_coded_values():
    for args, want in EXPECTED.items():
        assert sample_seed(*args) == want


def test_sample_seed_matches_the_spec_by_hand():
    # The documented recipe, spelled out independently of the module.
    d = hashlib.blake2b(struct.pack("<4q", 1, 2, 3, 4), key=b"rlswift.sample_seed.v1", digest_size=8).digest()
    assert sample_seed(1, 2, 3, 4) == int.from_bytes(d, "little") & (2**63 - 1)


def test_sample_seed_same_in_another_process_with_other_hash_seed():
    code = "from rollout.seeds import sample_seed; print(sample_seed(42, 100, 7, 3))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == EXPECTED[(42, 100, 7, 3)]


def test_sample_seed_distinct_and_in_range_over_grid():
    seeds = [sample_seed(r, s, p, i) for r in range(3) for s in range(10) for p in range(20) for i in range(8)]
    assert len(set(seeds)) == len(seeds) == 4800
    assert all(0 <= x < 2**63 for x in seeds)
    # Neighbouring arguments must not give neighbouring seeds (vLLM uses seed+i internally for n>1).
    assert len({x + k for x in seeds for k in range(4)}) == 4 * len(seeds)


def test_sample_seed_rejects_bad_arguments():
    with pytest.raises(TypeError, match="step must be an int"):
        sample_seed(0, 1.5, 0, 0)
    with pytest.raises(TypeError, match="run_seed"):
        sample_seed(True, 0, 0, 0)
    with pytest.raises(ValueError, match="int64"):
        sample_seed(0, 0, 2**63, 0)


def test_request_and_spec_validation_messages():
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        Request([], [1])
    with pytest.raises(ValueError, match="seeds is empty"):
        Request([1, 2], [])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
        Request([1], [2**63])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63\)"):
        Request([1], [-1])
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        SamplingSpec(max_tokens=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingSpec(temperature=-0.1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSpec(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingSpec(top_k=-1)
    spec = SamplingSpec(stop=["\n"], stop_token_ids=[3])
    assert spec.stop == ("\n",) and spec.stop_token_ids == (3,) and hash(spec)


def test_wire_round_trip():
    r = Request([5, 6, 7], [9, 2**63 - 1], SamplingSpec(temperature=0.7, top_k=5, stop=("x",)))
    assert request_from_dict(request_to_dict(r)) == r
    ro = Rollout(0, 1, 9, [5], [1, 2], [-0.5, -1.25], "length", "ab")
    assert Rollout.from_dict(ro.to_dict()) == ro


SHAPES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.self_attn.k_proj.weight": (2, 4),
    "model.norm.weight": (4,),
}


def test_validator_unknown_name_lists_close_names():
    v = WeightValidator(SHAPES, tied=True)
    with pytest.raises(ValueError, match="unknown weight name 'model.layers.0.self_attn.q_prj.weight'.*q_proj"):
        v.check([("model.layers.0.self_attn.q_prj.weight", torch.zeros(4, 4))])


def test_validator_wrong_shape_names_both_shapes():
    v = WeightValidator(SHAPES, tied=True)
    with pytest.raises(ValueError, match=r"got \(4, 2\), the model has \(2, 4\)"):
        v.check([("model.norm.weight", torch.zeros(4)), ("model.layers.0.self_attn.k_proj.weight", torch.zeros(4, 2))])


def test_validator_tied_head_folds_into_embedding():
    v = WeightValidator(SHAPES, tied=True)
    e = torch.randn(10, 4)
    assert [n for n, _ in v.check([("lm_head.weight", e)])] == ["model.embed_tokens.weight"]
    # Both names, equal values (the HF state_dict of a tied model): one update of the embedding.
    out = v.check([("model.embed_tokens.weight", e), ("lm_head.weight", e.clone())])
    assert len(out) == 1 and torch.equal(out[0][1], e)
    with pytest.raises(ValueError, match="ties them"):
        v.check([("lm_head.weight", e + 1), ("model.embed_tokens.weight", e)])
    with pytest.raises(ValueError, match="given twice"):
        v.check([("model.norm.weight", torch.zeros(4)), ("model.norm.weight", torch.zeros(4))])
    untied = WeightValidator(SHAPES, tied=False)
    with pytest.raises(ValueError, match="unknown weight name 'lm_head.weight'"):
        untied.check([("lm_head.weight", e)])
    with pytest.raises(ValueError, match="given twice"):
        v.check([("lm_head.weight", e), ("lm_head.weight", e)])
    untied_head = WeightValidator({**SHAPES, "lm_head.weight": (10, 4)}, tied=False)
    with pytest.raises(ValueError, match="given twice"):  # an untied head is an ordinary weight
        untied_head.check([("lm_head.weight", e), ("lm_head.weight", e)])
