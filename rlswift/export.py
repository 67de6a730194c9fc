"""`rlswift export`: turn a checkpoint into a folder that transformers, PEFT and vLLM load.

What comes out:
- full fine-tuning -> a transformers folder: config.json, model.safetensors, generation_config.json, tokenizer;
- LoRA -> a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer) whose
  `base_model_name_or_path` is the base model folder the run trained on;
- LoRA with `merge=True` -> a transformers folder whose weights are exactly what the run sent to its rollout
  engine (`engine_weights`: W + B @ A * scaling, computed out of place in fp32, cast to the run's dtype).
Each also gets `rlswift_export.json` (which checkpoint, step, kind, base model, the run's config and versions).

The checkpoint is read only through the read side (`verify`, `read_manifest`, `read_hook_state`): nothing is
unpickled. The policy is rebuilt the way a resume does (`load_policy` + `load_policy_state` from the `model` hook)
and saved with `save_pretrained`, so the export and the run's policy compute the same logits.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from rlswift.checkpoint.inspect import read_hook_state
from rlswift.checkpoint.reader import MANIFEST, CheckpointError, read_manifest, verify

__all__ = ["ExportError", "ExportResult", "POINTERS", "resolve_checkpoint", "export_checkpoint", "load_checkpoint_policy"]

# Pointer files in a run folder: each holds one checkpoint folder name (`latest` by the manager, `best` by retention).
POINTERS = ("latest", "best")
_CKPT_NAME = re.compile(r"^checkpoint-\d+$")
PROVENANCE = "rlswift_export.json"


class ExportError(ValueError):
    """The checkpoint or the output folder cannot be used; the message names the path, the problem and the fix."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_checkpoint` wrote."""

    out: Path
    """The exported folder."""
    checkpoint: Path
    """The checkpoint folder it came from."""
    step: int
    """The checkpoint's step."""
    kind: str
    """'full' (transformers folder), 'lora-adapter' (PEFT adapter folder) or 'lora-merged' (transformers folder)."""
    base_model: Path
    """The base model folder (the one the adapter applies to, or the one the run started from)."""

    def how_to_load(self) -> str:
        """A one-line hint for loading the folder."""
        if self.kind == "lora-adapter":
            return (f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{self.base_model}'), "
                    f"'{self.out}')")
        return f"AutoModelForCausalLM.from_pretrained('{self.out}')  (or: vllm serve {self.out})"


def _pointer_target(pointer: Path) -> Path:
    name = pointer.read_text().strip()
    if not _CKPT_NAME.match(name):
        raise ExportError(f"{pointer}: pointer holds {name!r}, not a checkpoint-N folder name; pass a checkpoint "
                          "folder instead")
    target = pointer.parent / name
    if not target.is_dir():
        raise ExportError(f"{pointer} names {name}, which is not in {pointer.parent} (deleted by retention?); "
                          f"pass one of: {_listing(pointer.parent)}")
    return target


def _listing(run: Path) -> str:
    names = sorted((d.name for d in run.iterdir() if d.is_dir() and _CKPT_NAME.match(d.name)),
                   key=lambda n: int(n.split("-")[1])) if run.is_dir() else []
    return ", ".join(names) or "(no checkpoint-* folders)"


def resolve_checkpoint(path: str | os.PathLike, which: str | None = None) -> Path:
    """The checkpoint folder that ``path`` names (not yet verified).

    ``path`` is a `checkpoint-N` folder; a run folder (then ``which`` picks the `latest` (default) or `best`
    pointer); or a pointer file itself (`runs/x/latest`, `runs/x/best`).
    """
    p = Path(path)
    if which is not None and which not in POINTERS:
        raise ExportError(f"--which {which!r}: choose one of {', '.join(POINTERS)}")
    if not p.exists():
        hint = f" (the run has no {p.name!r} pointer yet)" if p.name in POINTERS and p.parent.is_dir() else ""
        raise ExportError(f"{p} does not exist{hint}; pass a checkpoint-N folder, a run folder, or RUN/latest")
    if p.is_file():
        if p.name not in POINTERS:
            raise ExportError(f"{p} is a file, not a checkpoint; pass a checkpoint-N folder, a run folder, or a "
                              f"pointer file ({' / '.join(POINTERS)})")
        if which is not None and which != p.name:
            raise ExportError(f"{p} is the {p.name!r} pointer but --which says {which!r}; give one or the other")
        return _pointer_target(p)
    if (p / MANIFEST).is_file():
        if which is not None:
            raise ExportError(f"{p} is a checkpoint folder; --which only applies to a run folder")
        return p
    pointer = p / (which or "latest")
    if pointer.is_file():
        return _pointer_target(pointer)
    if which == "best":
        raise ExportError(f"{p} has no 'best' pointer (the run did not set metric_for_best); pass --which latest "
                          f"or one of: {_listing(p)}")
    raise ExportError(f"{p} is neither a checkpoint (no {MANIFEST}) nor a run folder with a '{which or 'latest'}' "
                      f"pointer; checkpoints found there: {_listing(p)}")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a folder that is not empty"
        raise ExportError(f"output {out} is {what}; export never overwrites: pick a new path or remove it first")


def _run_config(manifest: dict, ckpt: Path) -> dict:
    cfg = manifest.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ExportError(f"{ckpt}/{MANIFEST} has no run config with a 'model' key; it was not written by an rlswift "
                          "recipe, so the base model is unknown")
    return cfg


