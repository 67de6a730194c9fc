"""rlswift.distributed in ONE process: launch env, split rule and loss scales (hand-checked), rank seeds and remap,
pickle-free sharded checkpoints (save/load, refusal of planted pickles), and the hook read/write protocol.
The multi-process behaviour (FSDP2, gloo, resharding, signals) is in test_distributed_gloo.py."""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
from torch import nn

from rlswift.algorithms.grpo import accumulation_scale, policy_loss
from rlswift.checkpoint.reader import FORMAT_VERSION, CheckpointError, verify
from rlswift.distributed import (DistInfo, MainOnly, PerRankState, ShardedState, agree_config, all_gather_json, any_rank,
                                 broadcast_json, checkpoint_kind, config_differences, decoder_layers,
                                 derived_rng_state, dpo_loss_scale, fresh_seed, global_sum, grpo_loss_scale,
                                 init_distributed, load_rank_state, load_sharded, micro_batches, rank_rows,
                                 rank_seed, read_hooks, save_rank_state, save_sharded, saved_world_size,
                                 shard_model, single_process, source_rank, split_tensors, write_hooks)
from rlswift.state import Progress, RNGState

CPU = torch.device("cpu")


def fake(rank: int, world: int) -> DistInfo:
    """A DistInfo for pure functions that only read rank/world (no process group behind it)."""
    return DistInfo(rank, world, rank, CPU, rank == 0)


# ------------------------------------------------------------------------------------------- launch
def test_without_torchrun_env_there_is_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed(device="cpu")
    assert info == DistInfo(0, 1, 0, CPU, True) and not info.distributed
    assert not torch.distributed.is_initialized()
    # Every helper is the identity for one process.
    assert broadcast_json({"a": 1}, info) == {"a": 1} and all_gather_json([1], info) == [[1]]
    assert any_rank(True, info) is True and any_rank(False, info) is False
    assert agree_config({"x": 1}, info) == {"x": 1}
    assert float(global_sum(torch.tensor(2.5), info)) == 2.5


def test_partial_torchrun_env_is_refused_naming_the_missing_keys(monkeypatch):
    for k in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match=r"\['WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'\]"):
        init_distributed(device="cpu")


def test_config_differences_name_dotted_keys_with_both_values():
    a = {"seed": 0, "lora": {"rank": 0, "alpha": 16}, "lr": 1e-5}
    b = {"seed": 0, "lora": {"rank": 8, "alpha": 16}, "lr": 1e-5, "extra": True}
    assert config_differences(a, b) == ["extra: '<absent>' -> True", "lora.rank: 0 -> 8"]
    assert config_differences(a, a) == []


# ------------------------------------------------------------------------------------------- global batch split
def test_rank_rows_are_contiguous_blocks_and_uneven_splits_are_refused():
    assert [rank_rows(8, fake(r, 2)) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    assert [rank_rows(8, fake(r, 4), multiple_of=2) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6),
                                                                           slice(6, 8)]
    assert micro_batches(slice(4, 8), 2) == [slice(4, 6), slice(6, 8)]
    with pytest.raises(ValueError, match=r"rows=6 does not split into 4 ranks x 1 .*multiple of 4"):
        rank_rows(6, fake(0, 4))
    with pytest.raises(ValueError, match="multiple of 8"):
        rank_rows(12, fake(0, 4), multiple_of=2)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("accum", [1, 2, 4])
def test_one_process_loss_scale_is_the_accumulation_scale(loss_type, accum):
    info = single_process()
    rows = 8 // accum
    got = grpo_loss_scale(loss_type, info, accum, local_rows=rows, global_rows=8, local_tokens=5.0)
    assert got == accumulation_scale(loss_type, accum)


def _toy_step(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(8, 5, generator=g) - 0.1
    old = logps + 0.05 * torch.randn(8, 5, generator=g)
    mask = torch.ones(8, 5)
    for i, n in enumerate([5, 2, 4, 1, 5, 3, 2, 5]):
        mask[i, n:] = 0
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 2.0, -2.0])
    return logps, old, mask, adv


@pytest.mark.parametrize("loss_type,accum", [("grpo", 2), ("dr_grpo", 2), ("dapo", 2), ("bnpo", 1)])
def test_ranks_losses_sum_to_the_one_process_loss(loss_type, accum):
    """2 ranks x accum micro-batches, each scaled by grpo_loss_scale, sum to one process's accumulated loss."""
    logps, old, mask, adv = _toy_step()
    kw = {"max_completion_length": 5, "num_items_in_batch": mask.sum()}
    one = sum(policy_loss(logps[mb], old[mb], adv[mb], mask[mb], loss_type, **kw)[0]
              * accumulation_scale(loss_type, accum) for mb in micro_batches(slice(0, 8), accum))
    total = 0.0
    for r in range(2):
        info = fake(r, 2)
        for mb in micro_batches(rank_rows(8, info, accum), accum):
            loss, _ = policy_loss(logps[mb], old[mb], adv[mb], mask[mb], loss_type, **kw)
            if loss_type == "bnpo":  # tokens: the all_reduce over ranks, done by hand here (accum 1: whole batch)
                scale = float(mask[mb].sum()) / float(mask.sum())
            else:
                scale = grpo_loss_scale(loss_type, info, accum, local_rows=mb.stop - mb.start, global_rows=8)
            total = total + loss * scale
    assert torch.allclose(torch.as_tensor(total), one, rtol=1e-6, atol=1e-7)


def test_dpo_loss_scale_turns_local_means_into_the_global_mean():
    losses = torch.tensor([0.3, 0.7, 0.1, 0.9, 0.5, 0.2])
    parts = [losses[rank_rows(6, fake(r, 3))] for r in range(3)]
    total = sum(p.mean() * dpo_loss_scale(len(p), 6) for p in parts)
    assert abs(float(total) - float(losses.mean())) < 1e-7
    assert dpo_loss_scale(2, 8) == 0.25


# ------------------------------------------------------------------------------------------- per-rank state
def test_rank_seed_is_pinned_distinct_and_rank_0_starts_from_the_run_seed():
    assert rank_seed(0, 1, 0) == rank_seed(0, 1, 0) == 5150124977965041110  # pinned: seeds must never drift
    seeds = {rank_seed(7, r, s) for r in range(4) for s in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert fresh_seed(7, 0) == 7 and fresh_seed(7, 3) == rank_seed(7, 3, 0)


def test_remap_rule():
    assert [source_rank(r, 2) for r in range(4)] == [0, 1, None, None]  # 2 -> 4: ranks 2, 3 start fresh
    assert [source_rank(r, 4) for r in range(2)] == [0, 1]  # 4 -> 2: old ranks 2, 3 are dropped
    assert source_rank(0, 1) == 0 and source_rank(1, 1) is None


def test_derived_rng_state_equals_fresh_seeding_and_touches_no_live_stream():
    rng = RNGState()
    tg, ng = torch.Generator(), np.random.default_rng(5)
    rng.register_generator("t", tg)
    rng.register_generator("n", ng)
    before = (random.getstate(), torch.get_rng_state().clone())
    state = derived_rng_state(rng.state_dict(), 123)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
    rng.load_state_dict(state)
    assert random.random() == random.Random(123).random()
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(123)))
    assert torch.equal(torch.rand(2, generator=tg),
                       torch.rand(2, generator=torch.Generator().manual_seed(rank_seed(123, 0, 0))))
    assert ng.random() == np.random.default_rng(rank_seed(123, 1, 0)).random()


