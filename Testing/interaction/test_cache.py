"""The embedding cache: one encode per slice, LRU eviction within a memory budget."""

from __future__ import annotations

import numpy as np
import pytest

from MedFMLib.engines.base import Embedding
from MedFMLib.engines.classic import ClassicEngine
from MedFMLib.imaging.geometry import plane_through
from MedFMLib.imaging.intensity import Window
from MedFMLib.imaging.phantoms import make_ijk_to_ras
from MedFMLib.imaging.volume import Volume
from MedFMLib.interaction.cache import EmbeddingCache, EmbeddingKey
from MedFMLib.interaction.session import Session


def _key(index: int, **overrides) -> EmbeddingKey:
    fields = dict(volume="v", axis=2, index=index, engine="e", window=(1.0, 0.5), image_shape=(8, 8))
    fields.update(overrides)
    return EmbeddingKey(**fields)


def _embedding(nbytes: int) -> Embedding:
    return Embedding(features=np.zeros(nbytes, np.uint8), image_shape=(8, 8), nbytes=nbytes)


def test_hits_misses_and_lru_eviction():
    cache = EmbeddingCache(budget_bytes=300)
    for index in range(3):
        cache.put(_key(index), _embedding(100))
    assert len(cache) == 3 and cache.nbytes == 300
    assert cache.get(_key(0)) is not None  # 0 becomes most recently used
    cache.put(_key(3), _embedding(100))  # evicts 1, the least recently used
    assert _key(1) not in cache and _key(0) in cache and _key(3) in cache
    assert cache.get(_key(1)) is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 1, 1)
    cache.put(_key(4), _embedding(250))  # needs room for 250: everything older goes
    assert list(cache._entries) == [_key(4)] and cache.nbytes == 250
    cache.put(_key(5), _embedding(1000))  # larger than the budget alone: kept, it is in use
    assert _key(5) in cache and len(cache) == 1
    with pytest.raises(ValueError):
        EmbeddingCache(0)


def test_replacing_an_entry_keeps_the_byte_count():
    cache = EmbeddingCache(budget_bytes=1000)
    cache.put(_key(0), _embedding(100))
    cache.put(_key(0), _embedding(300))
    assert cache.nbytes == 300 and len(cache) == 1


def test_keys_separate_volume_axis_slice_engine_and_window():
    base = _key(0)
    variants = [
        _key(0, volume="w"),
        _key(0, axis=1),
        _key(1),
        _key(0, engine="other"),
        _key(0, window=(2.0, 0.5)),
        _key(0, image_shape=(8, 9)),
    ]
    assert len({base, *variants}) == 7


class CountingEngine(ClassicEngine):
    def __init__(self):
        super().__init__()
        self.encodes = 0

    def encode(self, image):
        self.encodes += 1
        return super().encode(image)


def test_session_encodes_each_slice_once_per_window():
    volume = Volume(np.random.default_rng(0).normal(100, 20, (6, 32, 32)).astype(np.float32), make_ijk_to_ras())
    engine = CountingEngine()
    cache = EmbeddingCache()
    session = Session(volume, engine, window=Window(200, 100), cache=cache)
    obj = session.add_object()
    centre = volume.ijk_to_ras_points(np.array([16.0, 16.0, 2.0]))
    for dx in range(5):
        session.add_point(obj, centre + np.array([dx * 0.5, 0, 0]))
    assert engine.encodes == 1
    session.add_point(obj, volume.ijk_to_ras_points(np.array([16.0, 16.0, 3.0])))
    assert engine.encodes == 2
    # Another session on the same volume, engine and window shares the cache.
    other = Session(volume, engine, window=Window(200, 100), cache=cache)
    other.add_point(other.add_object(), centre)
    assert engine.encodes == 2
    # A different window is a different picture: encoded again.
    windowed = Session(volume, engine, window=Window(50, 100), cache=cache)
    windowed.add_point(windowed.add_object(), centre)
    assert engine.encodes == 3
    assert session.is_encoded(plane_through(volume, centre, "axial"))


def test_budget_bounds_a_session_scrolling_through_slices():
    volume = Volume(np.zeros((12, 16, 16), np.float32), make_ijk_to_ras())
    engine = CountingEngine()
    one_slice = 16 * 16 * 4
    cache = EmbeddingCache(budget_bytes=3 * one_slice)
    session = Session(volume, engine, window=Window(1, 0), cache=cache)
    obj = session.add_object()
    for k in range(12):
        session.add_point(obj, volume.ijk_to_ras_points(np.array([8.0, 8.0, k])))
    assert len(cache) == 3 and cache.nbytes <= cache.budget_bytes
    assert cache.stats.evictions == 9
    session.add_point(obj, volume.ijk_to_ras_points(np.array([8.0, 8.0, 0.0])))  # evicted: encoded again
    assert engine.encodes == 13
