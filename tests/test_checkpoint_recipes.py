"""Checkpoint features through the real DPO CLI: async saves resume exactly, a run resumes from an S3 mirror after
its folder is deleted, the best checkpoint is kept and pointed to.

These need the recipe keys `async_save`, `mirror_to`, `metric_for_best` / `greater_is_better`; until the recipes
have them, each test skips saying which key is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from e2e import REPO, compare_runs, env_for
from rlswift.runlog import read_jsonl

pytestmark = pytest.mark.slow
BASE = ["-m", "rlswift.recipes.dpo", "--config", "recipes/dpo_tiny.yaml"]


def needs(*keys: str) -> None:
    from rlswift.recipes.dpo import DPOConfig

    missing = [k for k in keys if k not in DPOConfig.__dataclass_fields__]
    if missing:
        pytest.skip(f"the DPO recipe has no {', '.join(missing)} key yet")


def dpo(out, *overrides, cache, fault=None, env=None):
    """The DPO CLI in a fresh process (like e2e.run_cli, plus extra environment variables)."""
    extra = {**(env or {}), **({"RLSWIFT_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, *BASE, f"output_dir={out}", *overrides], cwd=REPO,
                          env=env_for(cache, **extra), capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rlswift_cache):
    out = tmp_path_factory.mktemp("dpo-sync") / "reference"
    ok(dpo(out, cache=rlswift_cache))
    return out


@pytest.mark.parametrize("fault", ["kill@5", "term@4", "kill-in-save@6"])
def test_async_save_resumes_exactly(request, tmp_path, rlswift_cache, fault):
    needs("async_save")
    reference = request.getfixturevalue("reference")
    out = tmp_path / "async"
    first = dpo(out, "async_save=true", cache=rlswift_cache, fault=fault)
    assert first.returncode == (0 if fault.startswith("term") else -9), first.stderr[-3000:]
    ok(dpo(out, "async_save=true", "resume=auto", cache=rlswift_cache))
    compare_runs(reference, out, 8)  # same metrics and final state as the uninterrupted sync run


def test_resume_from_s3_mirror_after_output_dir_is_deleted(request, tmp_path, rlswift_cache):
    needs("mirror_to")
    reference = request.getfixturevalue("reference")
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import s3fs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "eu-west-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="testing", secret="testing",
                          client_kwargs={"region_name": "eu-west-1"}).mkdir("runs")
        out = tmp_path / "mirrored"
        mirror = ["mirror_to=s3://runs/dpo"]
        first = dpo(out, *mirror, cache=rlswift_cache, fault="term@4", env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        shutil.rmtree(out)  # the machine is gone; only the mirror is left
        resumed = ok(dpo(out, *mirror, "resume=auto", cache=rlswift_cache, env=env))
        assert "downloaded checkpoint-4" in resumed.stderr
        compare_runs(reference, out, 8)
    finally:
        server.stop()


def test_best_checkpoint_is_kept(tmp_path, rlswift_cache):
    needs("metric_for_best", "greater_is_better")
    out = tmp_path / "best"
    ok(dpo(out, "save_steps=1", "save_total_limit=1", "metric_for_best=loss", "greater_is_better=false",
           cache=rlswift_cache))
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    best = min(losses, key=lambda s: (losses[s], s))
    assert (out / "best").read_text().strip() == f"checkpoint-{best}"
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept == sorted({best, max(losses)})
