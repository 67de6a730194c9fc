"""Copies of committed checkpoints in remote storage (any fsspec URL: s3://, gs://, a local folder, ...).

Upload (on a background thread, after the checkpoint is committed locally):
  1. if the remote already has this checkpoint (a re-save of the same step), its manifest is deleted first;
  2. every hook file, then `manifest.json` last: a remote checkpoint is complete iff its manifest exists, so an
     upload cut short (killed, network gone) is never mistaken for a checkpoint;
  3. the `latest` pointer, then the run files (logs matching `run_files`; they are at least as long as this
     checkpoint's offsets, so a resume can truncate them to the checkpoint), then remote retention with the local
     policy (a deletion removes the manifest first) and the `best` pointer.
Only the newest submitted checkpoint waits for upload: if saves outpace uploads, older pending ones are skipped.
Download: `remote_steps()` lists complete remote checkpoints; `download(name, dest)` copies one into a local folder
that the manager verifies (sizes, sha256, decoding) before renaming it into place.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import signal
import sys
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import orjson

from rlswift.checkpoint.reader import MANIFEST, CheckpointError
from rlswift.checkpoint.retention import best_checkpoint, select_deletions
from rlswift.checkpoint.writer import fsync_path

__all__ = ["Mirror"]

_CKPT = "checkpoint-"


class Mirror:
    """An fsspec location holding copies of a run's checkpoints and run files (see module docstring)."""

    def __init__(self, url: str, options: Mapping[str, Any] | None = None, run_files: tuple[str, ...] = ("*.jsonl",),
                 lock: threading.Lock | None = None, save_total_limit: int | None = None,
                 best_metric: str | None = None, best_mode: str = "max") -> None:
        try:
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(url, **dict(options or {}))
        except ImportError as e:
            raise CheckpointError(f"mirror_to={url!r} needs a filesystem library that is not installed ({e}); for "
                                  "S3 install it with: pip install 'rlswift[mirror]'") from e
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"mirror_to={url!r} is not a usable fsspec URL ({e})") from e
        self.url = url
        self.base = self.base.rstrip("/")
        self.run_files = tuple(run_files)
        self.save_total_limit, self.best_metric, self.best_mode = save_total_limit, best_metric, best_mode
        self._lock = lock or threading.Lock()
        self._cond = threading.Condition()
        self._pending: Path | None = None
        self._current: Path | None = None
        self._errors: list[str] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    def _r(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    # ------------------------------------------------------------------ background upload
    def submit(self, local: Path) -> None:
        """Queue the committed checkpoint folder `local` for upload (replacing a pending, not started one)."""
        with self._cond:
            if self._closed:
                raise CheckpointError(f"mirror {self.url} is closed; create a new CheckpointManager")
            self._pending = Path(local)
            if self._thread is None:
                # daemon: exit is never blocked by a hung remote; the manager's atexit close() waits instead.
                self._thread = threading.Thread(target=self._run, name="rlswift-mirror", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def busy(self) -> set[Path]:
        """The local checkpoint being uploaded (retention must not delete it). Call with the manager's lock."""
        return {self._current} if self._current is not None else set()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                local, self._pending = self._pending, None
                with self._lock:  # retention runs under the same lock: it either deleted it already or won't
                    if not (local / MANIFEST).is_file():
                        local = None
                    self._current = local
            if local is not None:
                try:
                    self.upload(local)
                except Exception as e:  # noqa: BLE001 - kept for wait(), reported now too
                    msg = f"mirror upload of {local.name} to {self.url} failed: {type(e).__name__}: {e}"
                    print(f"rlswift: {msg}", flush=True, file=sys.stderr)
                    with self._cond:
                        self._errors.append(msg)
            with self._cond:
                self._current = None
                self._cond.notify_all()

    def wait(self) -> None:
        """Block until nothing is pending or uploading; CheckpointError for failed uploads (raised once)."""
        with self._cond:
            while self._pending is not None or self._current is not None:
                if self._thread is None or not self._thread.is_alive():
                    break
                self._cond.wait()
            errors, self._errors = self._errors, []
        if errors:
            more = f" (and {len(errors) - 1} earlier failure(s))" if len(errors) > 1 else ""
            raise CheckpointError(errors[-1] + more + "; the local checkpoints are fine; check the mirror's "
                                  "credentials, endpoint and space")

    def close(self) -> None:
        """Finish pending uploads and stop the uploader thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ upload / list / download
    def upload(self, local: Path) -> None:
        """Copy the committed checkpoint folder `local` to the remote (protocol in the module docstring)."""
        manifest_bytes = (local / MANIFEST).read_bytes()
        m = orjson.loads(manifest_bytes)
        rdir = self._r(local.name)
        if self.fs.exists(self._r(local.name, MANIFEST)):
            self.fs.rm(self._r(local.name, MANIFEST))
        step = m.get("step")
        kill_after = (max(1, len(m["files"]) // 2)
                      if f"kill-in-upload@{step}" in os.environ.get("RLSWIFT_FAULT", "").split(",") else None)
        made: set[str] = set()
        for i, rel in enumerate(m["files"]):
            target = posixpath.join(rdir, rel)
            parent = posixpath.dirname(target)
            if parent not in made:
                self.fs.makedirs(parent, exist_ok=True)
                made.add(parent)
            self.fs.put_file(str(local / rel), target)
            if kill_after is not None and i + 1 >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests: a crash mid-upload
        self.fs.pipe_file(self._r(local.name, MANIFEST), manifest_bytes)  # last: marks it complete
        self.fs.pipe_file(self._r("latest"), (local.name + "\n").encode())
        for f in sorted(local.parent.iterdir()):
            if f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in self.run_files):
                self.fs.put_file(str(f), self._r(f.name))
        self._retention(local.name)

    def _remote_manifests(self) -> dict[str, dict]:
        out = {}
        for step, name in sorted(self.remote_steps().items()):
            try:
                out[name] = orjson.loads(self.fs.cat_file(self._r(name, MANIFEST)))
            except (OSError, orjson.JSONDecodeError):
                continue
        return out

    def _retention(self, just_uploaded: str) -> None:
        if self.save_total_limit is None and self.best_metric is None:
            return
        ms = self._remote_manifests()
        fake = {name: PurePosixPath("/", name) for name in ms}
        complete = [(int(name[len(_CKPT):]), Path(fake[name]), m.get("metrics") or {}) for name, m in ms.items()]
        if self.best_metric is not None:
            best = best_checkpoint(complete, self.best_metric, self.best_mode)
            if best is not None:
                self.fs.pipe_file(self._r("best"), (best.name + "\n").encode())
        for p in select_deletions(complete, self.save_total_limit, self.best_metric, self.best_mode,
                                  keep=[Path("/", just_uploaded)]):
            self.fs.rm(self._r(p.name, MANIFEST))  # first: a half-deleted checkpoint is never complete
            self.fs.rm(self._r(p.name), recursive=True)

    def remote_steps(self) -> dict[int, str]:
        """{step: folder name} of the complete (manifest present) checkpoints on the remote."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.glob(self._r(f"{_CKPT}*", MANIFEST))
        except FileNotFoundError:
            return {}
        out = {}
        for f in found:
            name = posixpath.basename(posixpath.dirname(f))
            if name.startswith(_CKPT) and name[len(_CKPT):].isdigit():
                out[int(name[len(_CKPT):])] = name
        return out

    def download(self, name: str, dest: Path) -> None:
        """Copy the remote checkpoint `name` into the new local folder `dest` (the caller verifies it)."""
        try:
            manifest_bytes = self.fs.cat_file(self._r(name, MANIFEST))
            m = orjson.loads(manifest_bytes)
            files = m["files"]
            for rel in files:
                if os.path.isabs(rel) or ".." in PurePosixPath(rel).parts:
                    raise CheckpointError(f"{self.url}/{name}: manifest file entry {rel!r} points outside the "
                                          "checkpoint")
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self._r(name, rel), str(dest / rel))
                fsync_path(dest / rel)
            for d in {(dest / rel).parent for rel in files}:
                fsync_path(d)
            (dest / MANIFEST).write_bytes(manifest_bytes)
            fsync_path(dest / MANIFEST)
            fsync_path(dest)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - network/remote errors: one line naming the checkpoint
            raise CheckpointError(f"cannot download {name} from {self.url}: {type(e).__name__}: {e}") from e

    def restore_run_files(self, root: Path) -> list[str]:
        """Download the remote run files that are missing locally or longer than the local copy; their names."""
        self.fs.invalidate_cache()
        got = []
        for info in self.fs.ls(self.base, detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            if info.get("type") != "file" or not any(fnmatch.fnmatch(name, pat) for pat in self.run_files):
                continue
            local = root / name
            if local.exists() and local.stat().st_size >= int(info.get("size") or 0):
                continue
            tmp = root / f".tmp-download-{name}-{os.getpid()}"
            self.fs.get_file(info["name"], str(tmp))
            os.replace(tmp, local)
            got.append(name)
        return got
