"""Execution contexts shared between threads: one per key (component, profile[, shape]), each behind its own lock.

TensorRT contexts are not safe to use from two threads at once, and a context is bound to one
optimization profile. A lock per context keeps concurrent callers correct while calls on
different components or profiles still overlap; on one GPU, calls on the same engine would
queue on the device anyway. With a size bound, the least recently used idle context is dropped.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict


class _Entry:
    def __init__(self, holder):
        self.holder = holder
        self.lock = threading.Lock()
        self.users = 0  # handed out and not yet returned; counted under the pool's guard


class ContextPool:
    def __init__(self, factory, max_items: int | None = None, on_evict=None):
        self._factory = factory  # key -> new context holder; called once per key while it is kept
        self._max_items = max_items
        self._on_evict = on_evict  # holder -> None, e.g. wait for its GPU work before it is dropped
        self._items: OrderedDict = OrderedDict()
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def acquire(self, key):
        with self._guard:
            entry = self._items.get(key)
            if entry is None:
                entry = self._items[key] = _Entry(self._factory(key))
            entry.users += 1
            self._items.move_to_end(key)
            evicted = self._evict()
        for holder in evicted:
            self._on_evict(holder)
        try:
            with entry.lock:
                yield entry.holder
        finally:
            with self._guard:
                entry.users -= 1

    def _evict(self) -> list:
        if self._max_items is None:
            return []
        dropped = []
        for key in list(self._items):
            if len(self._items) <= self._max_items:
                break
            if self._items[key].users == 0:  # never drop a context someone holds or waits for
                dropped.append(self._items.pop(key).holder)
        return dropped if self._on_evict else []

    def __len__(self) -> int:
        return len(self._items)
