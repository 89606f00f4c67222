"""CUDA streams for execution-context slots, and the gate that keeps CUDA graph captures clean. Pure Python.

`torch.cuda.Stream()` hands out streams round-robin from a pool of 32 per device and priority, so two
slots (or a slot and another library) can receive the same stream. A capture records everything
launched onto its stream while it runs, whichever thread launched it; another slot's enqueue landing
there would be baked into the graph. Two rules follow: slots get streams no other live slot holds
(where the pool has one free), and no slot launches work while any capture runs.
"""
from __future__ import annotations

import contextlib
import threading


class CaptureGate:
    """Enqueues share the gate; a capture holds it alone. Writer-preferring, so captures are not starved.

    Not re-entrant: a thread inside `enqueue()` must not enter `capture()` or `enqueue()` again.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._running = 0
        self._capturing = False
        self._waiting = 0  # captures waiting; new enqueues wait behind them

    @contextlib.contextmanager
    def enqueue(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._capturing and not self._waiting)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def capture(self):
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: not self._capturing and self._running == 0)
            finally:
                self._waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()


class StreamSet:
    """Streams held by live slots, by handle; a new slot gets one no other live slot holds, where it can."""

    def __init__(self, make_stream, attempts: int = 32):
        self._make = make_stream  # () -> stream with a `cuda_stream` handle, e.g. torch.cuda.Stream(device)
        self._attempts = attempts  # torch's pool size: after that many draws every stream has come round
        self._held: dict = {}  # handle -> number of slots holding it
        self._guard = threading.Lock()

    def take(self):
        with self._guard:
            for _ in range(self._attempts):
                stream = self._make()
                if stream.cuda_stream not in self._held:
                    break
            # All in use: share one. Correct still (the slot's lock and the capture gate order the work),
            # only slower, since two slots' work then queues on one stream.
            self._held[stream.cuda_stream] = self._held.get(stream.cuda_stream, 0) + 1
            return stream

    def give_back(self, stream) -> None:
        with self._guard:
            left = self._held.get(stream.cuda_stream, 0) - 1
            if left > 0:
                self._held[stream.cuda_stream] = left
            else:
                self._held.pop(stream.cuda_stream, None)

    def __len__(self) -> int:
        return len(self._held)
