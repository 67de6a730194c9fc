"""ReplayBuffer, RewardCache, EpisodeReturns: hand-worked behaviour and an exact fresh-process round trip."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlswift.state import EpisodeReturns, ReplayBuffer, RewardCache


# ---------------------------------------------------------------- ReplayBuffer
def test_fifo_eviction_and_pop_order():
    b = ReplayBuffer(3)
    for i in range(5):
        b.add({"i": i})
    assert len(b) == 3 and b.items() == [{"i": 2}, {"i": 3}, {"i": 4}] and b.evicted == 2
    assert b.pop() == {"i": 2} and b.pop() == {"i": 3} and len(b) == 1
    b.clear()
    with pytest.raises(IndexError, match="empty"):
        b.pop()


def test_loads_the_state_of_a_buffer_saved_before_priority_mode_was_removed():
    b = ReplayBuffer(2)
    b.load_state_dict({"capacity": 2, "mode": "fifo", "seed": 0, "items": [1], "priorities": [1.0],
                       "generator": torch.zeros(5056, dtype=torch.uint8), "evicted": 3})
    assert b.items() == [1] and b.evicted == 3
    with pytest.raises(ValueError, match="only FIFO"):
        b.load_state_dict({"capacity": 2, "mode": "priority", "items": []})
    with pytest.raises(ValueError, match="capacity >= 3"):
        b.load_state_dict({"capacity": 3, "items": [1, 2, 3]})


# ---------------------------------------------------------------- RewardCache
def test_key_is_sha256_of_canonical_json():
    want = hashlib.sha256(b'{"completion":"c","func":"f","prompt":"p"}').hexdigest()
    assert RewardCache.key("p", "c", "f") == want
    msgs_a = [{"role": "user", "content": "2+2?"}]
    msgs_b = [{"content": "2+2?", "role": "user"}]  # same message, other key order
    assert RewardCache.key(msgs_a, "4", "f") == RewardCache.key(msgs_b, "4", "f")
    assert RewardCache.key("p", "c", "f") != RewardCache.key("p", "c", "g")
    assert RewardCache().key("é", "c", "f") == hashlib.sha256(
        '{"completion":"c","func":"f","prompt":"é"}'.encode()).hexdigest()
    with pytest.raises(TypeError, match="JSON-able"):
        RewardCache.key(object(), "c", "f")


def test_lru_bound_and_counters():
    c = RewardCache(max_entries=2)
    c.put("a", 1.0)
    c.put("b", 2.0)
    assert c.get("a") == 1.0  # a is now the most recent
    c.put("c", 3.0)  # evicts b, the least recently used
    assert "b" not in c and c.get("b") is None and c.get("c") == 3.0
    assert (c.hits, c.misses, len(c)) == (2, 1, 2)
    with pytest.raises(TypeError, match="float\\('nan'\\)"):
        c.put("d", None)  # type: ignore[arg-type]
    c.put("pair", (-1.5, 2))  # lists of numbers are stored too (as floats)
    assert c.get("pair") == [-1.5, 2.0] and type(c.get("pair")[1]) is float
    c.put("nan", float("nan"))
    assert math.isnan(c.get("nan"))


# ---------------------------------------------------------------- EpisodeReturns
def test_episode_returns_welford_by_hand():
    r = EpisodeReturns(window=3)
    r.update(7, [1.0, 2.0])
    r.update(7, [3.0, 4.0])
    r.update("q", [10.0])
    s = r.stats(7)
    # mean of 1..4 = 2.5; population variance = (2.25+0.25+0.25+2.25)/4 = 1.25
    assert s["count"] == 4 and s["mean"] == 2.5 and s["std"] == pytest.approx(math.sqrt(1.25), rel=1e-15)
    assert s["recent"] == [2.0, 3.0, 4.0]
    assert r.stats("q") == {"count": 1, "mean": 10.0, "std": 0.0, "recent": [10.0]}
    g = r.global_stats()  # 1,2,3,4,10: mean 4, variance (9+4+1+0+36)/5 = 10
    assert g["count"] == 5 and g["mean"] == pytest.approx(4.0) and g["std"] == pytest.approx(math.sqrt(10.0))
    assert r.mean == g["mean"] and r.std == g["std"] and r.uids() == [7, "q"]
    with pytest.raises(KeyError, match="no rewards recorded"):
        r.stats(8)
    with pytest.raises(ValueError, match="non-finite"):
        r.update(7, [float("nan")])


# ---------------------------------------------------------------- round trip in a fresh process
def _build():
    return ReplayBuffer(4), RewardCache(max_entries=3), EpisodeReturns(window=2)


def _advance(buf, cache, ret, start: int, n: int) -> list:
    """Drive all three hooks for n steps and return what they produced (JSON-able)."""
    out = []
    for i in range(start, start + n):
        buf.add({"ids": torch.arange(i, i + 3), "group": [i, {"r": float(i)}]})
        picked = buf.items()[-2:]
        key = RewardCache.key(f"p{(i * i + i // 5) % 5}", "c", "f")  # a mix of hits and LRU evictions
        hit = cache.get(key)
        if hit is None:
            cache.put(key, i / 7)
        ret.update(i % 3, [i / 3, -i / 5])
        out.append([[p["ids"].tolist() for p in picked], hit, ret.stats(i % 3), ret.global_stats()])
    out.append([cache.hits, cache.misses, buf.evicted, [x["group"] for x in buf.items()]])
    return out


def test_round_trip_in_fresh_process(tmp_path):
    buf, cache, ret = _build()
    _advance(buf, cache, ret, 0, 9)
    torch.save({"buf": buf.state_dict(), "cache": cache.state_dict(), "ret": ret.state_dict()}, tmp_path / "b.pt")
    expected = _advance(buf, cache, ret, 9, 8)

    script = textwrap.dedent(
        """
        import json, sys, torch
        sys.path.insert(0, sys.argv[2])
        from test_state_buffers import _advance, _build
        buf, cache, ret = _build()
        sd = torch.load(sys.argv[1], weights_only=False)
        buf.load_state_dict(sd["buf"]); cache.load_state_dict(sd["cache"]); ret.load_state_dict(sd["ret"])
        print(json.dumps(_advance(buf, cache, ret, 9, 8)))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "b.pt"), os.path.dirname(__file__)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr
    # JSON turns int dict keys into strings on both sides alike; floats round-trip exactly through json.
    assert json.loads(res.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(expected))
