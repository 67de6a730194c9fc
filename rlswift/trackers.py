"""Experiment trackers (`report_to: [tensorboard, wandb, trackio, mlflow]`) whose series survive a resume.

`Trackers` fans each metrics record out to the chosen trackers and is a state hook: the checkpoint holds every
tracker's run id and the step it had reached, so a resumed run writes into the SAME tracker run and each step
appears there exactly once. How, per tracker:
- tensorboard: events are flushed at every checkpoint; a resume opens the writer with `purge_step = K + 1`
  (K = the checkpoint's step), so readers drop the events a killed run wrote after the checkpoint.
- wandb: same run id, `resume="allow"`. Steps the store already holds (online: the server's step; offline: the
  history in the earlier `offline-run-*-<id>` folders) are not logged again.
- mlflow: same run id in the same tracking store; points it already holds (per metric) are not logged again.
- trackio: same run (by id), `resume="allow"`; steps it already holds are not logged again.
Trackers that buffer (wandb writes its offline file every 15 s, trackio batches) can lose the last points when the
process is killed. So after a resume, the steps between what a tracker holds and the resumed step are replayed
from `metrics.jsonl`, which the checkpoint makes exactly-once; a series therefore has no gap and no duplicate.
Metric names are the record's keys, nested dicts flattened with '/' (`timing/step`); `step` is the x axis.
Each tracker's library is an optional extra: `pip install 'rlswift[tensorboard]'` (or wandb, trackio, mlflow).
"""

from __future__ import annotations

import math
import os
import struct
import sys
import warnings
from pathlib import Path
from typing import Any

from rlswift.registry import Registry
from rlswift.runlog import read_jsonl

__all__ = ["TRACKERS", "Trackers", "flatten", "wandb_offline_history"]

TRACKERS: Registry[type] = Registry("tracker")


