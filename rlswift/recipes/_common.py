"""Pieces both recipes call: resume, the model hook, LR schedules, fault points, the plot, the CLI wrapper."""

from __future__ import annotations

import math
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlswift import config as cfglib
from rlswift.checkpoint import CheckpointManager
from rlswift.checkpoint.manager import CheckpointError, read_manifest
from rlswift.distributed import (DistInfo, MainOnly, OneProcessParts, PerRankState, ShardedState, agree,
                                 derived_rng_state, grad_norm_value, init_distributed, rank_items,
                                 rank_seed)
from rlswift.errors import RlswiftError
from rlswift.models.policy import load_policy_state, policy_state_dict
from rlswift.runlog import JsonlLog, read_jsonl
from rlswift.state import hooks_from_factories, user_hooks

# Keys that only change how long a run goes or how it is watched: a resume may change these, no others.
RUN_LENGTH_KEYS = frozenset({"max_steps", "save_steps", "save_total_limit", "resume", "output_dir", "overwrite",
                             "progress_bar", "plot", "report_to", "run_name", "async_save", "mirror_to",
                             "metric_for_best", "greater_is_better"})
# Hooks added after rlswift 0.1: a checkpoint without them loads, and they keep their fresh state.
NEW_HOOKS = ("trackers",)


@dataclass
class LoraConfig:
    rank: int = 0
    """LoRA rank; 0 trains all weights (full fine-tuning)."""
    alpha: int = 16
    """LoRA scaling numerator (scaling = alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA input; >0 draws from torch's CPU stream, which the rng hook saves."""
    target_modules: str = "all-linear"
    """Modules that get adapters: 'all-linear' or a comma-separated list of module names."""


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    """adamw, adamw_8bit, galore_adamw, galore_adamw_8bit, q_galore_adamw_8bit (transformers' names and aliases such as
    adamw_torch_fused work), or a dotted path to a factory; see docs/optimizers.md."""
    adamw_implementation: str | None = None
    """adamw: fused, foreach or for-loop; unset = fused where the device has it (rlswift 0.1 ran for-loop)."""
    galore_rank: int = 128
    """GaLore/Q-GaLore: rank of the projected gradient."""
    galore_update_proj_gap: int = 200
    """GaLore/Q-GaLore: steps between projection updates (Q-GaLore adapts it)."""
    galore_scale: float = 0.25
    """GaLore/Q-GaLore: scale of the projected-back update."""
    target_modules: str = "all-linear"
    """GaLore/Q-GaLore: modules whose weights are projected ('all-linear' or comma-separated names/regexes)."""


def build_run_optimizer(model: torch.nn.Module, opt: OptimizerConfig, lr: float, weight_decay: float):
    """The run's optimizer (itself the `optimizer` state hook); records the AdamW implementation it resolved."""
    from rlswift.optim import adamw_implementation, build_optimizer, named_trainable

    if opt.name in ("adamw", "adamw_torch_fused") and opt.adamw_implementation is None:
        # What the run computes with goes into its config: fused and for-loop AdamW differ in the last bits.
        opt.adamw_implementation = adamw_implementation([p for _, p in named_trainable(model)[0]])
    targets = [t.strip() for t in opt.target_modules.split(",")] if "," in opt.target_modules else opt.target_modules
    return build_optimizer(opt.name, model, lr=lr, weight_decay=weight_decay, implementation=opt.adamw_implementation,
                           target_modules=targets, rank=opt.galore_rank, update_proj_gap=opt.galore_update_proj_gap,
                           scale=opt.galore_scale)


def make_checkpoint_manager(out: Path, cfg, info: DistInfo | None = None) -> CheckpointManager:
    """The run's CheckpointManager from the config's save keys (async writes, mirror, best-checkpoint retention)."""
    best = cfg.metric_for_best
    greater = cfg.greater_is_better if cfg.greater_is_better is not None else "loss" not in (best or "")
    return CheckpointManager(out, save_total_limit=cfg.save_total_limit, async_save=cfg.async_save,
                             mirror_to=cfg.mirror_to, best_metric=best, best_mode="max" if greater else "min",
                             info=info)


