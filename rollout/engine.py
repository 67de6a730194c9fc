"""The rollout engine protocol, the engine factory, and the request and weight-update validation every engine shares."""

from __future__ import annotations

import difflib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from rollout.types import Request, Rollout

TIED_HEAD = "lm_head.weight"
TIED_EMBED = "model.embed_tokens.weight"


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generator: sample, take new weights, release resources."""

    def generate(self, requests: list[Request]) -> list[Rollout]:
        """One Rollout per (request, seed), flat, ordered by (request_index, sample_index)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by HF parameter name (e.g. ``model.layers.0.self_attn.q_proj.weight``)."""
        ...

    def close(self) -> None:
        """Free the engine; further calls are undefined."""
        ...


def make_engine(kind: str, model_path: str | Path, **kwargs: Any) -> RolloutEngine:
    """Build an engine by kind: ``"vllm"`` (VLLMEngine) or ``"hf"`` (HFEngine); kwargs go to its constructor."""
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **kwargs)
    if kind == "hf":
        from rollout.hf_engine import HFEngine

        return HFEngine(model_path, **kwargs)
    raise ValueError(f"unknown engine kind {kind!r}: use 'vllm' or 'hf'")


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


def _safetensors_header(path: Path) -> dict[str, Any]:
    # The header is 8 bytes of little-endian length then JSON: reading it never loads the tensors.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def read_weight_shapes(model_path: str | Path) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, from the safetensors headers of a model folder (sharded or not)."""
    root = Path(model_path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {root}: engines need a safetensors model folder")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        for name, meta in _safetensors_header(f).items():
            if name != "__metadata__":
                shapes[name] = tuple(meta["shape"])
    return shapes


def is_tied(model_path: str | Path, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether the model ties lm_head to the input embedding (config flag, or lm_head absent from the files)."""
    cfg_file = Path(model_path) / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    tied = cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings"))
    if tied is None:
        tied = TIED_HEAD not in shapes
    return bool(tied) and TIED_EMBED in shapes


class WeightValidator:
    """Checks a weight update against the model's names and shapes before any engine is touched.

    For tied models ``lm_head.weight`` is accepted as another name of ``model.embed_tokens.weight``: it is folded into
    the embedding (if both are given they must be equal, since one tensor cannot hold two values).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], tied: bool) -> None:
        self.shapes = dict(shapes)
        self.tied = tied
        if tied:
            self.shapes.pop(TIED_HEAD, None)  # some tied checkpoints still store the head; it is not a free weight

    @classmethod
    def from_model_dir(cls, model_path: str | Path) -> "WeightValidator":
        """Validator for the model folder's safetensors weights."""
        shapes = read_weight_shapes(model_path)
        return cls(shapes, is_tied(model_path, shapes))

    def check(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Materialise and validate an update; return it as a list of (canonical name, detached tensor).

        Raises ValueError for: an unknown name (with close valid names), a wrong shape (both shapes), a non-tensor,
        a name given twice, or a tied head that differs from the embedding given with it.
        """
        out: dict[str, torch.Tensor] = {}
        head: torch.Tensor | None = None
        for item in named_tensors:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"update_weights wants (name, tensor) pairs, got {type(item).__name__}")
            name, t = item
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"update_weights: value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
            key = TIED_EMBED if (self.tied and name == TIED_HEAD) else name
            if key not in self.shapes:
                close = difflib.get_close_matches(name, list(self.shapes), n=4, cutoff=0.5)
                raise ValueError(
                    f"update_weights: unknown weight name {name!r}; close valid names: {close or sorted(self.shapes)[:4]}"
                    " (names are HF parameter names as in the model's safetensors files; merge LoRA first)"
                )
            want = self.shapes[key]
            if tuple(t.shape) != want:
                raise ValueError(f"update_weights: wrong shape for {name!r}: got {tuple(t.shape)}, the model has {want}")
            # The tied head is held apart from `out` until the end; every other name (an untied head too) is in `out`.
            if (key != name and head is not None) or (key == name and name in out):
                raise ValueError(f"update_weights: weight {name!r} given twice")
            if key != name:
                head = t.detach()
            else:
                out[name] = t.detach()
        if head is not None:
            if TIED_EMBED not in out:
                out[TIED_EMBED] = head
            elif out[TIED_EMBED] is not head and not torch.equal(out[TIED_EMBED].cpu(), head.to(out[TIED_EMBED].dtype).cpu()):
                raise ValueError(
                    "update_weights: lm_head.weight differs from model.embed_tokens.weight but the model ties them; "
                    "send one of them (or equal tensors)"
                )
        return list(out.items())
