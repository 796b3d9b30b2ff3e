"""Intensity windows: floating point all the way, Slicer's width/level semantics."""

from __future__ import annotations

import numpy as np
import pytest

from MedFMLib.errors import MedFMError
from MedFMLib.imaging.intensity import (
    CT_PRESETS,
    Window,
    parse_window,
    percentile_window,
    preset_window,
    resolve_window,
)


def test_window_maps_level_and_edges():
    window = Window(400, 40)
    values = np.array([-1000, -160, 40, 240, 3000], np.int16)
    np.testing.assert_allclose(window.apply(values), [0, 0, 0.5, 1, 1])
    assert window.apply(values).dtype == np.float32


def test_no_8_bit_quantisation():
    """Values 0.1 HU apart inside a wide window stay distinct; 8 bits would merge them."""
    values = np.arange(0, 2, 0.1, dtype=np.float32)
    mapped = Window(2000, 0).apply(values)
    assert len(np.unique(mapped)) == len(values)
    assert len(np.unique(np.round(mapped * 255))) == 1  # what an 8-bit frame would have kept


def test_presets_and_parsing():
    assert set(CT_PRESETS) == {"soft_tissue", "lung", "bone", "brain"}
    assert preset_window("Soft-Tissue") == Window(400, 40)
    assert preset_window("lung").level < 0
    with pytest.raises(MedFMError, match="Unknown intensity preset"):
        preset_window("liver")
    assert parse_window("350,50") == Window(350, 50)
    with pytest.raises(MedFMError, match="WIDTH,LEVEL"):
        parse_window("350")
    with pytest.raises(MedFMError, match="positive"):
        Window(-1, 0)


def test_percentile_window_is_robust_to_outliers():
    rng = np.random.default_rng(0)
    mr = rng.normal(300, 50, (20, 64, 64)).astype(np.float32)
    mr[0, 0, :10] = 1e6  # a few hot pixels
    window = percentile_window(mr)
    # 0.5 and 99.5 percentiles of N(300, 50): 300 ± 2.58 × 50; the hot pixels do not stretch it.
    assert window.low == pytest.approx(171, abs=5) and window.width == pytest.approx(258, abs=10)
    assert percentile_window(np.full((2, 2, 2), 7.0)).apply(np.array([7.0]))[0] == 0.0


def test_resolution_order():
    array = np.linspace(0, 100, 1000).reshape(10, 10, 10)
    assert resolve_window(array, Window(10, 5)) == Window(10, 5)
    assert resolve_window(array, preset="bone") == preset_window("bone")
    assert resolve_window(array).width == pytest.approx(99.0, rel=0.01)
    with pytest.raises(MedFMError, match="not both"):
        resolve_window(array, Window(1, 1), preset="bone")
