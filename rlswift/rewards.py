"""Reward functions with TRL's signature, a registry of built-ins, and a validating, caching scorer.

A reward function is ``f(prompts, completions, **kwargs) -> list[float | None]``: ``prompts`` / ``completions`` are
strings (standard format) or message lists (conversational: a completion is
``[{"role": "assistant", "content": text}]``); ``kwargs`` carry the dataset's extra columns (e.g. ``answer=[...]``,
one value per sample) and ``completion_ids``. ``None`` means "not applicable to this sample" (left out of the
weighted sum, as TRL does); it is not zero. Functions should accept ``**kwargs`` so new columns don't break them.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import torch

from rlswift.errors import RewardError
from rlswift.registry import Registry

__all__ = [
    "REWARD_FUNCS",
    "register_reward",
    "resolve_reward_funcs",
    "score",
    "completion_text",
    "last_integer",
    "accuracy",
    "format_reward",
    "length_penalty",
]

RewardFn = Callable[..., list]
REWARD_FUNCS: Registry[RewardFn] = Registry("reward function")

_INT = re.compile(r"-?\d[\d,]*")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: ``@register_reward("my_reward")`` adds the function to ``REWARD_FUNCS`` under ``name``."""

    def deco(fn: RewardFn) -> RewardFn:
        REWARD_FUNCS.register(name, fn)
        return fn

    return deco


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the content of a conversational completion's messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    raise TypeError(f"a completion must be a string or a list of messages, got {type(completion).__name__}")


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` ('1,234' counts as 1234), or None."""
    found = _INT.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def _answer_value(answer: Any) -> int | None:
    if answer is None:
        return None
    if isinstance(answer, int) and not isinstance(answer, bool):
        return int(answer)
    if isinstance(answer, float) and answer.is_integer():
        return int(answer)
    return last_integer(str(answer))


def _score_against_answer(
    name: str, completions: list, kwargs: dict, reward: Callable[[str, int], float]
) -> list[float | None]:
    """``reward(text, target)`` per completion against the row's ``answer`` column; None where there is no answer."""
    if "answer" not in kwargs:
        raise KeyError(f"reward {name!r} needs an 'answer' column in the dataset (one value per prompt)")
    answers = list(kwargs["answer"])
    if len(answers) != len(completions):
        raise ValueError(f"reward {name!r}: 'answer' has {len(answers)} values for {len(completions)} completions")
    out: list[float | None] = []
    for c, a in zip(completions, answers):
        target = _answer_value(a)
        out.append(None if target is None else reward(completion_text(c), target))
    return out


@register_reward("accuracy")
def accuracy(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """1.0 when the LAST integer of the completion equals the row's ``answer``, else 0.0 (None without answer).

    The last integer, not the first: models restate the question ("10 + 21 = 31") before answering.
    """
    return _score_against_answer(
        "accuracy", completions, kwargs, lambda text, target: 1.0 if last_integer(text) == target else 0.0
    )


def _ends_with_answer(text: str, target: int) -> bool:
    # Final line, stripped of trailing punctuation/markup, must end in the answer as a whole token.
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return False
    last = lines[-1].strip().rstrip(".!*` ")
    m = re.search(r"(-?\d[\d,]*)$", last)
    return m is not None and int(m.group(1).replace(",", "")) == target


@register_reward("format")
def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """0.2 when the completion is correct AND ends with the answer (its final line's last token), else 0.0.

    The bonus goes only to correct answers: a bonus for bare numbers teaches the model to print a wrong number.
    """
    return _score_against_answer(
        "format",
        completions,
        kwargs,
        lambda text, target: 0.2 if last_integer(text) == target and _ends_with_answer(text, target) else 0.0,
    )


