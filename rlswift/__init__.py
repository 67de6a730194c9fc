"""rlswift: RL post-training (GRPO, DPO) whose runs resume exactly.

Public API: `register_state_hook(name, obj)` adds user state to every run of this process,
`register_generator(name, gen)` adds a user-owned torch/numpy generator to the run's RNG hook; recipes live in
`rlswift.recipes.grpo` / `.dpo`. Imports are lazy so `python -m rlswift.recipes.grpo` can fix thread settings
before torch loads.
"""

import logging

# bitsandbytes (the 8-bit optimizers' library) logs a missing optional kernel package at import on CPU; peft imports
# it whenever it is installed. Nothing rlswift uses needs that kernel.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["register_generator", "register_state_hook", "__version__"]


def register_state_hook(name: str, obj) -> object:
    """Register ``obj`` (anything with state_dict()/load_state_dict()) to be saved and restored with every run."""
    from rlswift.state import register_state_hook as _register

    return _register(name, obj)


def register_generator(name: str, gen):
    """Save and restore ``gen`` (a torch.Generator or numpy.random.Generator) with every run's RNG state."""
    from rlswift.state import register_generator as _register

    return _register(name, gen)