def flatten(record: dict, prefix: str = "", sep: str = "/") -> dict[str, float]:
    """Numeric leaves of ``record`` as ``{"a/b": float}``; `step`, strings, lists and None are left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + sep, sep))
        elif name != "step" and isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"report_to includes {extra!r} but {module} cannot be imported ({e}); install it with "
                          f"pip install 'rlswift[{extra}]' or remove {extra!r} from report_to") from None


class _Tracker:
    """One tracker. `open` returns the step through which the tracker's store is complete (0 for a new run)."""

    extra = ""

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict | None):
        self.run_dir, self.run_name, self.project, self.config = run_dir, run_name, project, config or {}

    def open(self, saved: dict | None, resume_step: int) -> int:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything logged so far durable (called while a checkpoint is written)."""

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class TensorBoardTracker(_Tracker):
    """Event files under `<run_dir>/tensorboard` (torch's SummaryWriter); a resume purges steps after the checkpoint."""

    extra = "tensorboard"

    def __init__(self, *args: Any):
        super().__init__(*args)
        _need("tensorboard", self.extra)
        self.log_dir = self.run_dir / "tensorboard"
        self.writer = None

    def open(self, saved: dict | None, resume_step: int) -> int:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step also on a fresh start: it hides events of an attempt that died before its first checkpoint.
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resume_step + 1)
        return resume_step

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()
        for f in self.log_dir.glob("events.out.tfevents.*"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def state(self) -> dict:
        return {"log_dir": str(self.log_dir)}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _wandb_records(path: Path):
    """Records of a W&B transaction log (`run-<id>.wandb`): LevelDB-log framing of protobuf `Record`s.

    Blocks of 32 KiB; a record header is crc32 (4) + length (2) + type (1: full, 2: first, 3: middle, 4: last).
    A torn tail (the writer was killed) ends the scan.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        return
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left  # zero padding to the end of the block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length:
            return
        pos += 7 + length
        if kind in (1, 2):
            parts = chunk
        elif kind in (3, 4):
            parts += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def wandb_offline_history(wandb_dir: str | os.PathLike, run_id: str) -> list[dict]:
    """Every history row of run ``run_id`` in the offline folders under ``wandb_dir``, oldest folder first."""
    import json

    rows = []
    for f in sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for record in _wandb_records(f):
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


class WandbTracker(_Tracker):
    """W&B (mode from WANDB_MODE: online, offline, disabled); files under `<run_dir>/wandb`."""

    extra = "wandb"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.wandb = _need("wandb", self.extra)
        self.run = None
        self.run_id: str | None = None
        self.held = 0  # steps <= held are already in W&B: not logged again

    def open(self, saved: dict | None, resume_step: int) -> int:
        self.run_id = (saved or {}).get("run_id") or os.urandom(4).hex()  # W&B ids: [a-z0-9]
        project = (saved or {}).get("project") or os.environ.get("WANDB_PROJECT") or self.project
        self.run = self.wandb.init(project=project, name=self.run_name, id=self.run_id, resume="allow",
                                   dir=str(self.run_dir), config=self.config, reinit="create_new")
        self.project = project
        if saved is None:
            return 0
        self.held = max(0, int(self.run.starting_step) - 1)  # online: what the server already has
        if self.run.settings.mode == "offline":
            steps = [r.get("_step") for r in wandb_offline_history(self.run_dir / "wandb", self.run_id)]
            self.held = max([self.held] + [s for s in steps if isinstance(s, int)])
        return self.held

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step > self.held:
            self.run.log(metrics, step=step)

    def state(self) -> dict:
        return {"run_id": self.run_id, "project": self.project}

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MlflowTracker(_Tracker):
    """MLflow, in the store MLFLOW_TRACKING_URI names (default `sqlite:///<run_dir>/mlflow.db`); the experiment is
    MLFLOW_EXPERIMENT_NAME or the project name. Logs synchronously through `MlflowClient`."""

    extra = "mlflow"

    def __init__(self, *args: Any):
        super().__init__(*args)
        _need("mlflow", self.extra)
        self.client = None
        self.uri: str | None = None
        self.run_id: str | None = None
        self.held: dict[str, int] = {}

    def open(self, saved: dict | None, resume_step: int) -> int:
        from mlflow.tracking import MlflowClient

        saved = saved or {}
        self.uri = saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        if saved.get("run_id"):
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                self.held[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
            return min(self.held.values(), default=0)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.project
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name).info.run_id
        from mlflow.entities import Param

        params = [Param(k[:250], str(v)[:6000]) for k, v in _flat_params(self.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        return 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items() if step > self.held.get(k, 0)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def close(self) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id)


def _flat_params(config: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat_params(value).items()})
        else:
            out[key] = value
    return out


class TrackioTracker(_Tracker):
    """trackio, local SQLite under TRACKIO_DIR (default ~/.cache/huggingface/trackio), project = the project name."""

    extra = "trackio"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.trackio = _need("trackio", self.extra)
        self.run = None
        self.held = 0

    def open(self, saved: dict | None, resume_step: int) -> int:
        from trackio.sqlite_storage import SQLiteStorage

        saved = saved or {}
        self.project = saved.get("project") or self.project
        name = saved.get("name") or f"{self.run_name}-{os.urandom(3).hex()}"  # unique: 'allow' resumes by name
        self.run = self.trackio.init(project=self.project, name=name, config=self.config,
                                     resume="allow" if saved else "never", embed=False, auto_log_cpu=False,
                                     auto_log_gpu=False)
        if not saved:
            return 0
        self.held = SQLiteStorage.get_max_step_for_run(self.project, self.run.name) or 0
        return self.held

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step > self.held:
            self.run.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def state(self) -> dict:
        return {"project": self.project, "name": self.run.name if self.run is not None else None}

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


for _name, _cls in (("tensorboard", TensorBoardTracker), ("wandb", WandbTracker), ("mlflow", MlflowTracker),
                    ("trackio", TrackioTracker)):
    TRACKERS.register(_name, _cls)


class Trackers:
    """The trackers named in ``report_to``, as one object and one state hook (register it as ``trackers``).

    Call `log(record, step)` once per metrics record (after writing it to metrics.jsonl) and `close()` at the end.
    Nothing is opened before the first `log`, so a resume's `load_state_dict` decides which tracker runs continue.
    ``history``: the run's metrics.jsonl, from which a resume replays steps a tracker lost (default
    `<run_dir>/metrics.jsonl`). A tracker that fails while logging is reported once and then left out; training
    goes on.
    """

    def __init__(self, report_to: list[str] | tuple[str, ...], run_dir: str | os.PathLike,
                 run_name: str | None = None, project: str = "rlswift", config: dict | None = None,
                 history: str | os.PathLike | None = None):
        names = list(report_to or [])
        if len(set(names)) != len(names):
            raise ValueError(f"report_to={names} names a tracker twice")
        self.run_dir = Path(run_dir)
        self.history = Path(history) if history is not None else self.run_dir / "metrics.jsonl"
        run_name = run_name or self.run_dir.resolve().name
        self.trackers: dict[str, _Tracker] = {}
        for name in names:
            self.trackers[name] = TRACKERS.get(name)(self.run_dir, run_name, project, config)
        self._saved: dict = {}
        self._resume_step = 0
        self._last_step = 0
        self._opened = self._closed = False
        self._failed: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _guard(self, name: str, fn, *args) -> None:
        if name in self._failed:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracker outage must not stop a training run
            self._failed.add(name)
            warnings.warn(f"tracker {name!r} failed and is left out for the rest of the run: "
                          f"{type(e).__name__}: {e}", stacklevel=3)

    def _open(self, step: int) -> None:
        self._opened = True
        for name, tracker in self.trackers.items():
            held = tracker.open(self._saved.get(name), self._resume_step)
            lost = self._replay_rows(held, step)
            for row in lost:
                self._guard(name, tracker.log, flatten(row), int(row["step"]))
            if lost:
                print(f"rlswift: {name}: replayed steps {lost[0]['step']}-{lost[-1]['step']} from {self.history} "
                      "(the tracker lost them when the previous run stopped)", file=sys.stderr, flush=True)

    def _replay_rows(self, held: int, step: int) -> list[dict]:
        if held + 1 >= step or not self.history.is_file():
            return []
        return [r for r in read_jsonl(self.history) if held < int(r.get("step", 0)) < step]

    def log(self, record: dict, step: int) -> None:
        """Send one metrics record (nested dicts flattened with '/') to every tracker at ``step``."""
        self._last_step = step
        if not self.trackers:
            return
        if self._closed:
            raise RuntimeError("Trackers.log after close()")
        if not self._opened:
            self._open(step)
        metrics = flatten(record)
        for name, tracker in self.trackers.items():
            self._guard(name, tracker.log, metrics, step)

    def state_dict(self) -> dict:
        # Called while a checkpoint is written: what it records as logged must be durable first.
        for name, tracker in self.trackers.items():
            if self._opened:
                self._guard(name, tracker.flush)
        backends = {name: self._saved.get(name, {}) for name in self.trackers}
        if self._opened:
            backends.update({name: t.state() for name, t in self.trackers.items()})
        return {"step": self._last_step, "trackers": backends}

    def load_state_dict(self, state: dict) -> None:
        if self._opened:
            raise RuntimeError("Trackers.load_state_dict after the first log(): load the checkpoint first")
        self._saved = {k: v for k, v in state.get("trackers", {}).items() if v}
        self._resume_step = self._last_step = int(state.get("step", 0))

    def close(self) -> None:
        """Finish every tracker run (idempotent)."""
        if self._opened and not self._closed:
            for name, tracker in self.trackers.items():
                self._guard(name, tracker.close)
        self._closed = True
