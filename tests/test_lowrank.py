"""SVD compression: Eckart–Young, rank selection, capping."""

from __future__ import annotations

import pytest
import torch

from cdtool.delta.lowrank import factors_are_larger, rank_for_energy, rank_for_fro, truncate


def _matrix(seed=0, out=40, inp=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g)


@pytest.mark.parametrize("k", [1, 3, 10, 24])
def test_error_equals_discarded_singular_values(k):
    m = _matrix()
    t = truncate(m, rank=k)
    s = torch.linalg.svdvals(m.double())
    err = torch.linalg.norm(m.double() - t.up.double() @ t.down.double())
    assert abs(float(err) - float(s[k:].pow(2).sum().sqrt())) < 1e-4
    assert t.rank == k and t.up.shape == (40, k) and t.down.shape == (k, 24)


def test_rank_above_size_is_capped():
    t = truncate(_matrix(), rank=100)
    assert t.rank == 24 and t.capped
    assert torch.allclose(t.up @ t.down, _matrix(), atol=1e-5)


def test_energy_one_reproduces_input():
    m = _matrix(1)
    t = truncate(m, energy=1.0)
    assert t.rank == 24 and torch.allclose(t.up @ t.down, m, atol=1e-5)


def test_share_selection_is_the_smallest_rank_reaching_it():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert rank_for_energy(s, 0.6) == 2  # 0.4, 0.7 -> the official off-by-one would keep 1
    assert rank_for_energy(s, 0.7) == 2
    assert rank_for_energy(s, 0.71) == 3
    assert rank_for_fro(s, (16 / 30) ** 0.5) == 1
    m = _matrix(2)
    t = truncate(m, fro=0.9)
    assert t.fro >= 0.9
    assert truncate(m, rank=t.rank - 1).fro < 0.9


def test_compressing_a_compressed_matrix():
    m = _matrix(3)
    t = truncate(m, rank=8)
    again = truncate(t.up @ t.down, rank=8)
    assert torch.allclose(again.up @ again.down, t.up @ t.down, atol=1e-4)
    assert abs(again.fro - 1.0) < 1e-6


def test_randomized_matches_exact_on_low_rank_input():
    g = torch.Generator().manual_seed(4)
    low = torch.randn(64, 5, generator=g) @ torch.randn(5, 48, generator=g)
    t = truncate(low, rank=5, method="randomized")
    assert torch.allclose(t.up @ t.down, low, atol=1e-3)


def test_factors_are_larger_from_the_break_even_rank():
    # a 320x768 layer holds 245760 numbers; rank-k factors hold k * 1088: break-even at k = 225.88
    assert [factors_are_larger((320, 768), k) for k in (1, 225, 226, 320)] == [False, False, True, True]
    assert factors_are_larger((32, 32), 16) and not factors_are_larger((32, 32), 15)


def test_compress_delta_truncates_every_layer_and_keeps_the_rest():
    from cdtool.delta.file import Delta, LayerDelta
    from cdtool.delta.lowrank import compress_delta

    g = torch.Generator().manual_seed(3)
    low = torch.randn(40, 2, generator=g) @ torch.randn(2, 24, generator=g)  # rank 2 exactly
    small = torch.randn(3, 4, generator=g)  # rank-3 factors (3 x 7 = 21) hold more than 3 x 4 = 12
    bias = torch.randn(40, generator=g)
    delta = Delta(
        layers={"unet.b.to_k": LayerDelta(full=low, bias=bias), "unet.a.to_v": LayerDelta(full=small)},
        tokens={"<new1>": torch.ones(1, 24)},
        base_model="tiny",
        base_fingerprint="f" * 64,
        concepts=[{"token": "<new1>"}],
        provenance={"train": {"steps_run": 3}},
    )
    done = compress_delta(delta, rank=8, dtype=torch.float16)
    assert list(done.layers) == ["unet.a.to_v", "unet.b.to_k"] and done.capped == ["unet.a.to_v"]
    k = done.delta.layers["unet.b.to_k"]
    # a rank-2 ΔW keeps rank 2 (its other singular values are zero): reproduced up to fp16 rounding
    assert done.layers["unet.b.to_k"]["rank"] == 8 and k.up.dtype == torch.float16 and k.rank == 8
    assert torch.allclose(k.up.float() @ k.down.float(), low, atol=2e-2 * float(low.abs().max()))
    assert done.layers["unet.b.to_k"]["energy"] > 0.999 and torch.equal(k.bias, bias)
    assert done.layers["unet.b.to_k"]["bytes"] == 8 * (40 + 24) * 2 + 40 * 4
    v = done.delta.layers["unet.a.to_v"]  # stored dense, and whole since nothing was cut
    assert v.full is not None and torch.equal(v.full, small.half())
    assert done.layers["unet.a.to_v"] == {
        "rank": 3,
        "energy": pytest.approx(1.0),
        "fro": pytest.approx(1.0),
        "shape": [3, 4],
        "was_rank": None,
        "stored": "dense",
        "bytes": 12 * 2,
    }
    out = done.delta
    assert out.tokens is delta.tokens and out.concepts == delta.concepts and out.base_fingerprint == "f" * 64
    assert out.provenance == {"train": {"steps_run": 3}} and out.provenance is not delta.provenance


def test_compress_delta_by_energy_keeps_the_smallest_rank_reaching_it():
    from cdtool.delta.file import Delta, LayerDelta
    from cdtool.delta.lowrank import compress_delta

    u, _ = torch.linalg.qr(_matrix(4, 30, 30))
    v, _ = torch.linalg.qr(_matrix(5, 20, 20))
    m = (u[:, :4] * torch.tensor([4.0, 3.0, 2.0, 1.0])) @ v[:, :4].T  # singular values 4, 3, 2, 1
    done = compress_delta(Delta(layers={"unet.x": LayerDelta(full=m)}), energy=0.6)
    row = done.layers["unet.x"]
    assert row["rank"] == 2 and row["energy"] == pytest.approx(0.7) and row["stored"] == "factors"
    assert row["fro"] == pytest.approx((25 / 30) ** 0.5)
