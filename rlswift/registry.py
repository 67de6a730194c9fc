"""Flat name -> object registries (state hooks, reward functions, loss variants).

Every registry refuses duplicate names, lists the valid names when a lookup fails, and resolves a dotted
import path (``pkg.module.attr`` or ``pkg.module:attr``) for names it does not hold.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Generic, Iterator, TypeVar

from rlswift.errors import DottedPathError, DuplicateNameError, UnknownNameError

T = TypeVar("T")


def import_dotted(path: str) -> object:
    """Import ``pkg.module.attr`` or ``pkg.module:attr`` and return the attribute."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise DottedPathError(f"{path!r} is not a dotted import path; write it as 'package.module.name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DottedPathError(f"cannot import module {module_name!r} for {path!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise DottedPathError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})") from None
    return obj


def suggest(name: str, valid: list[str]) -> str:
    """' Did you mean X?' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """A flat, ordered map from names to objects of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` under ``name``; a name that is already taken is refused."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise DuplicateNameError(
                f"a {self.kind} named {name!r} is already registered; pick another name "
                f"(registered: {', '.join(self._items)})"
            )
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        return self._items.pop(name)

    def get(self, name: str) -> T:
        """Look ``name`` up; if absent and it contains a dot, import it as a dotted path."""
        if name in self._items:
            return self._items[name]
        if "." in name or ":" in name:
            return import_dotted(name)  # type: ignore[return-value]
        valid = sorted(self._items)
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{suggest(name, valid)} Valid names: {', '.join(valid) or '(none)'}; "
            f"or give a dotted import path such as 'my_pkg.my_module.my_{self.kind.replace(' ', '_')}'"
        )

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
