"""State hooks: everything a run must checkpoint to resume exactly (see docs/architecture.md)."""

from rlswift.state.buffers import EpisodeReturns, ReplayBuffer, RewardCache
from rlswift.state.progress import Progress
from rlswift.state.registry import (
    Stateful,
    StateMismatchError,
    StateRegistry,
    check_hook,
    hooks_from_factories,
    register_state_hook,
    user_hooks,
)
from rlswift.state.rng import RNGState, register_generator, seed_everything
from rlswift.state.sampler import EpochSampler, epoch_permutation, epoch_seed

__all__ = [
    "EpisodeReturns",
    "EpochSampler",
    "Progress",
    "RNGState",
    "ReplayBuffer",
    "RewardCache",
    "StateMismatchError",
    "StateRegistry",
    "Stateful",
    "check_hook",
    "epoch_permutation",
    "epoch_seed",
    "hooks_from_factories",
    "register_generator",
    "register_state_hook",
    "seed_everything",
    "user_hooks",
]
