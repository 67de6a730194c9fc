"""User code the end-to-end tests load by dotted path: reward functions and state hooks, as a user would write them."""

from __future__ import annotations

import os

import numpy as np

import rlswift


def digit_reward(prompts, completions, **kwargs) -> list[float]:
    """TRL-signature reward: fraction of digit characters (gives a random tiny model a learning signal)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def leaky_reward(prompts, completions, **kwargs) -> list[float]:
    """A reward that draws from an unregistered random source: verify-resume must catch it."""
    return [os.urandom(1)[0] / 255.0 for _ in completions]


class Curriculum:
    """A user state hook: per-prompt difficulty with its own numpy generator."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.difficulty: dict[int, float] = {}
        self.calls = 0

    def tick(self) -> None:
        self.calls += 1
        self.difficulty[self.calls % 5] = float(self.rng.random())

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "difficulty": dict(self.difficulty), "calls": self.calls}

    def load_state_dict(self, sd: dict) -> None:
        self.rng.bit_generator.state = sd["rng"]
        self.difficulty = dict(sd["difficulty"])
        self.calls = int(sd["calls"])


_CURRICULUM = Curriculum(seed=123)


def make_hooks() -> dict:
    """Factory named in config `state_hooks: [userland.custom.make_hooks]`."""
    return {"curriculum": _CURRICULUM}


def curriculum_reward(prompts, completions, **kwargs) -> list[float]:
    _CURRICULUM.tick()
    return [_CURRICULUM.difficulty.get(i % 5, 0.0) * 0.0 for i in range(len(completions))]


# A user component that owns its generator and registers it: every run's RNG hook saves and restores it.
_NOISE = rlswift.register_generator("userland_noise", np.random.default_rng(7))


def noisy_reward(prompts, completions, **kwargs) -> list[float]:
    """Digit reward plus a little noise drawn from the registered generator (exact across resumes)."""
    return [r + 0.01 * float(_NOISE.random()) for r in digit_reward(prompts, completions)]


def inf_reward(prompts, completions, **kwargs) -> list[float]:
    """Returns +inf for the second sample: a bad reward that must be refused at the boundary, by name."""
    return [float("inf") if i == 1 else 0.0 for i in range(len(completions))]


def raising_reward(prompts, completions, **kwargs) -> list[float]:
    """Raises, as a buggy user reward would."""
    raise ZeroDivisionError("user bug")


def sometimes_none_reward(prompts, completions, **kwargs) -> list[float | None]:
    """None ("not applicable") for every sample of every other group, so some samples are unscorable."""
    return [None if (i // 4) % 2 else digit_reward(prompts, [c])[0] for i, c in enumerate(completions)]
