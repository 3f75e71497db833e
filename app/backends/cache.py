"""Bounded LRU cache of image features, keyed by a hash of the uploaded bytes.

Questions about an image already seen skip decoding *and* the image encoder, the expensive
half of the model. Bounded by entries and by bytes; thread-safe (the event loop reads it, the
forward thread fills it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class FeatureCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max(0, max_entries)
        self.max_bytes = max(0, max_bytes)
        self._data: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: bytes) -> torch.Tensor | None:
        if not self.enabled:
            return None
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        if not self.enabled:
            return
        # Own a compact CPU copy: a view would pin the whole batch tensor it came from.
        value = value.detach().to("cpu", copy=True).contiguous()
        size = value.element_size() * value.nelement()
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old.element_size() * old.nelement()
            self._data[key] = value
            self._bytes += size
            while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._data.popitem(last=False)
                self._bytes -= evicted.element_size() * evicted.nelement()

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
