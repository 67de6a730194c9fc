"""RemoteEngine: the RolloutEngine protocol over HTTP to a ``rollout.serve`` process, weights over HTTP or a process
group (gloo / NCCL), and a server it launched restarted when it dies.

Restart (a server launched by ``RemoteEngine.launch``): when a call finds the server process dead (killed, crashed;
also in the middle of a generate), the client starts a new one from the same command, re-sends the weights of its
last update, and repeats the call. Samples are seeded per sample, so a repeated generate returns the same tokens.
The weights it re-sends are the tensors it was last given (references, no copy: ``keep_weights="reference"``), so
they must still hold the synced values: true in the synchronous loop (the trainer does not step while generate
runs, and update_weights comes before the next generate). A trainer that changes those tensors in place before the
next update_weights (asynchronous generation) passes ``keep_weights="copy"`` (one copy of the weights on their own
device, refreshed at each update). Servers given by URL only are never restarted.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import torch

from rollout.launch import CLIENT_KWARGS, SERVE_KWARGS, serve_flags, start_server, stop_server, wait_ready  # noqa: F401
from rollout.types import Request, Rollout, request_to_dict

TRANSPORTS = ("auto", "http", "gloo", "nccl")
_GONE = (ConnectionError, http.client.HTTPException, urllib.error.URLError, OSError)


class ServerGone(RuntimeError):
    """The rollout server stopped answering (connection refused or dropped)."""


class ServerError(RuntimeError):
    """The rollout server answered with a failure (HTTP 5xx): it is alive, so the call is not repeated."""


class RemoteEngine:
    """Client of a rollout server; server-side input errors are re-raised as ValueError with the same text.

    ``weight_transport``: ``"http"`` (safetensors bodies, through host memory), ``"gloo"`` / ``"nccl"`` (a process
    group of its own between this process and the server, see rollout.transport), ``"auto"`` (NCCL when the server's
    engine and this process both have CUDA, else HTTP).
    """

    def __init__(self, url: str, timeout: float = 600.0, weight_transport: str = "auto",
                 transport_timeout: float = 600.0, bucket_bytes: int | None = None,
                 keep_weights: str = "reference", max_restarts: int = 3) -> None:
        if weight_transport not in TRANSPORTS:
            raise ValueError(f"weight_transport must be one of {list(TRANSPORTS)}, got {weight_transport!r}")
        if keep_weights not in ("reference", "copy"):
            raise ValueError(f"keep_weights must be 'reference' or 'copy', got {keep_weights!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.weight_transport = weight_transport
        self.transport_timeout = transport_timeout
        self.bucket_bytes = bucket_bytes
        self.keep_weights = keep_weights
        self.max_restarts = max_restarts
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._launch: dict[str, Any] | None = None  # how to start the server again
        self._channel = None  # rollout.transport.WeightChannel, made on the first update over a process group
        self._held: dict[str, torch.Tensor] = {}  # name -> tensor of the last value sent (for a restart)
        self._pending: list[tuple[str, torch.Tensor]] = []  # the update being sent (a restart sends it too)
        self._via: str | None = None  # the transport chosen for the current server
        self._last_sync_ms: float | None = None
        self.last_server_generate_s: float | None = None
        """The server's own time for the last generate() (the rest of the call is transport); None before one."""

    # ------------------------------------------------------------------ HTTP
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
            raise ServerError(f"rollout server {self.url}{path} failed (HTTP {e.code}): {msg}") from None
        except TimeoutError:
            raise
        except _GONE as e:
            raise ServerGone(f"rollout server {self.url} did not answer {path}: {type(e).__name__}: {e}") from e

    def _post_json(self, path: str, obj: Any) -> dict:
        return self._call("POST", path, orjson.dumps(obj))

    # ------------------------------------------------------------------ restart
    def _dead(self, grace: float = 10.0) -> bool:
        """Whether the launched server process has exited (waits up to ``grace`` s for a dying one to be reaped)."""
        if self._proc is None:
            return False
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _restart(self) -> None:
        if self._launch is None:
            raise ServerGone(f"rollout server {self.url} is gone and was not launched by this client (no restart)")
        if self.restarts >= self.max_restarts:
            raise RuntimeError(f"rollout server died again after {self.restarts} restarts (max_restarts); giving up")
        self.restarts += 1
        print(f"rollout: server {self.url} died (exit code {self._proc.returncode if self._proc else None}); "
              f"restart {self.restarts}/{self.max_restarts}", file=sys.stderr, flush=True)
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self._via = None
        self.url, self._proc = start_server(**self._launch)
        # The new server starts from the folder: give it every weight of the last update (and of the one in flight).
        try:
            if self._held or self._pending:
                self._send(list({**self._held, **dict(self._pending)}.items()), None)
        except ValueError:
            if self._held:  # the update in flight was refused: the server must still hold the last accepted one
                self._send(list(self._held.items()), None)
            raise

    def _retrying(self, fn):
        """Run fn(); if the launched server is (found) dead, restart it (weights restored) and run fn again."""
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                self._restart()
            try:
                return fn()
            except (ValueError, ServerError):
                raise  # the server answered: it is alive
            except RuntimeError:  # ServerGone, or a transport error (a peer that died mid-broadcast)
                if self._launch is None or not self._dead():
                    raise
                self._restart()

    # ------------------------------------------------------------------ protocol
    def server_pid(self) -> int | None:
        """The pid of the server this client launched (None when it connected to one by URL)."""
        return self._proc.pid if self._proc is not None else None

    def health(self) -> dict:
        """The server's /health answer."""
        return self._call("GET", "/health")

    def generate(self, requests: list[Request]) -> list[Rollout]:
        """Same contract as the in-process engines (repeated on a restarted server if the server dies meanwhile)."""
        body = orjson.dumps({"requests": [request_to_dict(r) for r in requests]})
        out = self._retrying(lambda: self._call("POST", "/generate", body))
        self.last_server_generate_s = out.get("generate_s")
        return [Rollout.from_dict(d) for d in out["rollouts"]]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       changed: Collection[str] | None = None) -> None:
        """Send the update over the chosen transport; the server validates names/shapes before anything is sent and
        loads only what it needs (see RolloutEngine.update_weights for ``changed``)."""
        t0 = time.perf_counter()
        items: list[tuple[str, torch.Tensor]] = []
        for name, t in named_tensors:
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"update_weights: value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
            items.append((name, t.detach()))
        self._pending = items
        try:
            restarted = self.restarts
            # After a restart the new server already got this update (with every other weight): nothing to repeat.
            self._retrying(lambda: self.restarts != restarted or self._send(items, changed))
        finally:
            self._pending = []
        for name, t in items:  # only now (the update was accepted) does it become what a restart re-sends
            old = self._held.get(name)
            if self.keep_weights == "reference":
                self._held[name] = t
            elif old is not None and old.shape == t.shape and old.dtype == t.dtype and old.device == t.device:
                old.copy_(t)  # refresh the copy in place: no new memory per update
            else:
                self._held[name] = t.clone()
        self._last_sync_ms = (time.perf_counter() - t0) * 1e3

    def _transport(self) -> str:
        if self._via is None:
            via = self.weight_transport
            if via == "auto":
                dev = self.health().get("device", "cpu")
                via = "nccl" if dev.startswith("cuda") and torch.cuda.is_available() else "http"
            self._via = via
        return self._via

    def _send(self, items: list[tuple[str, torch.Tensor]], changed: Collection[str] | None) -> None:
        via = self._transport()
        if via == "http":
            if changed is not None:
                meta = [[n, _dtype(t), list(t.shape)] for n, t in items]
                plan = self._post_json("/weights/plan", {"meta": meta, "changed": list(changed), "via": "http"})
                send = set(plan["send"])
                items = [(n, t) for n, t in items if n in send]
            self._call("POST", "/update_weights", _safetensors(items), "application/octet-stream")
            return
        from rollout.transport import DEFAULT_BUCKET_BYTES, plan_buckets

        channel = self._ensure_channel(via)
        meta = [[n, _dtype(t), list(t.shape)] for n, t in items]
        bucket = self.bucket_bytes or DEFAULT_BUCKET_BYTES
        plan = self._post_json("/weights/plan", {"meta": meta, "changed": None if changed is None else list(changed),
                                                 "via": "pg", "bucket_bytes": bucket})
        by_name = dict(items)
        send = [(n, by_name[n]) for n in plan["send"]]
        buckets = plan_buckets([(n, _dtype(t), tuple(t.shape)) for n, t in send], bucket)
        try:
            channel.send([t for _, t in send], buckets)
        except Exception:
            # A broken link (the server died mid-transfer): drop the group; a restart or the next call rebuilds it.
            self._channel = None
            channel.close()
            raise
        self._post_json("/weights/done", {"id": plan["id"]})

    def _ensure_channel(self, backend: str):
        if self._channel is not None and self._channel.backend == backend:
            return self._channel
        from rollout.transport import WeightChannel, local_address_for, open_store

        host = local_address_for(urllib.parse.urlparse(self.url).hostname or "127.0.0.1")
        store = open_store(host, self.transport_timeout)
        init = {"backend": backend, "host": host, "port": store.port, "timeout_s": self.transport_timeout}
        # The server blocks in the rendezvous while answering, so its request runs beside our side of it.
        with ThreadPoolExecutor(max_workers=1) as pool:
            answer = pool.submit(self._post_json, "/transport/init", init)
            try:
                channel = WeightChannel(backend, host, store.port, rank=0, timeout_s=self.transport_timeout,
                                        store=store)
            except Exception:
                answer.cancel()
                raise
            answer.result()
        self._channel = channel
        return channel

    def sleep(self) -> None:
        """Ask the server's engine to free its KV cache (no-op where it has none)."""
        self._retrying(lambda: self._call("POST", "/sleep"))

    def wake_up(self) -> None:
        """Undo sleep()."""
        self._retrying(lambda: self._call("POST", "/wake_up"))

    def stats(self) -> dict[str, Any]:
        """The server engine's stats plus this client's (restarts, transport, client-side last sync ms)."""
        s = self._retrying(lambda: self._call("GET", "/stats"))
        return {**s, "restarts": self.restarts, "weight_transport": self.weight_transport,
                "client_last_sync_ms": None if self._last_sync_ms is None else round(self._last_sync_ms, 3)}

    def close(self) -> None:
        """Stop the server if this client launched it."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        proc, self._proc, self._launch = self._proc, None, None
        if proc is None:
            return
        try:
            self._call("POST", "/shutdown")
        except Exception:  # noqa: BLE001 - the process may be gone already; terminate below
            pass
        stop_server(proc)

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
        **kwargs: Any,
    ) -> "RemoteEngine":
        """Start ``python -m rollout.serve`` as a subprocess, wait for its ready line, return a client owning it
        (and able to restart it). ``env`` e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}`` puts the engine on another GPU.
        ``kwargs``: engine settings (the server's flags: max_model_len, seed, kv_cache_gib, gpu_memory_utilization,
        enforce_eager, max_num_seqs, max_num_batched_tokens, block_size, enable_sleep_mode, sleep_level, sync_method,
        device; None = the engine's default) and client settings (weight_transport, transport_timeout, bucket_bytes,
        keep_weights, max_restarts)."""
        client_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in CLIENT_KWARGS}
        cmd = [sys.executable, "-m", "rollout.serve", "--model", str(model), "--engine", engine,
               "--host", host, "--port", str(port), "--dtype", dtype, *serve_flags(kwargs), *extra_args]
        child_env = dict(os.environ)
        child_env.update(env or {})
        root = str(Path(__file__).resolve().parents[1])  # so `rollout` imports even when not installed
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH", "")) if p)
        spec = {"cmd": cmd, "env": child_env, "startup_timeout": startup_timeout}
        url, proc = start_server(**spec)
        client = cls(url, timeout=timeout, **client_kwargs)
        client._proc, client._launch = proc, spec
        return client


def _dtype(t: torch.Tensor) -> str:
    from rollout.transport import dtype_name

    return dtype_name(t.dtype)


def _safetensors(items: list[tuple[str, torch.Tensor]]) -> bytes:
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in items:
        if name in tensors:
            raise ValueError(f"update_weights: weight {name!r} given twice")
        t = t.to("cpu").contiguous()
        if t.data_ptr() in seen:  # safetensors refuses tensors that share memory (tied weights): copy repeats
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[name] = t
    return save(tensors)
