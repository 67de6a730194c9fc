import math

import pytest
import torch

from rlswift.errors import RewardError
from rlswift.rewards import (
    REWARD_FUNCS,
    accuracy,
    format_reward,
    last_integer,
    length_penalty,
    register_reward,
    resolve_reward_funcs,
    score,
)


def test_last_integer():
    assert last_integer("10 + 21 = 31") == 31
    assert last_integer("The answer is -7.") == -7
    assert last_integer("1,234 apples") == 1234
    assert last_integer("no digits") is None


def test_accuracy_uses_last_integer_and_conversational_format():
    comps = ["10 + 21 = 31", "31 is wrong, it is 32", "no number", [{"role": "assistant", "content": "= 31"}]]
    got = accuracy(["p"] * 4, comps, answer=[31, 31, 31, "31"])
    assert got == [1.0, 0.0, 0.0, 1.0]  # first integer (10) would have scored 0 on the first one
    assert accuracy(["p"], ["5"], answer=[None]) == [None]
    with pytest.raises(KeyError, match="answer"):
        accuracy(["p"], ["5"])


def test_format_bonus_only_for_correct_answers_that_end_the_completion():
    comps = [
        "10 + 21 = 31",  # correct, ends with the answer -> 0.2
        "The answer is 31.\n",  # correct, final line ends with it (trailing '.') -> 0.2
        "31 is the answer",  # correct number? last integer is 31 but it does not end the text -> 0
        "32",  # bare wrong number -> 0 (no bonus for format alone)
        "It is 31.\nI am sure",  # answer not on the final line -> 0
    ]
    assert format_reward(["p"] * 5, comps, answer=[31] * 5) == [0.2, 0.2, 0.0, 0.0, 0.0]


def test_length_penalty():
    assert length_penalty(["p", "p"], ["a", "b"], completion_ids=[[1, 2, 3], []]) == [-0.003, 0.0]
    assert length_penalty(["p"], ["abcdefgh"]) == [-0.002]


def test_registry_resolve_and_register():
    names = [n for n, _ in resolve_reward_funcs(["accuracy", "format", "rlswift.rewards.length_penalty"])]
    assert names == ["accuracy", "format", "rlswift.rewards.length_penalty"]
    with pytest.raises(KeyError) as e:
        resolve_reward_funcs(["acuracy"])
    assert "accuracy" in str(e.value) and "format" in str(e.value)

    @register_reward("test_const")
    def const(prompts, completions, **kw):
        return [0.5] * len(completions)

    try:
        assert REWARD_FUNCS.get("test_const") is const
        with pytest.raises(KeyError, match="already registered"):
            register_reward("test_const")(const)
    finally:
        REWARD_FUNCS.unregister("test_const")


def _const(v):
    def f(prompts, completions, **kw):
        return [v] * len(completions)

    return f


def test_score_weights_none_and_nansum():
    # func a: [1, None, None], func b: [0.5, 2, None]; weights (2, 1)
    a = lambda prompts, completions, **kw: [1.0, None, None]  # noqa: E731
    b = lambda prompts, completions, **kw: [0.5, 2.0, None]  # noqa: E731
    total, per = score([("a", a), ("b", b)], [2.0, 1.0], ["p"] * 3, ["c"] * 3)
    assert per.shape == (3, 2) and per.dtype == torch.float32
    assert per[0].tolist() == [1.0, 0.5] and math.isnan(per[1, 0]) and per[1, 1] == 2.0
    assert total[0].item() == 2.5 and total[1].item() == 2.0  # None is left out, not counted as 0
    assert math.isnan(total[2].item())  # every function said "not applicable": unscorable


