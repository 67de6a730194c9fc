"""VLLMEngine (in-process, CPU): seed semantics, batch independence, weight sync exactness, errors. Skips without vllm."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from rollout.types import Request, SamplingSpec  # noqa: E402
from rollout.vllm_engine import VLLMEngine  # noqa: E402
from rollout_helpers import SPEC, max_err, perturb_, prompts  # noqa: E402

LONG = [(i * 31) % 500 + 3 for i in range(300)]  # > 2 KV blocks of 128 tokens


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    e = VLLMEngine(tiny_model_dir, max_model_len=512, kv_cache_gib=1)
    yield e
    e.close()


@pytest.fixture()
def ref(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def generate_in_a_fresh_process(model_dir, requests: list[tuple[list[int], list[int]]], **engine_kwargs):
    """``(block_size, [[completion_ids, logprobs], ...])`` of a VLLMEngine started in another process, sampling the
    (prompt, seeds) requests with SPEC. (Closing a second in-process engine would tear down the first one's groups.)"""
    code = (
        "import json; from rollout.vllm_engine import VLLMEngine; from rollout.types import Request, SamplingSpec\n"
        f"e = VLLMEngine({str(model_dir)!r}, max_model_len=512, kv_cache_gib=1, **{engine_kwargs!r})\n"
        f"outs = e.generate([Request(p, seeds, {SPEC!r}) for p, seeds in {requests!r}])\n"
        "print('RESULT' + json.dumps([e.llm.llm_engine.vllm_config.cache_config.block_size,\n"
        "                             [[o.completion_ids, o.logprobs] for o in outs]]))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300)
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])


def test_seeds_and_order(engine):
    a, b, c = engine.generate([Request(prompts(1)[0], [11, 11, 12], SPEC)])
    assert a.completion_ids == b.completion_ids and len(a.logprobs) == len(a.completion_ids) > 0
    assert a.completion_ids != c.completion_ids
    assert [(o.request_index, o.sample_index, o.seed) for o in (a, b, c)] == [(0, 0, 11), (0, 1, 11), (0, 2, 12)]


def test_prompt_alone_equals_prompt_in_batch_of_32(engine):
    ps = prompts(32)
    target = Request(ps[17], [424242], SPEC)
    alone = engine.generate([target])[0]
    batch = engine.generate([Request(p, [i * 13 + 1, i], SPEC) for i, p in enumerate(ps[:17])] + [target]
                            + [Request(p, [i], SPEC) for i, p in enumerate(ps[18:])])
    assert len(batch) == 17 * 2 + 1 + 14
    assert batch[34].completion_ids == alone.completion_ids