# ---------------------------------------------------------------------------------------------- several ranks
# Optimizers whose update is elementwise, so that FSDP2's DTensor shards (each rank a block of rows) step exactly as
# the whole tensor would. 8-bit optimizers call kernels on raw storage and GaLore projects whole gradient
# matrices (an SVD per matrix): on shards both compute something else.
SHARDABLE_OPTIMIZERS = ("adamw", "adamw_torch", "adamw_torch_fused")


def start_distributed(cfg) -> DistInfo:
    """Join torchrun's process group (or stay one process) on the device the config asks for."""
    from rlswift.models.device import resolve_device

    if cfg.device != "auto":
        resolve_device(cfg.device)  # a bad name or a missing GPU: the one-process message, before any group
    want = None if cfg.device == "auto" else ("cpu" if cfg.device == "cpu" else "cuda")
    try:
        info = init_distributed(device=want)
    except RuntimeError as e:
        raise RlswiftError(str(e)) from e
    if info.distributed and cfg.device not in ("auto", "cpu", "cuda"):
        raise cfglib.ConfigError(f"device={cfg.device!r} under torchrun: each rank trains on cuda:LOCAL_RANK; set "
                                 "device=cuda (or auto)")
    return info


def check_distributed(cfg, info: DistInfo, splits: dict[str, tuple[int, int]]) -> None:
    """Refuse settings that cannot run on ``info.world_size`` ranks (nothing to check for one process).

    ``splits``: config key -> (items per step, multiple each rank's share must be of), e.g. GRPO's
    ``{"prompts_per_step": (4, 1)}``: every rank gets an equal share.
    """
    if not info.distributed:
        return
    w = info.world_size
    if cfg.async_save:
        raise cfglib.ConfigError(f"async_save=true is not supported with {w} ranks (a save is a collective of every "
                                 "rank, committed before any rank goes on); set async_save=false")
    if cfg.optimizer.name in _registered_optimizers() and cfg.optimizer.name not in SHARDABLE_OPTIMIZERS:
        raise cfglib.ConfigError(
            f"optimizer.name={cfg.optimizer.name!r} cannot run on {w} ranks: FSDP2 gives each rank a block of rows "
            "of every weight (a DTensor shard), and 8-bit optimizers run kernels on whole raw tensors while GaLore "
            "projects whole gradient matrices (an SVD each), so on shards they would compute something else. Use "
            f"optimizer.name=adamw (any adamw_implementation), or one process")
    for key, (n, multiple) in splits.items():
        try:
            rank_items(n, info, key, multiple)
        except ValueError as e:
            raise cfglib.ConfigError(str(e)) from None


def _registered_optimizers() -> set[str]:
    """The registered optimizer names (a dotted-path factory is the user's own: not checked)."""
    from rlswift.optim import OPTIMIZERS

    return set(OPTIMIZERS.names())


def prepare_run(out: Path, cfg, recipe: str, info: DistInfo):
    """`prepare_run_dir` on rank 0 only (it holds the run folder's lock); the other ranks wait for it and fail with
    it. Returns the lock on rank 0 (keep it for the life of the run), None elsewhere."""
    from rlswift.rundir import prepare_run_dir

    # agree() returns on every rank after rank 0 is done: no rank goes on before the folder is prepared.
    return agree(lambda: prepare_run_dir(out, cfg.resume, cfg.overwrite, recipe=recipe) if info.is_main else None,
                 info, f"preparing the run folder {out}")


def train_state_hooks(model: torch.nn.Module, optimizer, info: DistInfo) -> list[tuple[str, object]]:
    """The policy's and optimizer's hooks: "model" + "optimizer" for one process (unchanged format), "train_state"
    (`ShardedState`: written through DCP by every rank) with several ranks. Either layout loads into the other."""
    if info.distributed:
        return [("train_state", ShardedState(model, optimizer))]
    return [("model", ModelHook(model)), ("optimizer", optimizer)]


def rng_hook(rng, run_seed: int) -> PerRankState:
    """The RNG streams as a per-rank hook: each rank's own streams; a rank new to a checkpoint (more ranks than
    saved) starts from ``rank_seed(run_seed, rank, step)``. One process: the plain hook's format."""
    return PerRankState(rng, lambda r, s: derived_rng_state(rng.state_dict(), rank_seed(run_seed, r, s)))


def main_only(hook, info: DistInfo) -> MainOnly:
    """A run-log hook that lives on rank 0 only (other ranks never open the file)."""
    return MainOnly(hook if info.is_main else None)


