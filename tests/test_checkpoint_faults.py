"""Faults: SIGKILL mid-save, corrupt/truncated files, bad manifests, full disk, malicious pickles.

Each must end in a clear error or a safe fallback, never in a silently different load.
"""

import errno
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
import torch

from rlswift.checkpoint import CheckpointError, CheckpointManager, verify
from test_checkpoint_manager import Box

REPO = Path(__file__).resolve().parents[1]


def hooks(v):
    return {"w": Box({"t": torch.full((3,), float(v))}), "p": Box({"step": v}), "x": Box([v]), "y": Box((v,))}


def fresh():
    return {k: Box() for k in ("w", "p", "x", "y")}


@pytest.fixture
def saved(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, hooks(1), config={})
    return mgr, tmp_path / "checkpoint-1"


def set_manifest(ckpt: Path, edit):
    m = orjson.loads((ckpt / "manifest.json").read_bytes())
    edit(m)
    (ckpt / "manifest.json").write_bytes(orjson.dumps(m))


def assert_refused(mgr, ckpt, pattern):
    h = fresh()
    with pytest.raises(CheckpointError, match=pattern):
        mgr.load(ckpt, h)
    assert all(b.loaded == 0 for b in h.values())  # verified before touching any hook


def test_sigkill_in_save_leaves_previous_checkpoint_usable(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint_faults import hooks
        from rlswift.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        mgr.save(1, hooks(1), config={{"seed": 1}})
        mgr.save(2, hooks(2), config={{"seed": 1}})
        print("NOT KILLED")
    """)
    env = dict(os.environ, RLSWIFT_FAULT="kill@99,kill-in-save@2", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "NOT KILLED" not in r.stdout
    tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-checkpoint-2-")]
    assert len(tmps) == 1 and not (tmps[0] / "manifest.json").exists()
    written = list((tmps[0] / "hooks").iterdir())
    assert 0 < len(written) < 6  # killed part way: 2 of 4 hooks written (w has 2 files)
    assert not (tmp_path / "checkpoint-2").exists()
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-1"

    mgr = CheckpointManager(tmp_path)
    ckpt = mgr.resolve_resume("auto")
    assert ckpt == tmp_path / "checkpoint-1" and verify(ckpt) == []
    h = fresh()
    mgr.load(ckpt, h)
    assert h["p"].state == {"step": 1} and torch.equal(h["w"].state["t"], torch.ones(3))
    mgr.save(3, hooks(3), config={})  # the next save cleans the partial folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-3", "latest"]


def test_fault_env_for_other_step_is_inert(tmp_path, monkeypatch):
    monkeypatch.setenv("RLSWIFT_FAULT", "kill-in-save@99,kill@1,kill-in-save@11")
    CheckpointManager(tmp_path).save(1, hooks(1), config={})
    assert verify(tmp_path / "checkpoint-1") == []


def test_truncated_file(saved):
    mgr, ckpt = saved
    f = ckpt / "hooks" / "w.safetensors"
    f.write_bytes(f.read_bytes()[:-5])
    assert any("w.safetensors" in p and "size" in p for p in verify(ckpt))
    assert_refused(mgr, ckpt, r"w\.safetensors: size")


def test_flipped_byte_in_safetensors(saved):
    mgr, ckpt = saved
    f = ckpt / "hooks" / "w.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # a payload byte: the file still parses, only the checksum can tell
    f.write_bytes(bytes(data))
    assert_refused(mgr, ckpt, r"w\.safetensors: sha256 does not match")


def test_manifest_mismatch_size_and_sha(saved):
    mgr, ckpt = saved
    set_manifest(ckpt, lambda m: m["files"]["hooks/p.json"].update(size=1))
    assert_refused(mgr, ckpt, r"p\.json: size")
    set_manifest(ckpt, lambda m: m["files"]["hooks/p.json"].update(size=(ckpt / "hooks/p.json").stat().st_size,
                                                                    sha256="0" * 64))
    assert_refused(mgr, ckpt, r"p\.json: sha256")


def test_manifest_listing_unknown_or_outside_files(saved):
    mgr, ckpt = saved
    set_manifest(ckpt, lambda m: m["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0"}}))
    assert_refused(mgr, ckpt, "outside the checkpoint")


def test_newer_format_version(saved):
    mgr, ckpt = saved
    set_manifest(ckpt, lambda m: m.update(format_version=3))
    assert_refused(mgr, ckpt, r"written by a newer rlswift \(format 3 > 2\); upgrade rlswift")


def test_missing_folder_and_missing_manifest(saved, tmp_path):
    mgr, ckpt = saved
    assert_refused(mgr, tmp_path / "checkpoint-77", "no such folder")
    (ckpt / "manifest.json").unlink()
    assert_refused(mgr, ckpt, "incomplete checkpoint: manifest.json is missing")


def test_garbled_manifest(saved):
    mgr, ckpt = saved
    (ckpt / "manifest.json").write_bytes(b'{"format_version": 1, "files": ')
    assert_refused(mgr, ckpt, "unreadable manifest")


def test_auto_skips_incomplete_with_warning(saved):
    mgr, ckpt = saved
    mgr.save(2, hooks(2), config={})
    (ckpt.parent / "checkpoint-2" / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="checkpoint-2.*incomplete"):
        assert mgr.resolve_resume("auto") == ckpt


def test_full_disk_during_fsync(saved, monkeypatch):
    """ENOSPC raised by fsync (delayed allocation) part way through the hook files."""
    mgr, ckpt = saved
    root = ckpt.parent
    calls = {"n": 0}
    real = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match="disk full") as e:
        mgr.save(2, hooks(2), config={})
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "latest"]  # tmp cleaned, nothing new
    h = fresh()
    mgr.load(ckpt, h)
    assert h["p"].state == {"step": 1}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: writing more fails with a real ENOSPC from the kernel."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a real ENOSPC needs a size-limited tmpfs, and mounting one needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a size-limited tmpfs was refused here ({r.stderr.strip()}); no real ENOSPC possible")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("payload", ["safetensors", "json"])
@pytest.mark.parametrize("blocking", [True, False])
def test_real_disk_full(small_disk, capsys, payload, blocking):
    mgr = CheckpointManager(small_disk)
    mgr.save(1, hooks(1), config={})
    big = {"t": torch.ones(1 << 19)} if payload == "safetensors" else {"s": "x" * (2 << 20)}  # 2 MiB > 1 MiB disk
    h = {**hooks(2), "big": Box(big)}
    if blocking:
        with pytest.raises(CheckpointError, match="disk full while writing checkpoint-2") as e:
            mgr.save(2, h, config={})
    else:
        mgr.save(2, h, config={}, blocking=False)  # returns: the write fails on the background thread
        with pytest.raises(CheckpointError, match="background save of checkpoint-2 failed: disk full") as e:
            mgr.wait()
        assert "background save of checkpoint-2 failed" in capsys.readouterr().err  # said at once, too
        mgr.wait()  # raised once
    cause = e.value.__cause__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    assert cause is not None and cause.errno == errno.ENOSPC
    assert "\n" not in str(e.value)  # one line
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint-1", "latest"]  # tmp folder removed
    assert (small_disk / "latest").read_text().strip() == "checkpoint-1"
    assert CheckpointManager(small_disk).resolve_resume("auto") == small_disk / "checkpoint-1"
    f = fresh()
    mgr.load(small_disk / "checkpoint-1", f)
    assert f["p"].state == {"step": 1}
    mgr.save(3, hooks(3), config={})  # space is free again: the next save works
    assert verify(small_disk / "checkpoint-3") == []


def test_disk_full_recognised_through_library_errors():
    from safetensors import SafetensorError

    from rlswift.checkpoint.writer import is_disk_full

    st = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                         '"No space left on device" })')
    assert is_disk_full(st)
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "x")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(SafetensorError("header too large"))


class Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_file(ckpt: Path, rel: str, marker: Path, hook: str, replace: str | None = None):
    f = ckpt / rel
    torch.save({"x": Evil(str(marker))}, f) if rel.endswith(".pt") else f.write_bytes(
        pickle.dumps({"x": Evil(str(marker))}))

    def edit(m):
        m["files"][rel] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}
        if replace is None:
            m["hooks"][hook].append(rel)
    set_manifest(ckpt, edit)


@pytest.mark.parametrize("rel,replace", [("hooks/p.pt", None), ("hooks/w.safetensors", "w"),
                                         ("hooks/x.json", "x")])
def test_malicious_pickle_is_never_run(saved, tmp_path, rel, replace):
    mgr, ckpt = saved
    marker = tmp_path / "PWNED"
    hook = "p" if replace is None else replace
    _pickle_file(ckpt, rel, marker, hook, replace)
    assert verify(ckpt) == []  # checksums match: only the reader's refusal protects us
    assert_refused(mgr, ckpt, "never unpickles|cannot be parsed")
    assert not marker.exists()
