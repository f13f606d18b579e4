"""Size augmentation, the masked loss and the DVAR statistic."""

from __future__ import annotations

import statistics

import torch

from cdtool.train.augment import FAR, NEAR, augment, draw_scale, place
from cdtool.train.losses import custom_diffusion_loss, dvar, masked_mse


def test_scale_distribution():
    g = torch.Generator().manual_seed(0)
    scales = [draw_scale(512, g) for _ in range(6000)]
    small = [s for s in scales if s <= 512]
    assert abs(len(small) / len(scales) - 2 / 3) < 0.02
    assert min(small) == 512 // 3 and max(small) == 512
    big = [s for s in scales if s > 512]
    assert min(big) >= int(1.2 * 512) and max(big) < int(1.4 * 512)


def test_paste_mask_and_prompt_words():
    g = torch.Generator().manual_seed(1)
    img = torch.ones(3, 64, 64)
    canvas, mask = place(img, 64, 24, 8, torch.Generator().manual_seed(3))
    # the pasted box is exactly where the image is
    ys, xs = torch.nonzero(canvas[0] > 0.5, as_tuple=True)
    top, left = int(ys.min()), int(xs.min())
    assert int(ys.max()) - top + 1 == 24 and int(xs.max()) - left + 1 == 24
    assert float(canvas.sum()) == 3 * 24 * 24  # zero canvas elsewhere
    expect = torch.zeros(8, 8)
    expect[top // 8 + 1 : (top + 24) // 8 - 1, left // 8 + 1 : (left + 24) // 8 - 1] = 1
    assert torch.equal(mask, expect)
    for _ in range(200):
        a = augment(img, 64, 8, g)
        if a.scale < 0.6 * 64:
            assert a.prefix in FAR
        elif a.scale > 64:
            assert a.prefix in NEAR and torch.equal(a.mask, torch.ones(8, 8))
        else:
            assert a.prefix == ""
    off = augment(img, 64, 8, g, enabled=False)
    assert off.prefix == "" and torch.equal(off.mask, torch.ones(8, 8)) and torch.allclose(off.image, img)


def test_masked_mse_against_direct_computation():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = (torch.rand(2, 8, 8, generator=g) > 0.5).float()
    direct = []
    for b in range(2):
        sel = mask[b].bool()
        direct.append(((pred[b] - target[b]) ** 2)[:, sel].sum() / sel.sum())
    assert torch.allclose(masked_mse(pred, target, mask), torch.stack(direct).mean())
    # the reference's channel factor: a full mask gives C times the plain mean
    assert torch.allclose(masked_mse(pred, target, torch.ones(2, 8, 8)), 4 * ((pred - target) ** 2).mean())


def test_dvar():
    assert dvar([1.0, 2.0], 3) is None
    assert dvar([0.5] * 10, 4) == 0.0
    losses = [1.0, 0.8, 0.6, 0.5, 0.45, 0.44, 0.44, 0.45, 0.44]
    expect = statistics.variance(losses[-4:]) / statistics.variance(losses)
    assert abs(dvar(losses, 4) - expect) < 1e-12


def test_custom_diffusion_loss_weighs_a_regularisation_image_as_a_full_instance_view():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 8, 8)
    mask[0, 2:6, 2:6] = 1
    mask[1] = 1
    per_image = [((pred[i] - target[i]) ** 2).sum(0) for i in range(4)]  # summed over channels
    instance = ((per_image[0] * mask[0]).sum() / mask[0].sum() + per_image[1].mean()) / 2
    prior = (per_image[2].mean() + per_image[3].mean()) / 2
    assert torch.allclose(custom_diffusion_loss(pred, target, mask, 0.5), instance + 0.5 * prior)
    # the same image counts the same whether it is an instance view with a full mask or a prior image
    same = torch.cat([pred[:1], pred[:1]]), torch.cat([target[:1], target[:1]])
    assert torch.allclose(custom_diffusion_loss(*same, torch.ones(1, 8, 8)), 2 * per_image[0].mean())
    assert torch.allclose(custom_diffusion_loss(pred[:2], target[:2], mask), instance)