def numeric_metrics(record: dict) -> dict:
    """The record's top-level numbers (what a checkpoint's manifest keeps, so any of them can pick the best)."""
    return {k: v for k, v in record.items() if type(v) in (int, float)}


class ModelHook:
    """State hook for the policy: all weights for full fine-tuning, only the adapter tensors for LoRA."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return policy_state_dict(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_policy_state(self.model, state)


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    """LambdaLR with linear warmup then constant / linear decay / cosine decay, ending at ``total_steps``."""
    if kind not in ("constant", "linear", "cosine"):
        raise cfglib.ConfigError(f"lr_scheduler={kind!r}: choose 'constant', 'linear' or 'cosine'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resume_or_start(ckpt: CheckpointManager, registry, cfg, run_length_keys: set[str],
                    migrate: Callable[[dict], dict] | None = None) -> Path | None:
    """Load the checkpoint that ``cfg.resume`` names into every hook; with none, start from the fresh state.

    A resume whose config changes what the run computes is refused, naming the keys; run-length keys may change.
    ``migrate`` rewrites a saved config of an older rlswift into today's keys before the comparison.
    """
    path = ckpt.resolve_resume(cfg.resume) if cfg.resume else None
    if path is None:
        # No checkpoint: log lines from a run that died before its first save are not part of this run.
        for _, hook in registry.items():
            log = hook.hook if isinstance(hook, MainOnly) else hook
            if isinstance(log, JsonlLog):
                log.load_state_dict({"offset": 0})
        return None
    saved = read_manifest(path).get("config") or {}
    saved = migrate(saved) if migrate else saved
    current = cfglib.to_dict(cfg)
    changed = cfglib.changed_keys(saved, current, run_length_keys, defaults=cfglib.to_dict(type(cfg)()))
    problem = schedule_length_problem(saved, current)
    if changed or problem:
        raise CheckpointError(
            f"resume from {path} refused: "
            + (("the config changes what the run computes: " + "; ".join(changed) + ". ") if changed else "")
            + (problem + " " if problem else "")
            + f"Resume with the saved settings (in {path}/manifest.json) or start a new output_dir; keys that may "
            f"change on resume: {', '.join(sorted(run_length_keys))}")
    manifest_hooks = read_manifest(path).get("hooks") or {}
    hooks = {n: h for n, h in registry.items() if not (n in NEW_HOOKS and n not in manifest_hooks)}
    hooks, finish = _other_layout(hooks, manifest_hooks)
    try:
        ckpt.load(path, hooks)
        if finish is not None:
            finish()
    except (KeyError, ValueError, TypeError) as e:
        # A hook refused the saved state (other model, data, buffer sizes, ...): nothing of the run is changed.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise CheckpointError(f"resume from {path} refused: {msg}") from e
    ckpt.protect = path
    return path


def _other_layout(hooks: dict, saved: dict) -> tuple[dict, Callable[[], None] | None]:
    """Load a checkpoint of the other layout of the policy and optimizer (see `train_state_hooks`).

    One process reading a checkpoint of several ranks ("train_state"): a `ShardedState` over the plain model and
    optimizer reads it (DCP without a process group). Several ranks reading a one-process checkpoint ("model" +
    "optimizer"): stand-ins keep both states, then every rank loads the whole tensors and keeps its shard.
    """
    if "train_state" in hooks and "train_state" not in saved and {"model", "optimizer"} <= set(saved):
        hooks = dict(hooks)
        parts = OneProcessParts(hooks.pop("train_state"))
        return {**parts.hooks(), **hooks}, parts.finish
    if "train_state" in saved and "train_state" not in hooks and {"model", "optimizer"} <= set(hooks):
        hooks = dict(hooks)
        model_hook, optimizer = hooks.pop("model"), hooks.pop("optimizer")
        return {"train_state": ShardedState(model_hook.model, optimizer), **hooks}, None
    return hooks, None


def migrate_precision(saved: dict) -> dict:
    """A config of rlswift 0.1 in today's keys: it trained on the CPU, and its dtype was the storage precision."""
    saved = dict(saved)
    saved.setdefault("device", "cpu")
    saved.setdefault("optimizer", {"adamw_implementation": "for-loop"})  # 0.1: torch AdamW with foreach=False
    if "dtype" in saved:
        saved["precision"] = {"float32": "fp32", "bfloat16": "bf16"}.get(saved.pop("dtype"), "fp32")
    return saved


