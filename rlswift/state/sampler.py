"""EpochSampler: an endless stream of dataset indices, epoch after epoch, that resumes exactly.

Epoch ``e``'s order is a pure function of ``(seed, e)``: a fresh ``torch.Generator`` seeded with a blake2b mix of
the two draws the permutation. So the state is five integers, a restore recomputes only the current epoch's
permutation (O(1) in the number of epochs already done), and a stop exactly at an epoch's end resumes at the next
epoch's first index (the sampler never carries a generator across epochs, unlike a sampler seeded once).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed in [0, 2**63) mixed from ``seed`` and ``epoch`` with blake2b (stable across processes and runs)."""
    # Python's hash() is salted per process, so never use it here; decimal text encodes ints of any size.
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}".encode(), digest_size=8, person=b"rlswift-sampler").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_permutation(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of epoch ``epoch``: ``randperm`` from a generator seeded by ``epoch_seed``, or ``arange``."""
    if not shuffle:
        return torch.arange(num_items)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_items, generator=gen)


class EpochSampler:
    """Yields batches of indices in ``[0, num_items)`` forever; batches may straddle an epoch boundary.

    ``epoch`` and ``position`` say where the next index comes from; after a batch that ends exactly at an epoch's
    end they already point at ``(epoch + 1, 0)``.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, shuffle: bool = True,
                 data_fingerprint: str | None = None, data_source: str = "the dataset"):
        if not isinstance(num_items, int) or num_items <= 0:
            raise ValueError(f"num_items must be a positive int (the dataset size), got {num_items!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = bool(shuffle)
        # Identity of the data the indices point into: resuming an order over other data would train on other rows.
        self.data_fingerprint = data_fingerprint
        self.data_source = data_source
        self._epoch = 0
        self._position = 0
        self._perm: torch.Tensor | None = None  # the current epoch's order, computed lazily

    @property
    def epoch(self) -> int:
        """Epoch the next index is drawn from (0-based)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Offset of the next index within the current epoch's order, in ``[0, num_items)``."""
        return self._position

    def _order(self) -> torch.Tensor:
        if self._perm is None:
            self._perm = epoch_permutation(self.num_items, self.seed, self._epoch, self.shuffle)
        return self._perm

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices, continuing into the next epoch when this one runs out."""
        out: list[int] = []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self.num_items - self._position)
            out.extend(self._order()[self._position : self._position + take].tolist())
            self._position += take
            if self._position == self.num_items:
                self._epoch += 1
                self._position = 0
                self._perm = None
        return out

    def __iter__(self):
        """Endless iterator of batches (``next_batch`` repeatedly)."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """``{seed, num_items, batch_size, shuffle, epoch, position, data_fingerprint}`` (plain values)."""
        return {
            "data_fingerprint": self.data_fingerprint,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "epoch": self._epoch,
            "position": self._position,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Jump to the saved ``(epoch, position)``; refuses a state of different data, dataset size, seed or shuffle."""
        saved_fp = state_dict.get("data_fingerprint")  # absent in checkpoints of rlswift 0.1
        if saved_fp is not None and self.data_fingerprint is not None and saved_fp != self.data_fingerprint:
            raise ValueError(
                f"{self.data_source} changed since the checkpoint (content sha256 {saved_fp[:12]}... at save, "
                f"{self.data_fingerprint[:12]}... now): resuming would train on other rows in the saved order. "
                "Resume with the data the run started with, or start a new output_dir"
            )
        for key in ("num_items", "seed"):
            if int(state_dict[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state_dict[key]} but this sampler has "
                    f"{key}={getattr(self, key)}: the dataset (or seed) changed since the checkpoint, so its "
                    f"order cannot be resumed; resume with the same data and seed, or start a fresh run"
                )
        if "shuffle" in state_dict and bool(state_dict["shuffle"]) != self.shuffle:
            raise ValueError(
                f"sampler state was saved with shuffle={state_dict['shuffle']} but this sampler has "
                f"shuffle={self.shuffle}; resume with the same shuffle setting"
            )
        if int(state_dict["batch_size"]) != self.batch_size:
            # Batches are cut from the same index stream, so the order stays exact; only batch edges move.
            warnings.warn(
                f"sampler state was saved with batch_size={state_dict['batch_size']}, resuming with "
                f"batch_size={self.batch_size}: the index stream continues exactly but batches are cut differently"
            )
        epoch, position = int(state_dict["epoch"]), int(state_dict["position"])
        if epoch < 0 or not 0 <= position <= self.num_items:
            raise ValueError(
                f"sampler state has invalid epoch={epoch} / position={position} for {self.num_items} items"
            )
        if position == self.num_items:  # a stop exactly at an epoch's end: continue at the next epoch's start
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position
        self._perm = None  # recomputed from (seed, epoch) on the next draw
