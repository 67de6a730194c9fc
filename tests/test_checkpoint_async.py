"""Async save: snapshot in the caller's thread, write in the background with the same atomic protocol."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

import orjson
import pytest
import torch

import rlswift.checkpoint.manager as mm
from rlswift.checkpoint import CheckpointError, CheckpointManager, read_checkpoint, verify
from rlswift.runlog import JsonlLog
from test_checkpoint_manager import Box, make_hooks

REPO = Path(__file__).resolve().parents[1]


def file_digests(ckpt: Path) -> dict:
    return orjson.loads((ckpt / "manifest.json").read_bytes())["files"]


def test_async_equals_sync_bit_for_bit(tmp_path):
    hooks = make_hooks(seed=3)  # model with tied weights, AdamW after a step, RNG streams, big ints
    sync = CheckpointManager(tmp_path / "sync").save(7, hooks, config={"a": 1}, metrics={"loss": 0.5})
    mgr = CheckpointManager(tmp_path / "async", async_save=True)
    out = mgr.save(7, hooks, config={"a": 1}, metrics={"loss": 0.5})
    mgr.wait()
    assert out == tmp_path / "async" / "checkpoint-7" and verify(out) == []
    assert file_digests(out) == file_digests(sync)  # every file: same bytes (sha256 and size)
    for rel in file_digests(out):
        assert (out / rel).read_bytes() == (sync / rel).read_bytes()
    assert (tmp_path / "async" / "latest").read_text().strip() == "checkpoint-7"
    assert mgr.last_save["stall"] > 0 and mgr.last_save["write"] > 0
    assert mgr.last_save["live_bytes"] > 0  # model parameters and AdamW state: written without a copy


def test_later_mutation_does_not_change_what_is_written(tmp_path, monkeypatch):
    gate = threading.Event()
    real = mm.write_tmp

    def gated(*a, **k):  # hold the background writer until the live state has been changed
        assert gate.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(mm, "write_tmp", gated)
    w = torch.arange(6, dtype=torch.float32)
    state = {"w": w, "n": [1, 2], "d": {"k": "v"}}
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"a": Box(state)}, config={})
    w.add_(100)  # what training does next: in-place updates, and changes to containers
    state["n"].append(3)
    state["d"]["k"] = "changed"
    gate.set()
    mgr.wait()
    saved = read_checkpoint(tmp_path / "checkpoint-1").states["a"]
    assert torch.equal(saved["w"], torch.arange(6, dtype=torch.float32))
    assert saved["n"] == [1, 2] and saved["d"] == {"k": "v"}


def test_optimizer_step_waits_until_its_tensors_are_written(tmp_path, monkeypatch):
    gate = threading.Event()
    real = mm.write_tmp

    def gated(*a, **k):
        assert gate.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(mm, "write_tmp", gated)
    hooks = make_hooks(seed=5)
    model, opt = hooks["model"], hooks["optim"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, hooks, config={})
    assert mgr.last_save["copied_bytes"] == 0 and mgr.last_save["live_bytes"] > 0  # nothing copied

    def train_step():
        model(torch.tensor([3, 4])).sum().backward()
        opt.step()  # the fence: waits for the background writer

    t = threading.Thread(target=train_step)
    t.start()
    t.join(0.5)
    assert t.is_alive()  # blocked in step() while the writer is held
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    gate.set()
    t.join(30)
    mgr.wait()
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])  # the step ran afterwards
    assert mgr.last_save["fence_wait"] > 0.3
    saved = read_checkpoint(tmp_path / "checkpoint-1").states
    assert all(torch.equal(saved["model"][k], v) for k, v in before.items())  # the step-boundary values
    assert torch.equal(saved["optim"]["state"][0]["exp_avg"], moments)
    mgr.close()
    opt.step()  # close() removed the fence


def test_one_save_in_flight_and_buffers_reused(tmp_path, monkeypatch):
    started, gate = threading.Event(), threading.Event()
    real = mm.write_tmp
    order = []

    def gated(tmp, step, *a, **k):
        order.append(("start", step))
        if step == 1:
            started.set()
            assert gate.wait(30)
        real(tmp, step, *a, **k)
        order.append(("end", step))

    monkeypatch.setattr(mm, "write_tmp", gated)
    box = Box({"w": torch.ones(4)})
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"a": box}, config={})
    assert started.wait(30)
    buffers = {k: v.data_ptr() for k, v in mgr._stager._buffers.items()}
    threading.Timer(0.2, gate.set).start()
    box.state = {"w": torch.full((4,), 2.0)}
    mgr.save(2, {"a": box}, config={})  # waits for save 1 before snapshotting
    assert order[:2] == [("start", 1), ("end", 1)]
    assert {k: v.data_ptr() for k, v in mgr._stager._buffers.items()} == buffers  # same staging memory
    mgr.wait()
    assert order == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert torch.equal(read_checkpoint(tmp_path / "checkpoint-1").states["a"]["w"], torch.ones(4))
    assert torch.equal(read_checkpoint(tmp_path / "checkpoint-2").states["a"]["w"], torch.full((4,), 2.0))


def test_background_failure_surfaces_on_wait_and_next_save(tmp_path, monkeypatch, capsys):
    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"a": Box(1)}, config={})
    mgr.wait()
    real = os.fsync

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    mgr.save(2, {"a": Box(2)}, config={})
    with pytest.raises(CheckpointError, match=r"background save of checkpoint-2 failed: cannot write checkpoint-2 "
                                              r".*Input/output error"):
        mgr.save(3, {"a": Box(3)}, config={})  # the next save reports the previous failure
    assert "background save of checkpoint-2 failed" in capsys.readouterr().err
    mgr.save(3, {"a": Box(3)}, config={})  # still broken: failure kept for wait()
    with pytest.raises(CheckpointError, match="checkpoint-3 failed"):
        mgr.wait()
    monkeypatch.setattr(os, "fsync", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "latest"]
    # A failure nobody waited for is still reported when the process exits (the manager's atexit hook).
    monkeypatch.setattr(os, "fsync", broken)
    mgr.save(4, {"a": Box(4)}, config={})
    mgr._inflight.thread.join()
    capsys.readouterr()
    mm._report_unobserved(weakref.ref(mgr))
    assert "nobody waited for: background save of checkpoint-4 failed" in capsys.readouterr().err


def test_refused_state_fails_in_the_callers_thread(tmp_path):
    mgr = CheckpointManager(tmp_path, async_save=True)
    with pytest.raises(CheckpointError, match="hook 'b'.*set"):
        mgr.save(1, {"a": Box(1), "b": Box({1, 2})}, config={})
    assert mgr._inflight is None and not (tmp_path / "checkpoint-1").exists()
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
        mgr.save(1, {"a": Box(1)}, config={"x": {(1, 2): 3}})


def test_jsonl_log_offset_is_taken_at_the_snapshot(tmp_path):
    log = JsonlLog(tmp_path / "metrics.jsonl")
    mgr = CheckpointManager(tmp_path, async_save=True)
    log.write({"step": 1})
    mgr.save(1, {"log": log}, config={})
    log.write({"step": 2})  # after the step boundary: not part of checkpoint-1
    mgr.wait()
    offset = read_checkpoint(tmp_path / "checkpoint-1").states["log"]["offset"]
    assert offset == len(b'{"step":1}\n')
    log.close()


def test_sigkill_during_background_write_keeps_previous(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint_faults import hooks
        from rlswift.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r}, async_save=True)
        mgr.save(1, hooks(1), config={{"seed": 1}})
        h = hooks(2)
        mgr.save(2, h, config={{"seed": 1}})
        print("SAVE RETURNED", flush=True)
        for _ in range(600):  # training goes on while the background thread writes (and gets killed)
            h["w"].state["t"].add_(1)
            time.sleep(0.05)
        print("NOT KILLED", flush=True)
    """)
    env = dict(os.environ, RLSWIFT_FAULT="kill-in-save@2", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "SAVE RETURNED" in r.stdout and "NOT KILLED" not in r.stdout
    tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-checkpoint-2-")]
    assert len(tmps) == 1 and not (tmps[0] / "manifest.json").exists()  # killed part way
    assert not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"
    mgr = CheckpointManager(tmp_path)
    assert mgr.resolve_resume("auto") == tmp_path / "checkpoint-1"
    from test_checkpoint_faults import fresh

    h = fresh()
    mgr.load(tmp_path / "checkpoint-1", h)
    assert h["p"].state == {"step": 1} and torch.equal(h["w"].state["t"], torch.ones(3))