def schedule_length_problem(saved: dict, current: dict) -> str:
    """Why a max_steps change on resume would change the learning rates still to come ('' when it would not)."""
    if saved.get("max_steps") == current.get("max_steps") or current.get("lr_scheduler") == "constant":
        return ""
    if current.get("lr_decay_steps") is not None:
        return ""  # the decay has its own length
    return (f"max_steps {saved.get('max_steps')} -> {current.get('max_steps')} would change every remaining "
            f"learning rate of the {current.get('lr_scheduler')} schedule (it decays over max_steps); resume with "
            f"max_steps={saved.get('max_steps')}, or start runs you may extend with lr_decay_steps set.")


def register_user_hooks(registry, state_hooks: list[str]) -> None:
    """Add the hooks registered with `rlswift.register_state_hook` and those made by the config's factories."""
    for name, hook in list(user_hooks().items()) + list(hooks_from_factories(state_hooks).items()):
        registry.register(name, hook)


def optimizer_step(params: list[torch.nn.Parameter], optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip (when max_grad_norm > 0), step the optimizer and the schedule, clear grads; returns the grad norm."""
    if max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm_value(grad_norm)  # a replicated DTensor under FSDP2


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A tqdm bar, or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def report_stop(signum: int | None, step: int, elsewhere: bool = False) -> None:
    """The stop line; ``elsewhere``: this rank got no signal itself (another rank did, and every rank stopped)."""
    name = "a stop signal to another rank" if elsewhere else (signal.Signals(signum).name if signum
                                                               else "a stop request")
    print(f"rlswift: stopped by {name} after step {step}; checkpoint saved; resume with resume=auto",
          file=sys.stderr, flush=True)


def first_last_means(metrics_path: Path, keys: list[str], k_max: int) -> tuple[int, dict[str, tuple[float, float]]]:
    """Means of ``keys`` over the first and last k logged steps (k = min(k_max, steps // 3), at least 1)."""
    rows = list(read_jsonl(metrics_path)) if metrics_path.exists() else []
    if not rows:
        return 0, {}
    k = max(1, min(k_max, len(rows) // 3))
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    return k, {key: (mean(key, rows[:k]), mean(key, rows[-k:])) for key in keys}


def fault_point(step: int, rank: int = 0, point: str = "") -> None:
    """Test hook: ``RLSWIFT_FAULT=kill@N`` SIGKILLs, ``term@N`` SIGTERMs this process in the middle of step N;
    a named ``point`` answers to ``kill-POINT@N`` / ``term-POINT@N`` (e.g. kill-inflight@N: while async
    generation of the next batch runs).

    Under torchrun every rank reads the variable: ``kill@N:R`` / ``term@N:R`` hit rank R only; faults never fire
    again after a torchrun restart (see `checkpoint.writer.fault_requested`)."""
    from rlswift.checkpoint.writer import fault_requested

    for kind, sig in (("kill", signal.SIGKILL), ("term", signal.SIGTERM)):
        if fault_requested(kind + (f"-{point}" if point else ""), step, rank):
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), sig)


def plot_rewards(metrics_path: Path, png_path: Path, key: str = "reward", window: int = 5) -> None:
    """Plot per-step mean reward and its moving average to ``png_path``."""
    rows = list(read_jsonl(metrics_path))
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    vals = [r[key] for r in rows]
    avg = [sum(vals[max(0, i - window + 1):i + 1]) / len(vals[max(0, i - window + 1):i + 1]) for i in range(len(vals))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, vals, alpha=0.35, label=f"{key} (per step)")
    ax.plot(steps, avg, linewidth=2, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def run_cli(main) -> int:
    """Run a recipe's main(); rlswift's own errors (bad config, names, data, checkpoints, rewards) end with one
    'error: ...' line; anything else is a bug or an environment failure and keeps its traceback.
    ``RLSWIFT_TRACEBACK=1`` shows the traceback for every error."""
    try:
        return main()
    except (RlswiftError, CheckpointError) as e:
        if os.environ.get("RLSWIFT_TRACEBACK"):
            traceback.print_exc()
        msg = " ".join(str(e).split())  # one line, whatever the message's layout
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2
