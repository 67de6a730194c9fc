"""The rollout engine protocol, the engine factory, request validation and the stats counters every engine shares.

Weight-update validation lives in rollout.weights (re-exported here).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from rollout.types import Request, Rollout
from rollout.weights import (  # noqa: F401 - re-exported: engines and tests import them from here
    TIED_EMBED,
    TIED_HEAD,
    SyncPlanner,
    WeightValidator,
    is_tied,
    read_weight_shapes,
)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generator: sample, take new weights, free memory between rollouts, report."""

    def generate(self, requests: list[Request]) -> list[Rollout]:
        """One Rollout per (request, seed), flat, ordered by (request_index, sample_index)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       changed: Collection[str] | None = None) -> None:
        """Replace weights by HF parameter name (e.g. ``model.layers.0.self_attn.q_proj.weight``); weights not given
        keep their values. ``changed``: the names that may differ from the caller's previous update (None: all);
        the engine then loads only those (plus what it needs to load them exactly). It is ignored until the engine
        has received every weight once, so passing e.g. the trainable names on every call is always safe."""
        ...

    def sleep(self) -> None:
        """Free what generation alone needs (vLLM sleep mode: the KV cache) until the next call; a no-op where the
        engine has nothing to free. Weights survive (the next generate uses the last synced ones)."""
        ...

    def wake_up(self) -> None:
        """Undo sleep() now (otherwise the next update_weights/generate does it)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for logs: engine start seconds, last sync ms, generated tokens, ... (JSON-able)."""
        ...

    def close(self) -> None:
        """Free the engine; further calls are undefined."""
        ...


ENGINE_KINDS = ("vllm", "hf", "remote")


def make_engine(kind: str, model_path: str | Path, **kwargs: Any) -> RolloutEngine:
    """Build an engine by kind; kwargs go to its constructor.

    ``"vllm"``: VLLMEngine (in process). ``"hf"``: HFEngine. ``"remote"``: RemoteEngine; with ``url=...`` it
    connects to a running ``python -m rollout.serve``, otherwise it launches one for ``model_path``
    (kwargs as ``RemoteEngine.launch``) and restarts it if it dies.
    """
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **kwargs)
    if kind == "hf":
        from rollout.hf_engine import HFEngine

        return HFEngine(model_path, **kwargs)
    if kind == "remote":
        from rollout.client import RemoteEngine

        if "url" in kwargs:
            return RemoteEngine(**kwargs)
        return RemoteEngine.launch(model_path, **kwargs)
    raise ValueError(f"unknown engine kind {kind!r}: use one of {list(ENGINE_KINDS)}")


class EngineStats:
    """The counters behind ``stats()``: engines call ``synced``/``generated`` after each call."""

    def __init__(self, engine: str, device: str) -> None:
        self.t0 = time.perf_counter()
        self.values: dict[str, Any] = {
            "engine": engine, "device": device, "start_s": None, "syncs": 0, "last_sync_ms": None,
            "last_sync_tensors": 0, "sync_ms_total": 0.0, "generate_calls": 0, "last_generate_s": None,
            "last_generated_tokens": 0, "generated_tokens": 0, "asleep": False,
        }

    def started(self) -> None:
        """Record the engine start time (seconds since this object was made)."""
        self.values["start_s"] = round(time.perf_counter() - self.t0, 3)

    def synced(self, t0: float, n_tensors: int) -> None:
        ms = (time.perf_counter() - t0) * 1e3
        v = self.values
        v.update(syncs=v["syncs"] + 1, last_sync_ms=round(ms, 3), last_sync_tensors=n_tensors,
                 sync_ms_total=round(v["sync_ms_total"] + ms, 3))

    def generated(self, t0: float, rollouts: list[Rollout]) -> None:
        n = sum(len(r.completion_ids) for r in rollouts)
        v = self.values
        v.update(generate_calls=v["generate_calls"] + 1, last_generate_s=round(time.perf_counter() - t0, 4),
                 last_generated_tokens=n, generated_tokens=v["generated_tokens"] + n)

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        return {**self.values, **extra}


def check_requests(requests: list[Request], max_model_len: int, vocab_size: int) -> None:
    """Refuse a generate() call before any engine sees it: not a list of Request, a prompt that leaves no room for
    max_tokens within max_model_len, or a token id outside the vocabulary (skipped when vocab_size is 0: unknown)."""
    if not isinstance(requests, (list, tuple)):
        raise ValueError(f"generate wants a list of Request, got {type(requests).__name__}")
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise ValueError(f"request {i} is a {type(r).__name__}, not a rollout.types.Request")
        budget = max_model_len - r.sampling.max_tokens
        if len(r.prompt_ids) > budget:
            raise ValueError(
                f"request {i}: prompt of {len(r.prompt_ids)} tokens + max_tokens={r.sampling.max_tokens} exceeds "
                f"max_model_len={max_model_len}; shorten the prompt (at most {max(budget, 0)} tokens) "
                "or raise max_model_len"
            )
        if vocab_size and max(r.prompt_ids) >= vocab_size:
            raise ValueError(f"request {i}: token id {max(r.prompt_ids)} is outside the vocabulary (size {vocab_size})")


