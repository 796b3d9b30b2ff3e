"""An LRU cache of slice embeddings, bounded by a memory budget.

Encoding a slice is the expensive step (seconds on a CPU for SAM ViT-B);
decoding a click is cheap. A slice is therefore encoded once per
(volume, axis, slice index, engine, intensity window, image size) and every
further click on it costs only the decoder.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..engines.base import Embedding

DEFAULT_BUDGET_BYTES = 1 << 30  # 1 GiB: ~500 SAM embeddings in float16, ~250 in float32


@dataclass(frozen=True)
class EmbeddingKey:
    volume: str
    axis: int
    index: int
    engine: str
    window: tuple[float, float]
    image_shape: tuple[int, int]
    #: a window of the slice (row, col, rows, cols) encoded on its own; None for the whole slice
    crop: tuple[int, int, int, int] | None = None


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class EmbeddingCache:
    """Least-recently-used embeddings, evicted once their total size exceeds the budget."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, headroom: Callable[[], int] | None = None) -> None:
        """``headroom()``, if given, says how many more bytes may be used beyond what is in use now (a server's
        memory shared by many sessions' caches): the cache then keeps to the smaller of its budget and that."""
        if budget_bytes <= 0:
            raise ValueError("the cache budget must be positive")
        self.budget_bytes = int(budget_bytes)
        self.headroom = headroom
        self.stats = CacheStats()
        self._entries: OrderedDict[EmbeddingKey, Embedding] = OrderedDict()
        self._bytes = 0
        # Background encoders (the Slicer module) share one cache with the GUI thread.
        self._lock = threading.RLock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: EmbeddingKey) -> bool:
        return key in self._entries

    def keys(self) -> list[EmbeddingKey]:
        """The keys held, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, key: EmbeddingKey) -> Embedding | None:
        with self._lock:
            embedding = self._entries.get(key)
            if embedding is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return embedding

    def put(self, key: EmbeddingKey, embedding: Embedding) -> None:
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key).nbytes
            self._entries[key] = embedding
            self._bytes += embedding.nbytes
            limit = self.budget_bytes
            if self.headroom is not None:  # the new entry is counted in use already
                limit = min(limit, self._bytes + self.headroom())
            # Always keep the newest entry, even if it alone exceeds the budget:
            # the click that asked for it is about to use it.
            while self._bytes > limit and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.stats.evictions += 1

    def get_or_create(self, key: EmbeddingKey, create: Callable[[], Embedding]) -> Embedding:
        embedding = self.get(key)
        if embedding is None:
            embedding = create()
            self.put(key, embedding)
        return embedding

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
