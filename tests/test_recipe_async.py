"""Async GRPO with the engine in its own process (engine=remote, weights over a gloo process group), on the CPU.

The engine server is a second process on loopback, as it would be on its own GPU (NCCL there). Checked: the remote
engine samples exactly what the in-process one does; a killed engine server (not the trainer) is relaunched, gets the
weights again and the run goes on unchanged. Trainer kills at every phase of the async pipeline are in
test_recipe_grpo.py (variant async_generation).
"""

from __future__ import annotations

import pytest

from e2e import compare_runs, run_cli
from rlswift.runlog import read_jsonl

pytestmark = pytest.mark.slow
BASE = ["-m", "rlswift.recipes.grpo", "--config", "recipes/grpo_tiny.yaml", "max_steps=4",
        "reward_funcs=[accuracy,userland.custom.digit_reward]", "async_generation=true"]
REMOTE = ["engine=remote", "remote.engine=vllm", "remote.weight_transport=gloo", "vllm.kv_cache_gib=1"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_remote_engine_matches_in_process_and_survives_a_killed_server(tmp_path, rlswift_cache):
    local, remote, killed = tmp_path / "local", tmp_path / "remote", tmp_path / "killed"
    ok(run_cli([*BASE, f"output_dir={local}", "vllm.kv_cache_gib=1"], rlswift_cache))
    ok(run_cli([*BASE, f"output_dir={remote}", *REMOTE], rlswift_cache))
    a, b = list(read_jsonl(local / "trajectories.jsonl")), list(read_jsonl(remote / "trajectories.jsonl"))
    assert len(a) == len(b) == 5 * 16  # 4 steps + the batch sampled during the last one
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    # The server's own generation time is logged beside the client's (the difference: transport and waiting).
    timings = [r["timing"] for r in read_jsonl(remote / "metrics.jsonl")]
    assert all(0 < t["engine_generate"] <= t["rollout"] for t in timings), timings

    # The server is SIGKILLed while it generates the batch for step 3; the client relaunches it, re-sends the
    # weights and repeats the request: the run is the same as the undisturbed one.
    proc = ok(run_cli([*BASE, f"output_dir={killed}", *REMOTE], rlswift_cache, fault="kill-engine@2"))
    assert "died" in proc.stderr
    compare_runs(remote, killed, 4)


@pytest.mark.parametrize("device, server", [
    ("cpu", {"kv_cache_gib": 3, "block_size": 64}),
    ("cuda", {"gpu_memory_utilization": 0.25, "enforce_eager": True, "max_num_seqs": 64,
              "max_num_batched_tokens": None, "block_size": 64, "enable_sleep_mode": False}),
])
def test_a_launched_server_gets_the_vllm_settings_of_the_config(monkeypatch, device, server):
    """engine=remote launching its server: vllm.* settings become the server's flags (GPU: memory, CUDA graphs,
    batching), CUDA_VISIBLE_DEVICES puts it on its own GPU; nothing CUDA is touched here."""
    import torch

    from rlswift import config as cfglib
    from rlswift.distributed.launch import DistInfo
    from rlswift.recipes import grpo
    from rlswift.state import RNGState

    seen = {}
    monkeypatch.setattr(grpo, "make_engine", lambda kind, model, **kw: seen.update(kind=kind, **kw) or object())
    cfg = cfglib.load(grpo.GRPOConfig, None, ["engine=remote", "remote.cuda_visible_devices=1",
                                              "vllm.gpu_memory_utilization=0.25", "vllm.enforce_eager=true",
                                              "vllm.max_num_seqs=64", "vllm.kv_cache_gib=3",
                                              "vllm.block_size=64"])
    dev = torch.device(device)
    grpo.start_engine(cfg, "m", "bfloat16", dev, RNGState(), DistInfo(0, 1, 0, dev, True))
    assert seen["kind"] == "remote" and seen["engine"] == "vllm" and seen["env"] == {"CUDA_VISIBLE_DEVICES": "1"}
    assert {k: seen[k] for k in server} == server
    other = {"kv_cache_gib"} if device == "cuda" else {"gpu_memory_utilization", "enforce_eager"}
    assert not other & set(seen), seen

    cfg = cfglib.load(grpo.GRPOConfig, None, ["engine=remote", "remote.engine=hf"])
    grpo.start_engine(cfg, "m", "float32", dev, RNGState(), DistInfo(0, 1, 0, dev, True))
    assert seen["engine"] == "hf" and seen["device"] == device
