"""Sizes of weight matrices on rows, from the rows' Gram matrix, and the merge's growth figure."""

from __future__ import annotations

import pytest
import torch

from cdtool.merge.gram_norms import LayerSizes, SizeSketch, gram_root, largest_growth, sizes_on


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


def test_the_sketch_estimates_sizes_without_bias_and_within_its_error():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(500, 64, generator=g, dtype=torch.float64) * torch.linspace(0.01, 3, 64, dtype=torch.float64)
    gram = rows.T @ rows
    m = torch.randn(40, 64, generator=g, dtype=torch.float64)
    exact = float(torch.linalg.norm(m @ rows.T)) ** 2
    estimates = [SizeSketch(gram, columns=32, seed=s).sizes([m])[0] ** 2 for s in range(200)]
    # each draw within a few of its standard deviations (sqrt(2/k) at most); their mean near exact
    assert all(abs(e / exact - 1) < 4 * (2 / 32) ** 0.5 for e in estimates)
    assert sum(estimates) / len(estimates) / exact == pytest.approx(1.0, abs=0.03)
    assert SizeSketch(gram).sizes([m])[0] ** 2 / exact == pytest.approx(1.0, abs=4 * (2 / 256) ** 0.5)


def test_gram_root_factorises_full_and_rank_deficient_grams():
    g = torch.Generator().manual_seed(2)
    for n in (100, 5):  # 5 rows in 16 dimensions: singular
        rows = torch.randn(n, 16, generator=g, dtype=torch.float64)
        root = gram_root(rows.T @ rows)
        assert torch.allclose(root @ root.T, rows.T @ rows, atol=1e-8 * float((rows.T @ rows).abs().max()))
