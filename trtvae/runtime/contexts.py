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


class ContextPool:
    def __init__(self, factory, max_items: int | None = None):
        self._factory = factory  # key -> new context holder; called once per key while it is kept
        self._max_items = max_items
        self._items: OrderedDict = OrderedDict()
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def acquire(self, key):
        with self._guard:
            item = self._items.get(key)
            if item is None:
                item = self._items[key] = (self._factory(key), threading.Lock())
                self._evict(keep=key)
            self._items.move_to_end(key)
        holder, lock = item
        with lock:
            yield holder

    def _evict(self, keep) -> None:
        if self._max_items is None:
            return
        for key in list(self._items):
            if len(self._items) <= self._max_items:
                return
            if key == keep:
                continue
            _, lock = self._items[key]
            if lock.acquire(blocking=False):  # never drop a context while someone uses it
                lock.release()
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._guard:
            self._items.clear()