def test_a_group_shares_its_prompt_blocks_on_cpu_with_the_same_tokens(engine, tiny_model_dir, ref):
    """On CPU the default KV block is 32 tokens, not vLLM's 128: samples 2..G of a group read the whole blocks of
    the prompt that sample 1 computes in the same step, and the tokens and logprobs are exactly those of an engine
    with 128-token blocks, where a 70-token prompt is computed once per sample."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine.update_weights(ref.named_parameters())
    assert engine.llm.llm_engine.vllm_config.cache_config.block_size == 32
    group_prompts = [[(5 + 7 * i + 3 * k) % 500 + 3 for k in range(70)] for i in range(3)]
    reqs = [Request(p, [40 + i, 50 + i, 60 + i, 70 + i], SPEC) for i, p in enumerate(group_prompts)]
    got = engine.generate(reqs)
    engine.llm.reset_prefix_cache()
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in group_prompts for _ in range(4)],
                               [SamplingParams(seed=s, max_tokens=2) for s in range(12)], use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 64, 64, 64] * 3  # 2 whole blocks of 32 shared

    block_size, want = generate_in_a_fresh_process(tiny_model_dir, [(r.prompt_ids, r.seeds) for r in reqs],
                                                   block_size=128)
    assert block_size == 128
    assert [o.completion_ids for o in got] == [ids for ids, _ in want]
    assert [o.logprobs for o in got] == [lps for _, lps in want]  # bit for bit


def test_logprobs_are_raw_model_logprobs(engine, ref):
    outs = engine.generate([Request(LONG, [1], SamplingSpec(temperature=0.7, top_k=20, max_tokens=8)),
                            Request(prompts(1)[0], [2], SPEC)])
    assert max_err(ref, outs) < 1e-4


def test_update_weights_matches_forward_incl_long_prompt_and_tied_head(engine, ref):
    before = engine.generate([Request(LONG, [3], SPEC)])  # fills the prefix cache with old-weight KV blocks
    perturb_(ref, 0.02)
    engine.update_weights(ref.state_dict().items())  # HF state_dict: lm_head.weight is tied to the embedding
    outs = engine.generate([Request(LONG, [3, 4], SPEC), Request(prompts(1)[0], [5], SPEC)])
    assert max_err(ref, outs) < 1e-4
    assert max_err(ref, before) > 1e-3  # the old logprobs really are stale, so the check above has teeth
    # Embedding alone (sent under the tied head's name): the CPU-packed head must follow it.
    with torch.no_grad():
        ref.model.embed_tokens.weight.mul_(1.1)
    engine.update_weights([("lm_head.weight", ref.lm_head.weight)])
    assert max_err(ref, engine.generate([Request(LONG, [6], SPEC)])) < 1e-4


def test_bad_input_errors_and_engine_keeps_serving(engine, ref):
    engine.update_weights(ref.named_parameters())  # back to the folder's weights
    r = Request(prompts(1)[0], [9], SPEC)
    before = engine.generate([r])[0].completion_ids
    with pytest.raises(ValueError, match="request 1: prompt of 510 tokens.*max_model_len=512"):
        engine.generate([r, Request([5] * 510, [1], SPEC)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([Request([5, 100000], [1], SPEC)])
    with pytest.raises(ValueError, match="unknown weight name 'model.layers.0.mlp.gate_prj.weight'.*gate_proj"):
        engine.update_weights([("model.layers.0.mlp.gate_prj.weight", torch.ones(1))])
    with pytest.raises(ValueError, match=r"got \(3,\), the model has \(128,\)"):
        engine.update_weights([("model.norm.weight", torch.ones(3))])
    with pytest.raises(ValueError, match="partial update of vLLM layer 'model.layers.0.self_attn.qkv_proj'.*k_proj"):
        engine.update_weights([("model.layers.0.self_attn.q_proj.weight", torch.zeros(128, 128))])
    assert engine.generate([r])[0].completion_ids == before


def test_stop_strings_end_the_text(engine, ref):
    engine.update_weights(ref.named_parameters())
    spec = SamplingSpec(temperature=1.0, max_tokens=16, stop=("0",))
    outs = engine.generate([Request(p, [i], spec) for i, p in enumerate(prompts(8))])
    assert all("0" not in o.text for o in outs)
    stopped = [o for o in outs if o.finish_reason == "stop"]
    assert stopped and all(len(o.completion_ids) < 16 for o in stopped)


@pytest.mark.slow
def test_same_tokens_in_another_process(engine, tiny_model_dir, ref):
    engine.update_weights(ref.named_parameters())
    reqs = [Request(p, [100 + i, 7], SPEC) for i, p in enumerate(prompts(3))]
    here = [o.completion_ids for o in engine.generate(reqs)]
    _, there = generate_in_a_fresh_process(tiny_model_dir, [(r.prompt_ids, r.seeds) for r in reqs], seed=123)
    assert [ids for ids, _ in there] == here


def test_lora_policy_syncs_merged_weights_and_never_twice(engine, tiny_model_dir):
    """A LoRA policy sends W + BA computed out of place; syncing again (as after a resume) changes nothing."""
    from rlswift.models.policy import engine_weights, load_policy

    policy = load_policy(tiny_model_dir, lora_rank=4, lora_alpha=8, seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter a real effect
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    reqs = [Request(LONG, [7], SPEC), Request(prompts(1)[0], [8], SPEC)]
    first = None
    for _ in range(2):
        engine.update_weights(engine_weights(policy))
        outs = engine.generate(reqs)
        assert max_err(policy, outs) < 1e-4
        first = first or [o.completion_ids for o in outs]
        assert [o.completion_ids for o in outs] == first


@pytest.mark.slow
def test_bf16_engine_is_deterministic_and_syncs(tiny_model_dir):
    """bf16 in a fresh process: same seeds give the same tokens; logprobs match an fp32 forward within bf16 precision
    (measured: 0.005 on the folder's weights, 0.35 after a large perturbation whose stale error is 11)."""
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM
from rollout.vllm_engine import VLLMEngine
from rollout.types import Request
from rollout_helpers import SPEC, max_err, perturb_, prompts
e = VLLMEngine({str(tiny_model_dir)!r}, dtype="bfloat16", max_model_len=512, kv_cache_gib=1)
reqs = [Request(p, [100 + i, 7], SPEC) for i, p in enumerate(prompts(4))]
a, b = e.generate(reqs), e.generate(reqs)
ref = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32)
err0 = max_err(ref, a)
perturb_(ref, 0.2)
stale = max_err(ref, a)
e.update_weights(ref.state_dict().items())
err1 = max_err(ref, e.generate(reqs))
print("RESULT" + json.dumps({{"same": [o.completion_ids for o in a] == [o.completion_ids for o in b],
                              "err0": err0, "stale": stale, "err1": err1}}))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])
    assert r["same"]
    assert r["err0"] < 0.05 and r["err1"] < 1.0, r
    assert r["err1"] < 0.1 * r["stale"], r  # the update really moved the engine's weights


