"""A small name -> class registry, used for mask methods and reconstruction strategies."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes registered under their ``name`` attribute; a bad name lists the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Register ``cls`` under ``cls.name`` (lower-case, unique). Usable as a decorator."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or name != name.lower():
            raise ValueError(f"{cls.__name__}.name must be a non-empty lower-case string, got {name!r}.")
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._classes[name].__name__}).")
        self._classes[name] = cls
        return cls

    def create(self, name: str) -> T:
        """An instance of the class registered as ``name``."""
        try:
            return self._classes[name]()
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}: choose one of {', '.join(sorted(self))}.") from None

    def get(self, name: str, default=None):
        return self._classes.get(name, default)

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]

    def __setitem__(self, name: str, cls: type[T]) -> None:  # lets tests swap in a spy
        self._classes[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)
