"""A bounded mapping that forgets the least recently used entry first.

Reading an entry (`get`) or writing it (`put`) makes it the most recent;
`peek` and `in` do not. `put` past `capacity` drops the least recent entries
and returns them, oldest first, so that an owner holding something that must
be released (a process, a file) can release it. Not thread-safe: the registry
uses it from the event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most `capacity` entries; the least recently used goes first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first."""
        return iter(self._entries)

    def get(self, key: K) -> V | None:
        """The value (now the most recent), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The value, leaving the order as it is."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> list[tuple[K, V]]:
        """Keep `value` as the most recent; the entries dropped to stay within capacity, oldest first."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        dropped = []
        while len(self._entries) > self.capacity:
            dropped.append(self._entries.popitem(last=False))
        return dropped

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def values(self) -> list[V]:
        """The values, least recently used first."""
        return list(self._entries.values())

    def items(self) -> list[tuple[K, V]]:
        """The entries, least recently used first."""
        return list(self._entries.items())

    def clear(self) -> None:
        self._entries.clear()
