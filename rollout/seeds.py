"""Per-sample sampling seeds, computed (never drawn) so a resumed run samples exactly what the first run did."""

from __future__ import annotations

import hashlib
import struct

_KEY = b"rlswift.sample_seed.v1"
_INT64 = (-(2**63), 2**63 - 1)


def sample_seed(run_seed: int, step: int, prompt_uid: int, sample_idx: int) -> int:
    """The seed of sample ``sample_idx`` of prompt ``prompt_uid`` at ``step`` of run ``run_seed``, in [0, 2**63).

    A keyed blake2b (digest 8 bytes) over the four integers packed as signed little-endian int64, masked to 63 bits.
    It depends on nothing but its arguments: the same on every process, machine and Python version.
    """
    vals = (run_seed, step, prompt_uid, sample_idx)
    for name, v in zip(("run_seed", "step", "prompt_uid", "sample_idx"), vals):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"sample_seed: {name} must be an int, got {type(v).__name__}")
        if not _INT64[0] <= v <= _INT64[1]:
            raise ValueError(f"sample_seed: {name}={v} does not fit a signed int64")
    digest = hashlib.blake2b(struct.pack("<4q", *vals), key=_KEY, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
