"""VLLMEngine: vLLM run in this process, one vLLM request per sample, live weight sync in place, optional sleep mode.

What the logprobs mean: vLLM's default ``logprobs_mode`` is ``"raw_logprobs"``: the log-softmax of the model's raw
logits, BEFORE temperature, top-k and top-p. So ``Rollout.logprobs`` is log p_model(token | prefix) at temperature 1
whatever the SamplingSpec says — exactly what a trainer's fp32 forward of the same weights computes. HFEngine reports
the same quantity.

Weight sync, two methods (``sync_method``):
- ``"reload"`` (CPU; any platform): the worker's ``reload_weights`` (layerwise reload). Needed on CPU, where the
  backend repacks linear weights after loading and ``model.load_weights`` alone fails. It rebuilds a layer from what
  it is sent, so a fused layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj) must be sent whole; layers sent nothing
  keep their weights.
- ``"load_weights"`` (CUDA, unquantized): ``model.load_weights`` copies each tensor into its (shard of the) vLLM
  parameter in place: no re-materialisation, any subset (one shard of a fused layer too) loads exactly, CUDA graphs
  stay valid (same storage). Unquantized linear and embedding layers do no post-load processing on CUDA (vLLM 0.26
  and 0.32: ``process_weights_after_loading`` only repacks on CPU), so this is exact. TRL's colocate mode syncs so.

Sleep mode (CUDA, ``enable_sleep_mode=True``): ``sleep()`` puts vLLM to sleep at ``sleep_level``. Level 1 (default)
copies the weights to pinned host memory and frees them and the KV cache; waking copies them back to the same
addresses, bit for bit, so the weights after ``wake_up`` are the last synced ones and captured CUDA graphs stay valid
(vLLM 0.26 and 0.32, CuMem allocator: memory is remapped at the same virtual addresses). Level 2 discards the weights
too (nothing is copied): the next ``update_weights`` must then carry every weight, and ``generate`` refuses to run
before it. Sleeping at level >= 1 clears the prefix cache (KV blocks are gone). ``update_weights`` while asleep wakes
the weights only (the KV cache stays freed until ``generate``), as TRL and verl do. On CPU vLLM has no sleep mode
(its worker's sleep/wake only log a warning): the setting is ignored with a reason and sleep/wake are no-ops.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import time
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from rollout.engine import EngineStats, check_requests
from rollout.types import Request, Rollout
from rollout.weights import TIED_EMBED, SyncPlanner, WeightValidator

SYNC_METHODS = ("auto", "reload", "load_weights")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _repack_tied_head(model: torch.nn.Module) -> None:
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class _QuietReload(logging.Filter):
    """Drops the reload's per-layer notices for layers that were sent nothing (rotary buffers, a tied head, layers a
    partial update leaves alone): they keep their weights, which is what a partial update means."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not ("Failed to load weights" in msg or "weights were not loaded" in msg)


_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                   "vllm.model_executor.model_loader.reload.inplace", "vllm.v1.worker.gpu_model_runner")


CPU_BLOCK_SIZE = 32  # KV block tokens on CPU when prefix caching is on (see VLLMEngine.__init__)


