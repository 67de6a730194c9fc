"""Trackers: every step exactly once in each tracker's own store after a SIGKILL and a resume.

The recipe's pattern, in two real processes: log steps 1..5 (record to metrics.jsonl, then to the trackers),
checkpoint at step 3 through `CheckpointManager`, SIGKILL; a new process loads the checkpoint and logs 4..8.
Each tracker is then read back from its files (TensorBoard event files, W&B offline transaction logs, the MLflow
sqlite store, trackio's sqlite store), never through the object that wrote it. Skips a tracker whose library is
not installed (`pip install 'rlswift[tensorboard|wandb|mlflow|trackio]'`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlswift.trackers import TRACKERS, Trackers, flatten

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import os, signal, sys
from pathlib import Path
from rlswift.checkpoint import CheckpointManager
from rlswift.runlog import JsonlLog
from rlswift.trackers import Trackers

name, run, phase = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
log = JsonlLog(run / "metrics.jsonl")
trackers = Trackers([name], run, run_name="t", config={"learning_rate": 1e-3, "lora": {"rank": 4}})
hooks = {"metrics_log": log, "trackers": trackers}
ckpt = CheckpointManager(run)

def record(s):  # what an exactly resumed run computes again, except its timing
    return {"step": s, "reward": s / 10, "loss": 1.0 / s, "timing": {"step": 100.0 * (phase == "second") + s}}

if phase == "first":
    for s in range(1, 6):
        log.write(record(s)); trackers.log(record(s), s)
        if s == 3:
            ckpt.save(3, hooks, config={})
    os.kill(os.getpid(), signal.SIGKILL)
ckpt.load(ckpt.resolve_resume("auto"), hooks)
for s in range(4, 9):
    log.write(record(s)); trackers.log(record(s), s)
ckpt.save(8, hooks, config={})
trackers.close()
print("STATE", trackers.state_dict())
"""