def adapt(policy, seed=1):
    """Give the LoRA B matrices random values (they start at zero), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_lora_sync_of_changed_layers_only_is_exact(engine, tiny_model_dir):
    """A LoRA on q and v: after one full sync, only q/k/v (k: the rest of vLLM's fused qkv layer) are reloaded; every
    other layer keeps the weights it had, and the engine matches the policy as after a full sync."""
    from rlswift.models.policy import engine_weights, load_policy

    policy = load_policy(tiny_model_dir, lora_rank=4, lora_alpha=8, seed=3, lora_target_modules=["q_proj", "v_proj"])
    changed = [n for n, _ in engine_weights(policy) if ".q_proj.weight" in n or ".v_proj.weight" in n]
    reqs = [Request(LONG, [7], SPEC), Request(prompts(1)[0], [8, 9], SPEC)]
    adapt(policy, seed=1)
    # `changed` is relative to the previous update this engine got (other tests' models): a new policy syncs fully.
    engine.update_weights(engine_weights(policy))
    assert engine.stats()["last_sync_tensors"] == len(engine.validator.shapes) == 26
    adapt(policy, seed=2)
    engine.update_weights(engine_weights(policy), changed=changed)
    assert engine.stats()["last_sync_tensors"] == 12  # 2 layers x q/k/v x weight/bias
    partial = engine.generate(reqs)
    assert max_err(policy, partial) < 1e-4
    engine.update_weights(engine_weights(policy))  # everything, same values
    assert engine.stats()["last_sync_tensors"] == 26
    full = engine.generate(reqs)
    assert [o.completion_ids for o in full] == [o.completion_ids for o in partial]
    assert max(abs(a - b) for x, y in zip(full, partial) for a, b in zip(x.logprobs, y.logprobs)) < 1e-6


def test_settings_are_validated_before_vllm_starts(tiny_model_dir):
    bad = [({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in"),
           ({"max_num_seqs": 0}, "max_num_seqs must be a positive int"),
           ({"max_num_batched_tokens": 2.5}, "max_num_batched_tokens must be a positive int"),
           ({"block_size": 0}, "block_size must be a positive int"),
           ({"block_size": 16}, "block_size=16: vLLM's CPU attention takes multiples of 32"),
           ({"sleep_level": 3}, "sleep_level must be 1"),
           ({"sync_method": "fast"}, "sync_method must be one of"),
           ({"enforce_eager": "yes"}, "enforce_eager must be"),
           ({"kv_cache_gib": 0}, "kv_cache_gib must be a positive whole number"),
           ({"max_num_batched_tokens": 256}, "prefill is never chunked.*raise max_num_batched_tokens"),
           ({"sync_method": "load_weights"}, "fails on CPU")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            VLLMEngine(tiny_model_dir, max_model_len=512, **kw)


def test_gpu_settings_are_ignored_on_cpu_with_a_reason_and_sleep_is_a_no_op(engine, tiny_model_dir, ref):
    """Scheduler limits apply; GPU-only settings are listed with why they were ignored; sleep/wake do nothing and the
    tokens are those of an engine with default settings (a sample never depends on its batch)."""
    engine.update_weights(ref.named_parameters())
    reqs = [Request(p, [100 + i, 7], SPEC) for i, p in enumerate(prompts(6))]
    want = engine.generate(reqs)
    with pytest.warns(UserWarning, match="ignored"):
        e = VLLMEngine(tiny_model_dir, max_model_len=512, max_num_seqs=3, max_num_batched_tokens=600,
                       gpu_memory_utilization=0.3, enforce_eager=False, enable_sleep_mode=True)
    try:
        assert e.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 3
        assert e.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens == 600
        s = e.stats()
        assert set(s["ignored_settings"]) == {"gpu_memory_utilization", "enforce_eager", "enable_sleep_mode"}
        assert "no sleep mode on CPU" in s["ignored_settings"]["enable_sleep_mode"]
        assert s["start_s"] > 0 and s["sync_method"] == "reload" and s["device"] == "cpu"
        e.sleep()
        assert e.stats()["asleep"] is False
        got = e.generate(reqs)
        e.wake_up()
        assert [o.completion_ids for o in got] == [o.completion_ids for o in want]
        s = e.stats()
        assert s["generate_calls"] == 1 and s["generated_tokens"] == sum(len(o.completion_ids) for o in got) > 0
    finally:
        e.close()


class FakeLLM:
    """Records what VLLMEngine asks of vLLM (sleep mode only exists on CUDA; this checks the engine's side of it)."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def apply_model(self, fn):
        self.calls.append(("load",))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace

        self.calls.append(("generate", len(prompts)))
        out = SimpleNamespace(token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-1.0)}], finish_reason="length",
                              text="x")
        return [SimpleNamespace(outputs=[out]) for _ in prompts]


