"""One generic name → value registry behind every ``register_*`` / ``build_*`` pair.

Models, data sources, losses, schedules, optimizers, tasks, report sections and doctor
checks all map a config value to something registered at import time. :class:`Registry`
gives them one duplicate-name check and one unknown-name message, so that every one of
them suggests the nearest name and lists the choices the same way.

A ground-floor module: it imports only the standard library and
:mod:`visiontrain.errors`, so any area may use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from visiontrain.errors import ConfigError, UserError, did_you_mean

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[T]):
    """Named values of one kind, with a user-facing error for an unknown name.

    Example::

        _SCHEDULES: Registry[Builder] = Registry("schedule", key="schedule.name")
        _SCHEDULES.register("cosine", build_cosine)
        _SCHEDULES.get("cosin")  # ConfigError: unknown schedule `schedule.name=cosin`
                                 # — did you mean `cosine`? Choose one of: cosine, ...
    """

    def __init__(
        self, kind: str, key: str | None = None, error: type[UserError] = ConfigError
    ) -> None:
        """Create an empty registry.

        Args:
            kind: what an entry is, for messages: ``"model"``, ``"data source"``...
            key: the config key whose value names an entry (``"model.name"``), shown in
                the unknown-name message; None when the name is not a config value.
            error: the :class:`~visiontrain.errors.UserError` raised for an unknown name.
        """
        self.kind = kind
        self.key = key
        self.error = error
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: T) -> T:
        """Add ``value`` under ``name`` and return it.

        Raises:
            ValueError: ``name`` is already registered. This is a programming error (two
                modules claim one name), not bad input, so it is no ``UserError``.
        """
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = value
        return value

    def decorator(self, name: str, make: Callable[[F], T] | None = None) -> Callable[[F], F]:
        """A decorator that registers the function it wraps under ``name``.

        Args:
            name: the registered name.
            make: turns the function into the stored value (e.g. an entry that also holds
                the config keys it honours); None stores the function itself.

        Returns:
            A decorator that returns the function unchanged, so it stays callable.
        """

        def deco(fn: F) -> F:
            # Without ``make`` the registry's T is the function type itself.
            self.register(name, make(fn) if make is not None else fn)  # type: ignore[arg-type]
            return fn

        return deco

    def get(self, name: str) -> T:
        """The value registered under ``name``.

        Raises:
            UserError: (the registry's ``error`` class) ``name`` is not registered; the
                message suggests the nearest name and lists the choices.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise self.unknown(name) from None

    def find(self, name: str) -> T | None:
        """The value registered under ``name``, or None where a missing entry is fine.

        For optional lookups such as a task without a report section.
        """
        return self._entries.get(name)

    @contextmanager
    def override(self, name: str, value: T) -> Iterator[T]:
        """Register ``value`` under ``name`` for the ``with`` block, then restore the old one.

        For tests that swap one entry (a check that fails on purpose); registration
        proper never replaces an entry.
        """
        missing = object()
        old = self._entries.get(name, missing)
        self._entries[name] = value
        try:
            yield value
        finally:
            if old is missing:
                del self._entries[name]
            else:
                self._entries[name] = old  # type: ignore[assignment]

    def unknown(
        self,
        name: str,
        among: Iterable[str] | None = None,
        kind: str | None = None,
        tail: str | None = None,
    ) -> UserError:
        """The error for a name that does not resolve, for callers that narrow the choice.

        ``create_model`` for a detection task, for instance, suggests only detection
        models; ``get`` uses the defaults.

        Args:
            name: the name that was asked for.
            among: the names to suggest from and list; all registered names when None.
            kind: what to call the entry in the message; the registry's kind when None.
            tail: a sentence that replaces ``Choose one of: ...`` (e.g. where other
                spellings, such as timm names, also resolve).

        Returns:
            The error, for the caller to raise (so tracebacks point at the caller).
        """
        choices = sorted(self._entries if among is None else among)
        named = f"{self.key}={name}" if self.key else name
        if tail is None:
            tail = f"Choose one of: {', '.join(choices) or '(none registered)'}."
        # The `unknown <kind>` opening is what users (and tests) grep for; did_you_mean
        # gives "" when nothing is close, leaving the sentence whole.
        return self.error(
            f"unknown {kind or self.kind} `{named}`{did_you_mean(name, choices) or '.'} {tail}"
        )

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, value)`` pairs, sorted by name."""
        return sorted(self._entries.items(), key=lambda item: item[0])

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered."""
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """Registered names in registration order (the order checks run in, say)."""
        return iter(list(self._entries))

    def __len__(self) -> int:
        """How many names are registered."""
        return len(self._entries)

    def __repr__(self) -> str:
        """``Registry('schedule', 8 entries)``."""
        return f"Registry({self.kind!r}, {len(self)} entries)"
