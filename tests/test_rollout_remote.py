"""RemoteEngine + rollout.serve over loopback: same results as in-process, errors re-raised as ValueError."""

import os

import pytest
import torch

from rollout.client import RemoteEngine
from rollout.hf_engine import HFEngine
from rollout.types import Request, SamplingSpec

SPEC = SamplingSpec(temperature=1.0, top_k=50, top_p=0.95, max_tokens=10)
REQS = [Request([(7 * i + 3 * k) % 500 + 3 for k in range(5 + i)], [100 + i, 5], SPEC) for i in range(3)]


def perturbed(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.mul_(1.05)
    return m


def round_trip(remote, local, model):
    assert remote.generate(REQS) == local.generate(REQS)
    remote.update_weights(model.state_dict().items())  # tied lm_head shares memory: the client copies it
    local.update_weights(model.state_dict().items())
    after = remote.generate(REQS)
    assert after == local.generate(REQS)
    return after


@pytest.fixture(scope="module")
def remote(tiny_model_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    r = RemoteEngine.launch(tiny_model_dir, engine="hf", timeout=120)
    yield r
    r.close()


def test_hf_round_trip_equals_in_process(remote, tiny_model_dir):
    assert remote.health()["ok"] is True
    local = HFEngine(tiny_model_dir)
    before = local.generate(REQS)
    after = round_trip(remote, local, perturbed(tiny_model_dir))
    assert [o.completion_ids for o in after] != [o.completion_ids for o in before]  # the update did something


def test_errors_come_back_as_value_error_and_server_keeps_serving(remote, tiny_model_dir):
    local = HFEngine(tiny_model_dir)
    with pytest.raises(ValueError, match="request 1: prompt of 1020 tokens"):
        remote.generate([REQS[0], Request([5] * 1020, [1], SPEC)])
    with pytest.raises(ValueError, match="unknown weight name 'model.nrm.weight'"):
        remote.update_weights([("model.nrm.weight", torch.ones(128))])
    with pytest.raises(ValueError, match=r"got \(3,\), the model has \(128,\)"):
        remote.update_weights([("model.norm.weight", torch.ones(3))])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        remote._call("POST", "/generate", b'{"requests": [{"prompt_ids": [], "seeds": [1]}]}')
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        remote._call("POST", "/generate", b'{"requests": [{"prompt_ids": [3], "seeds": [1], "sampling": {"max_tokens": 0}}]}')
    remote.update_weights(local.model.state_dict().items())  # back to the folder's weights
    assert remote.generate(REQS) == local.generate(REQS)


def test_launch_failure_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="did not start"):
        RemoteEngine.launch(tmp_path / "missing", engine="hf", startup_timeout=60)


def test_close_stops_the_server(tiny_model_dir):
    r = RemoteEngine.launch(tiny_model_dir, engine="hf")
    proc = r._proc
    r.close()
    assert proc.poll() is not None


@pytest.mark.slow
def test_vllm_round_trip_equals_in_process(tiny_model_dir):
    pytest.importorskip("vllm")
    from rollout.vllm_engine import VLLMEngine

    model = perturbed(tiny_model_dir)
    remote = RemoteEngine.launch(tiny_model_dir, engine="vllm", extra_args=["--max-model-len", "512", "--kv-cache-gib", "1"])
    local = VLLMEngine(tiny_model_dir, max_model_len=512, kv_cache_gib=1)
    try:
        round_trip(remote, local, model)
    finally:
        remote.close()
        local.close()


def test_launch_times_out_on_a_server_that_hangs_silently():
    """A server that never prints its ready line is given up on after startup_timeout, not waited on forever."""
    import subprocess
    import sys
    import time

    from rollout.client import wait_ready

    proc = subprocess.Popen([sys.executable, "-c", "import time; print('loading', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        url, seen = wait_ready(proc, timeout=2.0)
        assert url is None and seen == ["loading\n"]
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()
