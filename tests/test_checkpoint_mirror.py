"""mirror_to: committed checkpoints uploaded in the background to a real S3-compatible server (moto's server mode on
loopback, through s3fs); resume=auto restores from it when the local run folder is gone."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rlswift.checkpoint import CheckpointError, CheckpointManager, read_checkpoint
from rlswift.checkpoint.inspect import compare_states
from rlswift.runlog import JsonlLog, read_jsonl
from test_checkpoint_manager import make_hooks

pytest.importorskip("s3fs", reason="the mirror tests need s3fs (pip install 'rlswift[mirror]')")
pytest.importorskip("moto.server", reason="the mirror tests need moto[server] (in the dev extra)")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (any free port); yields fsspec options for it."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "eu-west-1"}, "skip_instance_cache": True}
    yield opts
    server.stop()


@pytest.fixture
def bucket(s3, request):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    name = "ckpt-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40]
    fs.mkdir(name)
    return fs, f"s3://{name}/run"


def hooks_with_log(root: Path, seed: int):
    return {**make_hooks(seed), "metrics_log": JsonlLog(root / "metrics.jsonl")}


def states(ckpt: Path) -> dict:
    return read_checkpoint(ckpt).states


def test_resume_from_mirror_after_local_folder_is_deleted(tmp_path, s3, bucket):
    fs, url = bucket
    root = tmp_path / "run"
    h = hooks_with_log(root, 0)
    mgr = CheckpointManager(root, save_total_limit=2, mirror_to=url, mirror_options=s3, async_save=True)
    for step in (1, 2, 3):
        h["metrics_log"].write({"step": step})
        h["progress"].state = {"step": step}
        mgr.save(step, h, config={"seed": 0}, metrics={"loss": 1.0 / step})
        mgr.wait()  # (without it, an upload still running when the next save commits makes that one skipped)
    h["metrics_log"].write({"step": 4})  # written after the last checkpoint: dropped on resume
    mgr.close()
    bucket_path = url[len("s3://"):]
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(bucket_path)) == [
        "checkpoint-2", "checkpoint-3", "latest", "metrics.jsonl"]  # remote retention: newest 2
    assert fs.cat_file(f"{bucket_path}/latest") == b"checkpoint-3\n"
    expected = states(root / "checkpoint-3")

    shutil.rmtree(root)  # the machine (and its disk) is gone
    h2 = hooks_with_log(root, 1)  # the new run opens its log first (an empty file), as the recipes do
    mgr2 = CheckpointManager(root, save_total_limit=2, mirror_to=url, mirror_options=s3)
    path = mgr2.resolve_resume("auto")
    assert path == root / "checkpoint-3" and (root / "latest").read_text() == "checkpoint-3\n"
    mgr2.load(path, h2)
    assert compare_states(expected, states(path)) == []
    assert h2["progress"].state == {"step": 3}
    for (k, a), b in zip(h["model"].state_dict().items(), h2["model"].state_dict().values()):
        assert torch.equal(a, b), k
    h2["metrics_log"].write({"step": 4})
    h2["metrics_log"].close()
    assert [r["step"] for r in read_jsonl(root / "metrics.jsonl")] == [1, 2, 3, 4]  # restored, cut, continued
    mgr2.close()


def test_partial_upload_is_never_a_checkpoint(tmp_path, s3, bucket, monkeypatch):
    fs, url = bucket
    root = tmp_path / "run"
    mgr = CheckpointManager(root, mirror_to=url, mirror_options=s3)
    mgr.save(1, make_hooks(1), config={})
    mgr.wait()
    real = mgr.mirror.fs.pipe_file

    def network_gone(path, *a, **k):
        if path.endswith("checkpoint-2/manifest.json"):
            raise ConnectionError("connection reset by peer")
        return real(path, *a, **k)

    monkeypatch.setattr(mgr.mirror.fs, "pipe_file", network_gone)
    mgr.save(2, make_hooks(2), config={})
    with pytest.raises(CheckpointError, match="mirror upload of checkpoint-2 .* failed: ConnectionError"):
        mgr.wait()
    mgr.close()
    b = url[len("s3://"):]
    assert fs.exists(f"{b}/checkpoint-2/hooks/model.safetensors")  # the files went up, the manifest did not
    assert mgr.mirror.remote_steps() == {1: "checkpoint-1"}
    shutil.rmtree(root)
    mgr2 = CheckpointManager(root, mirror_to=url, mirror_options=s3)
    assert mgr2.resolve_resume("auto") == root / "checkpoint-1"
    mgr2.close()


def test_corrupt_remote_newest_falls_back(tmp_path, s3, bucket):
    fs, url = bucket
    root = tmp_path / "run"
    mgr = CheckpointManager(root, mirror_to=url, mirror_options=s3)
    for step in (1, 2):
        mgr.save(step, make_hooks(step), config={})
        mgr.wait()
    mgr.close()
    b = url[len("s3://"):]
    data = bytearray(fs.cat_file(f"{b}/checkpoint-2/hooks/optim.safetensors"))
    data[-1] ^= 1
    fs.pipe_file(f"{b}/checkpoint-2/hooks/optim.safetensors", bytes(data))
    shutil.rmtree(root)
    mgr2 = CheckpointManager(root, mirror_to=url, mirror_options=s3)
    with pytest.warns(UserWarning, match=r"skipping mirrored checkpoint-2 .*optim.safetensors: sha256"):
        assert mgr2.resolve_resume("auto") == root / "checkpoint-1"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1", "latest"]  # no download leftovers
    mgr2.close()


def test_sigkill_mid_upload_leaves_previous_remote(tmp_path, s3, bucket):
    fs, url = bucket
    root = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint_manager import make_hooks
        from rlswift.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(root)!r}, mirror_to={url!r}, mirror_options={s3!r})
        mgr.save(1, make_hooks(1), config={{}})
        mgr.wait()
        mgr.save(2, make_hooks(2), config={{}})
        mgr.wait()
        print("NOT KILLED")
    """)
    env = dict(os.environ, RLSWIFT_FAULT="kill-in-upload@2", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    b = url[len("s3://"):]
    assert fs.exists(f"{b}/checkpoint-2/hooks") and not fs.exists(f"{b}/checkpoint-2/manifest.json")
    assert fs.cat_file(f"{b}/latest") == b"checkpoint-1\n"
    shutil.rmtree(root)
    mgr = CheckpointManager(root, mirror_to=url, mirror_options=s3)
    assert mgr.resolve_resume("auto") == root / "checkpoint-1"
    # The next upload of step 2 replaces the partial remote folder and completes it.
    mgr.save(2, make_hooks(2), config={})
    mgr.close()
    assert fs.cat_file(f"{b}/latest") == b"checkpoint-2\n" and fs.exists(f"{b}/checkpoint-2/manifest.json")


def test_bad_mirror_url_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="mirror_to='nosuchproto://x/y'"):
        CheckpointManager(tmp_path, mirror_to="nosuchproto://x/y")


def test_unreachable_mirror(tmp_path):
    dead = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s",
            "client_kwargs": {"region_name": "eu-west-1"}, "config_kwargs": {"retries": {"max_attempts": 1},
                                                                               "connect_timeout": 2}}
    root = tmp_path / "run"
    mgr = CheckpointManager(root, mirror_to="s3://nobucket/run", mirror_options=dead)
    with pytest.raises(CheckpointError, match="cannot list the mirror s3://nobucket/run: .*remove mirror_to"):
        mgr.resolve_resume("auto")  # nothing local: starting over could silently drop the mirrored run
    CheckpointManager(root).save(1, make_hooks(1), config={})
    with pytest.warns(UserWarning, match="using the local checkpoints only"):
        assert mgr.resolve_resume("auto") == root / "checkpoint-1"
