"""HFEngine: seed semantics, batch independence, logprobs vs a transformers forward after a weight update, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rollout.hf_engine import HFEngine, process_logits
from rollout.types import Request, SamplingSpec
from rollout_helpers import SPEC, perturb_, prompts, ref_logprobs


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = HFEngine(tiny_model_dir)
    yield e
    e.close()


def test_process_logits_hand_worked():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    # temperature 2 halves the logits; top_k=2 keeps the two largest.
    out = process_logits(logits, SamplingSpec(temperature=2.0, top_k=2))
    assert torch.equal(out, torch.tensor([1.0, 0.5, float("-inf"), float("-inf")]))
    # softmax([2,1,0,-1]) = [0.6439, 0.2369, 0.0871, 0.0321]; top_p=0.8: mass before token 2 is 0.8808 >= 0.8 -> cut.
    out = process_logits(logits, SamplingSpec(top_p=0.8))
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    # top_p=0.5 keeps the top token only (mass before token 1 is 0.6439).
    assert torch.isfinite(process_logits(logits, SamplingSpec(top_p=0.5))).tolist() == [True, False, False, False]


def test_same_seed_same_tokens_and_different_seeds_differ(engine):
    r = Request(prompts(1)[0], [11, 11, 12], SPEC)
    a, b, c = engine.generate([r])
    assert a.completion_ids == b.completion_ids and len(a.completion_ids) > 0
    assert a.completion_ids != c.completion_ids
    assert [(o.request_index, o.sample_index, o.seed) for o in (a, b, c)] == [(0, 0, 11), (0, 1, 11), (0, 2, 12)]


def test_same_tokens_in_another_process(engine, tiny_model_dir):
    reqs = [Request(p, [100 + i, 7], SPEC) for i, p in enumerate(prompts(3))]
    here = [o.completion_ids for o in engine.generate(reqs)]
    code = (
        "import json, sys; from rollout.hf_engine import HFEngine; from rollout.types import Request, SamplingSpec\n"
        f"e = HFEngine({str(tiny_model_dir)!r}); s = SamplingSpec(top_k=50, top_p=0.95, max_tokens=12)\n"
        f"reqs = [Request(p, [100 + i, 7], s) for i, p in enumerate({prompts(3)!r})]\n"
        "print(json.dumps([o.completion_ids for o in e.generate(reqs)]))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="99")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_prompt_alone_equals_prompt_in_batch_of_32(engine):
    ps = prompts(32)
    target = Request(ps[17], [424242], SPEC)
    alone = engine.generate([target])[0]
    batch = engine.generate([Request(p, [i * 13 + 1], SPEC) for i, p in enumerate(ps[:17])] + [target]
                            + [Request(p, [i], SPEC) for i, p in enumerate(ps[18:])])
    assert len(batch) == 32
    assert batch[17].completion_ids == alone.completion_ids and batch[17].logprobs == alone.logprobs


def test_greedy_is_argmax_chain(engine):
    r = engine.generate([Request(prompts(1)[0], [1, 2], SamplingSpec(temperature=0.0, max_tokens=6))])
    assert r[0].completion_ids == r[1].completion_ids  # seed is irrelevant when greedy
    ids = list(r[0].prompt_ids)
    for tok in r[0].completion_ids:
        with torch.no_grad():
            nxt = int(engine.model(torch.tensor([ids])).logits[0, -1].argmax())
        assert nxt == tok
        ids.append(tok)


def test_stop_token_ids_end_the_sample(engine):
    first = engine.generate([Request(prompts(1)[0], [5], SPEC)])[0].completion_ids[0]
    r = engine.generate([Request(prompts(1)[0], [5], SamplingSpec(top_k=50, top_p=0.95, max_tokens=12,
                                                                   stop_token_ids=(first,)))])[0]
    assert r.completion_ids == [first] and r.finish_reason == "stop"


def test_stop_strings_end_the_text(engine):
    spec = SamplingSpec(temperature=1.0, max_tokens=16, stop=("0",))
    outs = engine.generate([Request(p, [i], spec) for i, p in enumerate(prompts(8))])
    assert all("0" not in o.text for o in outs)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert stopped and all(len(o.completion_ids) < 16 for o in stopped)


def test_logprobs_match_forward_after_update_incl_long_prompt(engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    perturb_(ref, 0.01)
    engine.update_weights(ref.state_dict().items())  # includes lm_head.weight (tied) as HF state_dicts do
    long_prompt = [(i * 31) % 500 + 3 for i in range(200)]  # longer than one KV block
    outs = engine.generate([Request(long_prompt, [1, 2], SPEC), Request(prompts(1)[0], [3], SPEC)])
    for o in outs:
        assert (ref_logprobs(ref, o) - torch.tensor(o.logprobs)).abs().max() < 1e-4


def test_bad_input_errors_and_engine_keeps_serving(engine):
    r = Request(prompts(1)[0], [9], SPEC)
    before = engine.generate([r])[0].completion_ids
    with pytest.raises(ValueError, match="request 1: prompt of 1020 tokens"):
        engine.generate([r, Request([5] * 1020, [1], SPEC)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([Request([5, 100000], [1], SPEC)])
    with pytest.raises(ValueError, match="unknown weight name 'model.layers.0.mlp.gate_prj.weight'.*gate_proj"):
        engine.update_weights([("model.norm.weight", torch.ones(128)), ("model.layers.0.mlp.gate_prj.weight", torch.ones(1))])
    with pytest.raises(ValueError, match=r"got \(3,\), the model has \(128,\)"):
        engine.update_weights([("model.norm.weight", torch.ones(3))])
    # Nothing was applied by the failed updates (validation happens before any copy).
    assert engine.generate([r])[0].completion_ids == before
