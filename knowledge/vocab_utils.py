"""Helpers shared by the vocabulary loaders (RadLex, SNOMED CT)."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Mapping


def descendants(children: Mapping[Hashable, list], starts: Iterable[Hashable]) -> set:
    """The starts and everything below them in an is-a graph (cycle-safe)."""
    seen = set(starts)
    queue = deque(seen)
    while queue:
        for child in children.get(queue.popleft(), ()):
            if child not in seen:
                seen.add(child)
                queue.append(child)
    return seen


def unique_names(names: Iterable[str], exclude: str) -> list[str]:
    """Names in order, without case-insensitive repeats or the preferred term ``exclude``."""
    seen = {exclude.casefold()}
    out = []
    for name in names:
        if name and name.casefold() not in seen:
            seen.add(name.casefold())
            out.append(name)
    return out
