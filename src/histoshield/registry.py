"""One registry pattern for models, attacks, defenses and purifiers.

A `Registry` maps a normalised name to a class or builder; entries register themselves where they
are defined, with the `register` decorator (as timm's `register_model` does), and carry their
capabilities as attributes (an attack's `iterative`, `black_box`, `randomized`, `norm`; a
defense's or purifier's typed `schema`), so no caller classifies entries by name strings.

Examples:
    >>> reg = Registry("widget")
    >>> @reg.register
    ... class Blue:
    ...     name = "blue"
    >>> reg.get("BLUE") is Blue, reg.names()
    (True, ['blue'])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from histoshield.errors import HistoshieldError

T = TypeVar("T")


def normalise(name: str) -> str:
    """The registry key of a user-typed name: case and `_`/`-` do not matter."""
    return str(name).strip().lower().replace("_", "-")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind; `get` turns an unknown name into a one-line error."""

    def __init__(self, kind: str, *, normalise_names: bool = True) -> None:
        self.kind = kind
        self._norm = normalise_names
        self._entries: dict[str, T] = {}

    def _key(self, name: str) -> str:
        return normalise(name) if self._norm else str(name)

    def register(self, obj: T | None = None, *, name: str | None = None) -> Any:
        """Decorator (bare or with `name=`): add `obj` under `name` or its `name` attribute."""

        def add(o: T) -> T:
            key = self._key(name if name is not None else o.name)
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        """The entry registered as `name`; an unknown name raises HistoshieldError."""
        if not isinstance(name, str):
            raise HistoshieldError(f"{self.kind} name must be a string, got {name!r}")
        key = self._key(name)
        if key not in self._entries:
            raise HistoshieldError(
                f"unknown {self.kind} {name!r}: choose one of {', '.join(self.names())}"
            )
        return self._entries[key]

    def names(self) -> list[str]:
        """Registered names, sorted (so no listing depends on the order modules are imported)."""
        return sorted(self._entries)

    def schemas(self) -> dict[str, Any]:
        """name -> the entry's typed parameter `schema` (for `defenses.spec.parse_spec`)."""
        return {k: self._entries[k].schema for k in self.names()}  # type: ignore[attr-defined]

    def where(self, test: Callable[[T], bool]) -> list[str]:
        """Names of the entries for which `test(entry)` holds (e.g. a capability)."""
        return [k for k in self.names() if test(self._entries[k])]

    def __getitem__(self, name: str) -> T:
        return self._entries[self._key(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
