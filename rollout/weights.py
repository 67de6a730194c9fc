"""Weight updates shared by every engine: the model's names and shapes, validation (once per name), and the choice of
what to load when the caller says which weights may have changed.

Names are HF parameter names as in the model folder's safetensors files (``model.layers.0.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import difflib
import json
import struct
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch

TIED_HEAD = "lm_head.weight"
TIED_EMBED = "model.embed_tokens.weight"

Meta = tuple[str, tuple[int, ...]]  # (name, shape) of one tensor of an update


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


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors are views of the same memory with the same layout (so equal without reading them)."""
    return (a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape and a.stride() == b.stride())


class WeightValidator:
    """Checks a weight update against the model's names and shapes before any engine is touched.

    A (name, shape) pair is validated the first time it is seen; later updates with the same pairs skip the lookups.
    For tied models ``lm_head.weight`` is accepted as another name of ``model.embed_tokens.weight``: it is folded into
    the embedding (if both are given they must be equal, since one tensor cannot hold two values; two views of the
    same memory are equal without being read, so the usual tied state_dict costs no compare and no copy).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], tied: bool) -> None:
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.tied = tied
        if tied:
            self.shapes.pop(TIED_HEAD, None)  # some tied checkpoints still store the head; it is not a free weight
        self._known: dict[str, tuple[int, ...]] = {}  # canonical name -> shape, already validated

    @classmethod
    def from_model_dir(cls, model_path: str | Path) -> "WeightValidator":
        """Validator for the model folder's safetensors weights."""
        shapes = read_weight_shapes(model_path)
        return cls(shapes, is_tied(model_path, shapes))

    def canonical(self, name: str) -> str:
        """The name a weight is stored under (the tied head is the embedding)."""
        return TIED_EMBED if (self.tied and name == TIED_HEAD) else name

    def _validate(self, name: str, shape: tuple[int, ...]) -> str:
        key = self.canonical(name)
        if self._known.get(key) == shape:
            return key
        if key not in self.shapes:
            close = difflib.get_close_matches(name, list(self.shapes), n=4, cutoff=0.5)
            raise ValueError(
                f"update_weights: unknown weight name {name!r}; close valid names: {close or sorted(self.shapes)[:4]}"
                " (names are HF parameter names as in the model's safetensors files; merge LoRA first)"
            )
        want = self.shapes[key]
        if shape != want:
            raise ValueError(f"update_weights: wrong shape for {name!r}: got {shape}, the model has {want}")
        self._known[key] = shape
        return key

    def check_meta(self, meta: Iterable[Meta]) -> list[tuple[str, str]]:
        """Validate (name, shape) pairs without any tensor: [(canonical name, name given)] in order (a tied head given
        beside the embedding is dropped). Raises ValueError for an unknown name, a wrong shape or a name given twice."""
        out: dict[str, str] = {}
        head: str | None = None
        for name, shape in meta:
            key = self._validate(name, tuple(shape))
            if (key != name and head is not None) or (key == name and key in out):
                raise ValueError(f"update_weights: weight {name!r} given twice")
            if key != name:
                head = name
            else:
                out[key] = name
        if head is not None and TIED_EMBED not in out:
            out[TIED_EMBED] = head
        return list(out.items())

    def check(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Materialise and validate an update; return it as a list of (canonical name, detached tensor).

        Raises ValueError for: an unknown name (with close valid names), a wrong shape (both shapes), a non-tensor,
        a name given twice, or a tied head that differs from the embedding given with it. Tensors stay where they
        are (no copy, no move to the CPU).
        """
        out: dict[str, torch.Tensor] = {}
        head: torch.Tensor | None = None
        for item in named_tensors:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"update_weights wants (name, tensor) pairs, got {type(item).__name__}")
            name, t = item
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"update_weights: value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
            key = self._validate(name, tuple(t.shape))
            # The tied head is held apart from `out` until the end; every other name (an untied head too) is in `out`.
            if (key != name and head is not None) or (key == name and name in out):
                raise ValueError(f"update_weights: weight {name!r} given twice")
            if key != name:
                head = t.detach()
            else:
                out[name] = t.detach()
        if head is not None:
            emb = out.get(TIED_EMBED)
            if emb is None:
                out[TIED_EMBED] = head
            elif not (emb is head or same_storage(emb, head) or torch.equal(emb, head.to(emb.device, emb.dtype))):
                raise ValueError(
                    "update_weights: lm_head.weight differs from model.embed_tokens.weight but the model ties them; "
                    "send one of them (or equal tensors)"
                )
        return list(out.items())


class SyncPlanner:
    """What an engine loads from an update: everything until it has held a full set once, then what changed.

    ``group_of`` maps a name to the engine layer it is loaded into; a layer must then be loaded whole (vLLM's
    layerwise reload fuses q/k/v and gate/up projections and rebuilds a layer only from what it is sent). The
    default is one layer per name (any subset loads exactly).
    """

    def __init__(self, validator: WeightValidator, group_of: Callable[[str], str] | None = None) -> None:
        self.validator = validator
        self.group_of = group_of
        self.groups: dict[str, set[str]] = {}
        if group_of is not None:
            for name in validator.shapes:
                self.groups.setdefault(group_of(name), set()).add(name)
        self.synced_all = False  # set once a full set was loaded; cleared when the engine loses its weights

    def select(self, names: list[str], changed: Collection[str] | None) -> list[str]:
        """The canonical names (a subset of ``names``, in order) to load, given those the caller says may have changed
        since its previous update (None: all). ``changed`` is ignored until a full set was loaded: before that the
        engine holds the folder's weights, which may differ from the caller's anywhere."""
        if changed is None or not self.synced_all:
            chosen = list(names)
        else:
            want = {self.validator.canonical(n) for n in changed}
            if self.group_of is not None:
                want = set().union(*(self.groups.get(self.group_of(n), {n}) for n in want)) if want else set()
            chosen = [n for n in names if n in want]
        self.check_whole_groups(chosen, names)
        return chosen

    def check_whole_groups(self, chosen: list[str], given: list[str] | None = None) -> None:
        """Refuse a load that covers only part of an engine layer (names the missing members and the fix)."""
        if self.group_of is None:
            return
        have = set(chosen)
        for group in sorted({self.group_of(n) for n in chosen}):
            missing = sorted(self.groups.get(group, set()) - have)
            if missing:
                hint = (" (the caller's update lacks them too)" if given is not None and not set(missing) <= set(given)
                        else "")
                raise ValueError(
                    f"update_weights: partial update of vLLM layer {group!r}: also send {missing}{hint} "
                    "(this engine reloads whole fused layers; sending every weight is always fine)"
                )

    def plan(self, meta: Iterable[Meta], changed: Collection[str] | None) -> list[str]:
        """For an update announced by its (name, shape) pairs: validate them and return the names (as given) of the
        tensors to send, in order. The same choice ``select`` makes for the tensors themselves."""
        pairs = self.validator.check_meta(meta)
        given = dict(pairs)
        return [given[n] for n in self.select([k for k, _ in pairs], changed)]

    def loaded(self, chosen: list[str]) -> None:
        """Record a successful load: a full set makes ``changed`` usable from now on."""
        if not self.synced_all and set(chosen) >= set(self.validator.shapes):
            self.synced_all = True

    def covers_all(self, names: Iterable[str]) -> bool:
        """Whether ``names`` (canonical) hold every weight of the model."""
        return set(names) >= set(self.validator.shapes)

    def missing(self, names: Iterable[str]) -> list[str]:
        """The model's weights absent from ``names`` (canonical), sorted."""
        return sorted(set(self.validator.shapes) - set(names))
