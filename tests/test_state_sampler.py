"""EpochSampler: per-epoch orders as pure functions of (seed, epoch), exact resume at any point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from rlswift.state import EpochSampler, epoch_permutation, epoch_seed


def _stream(s: EpochSampler, n: int) -> list[list[int]]:
    return [s.next_batch() for _ in range(n)]


def test_unshuffled_stream_straddles_epochs_by_hand():
    s = EpochSampler(5, 3, seed=0, shuffle=False)
    assert s.next_batch() == [0, 1, 2] and (s.epoch, s.position) == (0, 3)
    assert s.next_batch() == [3, 4, 0] and (s.epoch, s.position) == (1, 1)
    assert s.next_batch() == [1, 2, 3] and (s.epoch, s.position) == (1, 4)
    assert s.next_batch() == [4, 0, 1] and (s.epoch, s.position) == (2, 2)
    big = EpochSampler(2, 5, seed=0, shuffle=False)  # a batch larger than the dataset spans several epochs
    assert big.next_batch() == [0, 1, 0, 1, 0] and (big.epoch, big.position) == (2, 1)


def test_epoch_orders_are_pure_permutations_that_differ():
    s = EpochSampler(50, 10, seed=3)
    flat = sum(_stream(s, 15), [])  # 3 epochs
    epochs = [flat[0:50], flat[50:100], flat[100:150]]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(50))
        assert order == epoch_permutation(50, 3, e).tolist()  # pure function of (seed, epoch)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epoch_permutation(50, 4, 0).tolist() != epochs[0]  # the seed matters
    assert epoch_seed(3, 1) == epoch_seed(3, 1) and epoch_seed(3, 1) != epoch_seed(1, 3)
    assert 0 <= epoch_seed(2**100, 7) < 2**63


@pytest.mark.parametrize("stop_after", [3, 5, 6])  # 3: exactly at the end of epoch 0; 5: mid-epoch; 6: end of epoch 1
def test_resume_equals_uninterrupted(stop_after):
    ref = _stream(EpochSampler(12, 4, seed=9), 12)
    s = EpochSampler(12, 4, seed=9)
    head = _stream(s, stop_after)
    sd = s.state_dict()
    if stop_after in (3, 6):
        # A stop exactly at an epoch's end points at the next epoch's first index.
        assert (sd["epoch"], sd["position"]) == (stop_after // 3, 0)
    fresh = EpochSampler(12, 4, seed=9)
    fresh.load_state_dict(sd)
    assert head + _stream(fresh, 12 - stop_after) == ref


def test_load_accepts_position_at_epoch_end():
    s = EpochSampler(6, 2, seed=1)
    s.load_state_dict({"seed": 1, "num_items": 6, "batch_size": 2, "epoch": 4, "position": 6})
    assert (s.epoch, s.position) == (5, 0)
    assert s.next_batch() == epoch_permutation(6, 1, 5)[:2].tolist()


def test_load_is_o1_in_epochs_done():
    s = EpochSampler(1000, 8, seed=2)
    t0 = time.perf_counter()
    s.load_state_dict({"seed": 2, "num_items": 1000, "batch_size": 8, "epoch": 10**9, "position": 992})
    batch = s.next_batch()
    assert time.perf_counter() - t0 < 1.0
    assert batch == epoch_permutation(1000, 2, 10**9)[992:].tolist()
    assert s.epoch == 10**9 + 1 and s.position == 0


def test_load_refuses_a_changed_dataset_or_seed():
    sd = EpochSampler(10, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match=r"num_items=10.*num_items=11.*dataset"):
        EpochSampler(11, 2, seed=1).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"seed=1.*seed=2"):
        EpochSampler(10, 2, seed=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="shuffle"):
        EpochSampler(10, 2, seed=1, shuffle=False).load_state_dict(sd)
    with pytest.warns(UserWarning, match="batch_size"):
        EpochSampler(10, 5, seed=1).load_state_dict(sd)
    with pytest.raises(ValueError, match="positive int"):
        EpochSampler(0, 2, seed=1)


def test_round_trip_in_fresh_process(tmp_path):
    import torch

    s = EpochSampler(7, 3, seed=123)
    _stream(s, 4)  # mid-epoch 1
    torch.save(s.state_dict(), tmp_path / "sampler.pt")
    expected = _stream(s, 6)
    script = textwrap.dedent(
        """
        import json, sys, torch
        from rlswift.state import EpochSampler
        s = EpochSampler(7, 3, seed=123)
        s.load_state_dict(torch.load(sys.argv[1], weights_only=False))
        print(json.dumps([s.next_batch() for _ in range(6)]))
        """
    )
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sampler.pt")], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected
