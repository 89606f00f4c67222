"""Execution contexts shared between threads: one per (component, profile), each behind its own lock.

TensorRT contexts are not safe to use from two threads at once, and a context is bound to one
optimization profile. A lock per context keeps concurrent callers correct while calls on
different components or profiles still overlap; on one GPU, calls on the same engine would
queue on the device anyway.
"""
from __future__ import annotations

import contextlib
import threading


class ContextPool:
    def __init__(self, factory):
        self._factory = factory  # key -> new context holder; called once per key
        self._items: dict = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def acquire(self, key):
        with self._guard:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = (self._factory(key), threading.Lock())
        holder, lock = item
        with lock:
            yield holder

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._guard:
            self._items.clear()
