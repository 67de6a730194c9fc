"""A rollout engine behind a small local HTTP endpoint (stdlib server, orjson bodies, one lock on the engine).

    python -m rollout.serve --model DIR --engine vllm|hf [--host 127.0.0.1] [--port 0] [--dtype float32] [vLLM flags]

Prints exactly one line ``rollout.serve listening on http://HOST:PORT`` on stdout when ready. Endpoints:
GET /health, GET /stats; POST /generate ({"requests": [...]} -> {"rollouts": [...]}); POST /update_weights (body:
safetensors bytes); POST /sleep, /wake_up, /shutdown. Weights over a process group (rollout.transport):
POST /transport/init ({"backend", "host", "port", "timeout_s"}: join the trainer's group as rank 1), then per update
POST /weights/plan ({"meta": [[name, dtype, shape]...], "changed": [...] | null}: validated before anything is
broadcast; -> {"send": names, "id"}), the trainer broadcasts those tensors, POST /weights/done ({"id"}) -> the
result of loading them. Bad input -> HTTP 400 {"error": message}; other failures -> HTTP 500.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from rollout.engine import RolloutEngine, make_engine
from rollout.types import request_from_dict

READY_PREFIX = "rollout.serve listening on "


class _Weights:
    """Server side of the process-group transport: the channel and the one transfer in flight."""

    def __init__(self) -> None:
        self.channel = None
        self.next_id = 0
        self.thread: threading.Thread | None = None
        self.id = -1
        self.result: Any = None  # number of tensors loaded, or the exception

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class WeightServer(ThreadingHTTPServer):
    """The HTTP server of ``make_server``; closing it also tears down its weight process group (an NCCL group left
    alive warns at exit that destroy_process_group() was never called)."""

    weights: _Weights

    def server_close(self) -> None:
        super().server_close()
        channel, self.weights.channel = self.weights.channel, None
        if channel is not None:
            channel.close()


def make_server(engine: RolloutEngine, host: str = "127.0.0.1", port: int = 0, kind: str = "") -> WeightServer:
    """An HTTP server around ``engine``; calls to the engine are serialised by one lock."""
    lock = threading.Lock()
    w = _Weights()
    generating = [0]
    device = str(getattr(engine, "device", "cpu"))

    def receive(plan: list, buckets: list) -> None:
        # Runs beside the trainer's broadcast: take every bucket (so the group stays in step even if loading fails),
        # then load them in one update.
        try:
            with lock:
                tensors = w.channel.recv(buckets)
                engine.update_weights(tensors)
            w.result = len(tensors)
        except Exception as e:  # noqa: BLE001 - reported by /weights/done
            w.result = e

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: stdout carries the ready line only
            pass

        def _reply(self, code: int, obj: Any) -> None:
            body = orjson.dumps(obj)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            if self.path == "/health":
                self._reply(200, {"ok": True, "engine": kind, "device": device, "pid": os.getpid()})
            elif self.path == "/stats":
                stats = engine.stats() if hasattr(engine, "stats") else {}
                self._reply(200, {**stats, "pid": os.getpid(), "generating": generating[0],
                                  "transport": w.channel.backend if w.channel is not None else None})
            else:
                self._reply(404, {"error": f"unknown path {self.path!r}: GET /health or /stats"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                self._post()
            except (ValueError, TypeError, KeyError, orjson.JSONDecodeError) as e:
                self._reply(400, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - report, keep serving
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def _post(self) -> None:
            if self.path == "/generate":
                payload = orjson.loads(self._body() or b"{}")
                reqs = [request_from_dict(d) for d in payload.get("requests", [])]
                with lock:
                    generating[0] += 1
                    t0 = time.perf_counter()
                    try:
                        outs = engine.generate(reqs)
                    finally:
                        generating[0] -= 1
                    seconds = time.perf_counter() - t0
                self._reply(200, {"rollouts": [o.to_dict() for o in outs], "generate_s": round(seconds, 4)})
            elif self.path == "/update_weights":
                from safetensors.torch import load

                tensors = load(self._body())
                with lock:
                    engine.update_weights(list(tensors.items()))
                self._reply(200, {"ok": True, "updated": len(tensors)})
            elif self.path == "/weights/plan":
                self._plan(orjson.loads(self._body() or b"{}"))
            elif self.path == "/weights/done":
                self._done(orjson.loads(self._body() or b"{}"))
            elif self.path == "/transport/init":
                self._init_transport(orjson.loads(self._body() or b"{}"))
            elif self.path in ("/sleep", "/wake_up"):
                with lock:
                    getattr(engine, self.path[1:])()
                self._reply(200, {"ok": True})
            elif self.path == "/shutdown":
                self._reply(200, {"ok": True})
                threading.Thread(target=self.server.shutdown, daemon=True).start()
            else:
                paths = "/generate, /update_weights, /weights/plan, /weights/done, /transport/init, /sleep, /wake_up"
                self._reply(404, {"error": f"unknown path {self.path!r}: use {paths} or /shutdown"})

        def _init_transport(self, p: dict) -> None:
            from rollout.transport import WeightChannel

            if w.busy():
                raise ValueError("a weight transfer is in progress; finish it (/weights/done) before a new transport")
            if w.channel is not None:
                w.channel.close()
                w.channel = None
            dev = device if p["backend"] == "nccl" else "cpu"
            w.channel = WeightChannel(p["backend"], p["host"], int(p["port"]), rank=1,
                                      timeout_s=float(p.get("timeout_s", 600)), device=dev)
            self._reply(200, {"ok": True, "device": str(w.channel.device)})

        def _plan(self, p: dict) -> None:
            from rollout.transport import DEFAULT_BUCKET_BYTES, dtype_from_name, plan_buckets

            meta = [(str(n), str(dt), tuple(int(d) for d in shape)) for n, dt, shape in p.get("meta", [])]
            for _, dt, _ in meta:
                dtype_from_name(dt)
            changed = p.get("changed")
            with lock:
                send = engine.plan_update([(n, s) for n, _, s in meta], changed)
            if p.get("via", "pg") == "http":
                self._reply(200, {"send": send, "id": -1})
                return
            if w.channel is None:
                raise ValueError("no weight transport: POST /transport/init first")
            if w.busy():
                raise ValueError("a weight transfer is already in progress")
            by_name = {n: (n, dt, s) for n, dt, s in meta}
            buckets = plan_buckets([by_name[n] for n in send], int(p.get("bucket_bytes", DEFAULT_BUCKET_BYTES)))
            w.next_id += 1
            w.id, w.result = w.next_id, None
            w.thread = threading.Thread(target=receive, args=(send, buckets), daemon=True)
            w.thread.start()
            self._reply(200, {"send": send, "id": w.id})

        def _done(self, p: dict) -> None:
            if int(p.get("id", -2)) != w.id or w.thread is None:
                raise ValueError(f"unknown weight transfer id {p.get('id')!r} (current: {w.id})")
            w.thread.join()
            w.thread = None
            if isinstance(w.result, BaseException):
                raise w.result
            self._reply(200, {"ok": True, "updated": w.result})

    server = WeightServer((host, port), Handler)
    server.weights = w
    return server


def engine_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """make_engine kwargs from the parsed command line (only what was given, so each engine keeps its defaults)."""
    kw: dict[str, Any] = {"dtype": a.dtype}
    if a.max_model_len:
        kw["max_model_len"] = a.max_model_len
    if a.engine == "hf":
        kw["device"] = a.device
        return kw
    kw["seed"] = a.seed
    for key in ("kv_cache_gib", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "block_size",
                "sync_method"):
        if getattr(a, key) is not None:
            kw[key] = getattr(a, key)
    if a.enforce_eager:
        kw["enforce_eager"] = True
    if a.enable_sleep_mode:
        kw.update(enable_sleep_mode=True, sleep_level=a.sleep_level)
    return kw


def parser() -> argparse.ArgumentParser:
    """The server's command line (``RemoteEngine.launch`` writes it from engine settings: ``serve_flags``)."""
    p = argparse.ArgumentParser(prog="python -m rollout.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder (safetensors + tokenizer)")
    p.add_argument("--engine", choices=["vllm", "hf"], default="hf")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--device", default="cpu", help="HF engine device (cpu, cuda, cuda:1)")
    p.add_argument("--seed", type=int, default=0, help="vLLM engine seed (per-sample seeds come with requests)")
    p.add_argument("--kv-cache-gib", type=int, default=None, help="vLLM CPU KV cache size (default 2)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM on GPU (default 0.5)")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None, help="vLLM KV block tokens (default: 32 on CPU)")
    p.add_argument("--enable-sleep-mode", action="store_true", help="vLLM on GPU: /sleep frees the KV cache")
    p.add_argument("--sleep-level", type=int, default=1, choices=[1, 2])
    p.add_argument("--sync-method", default=None, choices=["auto", "reload", "load_weights"])
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, start the engine and the server, print the ready line, serve until /shutdown."""
    a = parser().parse_args(argv)
    engine = make_engine(a.engine, a.model, **engine_kwargs(a))
    server = make_server(engine, a.host, a.port, kind=a.engine)
    host, port = server.server_address[:2]
    print(f"{READY_PREFIX}http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        engine.close()
        sys.stdout.flush()


if __name__ == "__main__":
    main()
