"""StateRegistry: validation, strict/relaxed loading, user hooks and factories, and a save/load round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from rlswift.state import (
    Progress,
    StateMismatchError,
    StateRegistry,
    hooks_from_factories,
    register_state_hook,
    user_hooks,
)


class Counter:
    """A minimal hook: an int that counts up."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def test_register_refuses_duplicates_and_lists_names():
    reg = StateRegistry()
    reg.register("a", Counter())
    reg.register("b.c-d_1", Counter())
    with pytest.raises(KeyError, match=r"already registered.*a, b\.c-d_1"):
        reg.register("a", Counter())
    assert reg.names() == ["a", "b.c-d_1"]


@pytest.mark.parametrize("bad", ["", "a/b", "x y", "..", "é", "a:b"])
def test_register_refuses_unsafe_names(bad):
    with pytest.raises(ValueError, match="file names"):
        StateRegistry().register(bad, Counter())


def test_register_refuses_non_hooks():
    with pytest.raises(TypeError, match="lacks callable load_state_dict"):
        StateRegistry().register("x", types.SimpleNamespace(state_dict=lambda: {}))
    with pytest.raises(TypeError, match="state_dict and load_state_dict"):
        StateRegistry().register("x", object())


def test_get_unknown_lists_registered_and_never_imports_dotted():
    reg = StateRegistry({"alpha": Counter()})
    with pytest.raises(KeyError, match="registered: alpha"):
        reg.get("os.path")  # a dotted name is a hook name here, not an import path
    assert reg["alpha"].n == 0


def test_state_dict_and_strict_load():
    src = StateRegistry({"a": Counter(3), "p": Progress(step=7, extra={"k": [1, 2]})})
    sd = src.state_dict()
    assert sd == {
        "a": {"n": 3},
        "p": {"step": 7, "epoch": 0, "samples_seen": 0, "tokens_seen": 0, "extra": {"k": [1, 2]}},
    }
    dst = StateRegistry({"a": Counter(), "p": Progress()})
    assert dst.load_state_dict(sd) == {"missing": [], "unexpected": []}
    assert dst["a"].n == 3 and dst["p"].step == 7 and dst["p"].extra == {"k": [1, 2]}


def test_strict_mismatch_names_both_lists_and_touches_nothing():
    dst = StateRegistry({"a": Counter(0), "only_here": Counter(0)})
    sd = {"a": {"n": 5}, "only_there": {"n": 1}}
    with pytest.raises(StateMismatchError) as ei:
        dst.load_state_dict(sd)
    msg = str(ei.value)
    assert "only_here" in msg and "only_there" in msg and "strict=False" in msg
    assert isinstance(ei.value, RuntimeError)
    assert dst["a"].n == 0  # nothing loaded before the check
    report = dst.load_state_dict(sd, strict=False)
    assert report == {"missing": ["only_here"], "unexpected": ["only_there"]}
    assert dst["a"].n == 5


def test_user_hooks_module_registry():
    hook = Counter(9)
    name = "test_user_hook_registry_counter"
    assert register_state_hook(name, hook) is hook
    try:
        assert user_hooks().get(name) is hook
        with pytest.raises(KeyError, match="already registered"):
            register_state_hook(name, Counter())
        run = StateRegistry()
        run.update(user_hooks())
        assert run.state_dict()[name] == {"n": 9}
    finally:
        user_hooks().unregister(name)


# Factories used through dotted paths below (this test module is importable as tests.test_state_registry or by
# its bare name depending on rootdir handling, so the test resolves its own module name).
def make_two():
    return {"c1": Counter(1), "c2": Counter(2)}


def make_list():
    return [Counter()]


def make_c1_again():
    return {"c1": Counter()}


def test_hooks_from_factories():
    mod = __name__
    hooks = hooks_from_factories([f"{mod}.make_two"])
    assert sorted(hooks) == ["c1", "c2"] and hooks["c2"].n == 2
    with pytest.raises(TypeError, match=r"returned list.*must return a dict"):
        hooks_from_factories([f"{mod}.make_list"])
    with pytest.raises(KeyError, match="already made"):
        hooks_from_factories([f"{mod}.make_two", f"{mod}.make_c1_again"])
    with pytest.raises(TypeError, match="list of dotted paths"):
        hooks_from_factories(f"{mod}.make_two")  # type: ignore[arg-type]
    with pytest.raises(ImportError):
        hooks_from_factories(["no_such_pkg_xyz.make"])


def test_registry_round_trip_in_fresh_process(tmp_path):
    """Registry state -> torch.save -> fresh python -> load into fresh hooks -> continue == never stopped."""
    from rlswift.state import EpochSampler, RewardCache

    def build():
        return StateRegistry({"progress": Progress(), "sampler": EpochSampler(10, 3, seed=5), "cache": RewardCache(4)})

    reg = build()
    for i in range(4):
        reg["sampler"].next_batch()
        reg["progress"].step += 1
        reg["cache"].put(f"k{i}", i / 3)
    reg["cache"].get("k2")
    torch.save(reg.state_dict(), tmp_path / "state.pt")
    expected = [reg["sampler"].next_batch() for _ in range(5)] + [[reg["progress"].step, reg["cache"].hits]]

    script = textwrap.dedent(
        """
        import json, sys, torch
        from rlswift.state import EpochSampler, Progress, RewardCache, StateRegistry
        reg = StateRegistry({"progress": Progress(), "sampler": EpochSampler(10, 3, seed=5), "cache": RewardCache(4)})
        reg.load_state_dict(torch.load(sys.argv[1], weights_only=False))
        out = [reg["sampler"].next_batch() for _ in range(5)] + [[reg["progress"].step, reg["cache"].hits]]
        print(json.dumps(out))
        """
    )
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "state.pt")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


def test_progress_snapshot_is_independent_and_refuses_unknown_keys():
    p = Progress(step=2, tokens_seen=40, extra={"best": [0.5]})
    sd = p.state_dict()
    p.extra["best"].append(0.9)  # later mutation must not leak into the taken snapshot
    assert sd["extra"] == {"best": [0.5]}
    q = Progress()
    q.load_state_dict(sd)
    assert (q.step, q.tokens_seen, q.extra) == (2, 40, {"best": [0.5]})
    with pytest.raises(ValueError, match=r"unknown keys \['stepp'\]"):
        q.load_state_dict({"stepp": 3})