def fake_gpu_engine(tiny_model_dir, level):
    from rollout.engine import EngineStats
    from rollout.weights import SyncPlanner, WeightValidator

    e = object.__new__(VLLMEngine)
    e.llm, e.on_cpu, e.sync_method, e.enable_prefix_caching = FakeLLM(), False, "load_weights", True
    e.sleep_enabled, e.sleep_level, e._asleep, e._weights_awake, e._weights_lost = True, level, False, True, False
    e.validator = WeightValidator.from_model_dir(tiny_model_dir)
    e.planner = SyncPlanner(e.validator)
    e.max_model_len, e.vocab_size, e._stats, e.ignored_settings = 512, 512, EngineStats("vllm", "cuda:0"), {}
    return e


def test_sleep_mode_wakes_weights_for_a_sync_and_the_kv_cache_for_generate(tiny_model_dir, ref):
    e = fake_gpu_engine(tiny_model_dir, level=1)
    weights = list(ref.named_parameters())
    e.update_weights(weights)
    e.sleep()
    e.sleep()  # twice: still one vLLM sleep
    assert e.stats()["asleep"] is True
    e.update_weights(weights, changed=["model.norm.weight"])  # weights back (as they were), KV cache still freed
    e.generate([Request(prompts(1)[0], [1], SPEC)])
    assert e.llm.calls == [("load",), ("reset_prefix_cache",), ("sleep", 1), ("wake_up", ["weights"]), ("load",),
                           ("wake_up", ["kv_cache"]), ("generate", 1)]
    e.sleep()
    e.wake_up()
    assert e.llm.calls[-2:] == [("sleep", 1), ("wake_up", None)] and not e.stats()["asleep"]


def test_level2_sleep_needs_every_weight_before_generate(tiny_model_dir, ref):
    e = fake_gpu_engine(tiny_model_dir, level=2)
    weights = list(ref.named_parameters())
    e.update_weights(weights)
    e.sleep()
    with pytest.raises(ValueError, match="slept at level 2"):
        e.generate([Request(prompts(1)[0], [1], SPEC)])
    with pytest.raises(ValueError, match="must carry every weight"):
        e.update_weights(weights[:3])
    with pytest.raises(ValueError, match="must carry every weight"):
        e.plan_update([(n, tuple(p.shape)) for n, p in weights[:3]])
    e.update_weights(weights, changed=["model.norm.weight"])  # `changed` is ignored: every weight is loaded
    assert e.stats()["last_sync_tensors"] == 26
    e.generate([Request(prompts(1)[0], [1], SPEC)])
    assert e.llm.calls[-3:] == [("load",), ("wake_up", ["kv_cache"]), ("generate", 1)]


@pytest.mark.slow
def test_engine_starts_in_a_process_that_imported_flask(tiny_model_dir):
    """vLLM's CPU kernel rebinding scans every module's globals with hasattr; Flask's unbound LocalProxies raise there.
    The engine hides them while it starts (moto's S3 server in this test suite, an MLflow or Gradio app for users)."""
    pytest.importorskip("flask")
    code = (
        "import flask, json; from rollout.vllm_engine import VLLMEngine; from rollout.types import Request, SamplingSpec\n"
        f"e = VLLMEngine({str(tiny_model_dir)!r}, max_model_len=512, kv_cache_gib=1)\n"
        "out = e.generate([Request([1, 2, 3], [5], SamplingSpec(max_tokens=4))])\n"
        "assert 'current_app' in vars(flask) and 'request' in vars(flask), 'Flask globals not restored'\n"
        "print('RESULT' + json.dumps(len(out[0].completion_ids) > 0))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [x for x in out.stdout.splitlines() if x.startswith("RESULT")] == ["RESULTtrue"], out.stdout[-2000:]
