"""The seeded arithmetic task: "What is a + b?" prompts in TRL's conversational format, generated offline.

Rows are a pure function of (n, seed, low, high, system_prompt): a private numpy Generator draws the operands, so
building the data never touches (or depends on) a global random stream.
"""

from __future__ import annotations

import numpy as np

# Measured on SmolLM2-135M-Instruct, 64 prompts (seed 0), transformers generate, last-integer scoring,
# greedy / T=1.0 accuracy:                       24 new tokens    48 new tokens    prompt tokens
#   model default system prompt (None)            6.2% / 1.6%     15.6% / 4.7%     40
#   "You are a helpful assistant. Be brief."      7.8% / 4.7%     10.9% / 4.7%     33
#   "Answer with the number only."                0.0% / 0.0%      1.6% / 3.1%     30
#   "You are a calculator." / few-shot example    0.0% / 1.6%          -           29 / 46
# The model explains before answering whatever it is told; "Be brief." gives the best sampled reward at the short
# completion budget of the CPU demo: learnable (rewards are non-zero) and far from saturated.
DEFAULT_SYSTEM_PROMPT: str | None = "You are a helpful assistant. Be brief."


def arithmetic_rows(
    n: int,
    seed: int,
    low: int = 10,
    high: int = 99,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
) -> list[dict]:
    """``n`` addition problems with operands uniform in [low, high], as TRL conversational prompt rows.

    Each row: ``{"prompt": [{"role": "system", ...}?, {"role": "user", "content": "What is 12 + 30?"}],
    "answer": "42"}``. The system message is left out when ``system_prompt`` is None or empty.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if low > high:
        raise ValueError(f"low ({low}) must be <= high ({high})")
    rng = np.random.default_rng(seed)
    # One draw of shape (n, 2): row i's operands depend only on (seed, i), so a prefix of a bigger set is the same.
    operands = rng.integers(low, high + 1, size=(n, 2))
    rows = []
    for a, b in operands.tolist():
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": f"What is {a} + {b}?"})
        rows.append({"prompt": messages, "answer": str(a + b)})
    return rows
