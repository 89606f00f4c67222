"""Execution contexts shared between threads: one per key (component, profile[, shape]), each behind its own lock.

TensorRT contexts are not safe to use from two threads at once, and a context is bound to one
optimization profile. A lock per context keeps concurrent callers correct while calls on
different components or profiles still overlap; on one GPU, calls on the same engine would
queue on the device anyway. With a bound on their number or on the bytes they hold, the least
recently used idle contexts are dropped.
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
    def __init__(self, factory, max_items: int | None = None, on_evict=None, max_bytes: int | None = None,
                 size_of=None):
        self._factory = factory  # key -> new context holder; called once per key while it is kept
        self._max_items = max_items
        self._on_evict = on_evict  # holder -> None, e.g. wait for its GPU work before it is dropped
        # A holder's memory is known only after its first use (sized for the shapes it ran), so the byte
        # bound is also applied when a holder is returned.
        self._max_bytes = max_bytes
        self._size_of = size_of or (lambda holder: 0)  # holder -> bytes of device memory it pins
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
                evicted = self._evict() if self._max_bytes is not None else []
            for holder in evicted:
                self._on_evict(holder)

    def held_bytes(self) -> int:
        with self._guard:
            return sum(self._size_of(e.holder) for e in self._items.values())

    def _over(self) -> bool:
        if self._max_items is not None and len(self._items) > self._max_items:
            return True
        return self._max_bytes is not None and sum(self._size_of(e.holder) for e in self._items.values()) > \
            self._max_bytes

    def _evict(self) -> list:
        if self._max_items is None and self._max_bytes is None:
            return []
        dropped = []
        # The most recently used one stays even alone over the byte budget: dropping it would only make
        # the same call rebuild it next time.
        for key in list(self._items)[:-1]:
            if not self._over():
                break
            if self._items[key].users == 0:  # never drop a context someone holds or waits for
                dropped.append(self._items.pop(key).holder)
        return dropped if self._on_evict else []

    def __len__(self) -> int:
        return len(self._items)
