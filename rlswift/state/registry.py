"""The state registry: every stateful piece of a run registers here, and a checkpoint is its ``state_dict()``.

A *hook* is anything with torch's ``Stateful`` shape: callable ``state_dict()`` and ``load_state_dict(sd)``.
Hook names become file names inside a checkpoint (``hooks/{name}.json``), so they are restricted to
``[A-Za-z0-9_.-]``.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Mapping, Protocol, runtime_checkable

from rlswift.registry import Registry, import_dotted

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@runtime_checkable
class Stateful(Protocol):
    """What a state hook must provide (same shape as ``torch.distributed.checkpoint.stateful.Stateful``)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


class StateMismatchError(RuntimeError):
    """A checkpoint's hook names do not match the registry's (raised by strict ``load_state_dict``)."""


def check_hook(name: str, hook: object) -> None:
    """Raise if ``name`` is not a file-safe name or ``hook`` lacks callable ``state_dict``/``load_state_dict``."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(
            f"state hook name {name!r} is not allowed: names become file names, so use only letters, digits, "
            f"'_', '.' and '-' (for example 'my_buffer')"
        )
    missing = [m for m in ("state_dict", "load_state_dict") if not callable(getattr(hook, m, None))]
    if missing:
        raise TypeError(
            f"state hook {name!r} ({type(hook).__name__}) lacks callable {' and '.join(missing)}; a hook needs "
            f"state_dict() -> structure and load_state_dict(structure) (torch's Stateful protocol)"
        )


def hook_name_mismatch(saved: Iterable[str], registered: Iterable[str]) -> str:
    """'' when the saved and the registered hook names are the same sets, else what differs, by name (the one
    check a checkpoint load makes before touching any hook)."""
    saved, registered = list(saved), list(registered)
    missing = [n for n in registered if n not in saved]
    unexpected = [n for n in saved if n not in registered]
    if not (missing or unexpected):
        return ""
    return (f"registered but not saved {missing}, saved but not registered {unexpected} (saved: {saved}; "
            f"registered: {registered})")


class StateRegistry(Registry[object]):
    """An ordered name -> hook map whose ``state_dict`` is the whole resumable state of a run.

    A ``Registry`` of hooks (duplicates refused, ``names``/``items``/``unregister``/``in``/``len``/``[]``) that also
    validates hooks on ``register`` and never imports a dotted path on ``get`` (hook names may hold dots).
    """

    def __init__(self, hooks: Mapping[str, object] | None = None):
        super().__init__("state hook")
        for name, hook in (hooks or {}).items():
            self.register(name, hook)

    def register(self, name: str, hook: object) -> object:
        """Add ``hook`` under ``name``; refuses taken names, unsafe names and objects that are not hooks."""
        check_hook(name, hook)
        return super().register(name, hook)

    def get(self, name: str) -> object:
        """The hook named ``name``; unlike ``Registry.get`` never imports a dotted path (names may hold dots)."""
        if name in self._items:
            return self._items[name]
        raise KeyError(
            f"no state hook named {name!r}; registered: {', '.join(self.names()) or '(none)'}"
        )

    def update(self, hooks: "Mapping[str, object] | StateRegistry") -> None:
        """Register every hook of ``hooks`` (a mapping or another registry); duplicates are refused."""
        for name, hook in hooks.items():
            self.register(name, hook)

    def keys(self) -> list[str]:
        """The registered names, in registration order (so the registry reads as a Mapping)."""
        return self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def state_dict(self) -> dict[str, Any]:
        """``{name: hook.state_dict()}`` for every hook, in registration order."""
        return {name: hook.state_dict() for name, hook in self.items()}  # type: ignore[attr-defined]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> dict[str, list[str]]:
        """Load each hook's part of ``state_dict``.

        With ``strict`` a missing or unexpected name raises ``StateMismatchError`` before any hook is touched;
        without it the common names are loaded and the rest reported. Returns ``{"missing": [...],
        "unexpected": [...]}``.
        """
        names = self.names()
        missing = [n for n in names if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self]
        problem = hook_name_mismatch(state_dict, names)
        if strict and problem:
            raise StateMismatchError(
                f"checkpoint state does not match the registered state hooks: {problem}. Register the same hooks "
                "as the run that saved it, or load with strict=False to load the common hooks and leave the others "
                "untouched."
            )
        for name in names:
            if name in state_dict:
                self.get(name).load_state_dict(state_dict[name])  # type: ignore[attr-defined]
        return {"missing": missing, "unexpected": unexpected}


# The process-wide registry of user hooks; recipes copy it into each run's registry.
_USER_HOOKS = StateRegistry()


def register_state_hook(name: str, obj: object) -> object:
    """Register a user hook that every run started afterwards in this process will checkpoint; returns ``obj``."""
    return _USER_HOOKS.register(name, obj)


def user_hooks() -> StateRegistry:
    """The process-wide registry filled by ``register_state_hook``."""
    return _USER_HOOKS


def hooks_from_factories(paths: list[str]) -> dict[str, object]:
    """Call each factory named by a dotted path (config ``state_hooks``) and merge the ``{name: hook}`` it returns.

    Every returned hook is validated; a name produced twice is refused.
    """
    if isinstance(paths, str):
        raise TypeError(f"state_hooks must be a list of dotted paths, got the string {paths!r}; write [{paths!r}]")
    out: dict[str, object] = {}
    for path in paths:
        factory = import_dotted(path)
        if not callable(factory):
            raise TypeError(f"state hook factory {path!r} is a {type(factory).__name__}, not a callable")
        made = factory()
        if not isinstance(made, Mapping):
            raise TypeError(
                f"state hook factory {path!r} returned {type(made).__name__}; it must return a dict "
                f"{{name: hook}} such as {{'my_buffer': MyBuffer()}}"
            )
        for name, hook in made.items():
            check_hook(name, hook)
            if name in out:
                raise KeyError(f"state hook {name!r} from factory {path!r} was already made by an earlier factory")
            out[name] = hook
    return out