def test_rank_state_files_round_trip_and_remap(tmp_path):
    states = {r: {"r": r, "t": torch.arange(3) + r} for r in range(2)}
    files = {}
    for r in range(2):
        files |= save_rank_state(states[r], tmp_path, "rng", fake(r, 2))
    assert sorted(files) == [f"hooks/rng.rank0000{r}-of-00002.{e}" for r in range(2) for e in ("json", "safetensors")]
    for rel, entry in files.items():
        data = (tmp_path / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert saved_world_size(files, "rng") == 2
    got = load_rank_state(tmp_path, "rng", fake(1, 3), saved_world=2)
    assert got["r"] == 1 and torch.equal(got["t"], torch.arange(3) + 1)
    assert load_rank_state(tmp_path, "rng", fake(2, 3), saved_world=2) is None  # no source: caller seeds fresh
    assert load_rank_state(tmp_path, "rng", fake(0, 1), saved_world=2)["r"] == 0


# ------------------------------------------------------------------------------------------- sharded checkpoints
class Net(nn.Module):
    def __init__(self, width: int = 8, depth: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _trained(seed=0, lr=1e-2):
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, foreach=False)
    net(torch.randn(4, 8)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    return net, opt


def test_save_and_load_sharded_in_one_process_is_exact(tmp_path):
    net, opt = _trained()
    files = save_sharded(ShardedState(net, opt).state_dict(), tmp_path)
    on_disk = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert set(files) == on_disk == {"dcp/metadata.json", "dcp/rank00000.safetensors", "dcp/skeleton.json"}
    for rel, entry in files.items():
        assert entry["sha256"] == hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
    net2, opt2 = _trained(seed=1, lr=0.5)
    hook = ShardedState(net2, opt2)
    hook.load_state_dict(load_sharded(hook.state_dict(), tmp_path))
    for (n, a), (_, b) in zip(net.named_parameters(), net2.named_parameters()):
        assert torch.equal(a, b), n
    assert opt2.param_groups[0]["lr"] == 1e-2  # non-tensor values come from the checkpoint's skeleton
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_load_sharded_names_mismatching_tensors(tmp_path):
    net, opt = _trained()
    save_sharded(ShardedState(net, opt).state_dict(), tmp_path)
    deeper = Net(depth=3)
    with pytest.raises(CheckpointError, match=r"not in the checkpoint \['model/layers.2.bias'"):
        load_sharded(ShardedState(deeper).state_dict(), tmp_path)
    wider = Net(width=4)
    with pytest.raises(CheckpointError, match=r"saved with shape \[8, 8\], this run has \[4, 4\]"):
        load_sharded({"model": dict(wider.state_dict()), "optimizer": ShardedState(net, opt).state_dict()
                     ["optimizer"]}, tmp_path)


class _Payload:
    """Unpickling this creates a marker file: proof that a loader executed pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle was executed"))


def test_planted_pickles_are_never_loaded(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    import torch.distributed.checkpoint as dcp

    net, opt = _trained()
    save_sharded(ShardedState(net, opt).state_dict(), tmp_path)
    marker = tmp_path / "PWNED"
    for name in (".metadata", "__0_0.distcp"):  # what DCP's stock reader opens (both pickle formats)
        (tmp_path / "dcp" / name).write_bytes(pickle.dumps(_Payload(marker)))
    # The payload is live: torch's stock FileSystemReader unpickles .metadata and runs it.
    with pytest.raises(BaseException):  # DCP's CheckpointException derives from BaseException
        dcp.load({"x": torch.zeros(1)}, storage_reader=FileSystemReader(tmp_path / "dcp"), no_dist=True)
    assert marker.exists()
    marker.unlink()
    # rlswift's reader never opens either file; the load works and the marker stays absent.
    net2, opt2 = _trained(seed=3)
    hook = ShardedState(net2, opt2)
    hook.load_state_dict(load_sharded(hook.state_dict(), tmp_path))
    assert not marker.exists() and torch.equal(net2.layers[0].weight, net.layers[0].weight)
    # A metadata.json pointing a chunk at the pickle is refused before any file is opened.
    meta_path = tmp_path / "dcp" / "metadata.json"
    meta = orjson.loads(meta_path.read_bytes())
    next(iter(meta["tensors"].values()))["chunks"][0]["file"] = "__0_0.distcp"
    meta_path.write_bytes(orjson.dumps(meta))
    with pytest.raises(CheckpointError, match="refusing to open it"):
        load_sharded(hook.state_dict(), tmp_path)
    assert not marker.exists()


def test_split_tensors_refuses_colliding_keys_and_numpy_in_sharded_state(tmp_path):
    flat, skel, slots = split_tensors({"a": {"b": torch.ones(1)}, "c": [1, torch.zeros(2)]})
    assert list(flat) == ["a/b", "c/1"] and skel == {"a": {"b": None}, "c": [1, None]}
    assert slots == [(("a", "b"), "a/b"), (("c", 1), "c/1")]
    with pytest.raises(ValueError, match="same checkpoint key 'a/b'"):
        split_tensors({"a/b": torch.ones(1), "a": {"b": torch.ones(1)}})
    with pytest.raises(CheckpointError, match="numpy arrays"):
        save_sharded({"x": np.zeros(2)}, tmp_path)


# ------------------------------------------------------------------------------------------- hooks protocol
def test_checkpoint_kind():
    assert checkpoint_kind(Progress()) == "replicated"
    assert checkpoint_kind(ShardedState(Net())) == "sharded"
    assert checkpoint_kind(PerRankState(RNGState(), lambda r, s: None)) == "per_rank"

    class Bad:
        checkpoint_kind = "shared"

    assert checkpoint_kind(MainOnly(None)) == "main_only"
    with pytest.raises(ValueError, match="use one of sharded, per_rank, replicated, main_only"):
        checkpoint_kind(Bad())


def _manifest(folder: Path, hooks: dict, files: dict, step: int) -> dict:
    m = {"format_version": FORMAT_VERSION, "step": step, "world_size": 1, "hooks": hooks, "files": files}
    (folder / "manifest.json").write_bytes(orjson.dumps(m))
    return m


def test_write_and_read_hooks_one_process(tmp_path):
    net, opt = _trained()
    rng = RNGState()
    progress = Progress(step=5, extra={"gen_calls": 3})
    hooks = {"train_state": ShardedState(net, opt), "rng": PerRankState(rng, lambda r, s: None),
             "progress": progress}
    torch.manual_seed(42)
    hook_files, files = write_hooks(tmp_path, hooks, single_process())
    assert hook_files["rng"] == ["hooks/rng.rank00000-of-00001.json", "hooks/rng.rank00000-of-00001.safetensors"]
    assert hook_files["progress"] == ["hooks/progress.json"]
    assert "hooks/train_state.dcp/rank00000.safetensors" in hook_files["train_state"]
    manifest = _manifest(tmp_path, hook_files, files, 5)
    assert verify(tmp_path) == []  # the table lists every file with the right size and sha256
    expect = torch.rand(4)
    net2, opt2 = _trained(seed=9)
    p2 = Progress()
    torch.manual_seed(0)
    read_hooks(tmp_path, manifest, {"train_state": ShardedState(net2, opt2),
                                    "rng": PerRankState(RNGState(), lambda r, s: None), "progress": p2},
               single_process())
    assert torch.equal(torch.rand(4), expect)  # rng restored
    assert p2.step == 5 and p2.extra == {"gen_calls": 3}
    assert torch.equal(net2.layers[1].weight, net.layers[1].weight)


def test_read_hooks_remaps_per_rank_state_of_a_one_process_checkpoint(tmp_path):
    """An RNG hook saved by the one-process manager (hooks/rng.json) resumes on 2 ranks: rank 0 takes it,
    rank 1 starts fresh from fresh(rank, step)."""
    from rlswift.checkpoint.codec import encode

    (tmp_path / "hooks").mkdir()
    tree, tensors = encode({"v": 1})
    (tmp_path / "hooks" / "rng.json").write_bytes(orjson.dumps(tree))
    manifest = {"step": 7, "hooks": {"rng": ["hooks/rng.json"]}, "files": {"hooks/rng.json": {}}}
    calls = []

    class Hook:
        got = None

        def state_dict(self):
            return {}

        def load_state_dict(self, sd):
            self.got = sd

    for r in range(2):
        h = Hook()
        read_hooks(tmp_path, manifest, {"rng": PerRankState(h, lambda rank, step: calls.append((rank, step)) or
                                                            {"fresh": rank})}, fake(r, 2))
        assert h.got == ({"v": 1} if r == 0 else {"fresh": 1})
    assert calls == [(1, 7)]


def test_decoder_layers_and_world_size_one_sharding():
    net = Net()
    assert decoder_layers(net) == list(net.layers)
    assert shard_model(net, single_process()) is net  # one process: nothing to shard, same object
    with pytest.raises(ValueError, match="cannot find the decoder layers of Sequential"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_a_corrupt_chunk_file_is_a_checkpoint_error_not_a_base_exception(tmp_path):
    net, opt = _trained()
    save_sharded(ShardedState(net, opt).state_dict(), tmp_path)
    (tmp_path / "dcp" / "rank00000.safetensors").write_bytes(b"\x00" * 64)
    hook = ShardedState(*_trained(seed=2))
    with pytest.raises(CheckpointError, match="sharded load of .* failed on rank 0"):
        load_sharded(hook.state_dict(), tmp_path)


def test_main_only_hooks_are_loaded_on_rank_0_only(tmp_path):
    """Run logs live on rank 0: another rank never truncates the file on resume."""
    from rlswift.runlog import JsonlLog

    log = JsonlLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1})
    hook_files, files = write_hooks(tmp_path / "ck", {"metrics_log": MainOnly(log)}, single_process())
    manifest = _manifest(tmp_path / "ck", hook_files, files, 1)
    log.write({"step": 2})  # written after the checkpoint: a resume drops it
    size = (tmp_path / "metrics.jsonl").stat().st_size
    read_hooks(tmp_path / "ck", manifest, {"metrics_log": MainOnly(None)}, fake(1, 2))
    assert (tmp_path / "metrics.jsonl").stat().st_size == size  # rank 1 left the file alone
    read_hooks(tmp_path / "ck", manifest, {"metrics_log": MainOnly(log)}, fake(0, 2))
    assert (tmp_path / "metrics.jsonl").read_bytes() == b'{"step":1}\n'
    log.close()


# ------------------------------------------------------------------------------------------- phase 2: recipes
def _cfg(**kw):
    from types import SimpleNamespace

    from rlswift.recipes._common import OptimizerConfig

    return SimpleNamespace(async_save=kw.get("async_save", False),
                           optimizer=OptimizerConfig(name=kw.get("optimizer", "adamw")))


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_bnb_8bit", "galore_adamw", "galore_adamw_8bit",
                                  "q_galore_adamw_8bit"])
def test_optimizers_that_cannot_step_on_shards_are_refused_on_several_ranks(name):
    from rlswift.config import ConfigError
    from rlswift.recipes._common import check_distributed

    check_distributed(_cfg(optimizer=name), single_process(), {})  # one process: anything goes
    with pytest.raises(ConfigError, match=rf"optimizer.name='{name}' cannot run on 2 ranks: .* Use "
                                          r"optimizer.name=adamw"):
        check_distributed(_cfg(optimizer=name), fake(0, 2), {})
    for ok in ("adamw", "adamw_torch", "adamw_torch_fused", "my_pkg.make_optimizer"):  # a dotted path: the user's
        check_distributed(_cfg(optimizer=ok), fake(1, 2), {})


def test_async_save_and_uneven_splits_are_refused_on_several_ranks(tmp_path):
    from rlswift.checkpoint import CheckpointManager
    from rlswift.config import ConfigError
    from rlswift.recipes._common import check_distributed

    with pytest.raises(ConfigError, match="async_save=true is not supported with 2 ranks"):
        check_distributed(_cfg(async_save=True), fake(0, 2), {})
    with pytest.raises(CheckpointError, match="async_save=true is not supported with 2 ranks"):
        CheckpointManager(tmp_path, async_save=True, info=fake(0, 2))
    with pytest.raises(ConfigError, match=r"prompts_per_step=3 does not split into 2 ranks x 1 micro-batches.*"
                                          r"multiple of 2 \(e.g. \[2, 4, 6\]\)"):
        check_distributed(_cfg(), fake(0, 2), {"prompts_per_step": (3, 1)})
    with pytest.raises(ConfigError, match="batch_size=4 does not split into 2 ranks x 4 micro-batches"):
        check_distributed(_cfg(), fake(0, 2), {"batch_size": (4, 4)})
    check_distributed(_cfg(), fake(0, 2), {"batch_size": (8, 4)})


def test_faults_target_a_rank_and_never_fire_after_a_torchrun_restart(monkeypatch):
    from rlswift.checkpoint.writer import fault_requested

    monkeypatch.setenv("RLSWIFT_FAULT", "kill@3,term@5:1,kill-in-save@4:0")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert fault_requested("kill", 3, 0) and fault_requested("kill", 3, 1)  # no rank: every rank
    assert not fault_requested("kill", 4, 0) and not fault_requested("term", 3, 0)
    assert fault_requested("term", 5, 1) and not fault_requested("term", 5, 0)
    assert fault_requested("kill-in-save", 4, 0) and not fault_requested("kill-in-save", 4, 1)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the restarted group goes on
    assert not fault_requested("kill", 3, 0)


def test_optimizer_state_by_name_and_by_index_round_trip():
    from rlswift.checkpoint.inspect import compare_states
    from rlswift.distributed import one_process_parts, optimizer_by_index, optimizer_by_name

    net, opt = _trained()
    names = [n for n, _ in net.named_parameters()]
    one = opt.state_dict()
    by_name = optimizer_by_name(one, names)
    assert list(by_name["state"]) == names and by_name["param_groups"][0]["params"] == names
    assert compare_states({"o": optimizer_by_index(by_name)}, {"o": one}) == []
    # The sharded hook's state is keyed by name; its one-process view is what the one-process hooks save.
    sharded = ShardedState(net, opt).state_dict()
    assert compare_states(one_process_parts(sharded), {"model": {n: p.detach() for n, p in net.named_parameters()},
                                                       "optimizer": one}
                          ) == []
    with pytest.raises(KeyError, match="the optimizer state has 4 parameters, this run's optimizer 3"):
        optimizer_by_name(one, names[:3])


def test_read_sharded_full_assembles_whole_tensors_without_a_process_group(tmp_path):
    from rlswift.checkpoint.inspect import compare_states
    from rlswift.distributed import read_sharded_full

    net, opt = _trained()
    state = ShardedState(net, opt).state_dict()
    save_sharded(state, tmp_path)
    assert compare_states({"s": read_sharded_full(tmp_path)}, {"s": state}) == []


def test_one_process_runner_is_a_plain_call_and_chunks_are_the_engine_weights(tiny_model_dir):
    from rlswift.distributed import engine_weight_chunks, shard_for_calls
    from rlswift.models.policy import engine_weights, load_policy

    model = load_policy(tiny_model_dir, lora_rank=4, seed=0)
    run = shard_for_calls(model, single_process(), keep_gathered=True)
    assert not run.sharded and run(lambda m, x: (m, x), 3) == (model, 3)
    run.release()  # a no-op for one process
    chunks = list(engine_weight_chunks(model))
    want = [(n, t) for n, t in engine_weights(model) if n != "lm_head.weight"]  # the tied head: sent once
    assert [n for c in chunks for n, _ in c] == [n for n, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip([x for c in chunks for x in c], want))
    # One chunk per decoder layer (fused q/k/v and gate/up stay together), the rest outside them.
    assert [sorted({n.split(".")[2] for n, _ in c if ".layers." in n}) for c in chunks] == [[], ["0"], ["1"], []]
    changed = {"model.layers.1.self_attn.q_proj.weight"}
    assert [[n for n, _ in c][0] for c in engine_weight_chunks(model, changed)] == [
        "model.layers.1.self_attn.q_proj.weight"]


def test_shared_prompt_path_is_agreed_for_every_rank():
    from rlswift.recipes._ranks import shared_prompt_agreed

    # 8 rows: prompts [a a a a | b b b c] (columns 0-2), completions after; T = 2.
    ids = torch.tensor([[1, 2, 3, 9, 9]] * 4 + [[4, 5, 6, 9, 9]] * 3 + [[7, 8, 9, 9, 9]])
    mask = torch.ones_like(ids)
    # 2 ranks, 1 micro-batch: rank 0 rows 0-3 (a a a a), rank 1 rows 4-7 (b b b c): both repeat a prompt.
    assert shared_prompt_agreed(ids, mask, 2, fake(0, 2), 0, 1) is True
    # 2 micro-batches each: rank 1's second one holds rows 6-7 (b c): no repeat there -> every rank plain.
    assert shared_prompt_agreed(ids, mask, 2, fake(0, 2), 1, 2) is False
    assert shared_prompt_agreed(ids, mask, 2, fake(1, 2), 0, 2) is True
    assert shared_prompt_agreed(ids, mask, 4, fake(0, 2), 0, 1) is False  # a one-token prompt: nothing shared