@register_reward("length_penalty")
def length_penalty(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """-(tokens / 1000): a mild push towards short answers; counts ``completion_ids`` if given, else characters/4."""
    ids = kwargs.get("completion_ids")
    if ids is not None:
        return [-len(x) / 1000.0 for x in ids]
    return [-(len(completion_text(c)) / 4.0) / 1000.0 for c in completions]


# TRL's ready-made rewards (trl.rewards), by the names TRL users know; trl is imported on first use (it is slow).
TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward")


def _trl_reward(name: str) -> RewardFn:
    def reward(prompts: list, completions: list, **kwargs: Any) -> list:
        import trl.rewards

        return getattr(trl.rewards, name)(prompts=prompts, completions=completions, **kwargs)

    reward.__name__ = name
    reward.__doc__ = f"trl.rewards.{name} (TRL's signature; e.g. accuracy_reward needs a 'solution' column and " \
                     "the math-verify package)"
    return reward


for _name in TRL_REWARDS:
    REWARD_FUNCS.register(_name, _trl_reward(_name))


def resolve_reward_funcs(names: Sequence[str]) -> list[tuple[str, RewardFn]]:
    """``[(name, fn)]`` for registered names or dotted import paths; unknown names raise KeyError listing valid ones."""
    out = []
    for name in names:
        fn = REWARD_FUNCS.get(name)
        if not callable(fn):
            raise TypeError(f"reward function {name!r} resolved to {fn!r}, which is not callable")
        out.append((name, fn))
    return out


def _cache_prompt_key(prompt: Any, columns: dict[str, list], i: int) -> Any:
    # The reward may depend on the row's columns (e.g. the answer), so they are part of the key;
    # completion_ids are a function of the completion and left out.
    extra = {k: _plain(v[i]) for k, v in sorted(columns.items()) if k != "completion_ids"}
    return {"prompt": prompt, "columns": extra} if extra else prompt


def _plain(v: Any) -> Any:
    # numpy scalars / tensors -> python values so the cache's canonical JSON accepts them
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _call(
    name: str, fn: RewardFn, prompts: list, completions: list, columns: dict[str, list], labels: list[str]
) -> list:
    # ``labels``: how to name each of these samples in an error (e.g. "prompt 12 sample 3"), one line per problem.
    n = len(prompts)
    try:
        out = fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:  # one line naming the function: a traceback alone may not say which reward failed
        raise RewardError(
            f"reward function {name!r} raised {type(e).__name__}: {e} (on {n} samples, first: {labels[0]}; "
            "set RLSWIFT_TRACEBACK=1 for the traceback)"
        ) from e
    try:
        out = list(out)
    except TypeError:
        raise RewardError(
            f"reward function {name!r} must return a list of floats/None, got {type(out).__name__}"
        ) from None
    if len(out) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(out)} rewards, expected {n} (one per completion)"
        )
    values: list[float | None] = []
    for j, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward function {name!r} returned {v!r} for {labels[j]}; expected a float or None"
            ) from None
        if math.isnan(f):
            raise RewardError(
                f"reward function {name!r} returned NaN for {labels[j]}; return None for 'not applicable'"
            )
        if math.isinf(f):
            raise RewardError(
                f"reward function {name!r} returned {f} for {labels[j]}; rewards must be finite (clip it, or "
                "return None for 'not applicable')"
            )
        values.append(f)
    return values


def score(
    funcs: Sequence[tuple[str, RewardFn]],
    weights: Sequence[float] | None,
    prompts: list,
    completions: list,
    columns: dict[str, list] | None = None,
    cache: Any = None,
    labels: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every reward function on the N samples and combine them like TRL.

    Returns ``(total [N], per_func [N, F])`` float32 tensors. ``per_func`` holds NaN where a function returned
    None; ``total = nansum(per_func * weights)`` per row, NaN when every function returned None (unscorable;
    ``group_advantages`` gives such samples advantage 0). ``weights`` None means all 1.0. ``columns`` maps extra
    dataset columns (and ``completion_ids``) to one value per sample. ``cache`` (duck-typed ``RewardCache``: ``key
    (prompt, completion, func_name)``, ``get(key)`` -> value or None, ``put(key, value)``) skips samples already
    scored; each function is called once, on the misses only, with the matching subset of every column.
    ``labels`` names each sample in error messages (default "sample i").
    """
    columns = dict(columns or {})
    n = len(prompts)
    labels = list(labels) if labels is not None else [f"sample {i}" for i in range(n)]
    if len(completions) != n:
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; give one prompt per completion")
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"column {k!r} has {len(v)} values for {n} samples")
    f = len(funcs)
    if weights is None:
        weights = [1.0] * f
    if len(weights) != f:
        raise ValueError(f"{len(weights)} reward weights for {f} reward functions; give one weight per function")
    per_func = torch.full((n, f), float("nan"), dtype=torch.float32)
    _MISSING = object()
    for col, (name, fn) in enumerate(funcs):
        values: list[Any] = [_MISSING] * n
        keys: list[Any] = [None] * n
        if cache is not None:
            for i in range(n):
                keys[i] = cache.key(_cache_prompt_key(prompts[i], columns, i), completions[i], name)
                hit = cache.get(keys[i])
                if hit is not None:
                    # Cached None ("not applicable") is stored as NaN so a miss (None) stays distinguishable.
                    values[i] = None if isinstance(hit, float) and math.isnan(hit) else hit
        misses = [i for i in range(n) if values[i] is _MISSING]
        if misses:
            sub_cols = {k: [v[i] for i in misses] for k, v in columns.items()}
            computed = _call(
                name, fn, [prompts[i] for i in misses], [completions[i] for i in misses], sub_cols,
                [labels[i] for i in misses],
            )
            for i, v in zip(misses, computed):
                values[i] = v
                if cache is not None:
                    cache.put(keys[i], float("nan") if v is None else v)
        for i, v in enumerate(values):
            if v is not None:
                per_func[i, col] = float(v)
    w = torch.tensor(list(weights), dtype=torch.float32)
    total = (per_func * w.unsqueeze(0)).nansum(dim=1)
    total[torch.isnan(per_func).all(dim=1)] = float("nan")
    return total, per_func
