"""RNGState: one hook for every random stream a run draws from.

Covers Python's ``random``, numpy's global stream, torch's CPU generator, every CUDA device's generator (when CUDA
is available) and named ``torch.Generator`` / ``numpy.random.Generator`` objects registered by components that
own their own generator. The state dict holds only tensors, ints (of any size: PCG64's state is 128-bit), floats,
strings, tuples, lists, dicts and numpy arrays, so the checkpoint codec stores it without pickle.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from rlswift.registry import Registry


def _plain(obj: Any) -> Any:
    """Copy ``obj`` turning numpy scalars into Python numbers (arrays are copied, containers rebuilt)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _as_tuples(obj: Any) -> Any:
    """Lists -> tuples, recursively (``random.setstate`` insists on tuples)."""
    if isinstance(obj, (list, tuple)):
        return tuple(_as_tuples(v) for v in obj)
    return obj


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy's global stream and torch (CPU and every CUDA device) with ``seed``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    # numpy's legacy seeding accepts only 32-bit seeds; fold larger ones rather than failing.
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def forked_seed(seed: int, cuda_devices: Iterable[int] = ()) -> Iterator[None]:
    """Run the block on torch's CPU stream (and the given GPUs' streams) seeded with ``seed``; every stream is as it
    was afterwards. Only those generators are touched: ``torch.manual_seed`` would reseed every GPU of the process,
    outside what ``fork_rng`` restores (found on 2 GPUs: rank 1's stream changed when a model was built)."""
    devices = sorted(cuda_devices)
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


# Generators user components registered with `rlswift.register_generator`; each run's RNGState tracks them.
_USER_GENERATORS: Registry[torch.Generator | np.random.Generator] = Registry("generator")


def register_generator(name: str, gen: torch.Generator | np.random.Generator) -> torch.Generator | np.random.Generator:
    """Have every run started afterwards in this process save and restore ``gen`` with its RNG state; returns it.

    For components that own a generator (``numpy.random.default_rng(seed)``, ``torch.Generator()``) instead of
    drawing from the global streams.
    """
    _check_generator(name, gen)
    return _USER_GENERATORS.register(name, gen)


def _check_generator(name: str, gen: object) -> None:
    if not isinstance(gen, (torch.Generator, np.random.Generator)):
        raise TypeError(
            f"generator {name!r} is a {type(gen).__name__}; register a torch.Generator or a "
            f"numpy.random.Generator (e.g. numpy.random.default_rng(seed))"
        )


class RNGState:
    """State hook for the global random streams plus named generators (``register_generator``).

    A new RNGState tracks every generator registered process-wide with `register_generator` so far.
    """

    def __init__(self) -> None:
        self._generators: Registry[torch.Generator | np.random.Generator] = Registry("generator")
        for name, gen in _USER_GENERATORS.items():
            self._generators.register(name, gen)

    def register_generator(self, name: str, gen: torch.Generator | np.random.Generator) -> None:
        """Track ``gen`` (a ``torch.Generator`` or ``numpy.random.Generator``) under ``name``; duplicates refused."""
        _check_generator(name, gen)
        self._generators.register(name, gen)

    def generator_names(self) -> list[str]:
        """Names of the registered generators."""
        return self._generators.names()

    def state_dict(self) -> dict[str, Any]:
        """Snapshot of every stream: ``python``, ``numpy``, ``torch``, ``cuda`` (list) and ``generators``."""
        gens: dict[str, dict[str, Any]] = {}
        for name, gen in self._generators.items():
            if isinstance(gen, torch.Generator):
                gens[name] = {"kind": "torch", "device": str(gen.device), "state": gen.get_state()}
            else:
                gens[name] = {"kind": "numpy", "state": _plain(gen.bit_generator.state)}
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {
            "python": _plain(random.getstate()),
            "numpy": _plain(np.random.get_state(legacy=True)),
            "torch": torch.get_rng_state(),
            "cuda": list(cuda),
            "generators": gens,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every stream; the saved generator names must equal the registered ones."""
        saved = state_dict.get("generators", {})
        missing = [n for n in self._generators.names() if n not in saved]
        unexpected = [n for n in saved if n not in self._generators]
        if missing or unexpected:
            raise ValueError(
                f"RNG state does not match the registered generators: missing from the checkpoint {missing}, "
                f"unexpected in the checkpoint {unexpected}; register the same generators (register_generator) "
                f"as the run that saved it before loading"
            )
        # Check kinds before touching anything so a bad state leaves every stream as it was.
        for name, entry in saved.items():
            want = "torch" if isinstance(self._generators[name], torch.Generator) else "numpy"
            if entry["kind"] != want:
                raise ValueError(f"generator {name!r} was saved as a {entry['kind']} generator but is now {want}")

        random.setstate(_as_tuples(state_dict["python"]))
        np_state = state_dict["numpy"]
        np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
        torch.set_rng_state(torch.as_tensor(state_dict["torch"], dtype=torch.uint8).cpu())
        cuda = list(state_dict.get("cuda", []))
        if cuda:
            if not torch.cuda.is_available():
                warnings.warn("checkpoint holds CUDA RNG states but CUDA is not available here; they are ignored")
            elif len(cuda) != torch.cuda.device_count():
                warnings.warn(
                    f"checkpoint holds {len(cuda)} CUDA RNG states but {torch.cuda.device_count()} devices are "
                    f"visible; restoring the first {min(len(cuda), torch.cuda.device_count())}"
                )
                for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                    torch.cuda.set_rng_state(s.cpu(), i)
            else:
                torch.cuda.set_rng_state_all([s.cpu() for s in cuda])

        for name, entry in saved.items():
            gen = self._generators[name]
            if isinstance(gen, torch.Generator):
                gen.set_state(torch.as_tensor(entry["state"], dtype=torch.uint8).cpu())
            else:
                gen.bit_generator.state = _plain(entry["state"])
