"""Stateful containers a run keeps between steps: a replay buffer, a reward cache and per-prompt return stats.

Each is a state hook (``state_dict`` / ``load_state_dict``) whose state holds only codec-able values, so a
checkpoint captures them exactly and a resumed run continues as if it never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict, deque
from typing import Any, Hashable


class ReplayBuffer:
    """A bounded FIFO of items (any codec-able structure, e.g. rollout groups); a full buffer evicts its oldest item."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self._items: deque[Any] = deque()
        self.evicted = 0  # items dropped because the buffer was full

    def add(self, item: Any) -> None:
        """Append ``item``; evicts the oldest when full."""
        if len(self._items) == self.capacity:
            self._items.popleft()
            self.evicted += 1
        self._items.append(item)

    def pop(self) -> Any:
        """Remove and return the oldest item."""
        if not self._items:
            raise IndexError("pop from an empty ReplayBuffer; check len(buffer) first")
        return self._items.popleft()

    def items(self) -> list[Any]:
        """All items, oldest first."""
        return list(self._items)

    def clear(self) -> None:
        """Drop every item."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def state_dict(self) -> dict[str, Any]:
        """Capacity, items (oldest first) and the eviction counter."""
        return {"capacity": self.capacity, "items": list(self._items), "evicted": self.evicted}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the items; refuses more items than this buffer's capacity."""
        # Checkpoints of rlswift 0.1 also hold mode/priorities/generator of a removed priority mode: FIFO only.
        if state_dict.get("mode", "fifo") != "fifo":
            raise ValueError(f"ReplayBuffer state has mode={state_dict['mode']!r}; only FIFO buffers exist now")
        items = list(state_dict["items"])
        if len(items) > self.capacity:
            raise ValueError(
                f"ReplayBuffer state holds {len(items)} items, more than this buffer's capacity {self.capacity}; "
                f"resume with capacity >= {len(items)}"
            )
        self._items = deque(items)
        self.evicted = int(state_dict.get("evicted", 0))


def _cache_value(value: Any) -> float | list:
    """A cache value as stored: a float, or a (nested) list of floats (e.g. a pair of reference log-probs)."""
    if isinstance(value, (list, tuple)):
        return [_cache_value(v) for v in value]
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(
            f"RewardCache stores numbers or lists of numbers, got {value!r}; store 'not applicable' as float('nan')"
        )
    return float(value)


class RewardCache:
    """An LRU map from ``key(prompt, completion, func_name)`` to a reward, with hit/miss counters.

    Values are floats (NaN allowed) or lists of floats, so other exactly-cached numbers (e.g. reference
    log-probs) can use it too.
    """

    def __init__(self, max_entries: int | None = None):
        if max_entries is not None and (not isinstance(max_entries, int) or max_entries <= 0):
            raise ValueError(f"max_entries must be a positive int or None (unbounded), got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[str, float | list] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(prompt: Any, completion: Any, func_name: str) -> str:
        """sha256 hex of the canonical JSON of ``[func_name, prompt, completion]``.

        ``prompt``/``completion`` may be strings or lists of chat message dicts; dict key order does not matter.
        """
        try:
            text = json.dumps(
                {"func": func_name, "prompt": prompt, "completion": completion},
                sort_keys=True, separators=(",", ":"), ensure_ascii=False,
            )
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"RewardCache.key needs JSON-able prompt and completion (str or list of message dicts): {e}"
            ) from e
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, key: str) -> float | list | None:
        """The cached reward for ``key`` (marking it recently used), or None; counts a hit or a miss."""
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        self.misses += 1
        return None

    def put(self, key: str, value: float | list) -> None:
        """Store ``value`` under ``key``; evicts the least recently used entry beyond ``max_entries``."""
        self._entries[key] = _cache_value(value)
        self._entries.move_to_end(key)
        self._trim()

    def _trim(self) -> None:
        """Drop least recently used entries beyond ``max_entries``."""
        if self.max_entries is not None:
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def state_dict(self) -> dict[str, Any]:
        """Keys and values in LRU order (least recent first) plus the counters."""
        return {
            "max_entries": self.max_entries,
            "keys": list(self._entries.keys()),
            "values": list(self._entries.values()),
            "hits": self.hits,
            "misses": self.misses,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore entries (keeping LRU order) and counters; trims to this cache's ``max_entries``."""
        keys, values = list(state_dict["keys"]), list(state_dict["values"])
        if len(keys) != len(values):
            raise ValueError(f"RewardCache state has {len(keys)} keys but {len(values)} values")
        self._entries = OrderedDict((k, _cache_value(v)) for k, v in zip(keys, values))
        self._trim()
        self.hits = int(state_dict["hits"])
        self.misses = int(state_dict["misses"])


class _Welford:
    """Running count / mean / M2 (sum of squared deviations) of a stream of floats."""

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0):
        self.count, self.mean, self.m2 = count, mean, m2

    def push(self, x: float) -> None:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        # Population std (ddof=0): defined (0.0) from the first value on.
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


