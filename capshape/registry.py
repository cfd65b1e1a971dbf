"""One generic registry for every kind of named component (tasks, objectives, models).

Modelled on lm-evaluation-harness's registry: duplicate names are rejected and an unknown
name gets a "did you mean" suggestion with the list of available names.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from capshape.errors import CapshapeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            self.add(name, item)
            return item

        return add

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise CapshapeError(f"Duplicate {self.kind} name '{name}': pick a different name.")
        self._items[name] = item

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CapshapeError(
                f"Unknown {self.kind} '{name}'.{hint} Available: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)
