"""RNGState and seed_everything: exact restore of every stream, codec-safe types, a fresh-process round trip."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from rlswift.state import RNGState, seed_everything

ALLOWED = (type(None), bool, int, float, str, bytes, torch.Tensor, np.ndarray, np.generic)


def _walk_types(obj, path="sd"):
    """Yield (path, type) for every leaf that is not a codec-able type."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_types(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_types(v, f"{path}[{i}]")
    elif not isinstance(obj, ALLOWED):
        yield path, type(obj)


def _draws(tg: torch.Generator, ng: np.random.Generator) -> list:
    """Draws touching every stream, incl. cached-gaussian state (odd number of normal draws)."""
    return [
        random.random(), random.gauss(0, 1), random.getrandbits(70),
        float(np.random.rand()), float(np.random.randn()),
        torch.rand(2).tolist(), torch.randint(0, 1000, (3,)).tolist(),
        torch.rand(2, generator=tg).tolist(),
        ng.integers(0, 2**40, size=3).tolist(), float(ng.random()),
    ]


def test_seed_everything_matches_known_first_draws():
    # Hand-checked reference values of each library's documented seeding (seed 0).
    seed_everything(0)
    assert random.random() == 0.8444218515250481
    assert float(np.random.rand()) == 0.5488135039273248
    assert torch.rand(1).item() == pytest.approx(0.49625658988952637, abs=0)
    with pytest.raises(ValueError, match="non-negative int"):
        seed_everything(-1)
    seed_everything(2**40 + 3)  # large seeds are accepted (numpy's stream gets the low 32 bits)
    a = random.random()
    seed_everything(2**40 + 3)
    assert random.random() == a


def test_register_generator_refuses_duplicates_and_wrong_types():
    rng = RNGState()
    rng.register_generator("g", torch.Generator())
    with pytest.raises(KeyError, match="already registered.*g"):
        rng.register_generator("g", np.random.default_rng(0))
    with pytest.raises(TypeError, match="torch.Generator or a numpy.random.Generator"):
        rng.register_generator("r", random.Random(0))
    assert rng.generator_names() == ["g"]


def test_process_wide_generators_join_every_new_rng_state():
    from rlswift import register_generator
    from rlswift.state.rng import _USER_GENERATORS

    gen = register_generator("test_user_gen", np.random.default_rng(3))
    try:
        rng = RNGState()
        assert "test_user_gen" in rng.generator_names()
        before = rng.state_dict()
        first = gen.random()
        rng.load_state_dict(before)
        assert gen.random() == first  # restored through the run's RNG hook
        with pytest.raises(TypeError, match="numpy.random.Generator"):
            register_generator("bad", random.Random(0))
    finally:
        _USER_GENERATORS.unregister("test_user_gen")


def test_state_dict_is_codec_safe_and_keeps_128_bit_ints():
    rng = RNGState()
    rng.register_generator("np", np.random.default_rng(12345))
    rng.register_generator("t", torch.Generator().manual_seed(1))
    sd = rng.state_dict()
    assert list(_walk_types(sd)) == []
    assert isinstance(sd["python"], tuple) and isinstance(sd["python"][1], tuple)
    pcg = sd["generators"]["np"]["state"]["state"]
    assert type(pcg["state"]) is int and type(pcg["inc"]) is int
    assert pcg["inc"] >= 2**64  # PCG64's increment is a 128-bit value; it must stay a Python int
    assert sd["torch"].dtype == torch.uint8


def test_restore_in_process_replays_every_stream():
    seed_everything(3)
    tg = torch.Generator().manual_seed(11)
    ng = np.random.Generator(np.random.MT19937(7))  # a bit generator whose state holds an array
    rng = RNGState()
    rng.register_generator("t", tg)
    rng.register_generator("n", ng)
    random.gauss(0, 1)  # leave a cached gaussian behind
    np.random.randn()
    sd = rng.state_dict()
    first = _draws(tg, ng)
    _draws(tg, ng)  # move everything on
    rng.load_state_dict(sd)
    assert _draws(tg, ng) == first


def test_load_refuses_different_generator_names_or_kinds():
    a = RNGState()
    a.register_generator("x", torch.Generator())
    b = RNGState()
    b.register_generator("y", torch.Generator())
    with pytest.raises(ValueError, match=r"missing from the checkpoint \['y'\].*unexpected in the checkpoint \['x'\]"):
        b.load_state_dict(a.state_dict())
    c = RNGState()
    c.register_generator("x", np.random.default_rng(0))
    with pytest.raises(ValueError, match="saved as a torch generator but is now numpy"):
        c.load_state_dict(a.state_dict())


def test_round_trip_in_fresh_process(tmp_path):
    seed_everything(42)
    tg = torch.Generator().manual_seed(5)
    ng = np.random.default_rng(99)
    rng = RNGState()
    rng.register_generator("policy", tg)
    rng.register_generator("data", ng)
    _draws(tg, ng)  # a run that has drawn a while
    torch.save(rng.state_dict(), tmp_path / "rng.pt")
    expected = _draws(tg, ng)

    script = textwrap.dedent(
        """
        import json, random, sys
        import numpy as np, torch
        sys.path.insert(0, sys.argv[2])
        from test_state_rng import _draws
        from rlswift.state import RNGState, seed_everything
        seed_everything(7)  # different streams, to prove the load replaces them
        tg, ng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        rng = RNGState()
        rng.register_generator("policy", tg)
        rng.register_generator("data", ng)
        rng.load_state_dict(torch.load(sys.argv[1], weights_only=False))
        print(json.dumps(_draws(tg, ng)))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "rng.pt"), os.path.dirname(__file__)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == json.loads(json.dumps(expected))
