"""A rollout engine behind a small local HTTP endpoint (stdlib server, orjson bodies, one lock on the engine).

    python -m rollout.serve --model DIR --engine vllm|hf [--host 127.0.0.1] [--port 0] [--dtype float32]

Prints exactly one line ``rollout.serve listening on http://HOST:PORT`` on stdout when ready. Endpoints:
GET /health; POST /generate ({"requests": [...]} -> {"rollouts": [...]}); POST /update_weights (body: safetensors
bytes); POST /shutdown. Bad input -> HTTP 400 {"error": message}; other failures -> HTTP 500.
"""

from __future__ import annotations

import argparse
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from rollout.engine import RolloutEngine, make_engine
from rollout.types import request_from_dict

READY_PREFIX = "rollout.serve listening on "


def make_server(engine: RolloutEngine, host: str = "127.0.0.1", port: int = 0, kind: str = "") -> ThreadingHTTPServer:
    """An HTTP server around ``engine``; calls to the engine are serialised by one lock."""
    lock = threading.Lock()

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
                self._reply(200, {"ok": True, "engine": kind})
            else:
                self._reply(404, {"error": f"unknown path {self.path!r}: GET /health only"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                if self.path == "/generate":
                    payload = orjson.loads(self._body() or b"{}")
                    reqs = [request_from_dict(d) for d in payload.get("requests", [])]
                    with lock:
                        outs = engine.generate(reqs)
                    self._reply(200, {"rollouts": [o.to_dict() for o in outs]})
                elif self.path == "/update_weights":
                    from safetensors.torch import load

                    tensors = load(self._body())
                    with lock:
                        engine.update_weights(list(tensors.items()))
                    self._reply(200, {"ok": True, "updated": len(tensors)})
                elif self.path == "/shutdown":
                    self._reply(200, {"ok": True})
                    threading.Thread(target=self.server.shutdown, daemon=True).start()
                else:
                    self._reply(404, {"error": f"unknown path {self.path!r}: use /generate, /update_weights, /shutdown"})
            except (ValueError, TypeError, KeyError, orjson.JSONDecodeError) as e:
                self._reply(400, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - report, keep serving
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

    return ThreadingHTTPServer((host, port), Handler)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, start the engine and the server, print the ready line, serve until /shutdown."""
    p = argparse.ArgumentParser(prog="python -m rollout.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder (safetensors + tokenizer)")
    p.add_argument("--engine", choices=["vllm", "hf"], default="hf")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="vLLM engine seed (per-sample seeds come with requests)")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM CPU KV cache size")
    a = p.parse_args(argv)
    kw: dict[str, Any] = {"dtype": a.dtype}
    if a.max_model_len:  # else each engine's own default
        kw["max_model_len"] = a.max_model_len
    if a.engine == "vllm":
        kw.update(seed=a.seed, kv_cache_gib=a.kv_cache_gib)
    engine = make_engine(a.engine, a.model, **kw)
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
