"""Typed, validated records exchanged with a rollout engine: what to sample and what came back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MAX_SEED = 2**63  # seeds live in [0, 2**63): they fit a signed int64 on every engine


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample one completion; the same meaning on every engine (vLLM semantics).

    temperature == 0 means greedy; top_k == 0 means no top-k cut; top_p == 1.0 means no nucleus cut.
    """

    temperature: float = 1.0  # scalar >= 0
    top_p: float = 1.0  # scalar in (0, 1]
    top_k: int = 0  # scalar >= 0, 0 = off
    max_tokens: int = 32  # scalar > 0: completion tokens at most
    stop: tuple[str, ...] = ()  # stop strings (the completion text ends before the match)
    stop_token_ids: tuple[int, ...] = ()  # extra stop token ids besides the model's EOS

    def __post_init__(self) -> None:
        # Lists are accepted for convenience, stored as tuples so the spec stays hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"SamplingSpec.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}; use 1.0 to turn it off")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"SamplingSpec.top_k must be an int >= 0 (0 = off), got {self.top_k}")
        if int(self.max_tokens) != self.max_tokens or self.max_tokens <= 0:
            raise ValueError(f"SamplingSpec.max_tokens must be a positive int, got {self.max_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingSpec.stop must hold non-empty strings, got {self.stop!r}")


@dataclass(frozen=True)
class Request:
    """One prompt and the seeds of its samples: one completion per seed, in seed order."""

    prompt_ids: list[int]  # [P] token ids, P >= 1
    seeds: list[int]  # [N] one per sample, each in [0, 2**63); see rollout.seeds.sample_seed
    sampling: SamplingSpec = field(default_factory=SamplingSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", [int(t) for t in self.prompt_ids])
        object.__setattr__(self, "seeds", [int(s) for s in self.seeds])
        if not self.prompt_ids:
            raise ValueError("Request.prompt_ids is empty: a prompt needs at least one token")
        if any(t < 0 for t in self.prompt_ids):
            raise ValueError("Request.prompt_ids holds a negative token id")
        if not self.seeds:
            raise ValueError("Request.seeds is empty: pass one seed per wanted sample")
        bad = [s for s in self.seeds if not 0 <= s < MAX_SEED]
        if bad:
            raise ValueError(
                f"Request.seeds must lie in [0, 2**63), got {bad[:3]}; use rollout.seeds.sample_seed to make them"
            )
        if not isinstance(self.sampling, SamplingSpec):
            raise ValueError(f"Request.sampling must be a SamplingSpec, got {type(self.sampling).__name__}")


@dataclass(frozen=True)
class Rollout:
    """One sampled completion and the log-probabilities the engine gave its tokens."""

    request_index: int  # index of the Request in the generate() call
    sample_index: int  # index of the seed in Request.seeds
    seed: int  # the seed that drove this sample
    prompt_ids: list[int]  # [P] token ids
    completion_ids: list[int]  # [T] sampled token ids (a stop token, if sampled, is included)
    logprobs: list[float]  # [T] log p(token) under the engine's raw model distribution (see engine docs)
    finish_reason: Literal["stop", "length"]
    text: str  # decoded completion (special tokens skipped; cut before a matched stop string)

    def to_dict(self) -> dict:
        """A JSON-able dict of all fields (the wire format of rollout.serve)."""
        return {
            "request_index": self.request_index,
            "sample_index": self.sample_index,
            "seed": self.seed,
            "prompt_ids": list(self.prompt_ids),
            "completion_ids": list(self.completion_ids),
            "logprobs": list(self.logprobs),
            "finish_reason": self.finish_reason,
            "text": self.text,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Rollout":
        """Inverse of to_dict."""
        return cls(**d)


def request_to_dict(r: Request) -> dict:
    """A JSON-able dict of a Request (the wire format of rollout.serve)."""
    s = r.sampling
    return {
        "prompt_ids": list(r.prompt_ids),
        "seeds": list(r.seeds),
        "sampling": {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "max_tokens": s.max_tokens,
            "stop": list(s.stop),
            "stop_token_ids": list(s.stop_token_ids),
        },
    }


def request_from_dict(d: dict) -> Request:
    """Inverse of request_to_dict; validation errors carry the field name."""
    if not isinstance(d, dict):
        raise ValueError(f"a request must be a JSON object, got {type(d).__name__}")
    sampling = SamplingSpec(**d.get("sampling", {}))
    return Request(prompt_ids=d.get("prompt_ids", []), seeds=d.get("seeds", []), sampling=sampling)
