"""TensorCache: host-side values derived from a tensor (a validation, panel offsets read back from
the device, a frozen weight's row norms), reused while that very tensor lives unchanged.

Keyed by the tensor object through a weak reference, plus its address and version counter. An
address-and-version key alone is not enough: the CUDA caching allocator hands a freed block
straight to the next tensor of that size, whose version starts where the old one's did, so a new
index (after a regrowth, or a fresh call) looked validated and reused the old one's offsets.
"""
from __future__ import annotations

import weakref

import torch


class TensorCache:
    def __init__(self, max_entries: int = 1024):
        self._entries: dict = {}
        self._max = max_entries

    @staticmethod
    def _state(t: torch.Tensor, extra) -> tuple:
        return (t.data_ptr(), t._version, tuple(t.shape), extra)

    def get(self, t: torch.Tensor, extra=()):
        """The value stored for ``t`` (this object, same storage and version, same ``extra``), else None."""
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != self._state(t, extra):
            return None
        return entry[2]

    def put(self, t: torch.Tensor, value, extra=()):
        if len(self._entries) >= self._max:
            self._entries.clear()
        self._entries[id(t)] = (weakref.ref(t), self._state(t, extra), value)
        return value

    def __getstate__(self):  # copies and pickles start empty (weak references do not travel)
        return {"_entries": {}, "_max": self._max}