def _kill_and_resume(name: str, run: Path, env: dict) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", **env)
    first = subprocess.run([sys.executable, "-c", WORKER, name, str(run), "first"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == -9, first.stderr[-3000:]
    second = subprocess.run([sys.executable, "-c", WORKER, name, str(run), "second"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    return second.stdout + second.stderr


def _need(module: str):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'rlswift[{module}]')")


def test_flatten_nested_and_non_numeric():
    rec = {"step": 3, "reward": 1, "ok": True, "name": "x", "none": None, "timing": {"step": 0.5, "io": {"r": 2}},
           "rewards/accuracy": 0.25, "list": [1, 2]}
    assert flatten(rec) == {"reward": 1.0, "ok": 1.0, "timing/step": 0.5, "timing/io/r": 2.0,
                            "rewards/accuracy": 0.25}


def test_unknown_tracker_and_duplicates_are_refused(tmp_path):
    with pytest.raises(KeyError, match="Valid names: mlflow, tensorboard, trackio, wandb"):
        Trackers(["tensorbord"], tmp_path)
    with pytest.raises(ValueError, match="twice"):
        Trackers(["wandb", "wandb"], tmp_path)
    assert sorted(TRACKERS.names()) == ["mlflow", "tensorboard", "trackio", "wandb"]
    empty = Trackers([], tmp_path)  # report_to: [] (the default) is a hook that does nothing
    empty.log({"step": 1, "reward": 1.0}, 1)
    assert empty.state_dict() == {"step": 1, "trackers": {}} and not empty


def test_missing_library_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if not installed
    with pytest.raises(ImportError, match=r"pip install 'rlswift\[wandb\]'"):
        Trackers(["wandb"], tmp_path)


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path):
    class Broken:
        def __init__(self, *a):
            self.calls = 0

        def open(self, saved, step):
            return 0

        def log(self, metrics, step):
            self.calls += 1
            raise ConnectionError("tracker server down")

        def flush(self):
            pass

        def state(self):
            return {}

        def close(self):
            pass

    TRACKERS.register("broken-for-test", Broken)
    try:
        t = Trackers(["broken-for-test"], tmp_path)
        with pytest.warns(UserWarning, match="tracker server down"):
            t.log({"reward": 1.0}, 1)
        t.log({"reward": 1.0}, 2)  # no second warning, no exception
        assert t.trackers["broken-for-test"].calls == 1
    finally:
        TRACKERS.unregister("broken-for-test")


class LossyStore:
    """A fake tracker whose store keeps only what was flushed (like W&B's 15 s offline buffer)."""

    stored: dict[str, dict[int, float]] = {}

    def __init__(self, run_dir, run_name, project, config):
        self.pending: list[tuple[int, float]] = []
        self.run_id = None

    def open(self, saved, resume_step):
        self.run_id = (saved or {}).get("run_id") or f"run{len(LossyStore.stored)}"
        series = LossyStore.stored.setdefault(self.run_id, {})
        self.held = max(series, default=0)
        return self.held

    def log(self, metrics, step):
        if step > self.held:
            self.pending.append((step, metrics["reward"]))

    def flush(self):
        for step, value in self.pending:
            assert step not in LossyStore.stored[self.run_id], f"step {step} logged twice"
            LossyStore.stored[self.run_id][step] = value
        self.pending.clear()

    def state(self):
        return {"run_id": self.run_id}

    def close(self):
        self.flush()


@pytest.mark.parametrize("flush_at", [[3], [3, 5], [2]])
def test_resume_replays_what_the_tracker_lost_and_skips_what_it_holds(tmp_path, flush_at):
    """Steps 1..5, checkpoint at 3, 'kill' (unflushed points vanish), resume: 1..8 once, none missing."""
    from rlswift.runlog import JsonlLog

    TRACKERS.register("lossy-for-test", LossyStore)
    LossyStore.stored = {}
    try:
        log = JsonlLog(tmp_path / "metrics.jsonl")
        first = Trackers(["lossy-for-test"], tmp_path)
        saved = None
        for s in range(1, 6):
            log.write({"step": s, "reward": s / 10})
            first.log({"step": s, "reward": s / 10}, s)
            if s == 3:
                saved, offset = first.state_dict(), log.state_dict()  # the checkpoint (flushes the tracker)
            if s in flush_at and s != 3:
                first.trackers["lossy-for-test"].flush()  # the tracker's own periodic flush
        # kill: `first` is dropped without close(); its pending points are lost
        log.load_state_dict(offset)  # the resume truncates metrics.jsonl to the checkpoint
        second = Trackers(["lossy-for-test"], tmp_path)
        second.load_state_dict(saved)
        for s in range(4, 9):
            log.write({"step": s, "reward": s / 10})
            second.log({"step": s, "reward": s / 10}, s)
        second.close()
        assert list(LossyStore.stored) == ["run0"], "the resume must continue the same tracker run"
        assert sorted(LossyStore.stored["run0"]) == list(range(1, 9))
        assert LossyStore.stored["run0"] == {s: s / 10 for s in range(1, 9)}
    finally:
        TRACKERS.unregister("lossy-for-test")


def test_tracker_added_on_resume_gets_the_whole_history(tmp_path):
    from rlswift.runlog import JsonlLog

    TRACKERS.register("lossy-for-test", LossyStore)
    LossyStore.stored = {}
    try:
        log = JsonlLog(tmp_path / "metrics.jsonl")
        first = Trackers([], tmp_path)
        for s in range(1, 4):
            log.write({"step": s, "reward": s / 10})
            first.log({"step": s, "reward": s / 10}, s)
        saved = first.state_dict()
        second = Trackers(["lossy-for-test"], tmp_path)
        second.load_state_dict(saved)
        log.write({"step": 4, "reward": 0.4})
        second.log({"step": 4, "reward": 0.4}, 4)
        second.close()
        assert LossyStore.stored == {"run0": {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}}
    finally:
        TRACKERS.unregister("lossy-for-test")


@pytest.mark.slow
def test_tensorboard_each_step_once_after_kill_and_resume(tmp_path):
    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _kill_and_resume("tensorboard", tmp_path, {})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"reward", "loss", "timing/step"} <= set(acc.Tags()["scalars"])
    reward = acc.Scalars("reward")
    assert [e.step for e in reward] == list(range(1, 9))
    assert [round(e.value, 6) for e in reward] == [round(s / 10, 6) for s in range(1, 9)]
    # purge_step: steps 4 and 5 of the killed run are dropped; the resumed run's values are the ones kept.
    assert [e.value for e in acc.Scalars("timing/step")] == [1, 2, 3, 104, 105, 106, 107, 108]


@pytest.mark.slow
def test_wandb_offline_each_step_once_after_kill_and_resume(tmp_path):
    _need("wandb")
    from rlswift.trackers import wandb_offline_history

    out = _kill_and_resume("wandb", tmp_path, {"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    folders = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and len({f.name.rsplit("-", 1)[1] for f in folders}) == 1  # one run id, resumed
    rows = wandb_offline_history(tmp_path / "wandb", folders[0].name.rsplit("-", 1)[1])
    assert sorted(r["_step"] for r in rows) == list(range(1, 9))
    assert {r["_step"]: r["reward"] for r in rows} == {s: s / 10 for s in range(1, 9)}
    # W&B flushes its offline file every 15 s: the killed process persisted nothing, so the resume replayed
    # steps 1-3 from metrics.jsonl (the values the first process logged; 4-8 come from the resumed one).
    assert "replayed steps 1-3" in out
    assert {r["_step"]: r["timing/step"] for r in rows}[2] == 2


@pytest.mark.slow
def test_mlflow_each_step_once_after_kill_and_resume(tmp_path):
    _need("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    _kill_and_resume("mlflow", tmp_path / "run", {"MLFLOW_TRACKING_URI": uri})
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("rlswift").experiment_id])
    assert len(runs) == 1, "the resume must continue the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["lora.rank"] == "4"
    for key in ("reward", "loss", "timing/step"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(1, 9)), (key, steps)
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "timing/step")}
    # MLflow logs synchronously: steps 4-5 of the killed run were stored and are not logged twice.
    assert hist[5] == 5 and hist[6] == 106


