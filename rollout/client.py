"""RemoteEngine: the RolloutEngine protocol over HTTP to a ``rollout.serve`` process (loopback is enough)."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import torch

from rollout.serve import READY_PREFIX
from rollout.types import Request, Rollout, request_to_dict


class RemoteEngine:
    """Client of a rollout server; server-side input errors are re-raised as ValueError with the same text."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._proc: subprocess.Popen | None = None

    def _call(self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json") -> dict:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": ctype})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return orjson.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = orjson.loads(raw).get("error", "")
            except orjson.JSONDecodeError:
                msg = raw.decode(errors="replace")
            if e.code == 400:
                raise ValueError(msg) from None
            raise RuntimeError(f"rollout server {self.url}{path} failed (HTTP {e.code}): {msg}") from None

    def health(self) -> dict:
        """The server's /health answer."""
        return self._call("GET", "/health")

    def generate(self, requests: list[Request]) -> list[Rollout]:
        """Same contract as the in-process engines."""
        body = orjson.dumps({"requests": [request_to_dict(r) for r in requests]})
        return [Rollout.from_dict(d) for d in self._call("POST", "/generate", body)["rollouts"]]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send the tensors as one safetensors blob; the server validates them before touching its engine."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in named_tensors:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"update_weights: value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
            if name in tensors:
                raise ValueError(f"update_weights: weight {name!r} given twice")
            t = t.detach().to("cpu").contiguous()
            # safetensors refuses tensors that share memory (tied weights): give repeats their own copy.
            if t.data_ptr() in seen:
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
        self._call("POST", "/update_weights", save(tensors), "application/octet-stream")

    def close(self) -> None:
        """Stop the server if this client launched it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            self._call("POST", "/shutdown")
        except Exception:  # noqa: BLE001 - the process may be gone already; terminate below
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def launch(
        cls,
        model: str | Path,
        engine: str = "hf",
        host: str = "127.0.0.1",
        port: int = 0,
        dtype: str = "float32",
        extra_args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        timeout: float = 600.0,
    ) -> "RemoteEngine":
        """Start ``python -m rollout.serve`` as a subprocess, wait for its ready line, return a client owning it."""
        cmd = [sys.executable, "-m", "rollout.serve", "--model", str(model), "--engine", engine,
               "--host", host, "--port", str(port), "--dtype", dtype, *extra_args]
        child_env = dict(os.environ if env is None else env)
        root = str(Path(__file__).resolve().parents[1])  # so `rollout` imports even when not installed
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, env=child_env, text=True, bufsize=1)
        url, seen = wait_ready(proc, startup_timeout)
        if url is None:
            proc.kill()
            proc.wait()
            tail = "".join(seen[-20:])
            raise RuntimeError(
                f"rollout.serve did not start within {startup_timeout:.0f} s (exit code {proc.returncode}): "
                f"{' '.join(cmd)}\n{tail}")
        client = cls(url, timeout=timeout)
        client._proc = proc
        return client


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
