"""Many processes under torchrun: process group, FSDP2 sharding, the global batch split, sharded checkpoints.

See docs/distributed.md. One process (no torchrun) never touches torch.distributed: every helper takes a
`DistInfo` and is the identity for world_size 1.
"""

from rlswift.distributed.batch import (GRPO_NORMALISATION, all_gather_rows, dpo_loss_scale, global_max, global_mean,
                                       global_sum, grpo_loss_scale, micro_batches, rank_items, rank_rows)
from rlswift.distributed.dcp import load_sharded, read_sharded_full, save_sharded, sharded_files, split_tensors
from rlswift.distributed.fsdp import (ModelRunner, decoder_layers, engine_weight_chunks, full_named_parameters,
                                      full_tensor, grad_norm_value, is_sharded, shard_for_calls, shard_model)
from rlswift.distributed.hooks_io import agree, read_hooks, sharded_subdir, write_hooks
from rlswift.distributed.launch import (ConfigMismatchError, DistInfo, agree_config, all_gather_json, any_rank,
                                        barrier, broadcast_json, config_differences, destroy_distributed,
                                        init_distributed, single_process, torchrun_env)
from rlswift.distributed.rank_state import (PerRankState, derived_rng_state, fresh_seed, load_rank_state,
                                            rank_seed, rank_stem, save_rank_state, saved_world_size, source_rank)
from rlswift.distributed.train_state import (MainOnly, OneProcessParts, ShardedState, checkpoint_kind,
                                            one_process_parts, optimizer_by_index, optimizer_by_name)

__all__ = [
    "DistInfo", "ConfigMismatchError", "init_distributed", "destroy_distributed", "torchrun_env", "single_process",
    "barrier", "broadcast_json", "all_gather_json", "any_rank", "agree_config", "config_differences",
    "shard_model", "decoder_layers", "is_sharded", "grad_norm_value", "full_named_parameters", "full_tensor",
    "ModelRunner", "shard_for_calls", "engine_weight_chunks",
    "rank_items", "rank_rows", "micro_batches", "global_sum", "global_max", "global_mean", "grpo_loss_scale",
    "dpo_loss_scale", "GRPO_NORMALISATION", "all_gather_rows",
    "save_sharded", "load_sharded", "read_sharded_full", "sharded_files", "split_tensors", "ShardedState",
    "MainOnly", "checkpoint_kind", "OneProcessParts", "one_process_parts", "optimizer_by_index",
    "optimizer_by_name", "agree",
    "rank_seed", "fresh_seed", "source_rank", "rank_stem", "save_rank_state", "load_rank_state",
    "saved_world_size", "derived_rng_state", "PerRankState", "write_hooks", "read_hooks", "sharded_subdir",
]