def test_score_validation_errors():
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        score([("a", _const(1.0))], [1.0, 1.0], ["p"], ["c"])
    short = lambda prompts, completions, **kw: [1.0]  # noqa: E731
    with pytest.raises(ValueError, match=r"'short' returned 1 rewards, expected 3"):
        score([("short", short)], None, ["p"] * 3, ["c"] * 3)
    nan = lambda prompts, completions, **kw: [0.0, float("nan")]  # noqa: E731
    with pytest.raises(ValueError, match=r"'nanfn' returned NaN for sample 1"):
        score([("nanfn", nan)], None, ["p"] * 2, ["c"] * 2)

    def boom(prompts, completions, **kw):
        raise ZeroDivisionError("division by zero")

    with pytest.raises(RewardError, match=r"'boom' raised ZeroDivisionError") as e:
        score([("boom", boom)], None, ["p"], ["c"])
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    inf = lambda prompts, completions, **kw: [0.0, float("-inf")]  # noqa: E731
    with pytest.raises(RewardError, match=r"'inf' returned -inf for prompt 7 sample 1; rewards must be finite"):
        score([("inf", inf)], None, ["p"] * 2, ["c"] * 2, labels=["prompt 7 sample 0", "prompt 7 sample 1"])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        score([("a", _const(1.0))], None, ["p"] * 2, ["c"] * 2, {"answer": [1]})


def test_score_passes_columns_and_builtins():
    funcs = resolve_reward_funcs(["accuracy", "format"])
    total, per = score(funcs, [1.0, 1.0], ["q1", "q2"], ["1 + 2 = 3", "4"], {"answer": [3, 5]})
    assert per.tolist() == [[1.0, pytest.approx(0.2)], [0.0, 0.0]]
    assert total.tolist() == [pytest.approx(1.2), 0.0]


class DictCache:
    """Stand-in for rlswift.state.RewardCache: key/get/put over a dict."""

    def __init__(self):
        self.d = {}

    def key(self, prompt, completion, func_name):
        return repr((prompt, completion, func_name))

    def get(self, key):
        return self.d.get(key)

    def put(self, key, value):
        self.d[key] = value


def test_score_cache_computes_only_misses_in_order():
    calls = []

    def rec(prompts, completions, answer, completion_ids, **kw):
        calls.append((list(completions), list(answer), list(completion_ids)))
        return [None if c == "skip" else float(len(c)) for c in completions]

    cache = DictCache()
    cols = {"answer": [1, 2], "completion_ids": [[5], [6, 7]]}
    t1, p1 = score([("rec", rec)], None, ["p", "q"], ["aa", "skip"], cols, cache=cache)
    assert calls == [(["aa", "skip"], [1, 2], [[5], [6, 7]])]
    # second batch: sample 0 and 2 were seen (same prompt, completion and columns), sample 1 is new
    cols2 = {"answer": [1, 3, 2], "completion_ids": [[5], [8], [6, 7]]}
    t2, p2 = score([("rec", rec)], None, ["p", "r", "q"], ["aa", "bbb", "skip"], cols2, cache=cache)
    assert calls[1] == (["bbb"], [3], [[8]])  # one call, misses only, columns subset in order
    assert len(calls) == 2
    assert p2[:, 0].tolist()[:2] == [2.0, 3.0] and math.isnan(p2[2, 0])  # cached None stays None
    # same prompt+completion but another answer column is a different key (the reward may depend on it)
    score([("rec", rec)], None, ["p"], ["aa"], {"answer": [9], "completion_ids": [[5]]}, cache=cache)
    assert len(calls) == 3


def test_score_with_real_reward_cache():
    buffers = pytest.importorskip("rlswift.state.buffers")
    cache = buffers.RewardCache()
    n_calls = []

    def f(prompts, completions, **kw):
        n_calls.append(len(completions))
        return [None if c == "x" else 1.0 for c in completions]

    for _ in range(2):
        total, per = score([("f", f)], None, [[{"role": "user", "content": "hi"}]] * 2, ["ok", "x"],
                           {"answer": [1, 2]}, cache=cache)
        assert per[0, 0].item() == 1.0 and math.isnan(per[1, 0].item())
    assert n_calls == [2]  # the second round was served from the cache, None included
    assert cache.hits == 2


def test_trl_rewards_work_by_name():
    funcs = resolve_reward_funcs(["think_format_reward", "accuracy_reward"])
    completions = [[{"role": "assistant", "content": "<think>\nadd\n</think>\nThe sum is $\\boxed{42}$"}],
                   [{"role": "assistant", "content": "it is $\\boxed{41}$"}]]
    total, per = score(funcs, None, ["q", "q"], completions, {"solution": ["$42$", "$42$"]})
    assert per.tolist() == [[1.0, 1.0], [0.0, 0.0]]