def load_checkpoint_policy(checkpoint: str | os.PathLike, base_model: str | os.PathLike | None = None
                           ) -> tuple[Any, Path, dict]:
    """Rebuild the run's policy from a checkpoint: ``(policy, base_model_folder, manifest)``.

    Verifies every checksum first; the `model` hook is decoded without unpickling and copied into a policy built
    from the run's config (`model`, `precision`, `lora.*`), exactly as a resume does. ``base_model`` overrides the
    config's `model` (use it when the base folder has moved).
    """
    from rlswift.models import resolve_model
    from rlswift.models.policy import load_policy, load_policy_state

    ckpt = Path(checkpoint)
    problems = verify(ckpt)
    if problems:
        raise ExportError(f"cannot export {ckpt}: " + "; ".join(problems))
    manifest = read_manifest(ckpt)
    cfg = _run_config(manifest, ckpt)
    hooks = manifest.get("hooks", {})
    if "model" not in hooks and "train_state" not in hooks:  # one process / several ranks (sharded policy)
        raise ExportError(f"{ckpt} has no 'model' hook (hooks: {', '.join(hooks)}); only "
                          "checkpoints of rlswift recipes can be exported")
    try:
        base = resolve_model(base_model if base_model is not None else cfg["model"])
    except FileNotFoundError as e:
        raise ExportError(f"{e}. The run's base model must be at hand: pass --base-model FOLDER") from None
    lora = cfg.get("lora") or {}
    rank = int(lora.get("rank", 0) or 0)
    policy = load_policy(base, dtype=_param_dtype(cfg), lora_rank=rank,
                         lora_alpha=lora.get("alpha", 16), lora_dropout=lora.get("dropout", 0.0),
                         lora_target_modules=lora.get("target_modules", "all-linear"), seed=cfg.get("seed", 0))
    try:
        state = read_hook_state(ckpt, "model", check=False)  # verified above; several ranks: gathered
        load_policy_state(policy, state)
    except (CheckpointError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ExportError(f"{ckpt}: the saved policy does not fit base model {base} with lora.rank={rank}: {msg}. "
                          "Pass the run's base model with --base-model") from None
    policy.eval()
    return policy, base, manifest


def _param_dtype(cfg: dict) -> str:
    """The dtype the run kept its weights in: fp32 for fp32 and bf16-mixed (master weights), bf16 for pure bf16
    (`precision`; rlswift 0.1 runs saved it as `dtype`)."""
    if "precision" in cfg:
        return "bfloat16" if cfg["precision"] == "bf16" else "float32"
    return cfg.get("dtype", "float32")


def _merged_model(policy: Any, base: Path, dtype: str) -> Any:
    """A plain transformers model holding `engine_weights(policy)`: the weights the run's engine sampled with."""
    import torch

    from rlswift.models.policy import engine_weights, load_policy

    model = load_policy(base, dtype=dtype)
    merged = {name: t.detach().clone() for name, t in engine_weights(policy)}
    expected = set(model.state_dict())
    if set(merged) != expected:
        raise ExportError(f"merged weights do not cover the model: missing {sorted(expected - set(merged))[:5]}, "
                          f"unexpected {sorted(set(merged) - expected)[:5]}")
    with torch.no_grad():
        model.load_state_dict(merged, strict=True)
    return model


def _readable_by_umask(folder: Path) -> None:
    # safetensors writes through a private temporary file (mode 0600); an export is meant to be shared.
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, merge: bool = False,
                      which: str | None = None, base_model: str | os.PathLike | None = None) -> ExportResult:
    """Export a checkpoint (folder, run folder + ``which``, or pointer file) to ``out`` (absent or empty).

    Written into a temporary sibling folder and renamed into place, so ``out`` never holds half an export.
    """
    from rlswift.models.policy import is_peft_model, load_tokenizer

    out = Path(out)
    _check_out(out)
    ckpt = resolve_checkpoint(checkpoint, which)
    policy, base, manifest = load_checkpoint_policy(ckpt, base_model)
    cfg = manifest["config"]
    lora = is_peft_model(policy)
    kind = ("lora-merged" if merge else "lora-adapter") if lora else "full"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if kind == "lora-adapter":
            # Points the adapter at the base folder the run used, so AutoPeftModelForCausalLM finds it.
            policy.peft_config[policy.active_adapter].base_model_name_or_path = str(base.resolve())
            policy.save_pretrained(str(tmp))
        else:
            model = _merged_model(policy, base, _param_dtype(cfg)) if lora else policy
            model.save_pretrained(str(tmp))
            gen = base / "generation_config.json"
            if gen.is_file() and not (tmp / "generation_config.json").exists():
                shutil.copy2(gen, tmp / "generation_config.json")
        load_tokenizer(base).save_pretrained(str(tmp))
        provenance = {"checkpoint": str(ckpt.resolve()), "step": manifest.get("step"), "kind": kind,
                      "base_model": str(base.resolve()), "config": cfg, "versions": manifest.get("versions")}
        (tmp / PROVENANCE).write_bytes(orjson.dumps(provenance, option=orjson.OPT_INDENT_2, default=str))
        _readable_by_umask(tmp)
        _check_out(out)  # again: something may have appeared there while we worked
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out=out, checkpoint=ckpt, step=int(manifest.get("step", -1)), kind=kind, base_model=base)
