"""Decoder attention map (DAM): splatting, target selection, loss and the correlation diagnostic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdetr.detector.losses.dam import attn_map_to_flat_grid, dam_correlation, dam_loss, dam_target

SHAPES = torch.tensor([[3, 5], [4, 2], [2, 3]])  # non-square levels, S = 15 + 8 + 6 = 29
STARTS = torch.tensor([0, 15, 23])
S = 29


def _slow_flat_grid(shapes, starts, loc, attn, shift):
    """One sample at a time, one corner at a time: the obviously-correct definition."""
    bs, n_layers, n_q, n_heads, n_levels, n_points, _ = loc.shape
    out = torch.zeros(bs, n_layers, n_heads, S, dtype=torch.float64)
    for b in range(bs):
        for layer in range(n_layers):
            for q in range(n_q):
                for h in range(n_heads):
                    for lvl in range(n_levels):
                        height, width = shapes[lvl].tolist()
                        for p in range(n_points):
                            x = loc[b, layer, q, h, lvl, p, 0].item() * width - shift
                            y = loc[b, layer, q, h, lvl, p, 1].item() * height - shift
                            a = attn[b, layer, q, h, lvl, p].item()
                            x0, y0 = math.floor(x), math.floor(y)
                            for cx in (x0, x0 + 1):
                                for cy in (y0, y0 + 1):
                                    if 0 <= cx < width and 0 <= cy < height:
                                        factor = (1 - abs(x - cx)) * (1 - abs(y - cy))
                                        out[b, layer, h, starts[lvl].item() + cy * width + cx] += a * factor
    return out


@pytest.mark.parametrize("shift", [False, True])
def test_flat_grid_equals_slow_loop(shift):
    torch.manual_seed(0)
    loc = torch.rand(2, 2, 3, 2, 3, 4, 2) * 1.4 - 0.2  # some samples outside [0, 1]
    # Exact borders and points just inside/outside them.
    loc[0, 0, 0, 0, :, 0] = torch.tensor([0.0, 0.0])
    loc[0, 0, 0, 0, :, 1] = torch.tensor([1.0, 1.0])
    loc[0, 0, 0, 0, :, 2] = torch.tensor([1.0 - 1e-6, 1e-6])
    loc[0, 0, 0, 0, :, 3] = torch.tensor([-1e-6, 0.5])
    loc[1, 1, 2, 1, :, 0] = torch.tensor([0.1, 1.0 + 1e-6])
    attn = torch.rand(2, 2, 3, 2, 3, 4)
    got = attn_map_to_flat_grid(SHAPES, STARTS, loc, attn, align_corners_shift=shift)
    want = _slow_flat_grid(SHAPES, STARTS, loc, attn, 0.5 if shift else 0.0)
    assert got.shape == (2, 2, 2, S) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_flat_grid_hand_example_and_conventions():
    shapes, starts = torch.tensor([[2, 3], [1, 1]]), torch.tensor([0, 6])
    loc = torch.zeros(1, 1, 1, 1, 2, 1, 2)
    loc[..., 0, 0, :] = torch.tensor([0.5, 0.5])  # level 0 (H=2, W=3)
    loc[..., 1, 0, :] = torch.tensor([0.5, 0.5])  # level 1 (1x1)
    attn = torch.tensor([0.8, 0.2]).view(1, 1, 1, 1, 2, 1)

    # Official: (x*W, y*H) = (1.5, 1.0) -> half on cell (1, 1) = token 4, half on (2, 1) = token 5;
    # level 1 at (0.5, 0.5) spreads 1/4 on its only cell, the other corners fall outside.
    got = attn_map_to_flat_grid(shapes, starts, loc, attn)[0, 0, 0]
    torch.testing.assert_close(got, torch.tensor([0, 0, 0, 0, 0.4, 0.4, 0.05]))

    # grid_sample's point (1.0, 0.5): half on cell (1, 0) = token 1, half on (1, 1) = token 4; level 1 lands
    # exactly on its cell centre.
    got = attn_map_to_flat_grid(shapes, starts, loc, attn, align_corners_shift=True)[0, 0, 0]
    torch.testing.assert_close(got, torch.tensor([0, 0.4, 0, 0, 0.4, 0, 0.2]))


def test_flat_grid_shift_matches_grid_sample_weights():
    """With the shift, the splat weights are exactly the weights grid_sample(align_corners=False) reads."""
    torch.manual_seed(1)
    height, width = 4, 6
    loc = torch.rand(1, 1, 5, 1, 1, 1, 2)
    attn = torch.ones(1, 1, 5, 1, 1, 1)
    dam = attn_map_to_flat_grid(torch.tensor([[height, width]]), torch.tensor([0]), loc, attn, True)
    value = torch.randn(1, 1, height, width)
    grid = (2 * loc[0, 0, :, 0, 0, 0] - 1).view(1, 5, 1, 2)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Linear in the value: the sum of all sampled values equals <DAM, value>.
    torch.testing.assert_close(sampled.sum(), (dam[0, 0, 0] * value.flatten()).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift, low, high", [(False, 0.1, 0.45), (True, 0.3, 0.7)])
def test_flat_grid_conserves_mass_inside(shift, low, high):
    """Samples whose four neighbours all lie inside their level (smallest side 2) keep all their weight."""
    torch.manual_seed(2)
    loc = torch.rand(2, 1, 4, 2, 3, 2, 2) * (high - low) + low
    attn = torch.rand(2, 1, 4, 2, 3, 2)
    got = attn_map_to_flat_grid(SHAPES, STARTS, loc, attn, align_corners_shift=shift)
    torch.testing.assert_close(got.sum(-1), attn.sum(dim=(2, 4, 5)))


def test_dam_target_selects_exactly_k_real_tokens():
    torch.manual_seed(3)
    flat = torch.rand(3, S)
    mask = torch.zeros(3, S, dtype=torch.bool)
    mask[1, 10:15] = True
    mask[2, 20:] = True
    flat[1, 10:15] = 5.0  # padded cells with the largest attention must still not be chosen
    flat[2, 20:] = 5.0
    nums = torch.tensor([4, 7, 3])
    target = dam_target(flat, mask, nums)
    assert target.dtype == flat.dtype and set(target.unique().tolist()) <= {0.0, 1.0}
    assert target.sum(1).tolist() == [4.0, 7.0, 3.0]
    assert not target[mask].any()
    for i in range(3):
        real = flat[i].masked_fill(mask[i], -1.0)
        assert set(target[i].nonzero().flatten().tolist()) == set(real.topk(int(nums[i])).indices.tolist())


def test_dam_target_caps_keep_at_real_tokens():
    flat = torch.rand(1, 6)
    mask = torch.tensor([[False, False, False, True, True, True]])
    target = dam_target(flat, mask, torch.tensor([5]))  # rho >= 1 would ask for more than exist
    assert target.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    assert dam_target(flat, None, torch.tensor([2])).sum().item() == 2.0


def test_dam_loss_is_token_averaged_bce():
    torch.manual_seed(4)
    logits, target = torch.randn(2, S), (torch.rand(2, S) > 0.7).float()
    want = F.binary_cross_entropy_with_logits(logits, target)
    assert dam_loss(logits, target).item() == pytest.approx(want.item(), rel=1e-6)


def test_dam_correlation_hand_example():
    shapes, starts = torch.tensor([[1, 2], [1, 2]]), torch.tensor([0, 2])
    flat = torch.tensor([[1.0, 3.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    kept = torch.tensor([[1, 2], [3, 2]])
    corr = dam_correlation(kept, flat, shapes, starts)
    # Image 0: 5/8 overall, 3/4 on level 0, 2/4 on level 1. Image 1: 2/2, level 0 empty -> 0, 2/2.
    assert corr["corr_mask_attn_map_dec_all"].item() == pytest.approx((5 / 8 + 1) / 2)
    assert corr["corr_mask_attn_map_dec_0"].item() == pytest.approx((3 / 4 + 0) / 2)
    assert corr["corr_mask_attn_map_dec_1"].item() == pytest.approx((2 / 4 + 1) / 2)
