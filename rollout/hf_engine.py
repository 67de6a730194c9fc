"""HFEngine: a transformers model behind the RolloutEngine protocol, with vLLM's seed and logprob semantics.

Each sample is decoded on its own (batch of one, KV cache) with its own ``torch.Generator`` seeded by its seed, so
its tokens depend on the seed, prompt and weights only — never on the other requests of the call. Logprobs are the
raw model log-softmax (before temperature/top-k/top-p), matching VLLMEngine's ``raw_logprobs``. The token streams
are not those of vLLM (the samplers differ); the seed semantics are.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from rollout.engine import EngineStats, check_requests
from rollout.weights import SyncPlanner, WeightValidator
from rollout.types import Request, Rollout, SamplingSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def process_logits(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Temperature, then top-k, then top-p (vLLM's order) on fp32 logits [V]; cut tokens get -inf."""
    x = logits / spec.temperature
    if spec.top_k and spec.top_k < x.numel():
        kth = torch.topk(x, spec.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        drop = (probs.cumsum(-1) - probs) >= spec.top_p
        drop[0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


class HFEngine:
    """transformers engine implementing the RolloutEngine protocol (slow but exact; also the reference)."""

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        max_model_len: int | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._stats = EngineStats("hf", str(device))
        torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        if isinstance(model, (str, Path)):
            path = Path(model)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
            self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
            self.validator = WeightValidator.from_model_dir(path)
        else:
            if tokenizer is None:
                raise ValueError("HFEngine: pass tokenizer= when giving a loaded model (it decodes the text)")
            self.model, self.tokenizer = model.to(device), tokenizer
            sd = self.model.state_dict()
            tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
            self.validator = WeightValidator({n: tuple(t.shape) for n, t in sd.items()}, tied)
        self.model.eval()
        self.device = torch.device(device)
        cfg = self.model.config
        self.max_model_len = int(max_model_len or getattr(cfg, "max_position_embeddings", 0) or 2**31)
        self.vocab_size = int(cfg.vocab_size)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = cfg.eos_token_id if eos is None else eos
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.planner = SyncPlanner(self.validator)  # any subset of weights loads exactly (plain copies)
        self._targets = dict(self.model.state_dict(keep_vars=True))
        self._stats.started()

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def _sample_one(self, prompt: list[int], seed: int, spec: SamplingSpec) -> tuple[list[int], list[float], str, str]:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        stop_ids = self.eos_ids | set(spec.stop_token_ids)
        ids, lps = [], []
        out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
        finish, text = "length", None
        for _ in range(spec.max_tokens):
            logits = out.logits[0, -1].float()
            if spec.temperature == 0:
                tok = int(logits.argmax())
            else:
                probs = process_logits(logits, spec).softmax(-1)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            ids.append(tok)
            lps.append(float(logits.log_softmax(-1)[tok]))
            if tok in stop_ids:
                finish = "stop"
                break
            if spec.stop:
                decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
                hits = [decoded.find(s) for s in spec.stop if s in decoded]
                if hits:
                    finish, text = "stop", decoded[: min(hits)]
                    break
            if len(ids) < spec.max_tokens:
                out = self.model(
                    input_ids=torch.tensor([[tok]], device=self.device), past_key_values=out.past_key_values, use_cache=True
                )
        if text is None:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return ids, lps, finish, text

    def generate(self, requests: list[Request]) -> list[Rollout]:
        """Sample one completion per seed; flat list ordered by (request, sample)."""
        check_requests(requests, self.max_model_len, self.vocab_size)
        t0 = time.perf_counter()
        rollouts = []
        for i, r in enumerate(requests):
            for j, seed in enumerate(r.seeds):
                ids, lps, finish, text = self._sample_one(r.prompt_ids, seed, r.sampling)
                rollouts.append(Rollout(i, j, seed, list(r.prompt_ids), ids, lps, finish, text))
        self._stats.generated(t0, rollouts)
        return rollouts

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       changed: Collection[str] | None = None) -> None:
        """Validate names/shapes (all before any copy; once per name), then copy what changed into the model (the
        tied head follows the embedding). See RolloutEngine.update_weights for ``changed``."""
        t0 = time.perf_counter()
        weights = self.validator.check(named_tensors)
        chosen = set(self.planner.select([n for n, _ in weights], changed))
        with torch.no_grad():
            for name, t in weights:
                if name in chosen:
                    dst = self._targets[name]
                    dst.copy_(t.to(device=dst.device, dtype=dst.dtype))
        self.planner.loaded(list(chosen))
        self._stats.synced(t0, len(chosen))

    def plan_update(self, meta: Iterable[tuple[str, tuple[int, ...]]], changed: Collection[str] | None = None
                    ) -> list[str]:
        """Validate an update announced by (name, shape) pairs; the names (as given) update_weights would load."""
        return self.planner.plan(meta, changed)

    def sleep(self) -> None:
        """No-op: the HF engine holds no cache between calls."""

    def wake_up(self) -> None:
        """No-op (see sleep)."""

    def stats(self) -> dict[str, Any]:
        """EngineStats counters."""
        return self._stats.snapshot()

    def close(self) -> None:
        """Drop the model."""
        self.model = None
        self._targets = {}
