"""Ends playground sessions that sat idle past their time to live.

Gradio deletes a State `time_to_live` after its last change only while its session is open; once
the tab or API client has gone, it keeps the state an hour whatever the TTL. Media frames and
features are too big for that, so the playground ends idle sessions itself.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable


class IdleSweeper:
    """Calls `end(state)` on states not touched for `ttl_s` seconds, checking every `period_s`."""

    def __init__(self, ttl_s: float, end: Callable[[object], None], period_s: float | None = None):
        self.ttl_s = float(ttl_s)
        self.period_s = period_s if period_s is not None else min(60.0, max(1.0, self.ttl_s / 10))
        self._end = end
        self._last: dict[int, tuple[weakref.ref, float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def touch(self, state) -> None:
        with self._lock:
            self._last[id(state)] = (weakref.ref(state), time.monotonic())
            if self._thread is None:  # started on first use, so building a demo starts no thread
                self._thread = threading.Thread(target=self._run, name="session-expiry", daemon=True)
                self._thread.start()

    def forget(self, state) -> None:
        with self._lock:
            self._last.pop(id(state), None)

    def sweep(self) -> int:
        """End every state idle past the TTL; returns how many ended."""
        now = time.monotonic()
        with self._lock:
            gone = [k for k, (ref, last) in self._last.items() if now - last > self.ttl_s or ref() is None]
            idle = [self._last.pop(k)[0] for k in gone]
        ended = [state for ref in idle if (state := ref()) is not None]
        for state in ended:
            self._end(state)
        return len(ended)

    def _run(self) -> None:
        while True:
            time.sleep(self.period_s)
            self.sweep()
