"""Atomic, verifiable checkpoints of a set of state hooks: save (sync or async), resume, retention, mirror.

Layout of one checkpoint (`root/checkpoint-{step}/`):
    manifest.json               written last: its presence marks the checkpoint complete
    hooks/{name}.json           orjson tree of the hook's state_dict() (see codec.py)
    hooks/{name}.safetensors    the tree's tensors (only when it has any)
`root/latest` is a small text file holding the newest checkpoint's folder name, `root/best` (with `best_metric`)
the best one's (hints for humans and tools: `resolve_resume("auto")` does not trust them; it verifies).
The write protocol is in writer.py; docs/checkpoints.md describes it with the async and mirror paths.

Several ranks (torchrun; `info.world_size > 1`): `save` and `read_resume`/`load` are collectives. Every rank writes
its files into ONE tmp folder (sharded hooks through DCP, per-rank hooks per rank, replicated ones by rank 0; see
distributed/hooks_io.py); rank 0 writes the one manifest (`world_size` = the number of ranks) after every rank's
files are fsynced, commits, moves `latest`/`best`, applies retention and feeds the mirror; no rank returns from
`save` before the commit. A checkpoint of several ranks loads on any world size (also in one process).
docs/distributed.md has the protocol.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping

from rlswift.checkpoint.reader import (FORMAT_VERSION, MANIFEST, CheckpointError, LoadedCheckpoint, is_multi_rank,
                                       load_hook_state, read_checkpoint, read_manifest, verify)
from rlswift.checkpoint.retention import best_checkpoint, select_deletions
from rlswift.checkpoint.writer import (Stager, commit, encode_hooks, fault_requested, fsync_path, hook_file_stem,
                                       is_disk_full, optimizer_storages, plain_json, read_pointer, write_manifest,
                                       write_pointer, write_tmp)
from rlswift.state.registry import hook_name_mismatch

# The read side lives in reader.py; it is re-exported here so `from rlswift.checkpoint.manager import
# read_manifest` (recipes, scripts) keeps working.
__all__ = ["CheckpointManager", "CheckpointError", "FORMAT_VERSION", "LoadedCheckpoint", "verify",
           "read_manifest", "read_checkpoint", "load_hook_state", "hook_file_stem", "LATEST", "BEST"]

log = logging.getLogger(__name__)

LATEST, BEST = "latest", "best"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIXES = (".tmp-checkpoint-", ".tmp-deleting-", ".tmp-replaced-", ".tmp-download-", ".latest.tmp-",
                 ".best.tmp-")


def _say(msg: str) -> None:
    """One line on stderr right away: a background failure must be visible even if nobody waits for it."""
    print(f"rlswift: {msg}", file=sys.stderr, flush=True)


class _Inflight:
    """A background save: its thread, the failure it ended with (until someone has been told), and the event
    set once its files are written (the optimizers' fence waits for it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.files_written = threading.Event()


def _report_unobserved(ref: "weakref.ref[CheckpointManager]") -> None:
    mgr = ref()
    if mgr is None:
        return
    try:
        mgr.close()
    except CheckpointError as e:  # at exit nobody else will ever see it
        _say(f"checkpoint failure nobody waited for: {e}")


class CheckpointManager:
    """Writes, verifies, finds and loads checkpoints under `root`, applies retention, optionally mirrors them.

    save_total_limit: keep the newest N complete checkpoints (plus the best one by `metrics[best_metric]`,
      `best_mode` "max" or "min", marked by the `best` pointer, and the `protect`ed one, normally the one resumed
      from). `resolve_resume`/`read_resume` set `protect` to the checkpoint they return.
    async_save: default for `save(blocking=...)`: snapshot at the step boundary, write on a background thread.
    mirror_to: an fsspec URL (s3://bucket/run, gs://..., a local folder); every committed checkpoint is uploaded
      in the background (manifest last) and `resolve_resume("auto")` falls back to it. `mirror_options` go to
      fsspec (e.g. endpoint_url, key, secret); `mirror_files` are glob patterns of run files (logs) uploaded
      after each checkpoint and restored with it.
    info: the process's `distributed.DistInfo` (None: one process). With several ranks every rank makes a manager
      on the same root and calls `save`/`read_resume`/`load` at the same points; only rank 0 touches pointers,
      retention and the mirror. `async_save` is refused there (a save is collective and blocking).
    """

    def __init__(self, root: str | os.PathLike, save_total_limit: int | None = None,
                 best_metric: str | None = None, best_mode: str = "max",
                 protect: str | os.PathLike | None = None, async_save: bool = False,
                 mirror_to: str | None = None, mirror_options: Mapping[str, Any] | None = None,
                 mirror_files: tuple[str, ...] = ("*.jsonl",), info: Any = None) -> None:
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if save_total_limit is not None and save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit}")
        self.info = info
        self.ranks = int(getattr(info, "world_size", 1))
        self.is_main = bool(getattr(info, "is_main", True))
        if self.ranks > 1 and async_save:
            raise CheckpointError(
                f"async_save=true is not supported with {self.ranks} ranks: a save there is a collective of every "
                "rank that returns once the checkpoint is committed. Set async_save=false (a resume may change it)")
        self.root = Path(root)
        self.save_total_limit = save_total_limit
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.protect: Path | None = Path(protect) if protect is not None else None
        self.async_save = async_save
        self.last_save: dict[str, float] = {}  # timings of the newest save: stall, write (when done), bytes
        self._inflight: _Inflight | None = None
        self._stager = Stager()
        self._fenced: dict[int, Any] = {}  # id(optimizer) -> its step pre-hook handle
        self._resolved: LoadedCheckpoint | None = None
        self._lock = threading.Lock()  # retention vs. the mirror's choice of what to upload
        self.mirror = None
        if mirror_to and self.is_main:  # with several ranks only rank 0 uploads (after each commit)
            from rlswift.checkpoint.mirror import Mirror

            self.mirror = Mirror(mirror_to, options=mirror_options, run_files=mirror_files, lock=self._lock,
                                 save_total_limit=save_total_limit, best_metric=best_metric, best_mode=best_mode)
        atexit.register(_report_unobserved, weakref.ref(self))

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[tuple[int, Path]]:
        """All `checkpoint-{step}` folders under root (complete or not), sorted by step."""
        if not self.root.is_dir():
            return []
        out = [(int(m.group(1)), d) for d in self.root.iterdir() if (m := CKPT_RE.match(d.name)) and d.is_dir()]
        return sorted(out)

    def latest_pointer(self) -> Path | None:
        """The folder named by `root/latest`, if the pointer exists."""
        name = read_pointer(self.root, LATEST)
        return self.root / name if name else None

    def best_pointer(self) -> Path | None:
        """The folder named by `root/best`, if the pointer exists."""
        name = read_pointer(self.root, BEST)
        return self.root / name if name else None

    # ------------------------------------------------------------------ save
    def save(self, step: int, hooks: Mapping[str, Any], config: dict, metrics: dict | None = None,
             blocking: bool | None = None) -> Path:
        """Save every hook's state as `root/checkpoint-{step}` and return that path.

        blocking (default: `not async_save`): True writes and commits before returning. False snapshots every
        hook's state now, in this thread (state_dict() calls, encoding, copies of tensors into reused buffers,
        pinned for CUDA), and writes it on a background thread with the same atomic protocol; the checkpoint is
        committed when `wait()` returns. The CPU parameters and state of torch optimizers among `hooks` are not
        copied: their next `step()` waits until they are written (`last_save["fence_wait"]`); code that changes
        them in place other than through `step()` must call `wait()` first. At most one save is in flight: a new
        save first waits for the previous one and raises its failure. CheckpointError for a refused state (before
        anything is written), a full disk or another write failure (the previous checkpoints and `latest` are
        untouched).
        """
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self._wait_save()
        self._resolved = None
        blocking = not self.async_save if blocking is None else blocking
        config = plain_json(config, f"config of checkpoint-{step}")
        metrics = plain_json(metrics or {}, f"metrics of checkpoint-{step}")
        items = list(hooks.items())  # any object with .items() (e.g. a StateRegistry) works
        if self.ranks > 1:
            if not blocking:
                raise CheckpointError("a save of several ranks is blocking (async_save is refused there)")
            t0 = time.perf_counter()
            final = self._save_ranks(step, items, config, metrics)
            self.last_save = {"stall": time.perf_counter() - t0, "write": time.perf_counter() - t0}
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        self._cleanup_stale()
        name = f"checkpoint-{step}"
        t0 = time.perf_counter()
        if blocking:
            self._write(step, encode_hooks(items), len(items), config, metrics)
            self.last_save = {"stall": time.perf_counter() - t0, "write": time.perf_counter() - t0}
            return self.root / name
        optimizers, live = optimizer_storages(items)
        for opt in optimizers:
            self._fence(opt)
        self._stager.start(live)
        try:
            snapshot = list(encode_hooks(items, self._stager))
        finally:
            self._stager.finish()
        job = _Inflight(name)

        def run() -> None:
            t1 = time.perf_counter()
            try:
                self._write(step, snapshot, len(items), config, metrics, job.files_written.set)
            except BaseException as e:  # noqa: BLE001 - kept for wait(); reported now too
                job.error = e
                _say(f"background save of {name} failed: {e}")
            finally:
                job.files_written.set()  # never leave an optimizer waiting
            self.last_save["write"] = time.perf_counter() - t1

        job.thread = threading.Thread(target=run, name=f"rlswift-save-{step}")
        self._inflight = job
        self.last_save = {"stall": time.perf_counter() - t0, "copied_bytes": float(self._stager.bytes),
                          "live_bytes": float(self._stager.live_bytes), "fence_wait": 0.0}
        job.thread.start()
        return self.root / name

    def _save_ranks(self, step: int, items: list, config: Any, metrics: Any) -> Path:
        """The collective save of several ranks (see the module doc); returns the committed folder."""
        from rlswift.distributed.hooks_io import agree, write_hooks
        from rlswift.distributed.launch import broadcast_json

        info, name = self.info, f"checkpoint-{step}"
        final = self.root / name

        def prepare() -> str | None:
            if not self.is_main:
                return None
            self.root.mkdir(parents=True, exist_ok=True)
            self._cleanup_stale()
            tmp = self.root / f".tmp-{name}-{os.getpid()}"  # rank 0's pid: one folder for every rank
            tmp.mkdir()
            return str(tmp)

        tmp = Path(broadcast_json(agree(prepare, info, f"preparing {name}"), info))
        kill_after = max(1, len(items) // 2) if fault_requested("kill-in-save", step, info.rank) else None

        def after_hook(i: int) -> None:
            if kill_after is not None and i + 1 >= kill_after:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests: one rank dies mid-save

        def finish(hook_files: dict, files: dict) -> None:
            if not self.is_main:
                return
            write_manifest(tmp, step, config, metrics, hook_files, files, world_size=info.world_size)
            commit(tmp, final)
            write_pointer(self.root, LATEST, name)
            self._retention(final)

        try:
            hook_files, files = write_hooks(tmp, dict(items), info, after_hook=after_hook)
            # Rank 0 commits while the others wait here: no rank starts the next step (or exits) before it is done.
            agree(lambda: finish(hook_files, files), info, f"committing {name}")
        except BaseException as e:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            error = self._write_error(name, e)
            if error is not None:
                raise error from e
            raise
        if self.mirror is not None:
            self.mirror.submit(final)
        return final

    def _write_error(self, name: str, e: BaseException) -> CheckpointError | None:
        """The one-line error for an OS failure while writing ``name`` (None: not an OS failure, re-raise it)."""
        if is_disk_full(e):
            return CheckpointError(
                f"disk full while writing {name} under {self.root} ({e}); the previous checkpoints are "
                "untouched. Free disk space, lower save_total_limit, or point output_dir elsewhere")
        if isinstance(e, OSError):
            return CheckpointError(f"cannot write {name} under {self.root}: {e}; the previous checkpoints are "
                                   "untouched")
        return None

    def _fence(self, opt) -> None:
        """Make `opt.step()` wait until the in-flight save has written the optimizer's live tensors (once per
        optimizer; removed by close())."""
        if id(opt) in self._fenced:
            return
        ref = weakref.ref(self)

        def before_step(_opt, _args, _kwargs) -> None:
            mgr = ref()
            job = mgr._inflight if mgr is not None else None
            if job is not None and not job.files_written.is_set():
                t0 = time.perf_counter()
                job.files_written.wait()
                mgr.last_save["fence_wait"] = mgr.last_save.get("fence_wait", 0.0) + time.perf_counter() - t0

        self._fenced[id(opt)] = opt.register_step_pre_hook(before_step)

    def _write(self, step: int, encoded, n_hooks: int, config: Any, metrics: Any, files_written=None) -> None:
        name = f"checkpoint-{step}"
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        final = self.root / name
        try:
            write_tmp(tmp, step, encoded, n_hooks, config, metrics, files_written)
            commit(tmp, final)
            write_pointer(self.root, LATEST, name)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = self._write_error(name, e)
            if error is not None:
                raise error from e
            raise
        self._retention(final)
        if self.mirror is not None:
            self.mirror.submit(final)

    def wait(self) -> None:
        """Block until the in-flight save is committed and the mirror has uploaded everything submitted.

        CheckpointError if the save or an upload failed (each failure is raised once). Call it at the end of a
        run and before exiting on SIGTERM.
        """
        self._wait_save()
        if self.mirror is not None:
            self.mirror.wait()

    def _wait_save(self) -> None:
        job, self._inflight = self._inflight, None
        if job is None:
            return
        job.thread.join()
        if job.error is not None:
            e, job.error = job.error, None
            msg = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
            raise CheckpointError(f"background save of {job.name} failed: {msg}") from e

    def close(self) -> None:
        """wait(), then stop the mirror's uploader. The manager may not save afterwards."""
        try:
            self.wait()
        finally:
            self._stager = Stager()  # the async staging buffers (a copy of the state) can go
            for handle in self._fenced.values():
                handle.remove()
            self._fenced.clear()
            if self.mirror is not None:
                self.mirror.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # an error is already on its way: finish what was started, report but don't mask it
            self.close()
        except CheckpointError as e:
            _say(str(e))

    def _cleanup_stale(self) -> None:
        # Removes leftovers of interrupted saves/deletions of any process; one writer per root is assumed
        # (with several ranks only rank 0 cleans). A crash between the two renames of the
        # non-atomic replace fallback leaves the valid old copy in .tmp-replaced-: put it back first.
        for d in self.root.iterdir():
            if d.name.startswith(".tmp-replaced-"):
                m = re.match(r"^\.tmp-replaced-(checkpoint-\d+)-\d+$", d.name)
                target = self.root / m.group(1) if m else None
                if target is not None and not target.exists() and not verify(d):
                    os.rename(d, target)
                    continue
            if d.name.startswith(_TMP_PREFIXES):
                log.info("removing leftover %s of an interrupted save", d)
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)

    def _retention(self, just_saved: Path) -> None:
        complete = []
        for step, d in self.checkpoints():
            try:
                m = read_manifest(d)
            except CheckpointError:
                continue  # incomplete or unreadable: never counted, never deleted here
            complete.append((step, d, m.get("metrics") or {}))
        if self.best_metric is not None:
            best = best_checkpoint(complete, self.best_metric, self.best_mode)
            if best is not None and read_pointer(self.root, BEST) != best.name:
                write_pointer(self.root, BEST, best.name)
        with self._lock:
            busy = self.mirror.busy() if self.mirror is not None else set()
            doomed = select_deletions(complete, self.save_total_limit, self.best_metric, self.best_mode,
                                      keep={just_saved, self.protect, *busy})
            for d in doomed:
                # Rename first so a crash mid-delete never leaves a half-deleted checkpoint-* behind.
                trash = self.root / f".tmp-deleting-{d.name}-{os.getpid()}"
                os.rename(d, trash)
                shutil.rmtree(trash, ignore_errors=True)
        if doomed:
            fsync_path(self.root)

    # ------------------------------------------------------------------ load / resume
    def verify(self, path: str | os.PathLike) -> list[str]:
        """Problems with the checkpoint at `path` (empty list: fine). See module-level `verify`."""
        return verify(path)

    def apply(self, loaded: LoadedCheckpoint, hooks: Mapping[str, Any], strict: bool = True) -> dict:
        """Call each hook's load_state_dict with its state from `loaded` (see `read_resume`); returns the
        manifest and protects the checkpoint from retention.

        strict: a registered hook absent from the checkpoint, or a saved hook not registered, is a
        CheckpointError naming both lists (before any hook is touched); strict=False warns and skips them.
        A hook that refuses its state raises CheckpointError naming the hook.
        """
        hooks = dict(hooks.items())  # any object with .items() (e.g. a StateRegistry) works
        p, manifest = loaded.path, loaded.manifest
        if not loaded.decoded:
            return self._apply_ranks(loaded, hooks, strict)
        problem = hook_name_mismatch(manifest["hooks"], hooks)
        if problem:
            msg = f"checkpoint {p} and the registered hooks differ: {problem}"
            if strict:
                raise CheckpointError(msg + "; register the same hooks as the saving run, or load with "
                                            "strict=False to skip them")
            warnings.warn(msg + "; skipping them (strict=False)", stacklevel=3)
        for n, hook in hooks.items():
            if n in loaded.states:
                try:
                    hook.load_state_dict(loaded.states[n])
                except Exception as e:  # noqa: BLE001 - named, one line, with the original chained
                    raise CheckpointError(f"{p}: hook {n!r} refused its saved state: {type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
        self.protect = p
        return manifest

    def _apply_ranks(self, loaded: LoadedCheckpoint, hooks: dict, strict: bool) -> dict:
        """`apply` for a checkpoint of several ranks, or on several ranks: each hook read by its kind (sharded
        state resharded, per-rank state remapped; distributed/hooks_io.py). A collective with several ranks."""
        from rlswift.distributed.hooks_io import read_hooks
        from rlswift.distributed.launch import single_process

        saved = loaded.manifest["hooks"]
        if not strict:
            skipped = sorted(set(hooks) ^ set(saved))
            if skipped:
                warnings.warn(f"checkpoint {loaded.path}: hooks {skipped} are registered or saved but not both; "
                              "skipping them (strict=False)", stacklevel=3)
            hooks = {n: h for n, h in hooks.items() if n in saved}
            manifest = {**loaded.manifest, "hooks": {n: f for n, f in saved.items() if n in hooks}}
        else:
            manifest = loaded.manifest
        read_hooks(loaded.path, manifest, hooks, self.info if self.ranks > 1 else single_process())
        self.protect = loaded.path
        return loaded.manifest

    def _read_candidate(self, p: Path, context: str | None) -> LoadedCheckpoint:
        """Verify a checkpoint; decode it too unless it is read hook by hook when applied (several ranks)."""
        if self.ranks > 1 or (p / MANIFEST).is_file() and is_multi_rank(read_manifest(p)):
            m = read_manifest(p)
            problems = verify(p)
            if problems:
                prefix = context.format(path=p) + ": " if context else ""
                raise CheckpointError(prefix + "; ".join(problems))
            return LoadedCheckpoint(p, m, {}, decoded=False)
        return read_checkpoint(p, context=context)

    def load(self, path: str | os.PathLike, hooks: Mapping[str, Any], strict: bool = True) -> dict:
        """Verify `path` completely, decode every hook's state, then call each hook's load_state_dict.

        Returns the manifest. Reads each file once; when `path` is what `resolve_resume` just returned, its
        already verified and decoded states are used without reading anything again. See `apply` for strict.
        """
        p = Path(path)
        loaded, self._resolved = self._resolved, None
        if loaded is None or loaded.path != p:
            loaded = self._read_candidate(p, "cannot load {path}")
        protect = self.protect
        manifest = self.apply(loaded, hooks, strict)
        self.protect = protect  # load() never changed protection; resolve_resume/apply do
        return manifest

    def read_resume(self, resume: str | os.PathLike | None) -> LoadedCheckpoint | None:
        """The checkpoint to resume from, verified and decoded with each file read once (None: start fresh).

        None -> None. "auto" -> the newest checkpoint under root that verifies and decodes, warning about each
        skipped one (and naming why); with a mirror, also the mirror's checkpoints (a newer or only remote one is
        downloaded into root first, with the run files). A path -> that checkpoint, else CheckpointError saying
        why. Sets `protect` to the returned checkpoint so retention never deletes it.
        """
        self._wait_save()
        if resume is None:
            return None
        if self.ranks > 1:
            return self._read_resume_ranks(resume)
        loaded = self._find(resume)
        if loaded is not None:
            self.protect = loaded.path
        return loaded

    def _find(self, resume: str | os.PathLike) -> LoadedCheckpoint | None:
        if str(resume) == "auto":
            loaded = self._auto()
        else:
            p = Path(resume)
            if not p.exists():
                raise CheckpointError(f"resume path {p} does not exist; pass an existing checkpoint-* folder or "
                                      "resume='auto'")
            if p.is_dir() and not (p / MANIFEST).exists() and any(CKPT_RE.match(c.name) for c in p.iterdir()):
                raise CheckpointError(f"{p} is an output folder, not a checkpoint; pass one of its checkpoint-* "
                                      "folders or resume='auto'")
            loaded = self._read_candidate(p, "cannot resume from {path}")
        return loaded

    def _read_resume_ranks(self, resume: str | os.PathLike) -> LoadedCheckpoint | None:
        """`read_resume` on several ranks: rank 0 finds and verifies the checkpoint (checksums, once), every rank
        gets its path; a failure on rank 0 raises on every rank. The hooks are read when applied."""
        from rlswift.distributed.hooks_io import agree
        from rlswift.distributed.launch import broadcast_json

        def choose() -> str | None:
            if not self.is_main:
                return None
            loaded = self._find(resume)  # candidates verified only (_read_candidate): ranks read their own parts
            return None if loaded is None else str(loaded.path)

        path = broadcast_json(agree(choose, self.info, "finding the checkpoint to resume from"), self.info)
        if path is None:
            return None
        p = Path(path)
        self.protect = p
        return LoadedCheckpoint(p, read_manifest(p), {}, decoded=False)


    def _auto(self) -> LoadedCheckpoint | None:
        local = {s: d for s, d in self.checkpoints()}
        remote: dict[int, str] = {}
        if self.mirror is not None:
            try:
                remote = self.mirror.remote_steps()
            except Exception as e:  # noqa: BLE001 - network/credentials: decide below, in one line
                why = f"cannot list the mirror {self.mirror.url}: {type(e).__name__}: {e}"
                if not local:  # starting from scratch would silently drop a run that may live on the mirror
                    raise CheckpointError(why + "; fix its access, or remove mirror_to to start without it") from e
                warnings.warn(f"resume='auto': {why}; using the local checkpoints only", stacklevel=3)
        for step in sorted(set(local) | set(remote), reverse=True):
            if step in local:
                try:
                    return self._read_candidate(local[step], None)
                except CheckpointError as e:
                    warnings.warn(f"resume='auto': skipping {local[step]}: {e}", stacklevel=3)
            if step in remote:
                try:
                    return self._download(step)
                except CheckpointError as e:
                    warnings.warn(f"resume='auto': skipping mirrored checkpoint-{step} ({self.mirror.url}): {e}",
                                  stacklevel=3)
        return None

    def _download(self, step: int) -> LoadedCheckpoint:
        """Fetch the mirror's checkpoint-{step} into root (verified before it is renamed into place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"checkpoint-{step}"
        tmp = self.root / f".tmp-download-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.mirror.download(name, tmp)
            loaded = self._read_candidate(tmp, None)
            commit(tmp, self.root / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        loaded.path = self.root / name
        write_pointer(self.root, LATEST, name)
        self.mirror.restore_run_files(self.root)
        _say(f"resumed from the mirror: downloaded {name} from {self.mirror.url}")
        return loaded

    def resolve_resume(self, resume: str | os.PathLike | None) -> Path | None:
        """Like `read_resume` but returns only the path (None: start fresh); the decoded states are kept so the
        following `load(path, ...)` reads nothing again."""
        loaded = self.read_resume(resume)
        self._resolved = loaded
        return loaded.path if loaded is not None else None
