"""One memory budget for the features that every open session keeps (vision tokens, SAM 2 frames).

Each session reports what its cache holds after a call; when the total passes the budget the least
recently used sessions drop theirs and recompute them on their next call, with the same results.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

GB = 1024**3


def default_cache_bytes(device) -> int:
    """A quarter of a GPU's memory (the weights and one call's activations need the rest), 4 GB elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return 4 * GB


class CacheBudget:
    """Least-recently-used eviction of session caches over `max_bytes` (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._sizes: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()  # id(owner) -> (owner, bytes)
        self._lock = threading.RLock()  # a weakref callback may run (GC) while the lock is held

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._sizes.values())

    def charge(self, owner, nbytes: int) -> list:
        """`owner` (with a `drop_cache()` method) now holds `nbytes`; returns the owners evicted."""
        with self._lock:
            key = id(owner)
            self._sizes.pop(key, None)
            self._sizes[key] = (weakref.ref(owner, lambda _, key=key: self._forget(key)), int(nbytes))
            evicted, total = [], sum(size for _, size in self._sizes.values())
            for other, (ref, size) in list(self._sizes.items()):
                if total <= self.max_bytes or other == key:  # the caller's own cache is the one in use
                    break
                del self._sizes[other]
                total -= size
                if (victim := ref()) is not None:
                    evicted.append(victim)
        for victim in evicted:
            victim.drop_cache()
        return evicted

    def release(self, owner) -> None:
        """`owner` holds nothing any more (its session ended or was reset to new media)."""
        self._forget(id(owner))

    def _forget(self, key: int) -> None:
        with self._lock:
            self._sizes.pop(key, None)
