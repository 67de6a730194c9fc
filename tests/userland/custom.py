"""User code the end-to-end tests load by dotted path: reward functions and state hooks, as a user would write them."""

from __future__ import annotations

import os

import numpy as np


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


class TickingReward:
    """A reward function object that advances the curriculum on every call (state that lives across steps)."""

    __name__ = "ticking_reward"

    def __init__(self, curriculum: Curriculum):
        self.curriculum = curriculum

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        self.curriculum.tick()
        return [0.0 for _ in completions]


_CURRICULUM = Curriculum(seed=123)


def make_hooks() -> dict:
    """Factory named in config `state_hooks: [userland.custom.make_hooks]`."""
    return {"curriculum": _CURRICULUM}


def curriculum_reward(prompts, completions, **kwargs) -> list[float]:
    _CURRICULUM.tick()
    return [_CURRICULUM.difficulty.get(i % 5, 0.0) * 0.0 for i in range(len(completions))]
