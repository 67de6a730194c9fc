"""rlswift: RL post-training (GRPO, DPO) whose runs resume exactly.

Public API: `register_state_hook(name, obj)` adds user state to every run of this process; recipes live in
`rlswift.recipes.grpo` / `.dpo`. Imports are lazy so `python -m rlswift.recipes.grpo` can fix thread settings
before torch loads.
"""

__version__ = "0.1.0"
__all__ = ["register_state_hook", "__version__"]


def register_state_hook(name: str, obj) -> object:
    """Register ``obj`` (anything with state_dict()/load_state_dict()) to be saved and restored with every run."""
    from rlswift.state import register_state_hook as _register

    return _register(name, obj)