@pytest.mark.slow
def test_trackio_each_step_once_after_kill_and_resume(tmp_path):
    _need("trackio")
    store = tmp_path / "trackio-store"
    out = _kill_and_resume("trackio", tmp_path / "run", {"TRACKIO_DIR": str(store)})
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "runs = S.get_runs('rlswift'); "
            "print('RESULT' + json.dumps([[r if isinstance(r, str) else r['name'], "
            "[[x['step'], x.get('reward')] for x in S.get_logs('rlswift', r if isinstance(r, str) else r['name'])]]"
            " for r in runs]))")
    env = dict(os.environ, TRACKIO_DIR=str(store))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    runs = json.loads(res.stdout.split("RESULT", 1)[1])
    assert len(runs) == 1, (runs, out[-2000:])
    steps = sorted(s for s, _ in runs[0][1])
    assert steps == list(range(1, 9)), steps
    assert {s: r for s, r in runs[0][1]} == {s: s / 10 for s in range(1, 9)}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["grpo", "dpo"])
def test_recipe_report_to_tensorboard_survives_a_kill(recipe, tmp_path, rlswift_cache):
    """Through the real CLI: report_to=[tensorboard], SIGKILL in step 5, resume=auto: each step once in TensorBoard,
    with the values of metrics.jsonl. Skips until the recipe has `report_to` (the lead wires Trackers in)."""
    import dataclasses
    import importlib

    _need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from e2e import run_cli
    from rlswift.runlog import read_jsonl

    module = importlib.import_module(f"rlswift.recipes.{recipe}")
    config_cls = next(v for k, v in vars(module).items() if k.endswith("Config") and dataclasses.is_dataclass(v)
                      and "output_dir" in {f.name for f in dataclasses.fields(v)})
    if "report_to" not in {f.name for f in dataclasses.fields(config_cls)}:
        pytest.skip(f"{config_cls.__name__} has no report_to yet")
    out = tmp_path / "run"
    args = ["-m", f"rlswift.recipes.{recipe}", "--config", f"recipes/{recipe}_tiny.yaml", f"output_dir={out}",
            "report_to=[tensorboard]", *(["engine=hf"] if recipe == "grpo" else [])]
    first = run_cli(args, rlswift_cache, fault="kill@5")
    assert first.returncode == -9, first.stderr[-3000:]
    second = run_cli([*args, "resume=auto"], rlswift_cache)
    assert second.returncode == 0, second.stderr[-3000:]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("loss")
    rows = list(read_jsonl(out / "metrics.jsonl"))
    assert [e.step for e in loss] == [r["step"] for r in rows] == list(range(1, 9))
    import numpy as np

    assert [e.value for e in loss] == [float(np.float32(r["loss"])) for r in rows]  # TensorBoard keeps float32
    assert "timing/step" in acc.Tags()["scalars"]
