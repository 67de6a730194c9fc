"""Progress: the run's counters (step, epoch, samples and tokens seen) as a state hook."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Progress:
    """Counters of a run; ``step`` is the number of optimizer steps finished. ``extra`` holds codec-able values."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """All fields; ``extra`` is deep-copied so later mutation does not alter a taken snapshot."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "extra": copy.deepcopy(self.extra),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every field; unknown keys are refused (they mean a different Progress layout)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(state_dict) - names)
        if unknown:
            raise ValueError(f"Progress state has unknown keys {unknown}; known keys: {sorted(names)}")
        for key in ("step", "epoch", "samples_seen", "tokens_seen"):
            if key in state_dict:
                setattr(self, key, int(state_dict[key]))
        self.extra = copy.deepcopy(dict(state_dict.get("extra", {})))
