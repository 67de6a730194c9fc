"""Starting and stopping a ``python -m rollout.serve`` process: its command-line flags, the ready line, shutdown."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from typing import Any

from rollout.serve import READY_PREFIX

CLIENT_KWARGS = ("weight_transport", "transport_timeout", "bucket_bytes", "keep_weights", "max_restarts")
SERVE_KWARGS = ("max_model_len", "seed", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager", "max_num_seqs",
                "max_num_batched_tokens", "block_size", "enable_sleep_mode", "sleep_level", "sync_method", "device")


def serve_flags(settings: dict[str, Any]) -> list[str]:
    """``rollout.serve`` command-line flags for engine settings (None and False: the engine's default)."""
    flags: list[str] = []
    for key, value in settings.items():
        if key not in SERVE_KWARGS:
            raise ValueError(f"RemoteEngine.launch: unknown argument {key!r}; engine settings: {list(SERVE_KWARGS)}, "
                             f"client settings: {list(CLIENT_KWARGS)}")
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def start_server(cmd: list[str], env: dict[str, str], startup_timeout: float) -> tuple[str, subprocess.Popen]:
    """Run the server command; (its URL, the process) once it printed its ready line, else RuntimeError with its
    output's tail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, env=env, text=True, bufsize=1)
    url, seen = wait_ready(proc, startup_timeout)
    if url is None:
        proc.kill()
        proc.wait()
        tail = "".join(seen[-20:])
        raise RuntimeError(
            f"rollout.serve did not start within {startup_timeout:.0f} s (exit code {proc.returncode}): "
            f"{' '.join(cmd)}\n{tail}")
    return url, proc


def stop_server(proc: subprocess.Popen) -> None:
    """Wait for a server asked to shut down; terminate, then kill, one that does not exit."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(proc: subprocess.Popen, timeout: float) -> tuple[str | None, list[str]]:
    """Wait up to ``timeout`` s for the server's ready line: (its URL or None, the lines seen before it).

    A reader thread owns the pipe, so a server that hangs without printing still times out; after the ready line
    it keeps draining stdout (engine logs may go there) so a full pipe never blocks the server.
    """
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            if not ready.is_set():
                lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None, seen
        if line is None:  # EOF: the server died before it was ready
            return None, seen
        if line.startswith(READY_PREFIX):
            ready.set()
            return line[len(READY_PREFIX):].strip(), seen
        seen.append(line)