class EpisodeReturns:
    """Per-prompt reward statistics: count, running mean/std (Welford, population std), last ``window`` rewards.

    Also keeps the same running statistics over every reward seen (``global_stats``).
    """

    def __init__(self, window: int = 16):
        if not isinstance(window, int) or window <= 0:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window
        self._stats: dict[Hashable, _Welford] = {}
        self._recent: dict[Hashable, deque[float]] = {}
        self._global = _Welford()

    def update(self, uid: int | str, rewards: list[float]) -> None:
        """Add ``rewards`` (finite numbers) for prompt ``uid`` (an int or str)."""
        if not isinstance(uid, (int, str)) or isinstance(uid, bool):
            raise TypeError(f"prompt uid must be an int or str, got {type(uid).__name__}")
        values = [float(r) if r is not None else math.nan for r in rewards]
        bad = [r for r, v in zip(rewards, values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"EpisodeReturns.update got non-finite rewards {bad} for uid {uid!r}; filter them first")
        stats = self._stats.setdefault(uid, _Welford())
        recent = self._recent.setdefault(uid, deque(maxlen=self.window))
        for v in values:
            stats.push(v)
            self._global.push(v)
            recent.append(v)

    def stats(self, uid: int | str) -> dict[str, Any]:
        """``{"count", "mean", "std", "recent"}`` for ``uid``; KeyError if it was never updated."""
        if uid not in self._stats:
            raise KeyError(f"no rewards recorded for prompt uid {uid!r}; check `uid in episode_returns` first")
        s = self._stats[uid]
        return {"count": s.count, "mean": s.mean, "std": s.std, "recent": list(self._recent[uid])}

    def global_stats(self) -> dict[str, Any]:
        """``{"count", "mean", "std"}`` over every reward seen."""
        return {"count": self._global.count, "mean": self._global.mean, "std": self._global.std}

    @property
    def mean(self) -> float:
        """Running mean over every reward seen."""
        return self._global.mean

    @property
    def std(self) -> float:
        """Running population std over every reward seen."""
        return self._global.std

    def uids(self) -> list[int | str]:
        """Prompt uids seen, in first-seen order."""
        return list(self._stats)

    def __contains__(self, uid: object) -> bool:
        return uid in self._stats

    def __len__(self) -> int:
        return len(self._stats)

    def state_dict(self) -> dict[str, Any]:
        """``window``, global ``[count, mean, m2]`` and per uid ``{count, mean, m2, recent}``."""
        return {
            "window": self.window,
            "global": [self._global.count, self._global.mean, self._global.m2],
            "uids": {
                uid: {"count": s.count, "mean": s.mean, "m2": s.m2, "recent": list(self._recent[uid])}
                for uid, s in self._stats.items()
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every statistic exactly; recent rewards are trimmed to this object's ``window``."""
        count, mean, m2 = state_dict["global"]
        self._global = _Welford(int(count), float(mean), float(m2))
        self._stats, self._recent = {}, {}
        for uid, s in state_dict["uids"].items():
            self._stats[uid] = _Welford(int(s["count"]), float(s["mean"]), float(s["m2"]))
            self._recent[uid] = deque((float(v) for v in s["recent"]), maxlen=self.window)