def _positive_int(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or int(v) != v or v < 1:
        raise ValueError(f"{name} must be a positive int (or None for vLLM's default), got {v!r}")
    return int(v)


@contextlib.contextmanager
def _modules_scannable():
    """While vLLM starts, its Triton-kernel rebinding treats a module global that raises on ``hasattr`` as absent.

    vLLM's CPU platform rebinds kernels by scanning every loaded module's globals with ``hasattr(value,
    "__dict__")``; a werkzeug LocalProxy outside its context (Flask's ``current_app``, ``request``) raises
    RuntimeError there, so a process that had imported Flask (moto's S3 server, an MLflow or Gradio app, ...) could
    not start an engine. The scan's module gets a ``hasattr`` that answers False instead, for the start only.
    """
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:  # a vLLM without the scan
        yield
        return

    def tolerant_hasattr(obj, name):
        try:
            return hasattr(obj, name)
        except Exception:
            return False

    own = vars(dispatcher).get("hasattr")  # None: the module uses the builtin
    dispatcher.hasattr = tolerant_hasattr
    try:
        yield
    finally:
        if own is None:
            del dispatcher.hasattr
        else:
            dispatcher.hasattr = own


class VLLMEngine:
    """In-process vLLM engine implementing the RolloutEngine protocol.

    Each sample is its own vLLM request with ``n=1`` and ``seed=<its seed>``, so a sample's tokens depend on its
    seed, prompt and the weights only — not on the batch it was sent in (vLLM with ``n>1`` would use seed+i
    internally, colliding across prompts). On CPU: eager mode and no chunked prefill (per-request seeds crash with
    chunked prefill there).

    vLLM settings (None = vLLM's default): ``gpu_memory_utilization`` (CUDA; fraction of the card for weights +
    KV cache, default 0.5 so a trainer fits beside it), ``enforce_eager`` (CUDA graphs off), ``max_num_seqs`` and
    ``max_num_batched_tokens`` (scheduler batch limits), ``block_size`` (KV block tokens; on CPU with prefix caching
    the default is 32 instead of vLLM's 128, so the samples of a group share their prompt's blocks),
    ``enable_sleep_mode`` / ``sleep_level`` (see the module doc), ``kv_cache_gib`` (CPU KV cache). A setting that
    does not apply on this platform is ignored, listed in ``stats()["ignored_settings"]`` with the reason, and warned
    about once. ``llm_kwargs`` go to ``vllm.LLM`` as is.
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        kv_cache_gib: int | None = None,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        block_size: int | None = None,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        sync_method: str = "auto",
        **llm_kwargs: Any,
    ) -> None:
        self._stats = EngineStats("vllm", "?")
        # ---- validate every setting before the (slow) vLLM import
        if kv_cache_gib is not None and (isinstance(kv_cache_gib, bool) or int(kv_cache_gib) != kv_cache_gib
                                         or kv_cache_gib <= 0):
            raise ValueError(f"kv_cache_gib must be a positive whole number of GiB (vLLM reads an int), "
                             f"got {kv_cache_gib}")
        if gpu_memory_utilization is not None and not 0.0 < float(gpu_memory_utilization) <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] (fraction of GPU memory), "
                             f"got {gpu_memory_utilization}")
        if enforce_eager not in (None, True, False):
            raise ValueError(f"enforce_eager must be True, False or None, got {enforce_eager!r}")
        max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        max_num_batched_tokens = _positive_int("max_num_batched_tokens", max_num_batched_tokens)
        block_size = _positive_int("block_size", block_size)
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (keep weights in host memory) or 2 (discard them), "
                             f"got {sleep_level!r}")
        if sync_method not in SYNC_METHODS:
            raise ValueError(f"sync_method must be one of {list(SYNC_METHODS)}, got {sync_method!r}")
        # vLLM reads these at import time: in-process engine core, CPU KV cache size, no telemetry.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # setdefault: an explicit environment wins, and vLLM reads it once per process anyway.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib or 2)))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from vllm import LLM

        self.model_path = Path(model_path)
        self.max_model_len = int(max_model_len)
        self.enable_prefix_caching = enable_prefix_caching
        self.validator = WeightValidator.from_model_dir(self.model_path)
        cfg = json.loads((self.model_path / "config.json").read_text())
        self.vocab_size = int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size") or 0)
        self.on_cpu = _on_cpu()
        self.ignored_settings: dict[str, str] = {}
        kw: dict[str, Any] = dict(model=str(self.model_path), dtype=dtype, seed=seed, max_model_len=self.max_model_len,
                                  enable_prefix_caching=enable_prefix_caching)
        if max_num_seqs is not None:
            kw["max_num_seqs"] = max_num_seqs
        if max_num_batched_tokens is not None:
            kw["max_num_batched_tokens"] = max_num_batched_tokens
        if self.on_cpu:
            if max_num_batched_tokens is not None and max_num_batched_tokens < self.max_model_len:
                raise ValueError(
                    f"max_num_batched_tokens={max_num_batched_tokens} < max_model_len={self.max_model_len}: on CPU "
                    "prefill is never chunked (per-sample seeds crash with chunked prefill there), so one step must "
                    "hold a whole prompt; raise max_num_batched_tokens or lower max_model_len")
            kw.update(enforce_eager=True, enable_chunked_prefill=False)
            if block_size is None and enable_prefix_caching:
                # The CPU backend's default KV block is 128 tokens, and only whole blocks are shared: a GRPO group's
                # G requests of a shorter prompt each prefill it in full. 32 (the smallest the CPU attention takes)
                # lets them share it: -23% rollout time on SmolLM2, 4 x 4 samples of 46-token prompts (the
                # tokens and logprobs are bit-identical to 128's; scripts/README.md).
                block_size = CPU_BLOCK_SIZE
            if block_size is not None and block_size % CPU_BLOCK_SIZE:
                raise ValueError(f"block_size={block_size}: vLLM's CPU attention takes multiples of {CPU_BLOCK_SIZE} "
                                 f"tokens; use {CPU_BLOCK_SIZE} (the CPU default) or a multiple")
            if gpu_memory_utilization is not None:
                self._ignore("gpu_memory_utilization", "the CPU backend sizes its KV cache from kv_cache_gib")
            if enforce_eager is False:
                self._ignore("enforce_eager", "the CPU engine always runs eagerly (no CUDA graphs on CPU)")
            if enable_sleep_mode:
                self._ignore("enable_sleep_mode", "vLLM has no sleep mode on CPU (its CPU worker's sleep/wake_up "
                                                  "are no-ops); sleep() and wake_up() do nothing")
            enable_sleep_mode = False
            if sync_method == "load_weights":
                raise ValueError("sync_method='load_weights' fails on CPU (the CPU backend repacks linear weights "
                                 "after loading); use 'reload' or 'auto'")
            self.sync_method = "reload"
        else:
            kw["gpu_memory_utilization"] = 0.5 if gpu_memory_utilization is None else float(gpu_memory_utilization)
            if enforce_eager is not None:
                kw["enforce_eager"] = enforce_eager
            if enable_sleep_mode:
                kw["enable_sleep_mode"] = True
            if kv_cache_gib is not None:
                self._ignore("kv_cache_gib", "on GPU the KV cache is sized by gpu_memory_utilization")
            quantized = bool(llm_kwargs.get("quantization")) or bool(cfg.get("quantization_config"))
            self.sync_method = ("reload" if quantized else "load_weights") if sync_method == "auto" else sync_method
        if block_size is not None:
            kw["block_size"] = block_size
        kw.update(llm_kwargs)
        self.sleep_enabled = bool(enable_sleep_mode)
        self.sleep_level = sleep_level
        self._asleep = False  # vLLM is asleep (KV cache freed; weights too unless woken by a sync)
        self._weights_awake = True
        self._weights_lost = False  # level-2 sleep discarded the weights: a full sync must come before generate
        with _modules_scannable():
            self.llm = LLM(**kw)
        self.device = "cpu" if self.on_cpu else f"cuda:{torch.cuda.current_device()}"
        self._stats.values["device"] = self.device
        self._stats.started()
        # vLLM fuses HF weights into packed layers (q/k/v -> qkv_proj); the reload path must get whole layers.
        packed = self.llm.apply_model(lambda m: dict(getattr(m, "packed_modules_mapping", {}) or {}))[0]
        self._member_to_packed = {mem: fused for fused, mems in packed.items() for mem in mems}
        self.planner = SyncPlanner(self.validator, self._group_of if self.sync_method == "reload" else None)

    def _ignore(self, setting: str, reason: str) -> None:
        self.ignored_settings[setting] = reason
        warnings.warn(f"VLLMEngine: {setting} ignored: {reason}", stacklevel=3)

    def _group_of(self, name: str) -> str:
        # "model.layers.0.self_attn.k_proj.bias" -> "model.layers.0.self_attn.qkv_proj" (the vLLM layer it feeds)
        module = name.rpartition(".")[0]
        parent, _, leaf = module.rpartition(".")
        fused = self._member_to_packed.get(leaf)
        return f"{parent}.{fused}" if fused else module

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[Request]) -> list[Rollout]:
        """Sample one completion per seed; flat list ordered by (request, sample). See the module doc for logprobs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # Validate everything before vLLM sees a request: a failure inside vLLM could leave requests queued.
        check_requests(requests, self.max_model_len, self.vocab_size)
        if self._weights_lost:
            raise ValueError("VLLMEngine slept at level 2 and discarded its weights: call update_weights with every "
                             "weight before generate (or use sleep_level=1)")
        t0 = time.perf_counter()
        self.wake_up()
        prompts, params, index = [], [], []
        for i, r in enumerate(requests):
            s = r.sampling
            for j, seed in enumerate(r.seeds):
                prompts.append(TokensPrompt(prompt_token_ids=list(r.prompt_ids)))
                params.append(
                    SamplingParams(
                        n=1,
                        seed=seed,
                        temperature=s.temperature,
                        top_p=s.top_p,
                        top_k=s.top_k,
                        max_tokens=s.max_tokens,
                        stop=list(s.stop) or None,
                        stop_token_ids=list(s.stop_token_ids) or None,
                        logprobs=0,  # only the sampled token's logprob
                    )
                )
                index.append((i, j, seed))
        if not prompts:
            return []
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        rollouts = []
        for (i, j, seed), out in zip(index, outs):
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs)]
            finish = "length" if c.finish_reason == "length" else "stop"
            rollouts.append(Rollout(i, j, seed, list(requests[i].prompt_ids), ids, lps, finish, c.text))
        self._stats.generated(t0, rollouts)
        return rollouts

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       changed: Collection[str] | None = None) -> None:
        """Validate names/shapes (once per name), then load what changed in place and drop the prefix cache.

        See RolloutEngine.update_weights for ``changed``; with ``sync_method="reload"`` whole fused layers are loaded
        (the other members of an adapted q/k/v or gate/up layer are taken from the update), with ``"load_weights"``
        exactly the changed tensors. Tensors are read where they are (GPU tensors never pass through host memory).
        """
        t0 = time.perf_counter()
        weights = self.validator.check(named_tensors)
        names = [n for n, _ in weights]
        if self._weights_lost and not self.planner.covers_all(names):
            raise ValueError(f"update_weights after a level-2 sleep must carry every weight (vLLM discarded them); "
                             f"missing {self.planner.missing(names)[:4]}...")
        chosen = set(self.planner.select(names, changed))
        weights = [(n, t) for n, t in weights if n in chosen]
        if not weights:
            return
        if self._asleep and self._weights_awake is False:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed until generate
            self._weights_awake = True
        if self.sync_method == "reload":
            if self.on_cpu:  # contiguous CPU tensors: the reload keeps references until a layer is processed
                weights = [(n, t.to("cpu").contiguous()) for n, t in weights]
            quiet = _QuietReload()
            loggers = [logging.getLogger(n) for n in _RELOAD_LOGGERS]
            for lg in loggers:
                lg.addFilter(quiet)
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            finally:
                for lg in loggers:
                    lg.removeFilter(quiet)
            if self.validator.tied and TIED_EMBED in chosen:
                # The tied head shares the embedding's storage but on CPU its matmul uses a copy packed at load
                # time, and the reload never re-processes it (no weight of its own arrives): re-pack it.
                self.llm.apply_model(_repack_tied_head)
        else:
            self.llm.apply_model(lambda model: model.load_weights(iter(weights)))
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the caller may change its tensors next; and an honest sync time
        self.planner.loaded(list(chosen))
        if self.planner.synced_all:
            self._weights_lost = False
        # Cached KV blocks were computed with the old weights: reusing them would mix policies. (While asleep the
        # cache was already cleared by sleep.)
        if self.enable_prefix_caching and not self._asleep:
            self.llm.reset_prefix_cache()
        self._stats.synced(t0, len(weights))

    def plan_update(self, meta: Iterable[tuple[str, tuple[int, ...]]], changed: Collection[str] | None = None
                    ) -> list[str]:
        """Validate an update announced by (name, shape) pairs; return the names (as given) update_weights would
        load, so a remote client sends only those."""
        names = self.planner.plan(meta, changed)
        if self._weights_lost and not self.planner.covers_all(self.validator.canonical(n) for n in names):
            raise ValueError("update_weights after a level-2 sleep must carry every weight (vLLM discarded them)")
        return names

    # ------------------------------------------------------------------ sleep mode
    def sleep(self) -> None:
        """Free the KV cache (and the weights' GPU memory, kept in host memory at level 1) until the next call.
        A no-op without sleep mode (CPU, or enable_sleep_mode=False)."""
        if not self.sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep, self._weights_awake = True, False
        if self.sleep_level == 2:
            self._weights_lost = True
            self.planner.synced_all = False  # the next sync must be full, whatever `changed` says

    def wake_up(self) -> None:
        """Bring back whatever sleep() freed (generate calls this itself)."""
        if not self._asleep:
            return
        self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
        self._asleep = False
        self._weights_awake = True

    # ------------------------------------------------------------------ misc
    def stats(self) -> dict[str, Any]:
        """EngineStats counters plus this engine's settings (sync method, sleep state, ignored settings)."""
        return self._stats.snapshot(asleep=self._asleep, sync_method=self.sync_method, sleep_mode=self.sleep_enabled,
                                    ignored_settings=dict(self.ignored_settings))

    def close(self) -> None:
        """Shut the engine core down and free the model."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort: the in-process core may have nothing to shut down
            pass
        self.llm = None
        del llm
        gc.collect()
