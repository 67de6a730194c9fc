"""The GPU benchmark's reward, as the TRL anchor defines it (`trl_anchor/run_grpo.py`: reward_len)."""


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """min(len(text), 1000) / 1000: longer completions score higher (a pure throughput workload)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [min(len(t), 1000) / 1000.0 for t in texts]


def anchor_prompts(n: int = 2000) -> list[dict]:
    """The anchor's 2-shot arithmetic prompts (conversational), from the same seeded generator."""
    import random

    rng = random.Random(1)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        op = rng.choice("+-*")
        rows.append({"prompt": [{"role": "user", "content": (
            f"Solve the arithmetic problem. Example: 123 + 456 = 579. Example: 78 * 9 = 702. "
            f"Problem: {a} {op} {b} = ?")}]})
    return rows
