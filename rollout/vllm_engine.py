"""VLLMEngine: vLLM run in this process, one vLLM request per sample, live weight sync by in-place reload.

What the logprobs mean: vLLM 0.32's default ``logprobs_mode`` is ``"raw_logprobs"``: the log-softmax of the model's
raw logits, BEFORE temperature, top-k and top-p. So ``Rollout.logprobs`` is log p_model(token | prefix) at
temperature 1 whatever the SamplingSpec says — exactly what a trainer's fp32 forward of the same weights computes.
HFEngine reports the same quantity.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from rollout.engine import TIED_EMBED, WeightValidator, check_requests
from rollout.types import Request, Rollout


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _repack_tied_head(model: torch.nn.Module) -> None:
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if head is not None and method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class VLLMEngine:
    """In-process vLLM engine implementing the RolloutEngine protocol.

    Each sample is its own vLLM request with ``n=1`` and ``seed=<its seed>``, so a sample's tokens depend on its
    seed, prompt and the weights only — not on the batch it was sent in (vLLM with ``n>1`` would use seed+i
    internally, colliding across prompts). On CPU, eager mode and no chunked prefill (per-request seeds crash
    with chunked prefill there).
    """

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        kv_cache_gib: int = 2,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.5,
        **llm_kwargs: Any,
    ) -> None:
        # vLLM reads these at import time: in-process engine core, CPU KV cache size, no telemetry.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if int(kv_cache_gib) != kv_cache_gib or kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be a positive whole number of GiB (vLLM reads an int), got {kv_cache_gib}")
        # setdefault: an explicit environment wins, and vLLM reads it once per process anyway.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from vllm import LLM

        self.model_path = Path(model_path)
        self.max_model_len = int(max_model_len)
        self.enable_prefix_caching = enable_prefix_caching
        self.validator = WeightValidator.from_model_dir(self.model_path)
        cfg = json.loads((self.model_path / "config.json").read_text())
        self.vocab_size = int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size") or 0)
        kw: dict[str, Any] = dict(
            model=str(self.model_path),
            dtype=dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            enable_prefix_caching=enable_prefix_caching,
        )
        self.on_cpu = _on_cpu()
        if self.on_cpu:
            kw.update(enforce_eager=True, enable_chunked_prefill=False)
        else:
            kw.update(gpu_memory_utilization=gpu_memory_utilization)
        kw.update(llm_kwargs)
        self.llm = LLM(**kw)
        # vLLM fuses HF weights into packed layers (q/k/v -> qkv_proj); a reload must cover whole layers.
        packed = self.llm.apply_model(lambda m: dict(getattr(m, "packed_modules_mapping", {}) or {}))[0]
        self._member_to_packed = {mem: fused for fused, mems in packed.items() for mem in mems}
        self._groups: dict[str, set[str]] = {}
        for name in self.validator.shapes:
            self._groups.setdefault(self._group_of(name), set()).add(name)

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
            rollouts.append(
                Rollout(
                    request_index=i,
                    sample_index=j,
                    seed=seed,
                    prompt_ids=list(requests[i].prompt_ids),
                    completion_ids=ids,
                    logprobs=lps,
                    finish_reason=finish,
                    text=c.text,
                )
            )
        return rollouts

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Validate names/shapes against the model folder, then reload them in place and drop the prefix cache.

        Uses the worker's ``reload_weights`` (layerwise reload: works on CPU, where the backend repacks linear
        weights and ``model.load_weights`` alone fails, and on GPU).
        """
        weights = self.validator.check(named_tensors)
        if not weights:
            return
        given = {n for n, _ in weights}
        for group in sorted({self._group_of(n) for n in given}):
            missing = sorted(self._groups[group] - given)
            if missing:
                # vLLM's layerwise reload rebuilds a layer only from what it is sent: the rest would be garbage.
                raise ValueError(
                    f"update_weights: partial update of vLLM layer {group!r}: also send {missing} "
                    "(VLLMEngine reloads whole fused layers; sending every weight is always fine)"
                )
        # Contiguous CPU copies on CPU: the reload path may keep references until the layer is processed.
        if self.on_cpu:
            weights = [(n, t.to("cpu").contiguous()) for n, t in weights]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if self.validator.tied and TIED_EMBED in given:
            # The tied head shares the embedding's storage but on CPU its matmul uses a copy packed at load time,
            # and the reload never re-processes it (no weight of its own arrives): re-pack it from the new embedding.
            self.llm.apply_model(_repack_tied_head)
        # Cached KV blocks were computed with the old weights: reusing them would mix policies.
        if self.enable_prefix_caching:
            self.llm.reset_prefix_cache()

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
