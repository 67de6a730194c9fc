"""RemoteEngine + rollout.serve over loopback: same results as in-process (weights over HTTP or a gloo process group),
errors re-raised as ValueError, a killed server restarted with the last weights."""

import os
import signal
import threading
import time

import pytest
import torch

from rollout.client import RemoteEngine
from rollout.engine import make_engine
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


def test_launch_settings_become_server_flags():
    from rollout.client import serve_flags

    assert serve_flags({"max_model_len": 512, "seed": 0, "kv_cache_gib": None, "enforce_eager": True,
                        "enable_sleep_mode": False, "gpu_memory_utilization": 0.8}) == [
        "--max-model-len", "512", "--seed", "0", "--enforce-eager", "--gpu-memory-utilization", "0.8"]
    with pytest.raises(ValueError, match="unknown argument 'max_tokens'.*engine settings"):
        serve_flags({"max_tokens": 3})
    # ... and the server reads them back into the engine's settings.
    from rollout.serve import engine_kwargs, parser

    settings = {"max_model_len": 512, "seed": 3, "kv_cache_gib": 1, "max_num_seqs": 8, "block_size": 64,
                "sync_method": "reload"}
    a = parser().parse_args(["--model", "m", "--engine", "vllm", *serve_flags(settings)])
    assert engine_kwargs(a) == {"dtype": "float32", **settings}


def test_launch_failure_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="did not start"):
        RemoteEngine.launch(tmp_path / "missing", engine="hf", startup_timeout=60)


def test_close_stops_the_server(tiny_model_dir):
    r = RemoteEngine.launch(tiny_model_dir, engine="hf")
    proc = r._proc
    r.close()
    assert proc.poll() is not None


@pytest.mark.slow
def test_vllm_round_trip_over_gloo_equals_in_process(tiny_model_dir):
    pytest.importorskip("vllm")
    from rollout.vllm_engine import VLLMEngine

    model = perturbed(tiny_model_dir)
    remote = make_engine("remote", tiny_model_dir, engine="vllm", weight_transport="gloo", transport_timeout=120,
                         max_model_len=512, kv_cache_gib=1, seed=0, enable_sleep_mode=True)
    local = VLLMEngine(tiny_model_dir, max_model_len=512, kv_cache_gib=1)
    try:
        after = round_trip(remote, local, model)
        assert max_lp_diff(after, local.generate(REQS)) < 1e-4
        stats = remote.stats()
        assert stats["transport"] == "gloo" and "enable_sleep_mode" in stats["ignored_settings"]  # CPU: no sleep mode
        remote.sleep()
        assert remote.generate(REQS) == after  # sleep/wake through the server change nothing
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


# ---------------------------------------------------------------------------------------------- gloo transport

def max_lp_diff(a, b):
    assert [o.completion_ids for o in a] == [o.completion_ids for o in b]
    return max(float((torch.tensor(x.logprobs) - torch.tensor(y.logprobs)).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def gloo_remote(tiny_model_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    r = RemoteEngine.launch(tiny_model_dir, engine="hf", weight_transport="gloo", transport_timeout=60, timeout=120,
                            bucket_bytes=64 * 1024)  # several buckets even for the tiny model
    yield r
    r.close()


def test_gloo_weights_equal_in_process_and_bad_updates_are_refused_first(gloo_remote, tiny_model_dir):
    local = HFEngine(tiny_model_dir)
    model = perturbed(tiny_model_dir)
    after = round_trip(gloo_remote, local, model)
    assert max_lp_diff(after, local.generate(REQS)) < 1e-4
    stats = gloo_remote.stats()
    assert stats["transport"] == "gloo" and stats["syncs"] == 1
    # Refused on the metadata, before any tensor is broadcast: the group stays in step and the engine untouched.
    with pytest.raises(ValueError, match="unknown weight name 'model.nrm.weight'"):
        gloo_remote.update_weights([("model.norm.weight", torch.ones(128)), ("model.nrm.weight", torch.ones(128))])
    with pytest.raises(ValueError, match=r"got \(3,\), the model has \(128,\)"):
        gloo_remote.update_weights([("model.norm.weight", torch.ones(3))])
    assert gloo_remote.stats()["syncs"] == 1
    assert gloo_remote.generate(REQS) == after
    # Only what changed travels once the server holds a full set; the result equals the in-process engine's.
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    for eng in (gloo_remote, local):
        eng.update_weights(model.state_dict().items(), changed=["model.norm.weight"])
    assert gloo_remote.stats()["last_sync_tensors"] == 1
    assert max_lp_diff(gloo_remote.generate(REQS), local.generate(REQS)) < 1e-4
    # make_engine("remote", url=...) connects to a running server (nothing launched, nothing to restart).
    other = make_engine("remote", tiny_model_dir, url=gloo_remote.url, weight_transport="http")
    assert other.generate(REQS) == gloo_remote.generate(REQS) and other._launch is None


def kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_killed_server_is_restarted_with_the_last_weights(tiny_model_dir):
    """kill -9 between two calls and in the middle of a generate: the next call succeeds with identical tokens."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    remote = RemoteEngine.launch(tiny_model_dir, engine="hf", weight_transport="gloo", transport_timeout=60,
                                 timeout=300, keep_weights="copy")
    local = HFEngine(tiny_model_dir)
    try:
        model = perturbed(tiny_model_dir)
        remote.update_weights(model.state_dict().items())
        local.update_weights(model.state_dict().items())
        expected = local.generate(REQS)
        assert remote.generate(REQS) == expected
        with torch.no_grad():  # an optimizer step after the sync: the engine must keep the synced weights
            model.model.norm.weight.mul_(2.0)
        pid0 = remote.health()["pid"]
        kill(remote._proc)
        assert remote.generate(REQS) == expected
        assert remote.restarts == 1 and remote.health()["pid"] != pid0

        big = [Request([(5 * i + k) % 500 + 3 for k in range(6)], [i, 1000 + i, 2000 + i], SamplingSpec(max_tokens=48))
               for i in range(24)]
        want = local.generate(big)
        proc = remote._proc

        def kill_when_generating():
            while remote._call("GET", "/stats")["generating"] == 0:
                time.sleep(0.005)
            kill(proc)

        killer = threading.Thread(target=kill_when_generating)
        killer.start()
        got = remote.generate(big)
        killer.join()
        assert proc.poll() is not None and remote.restarts == 2
        assert got == want
    finally:
        remote.close()


def test_closing_the_server_tears_down_its_weight_group(tiny_model_dir):
    """rollout.serve's shutdown closes the weight process group it joined (on GPU an NCCL group left alive warned
    "destroy_process_group() was not called before program exit" in every remote run on 2 H200s)."""
    from rollout.serve import make_server

    server = make_server(HFEngine(tiny_model_dir), "127.0.0.1", 0, kind="hf")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    client = RemoteEngine(f"http://{host}:{port}", weight_transport="gloo", transport_timeout=60, timeout=120)
    client.update_weights(perturbed(tiny_model_dir).state_dict().items())
    channel = server.weights.channel
    assert channel is not None and channel.pg is not None
    client.close()
    server.shutdown()
    server.server_close()
    thread.join(10)
    assert server.weights.channel is None and channel.pg is None
