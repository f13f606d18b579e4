"""Sizes of weight matrices on rows, from the rows' Gram matrix, and the merge's growth figure."""

from __future__ import annotations

import pytest
import torch

from cdtool.gram_norms import LayerSizes, largest_growth, sizes_on


def test_sizes_equal_the_norms_of_the_outputs():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 32, generator=g, dtype=torch.float64)
    mats = [torch.randn(o, 32, generator=g, dtype=torch.float64) for o in (8, 1, 20)]
    sizes = sizes_on(rows.T @ rows, mats)
    for size, m in zip(sizes, mats, strict=True):
        assert size == pytest.approx(float(torch.linalg.norm(m @ rows.T)), rel=1e-5)
    assert sizes_on(rows.T @ rows, []) == []


def test_largest_growth_names_the_layer_and_skips_untouched_ones():
    layers = {
        "a": LayerSizes(merged=2.0, inputs=[1.0, 0.5]),
        "b": LayerSizes(merged=30.0, inputs=[0.1, 3.0]),
        "c": LayerSizes(merged=5.0, inputs=[0.0]),  # no input changes it: no ratio
        "d": LayerSizes(merged=1.0, inputs=[]),
    }
    assert largest_growth(layers) == (10.0, "b")
    assert largest_growth({}) == (0.0, None)
