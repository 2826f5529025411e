"""MUML pieces: CAMs, attention boxes, crops; each against a plain loop or hand values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imlnet.models.muml import (
    UnitHead,
    attention_boxes,
    attention_maps,
    cam,
    combine_maps,
    crop_resize,
    mask_boxes,
)


def naive_box(m: torch.Tensor, theta: float, pad: float) -> list[float]:
    """Bounding box of ``m > theta`` by a loop over pixels, padded and clipped."""
    h, w = m.shape
    ys, xs = [], []
    for y in range(h):
        for x in range(w):
            if m[y, x] > theta:
                ys.append(y)
                xs.append(x)
    if not ys:
        x1, y1, x2, y2 = 0.0, 0.0, float(w), float(h)
    else:
        x1, y1, x2, y2 = min(xs), min(ys), max(xs) + 1.0, max(ys) + 1.0
    px, py = (x2 - x1) * pad, (y2 - y1) * pad
    return [max(x1 - px, 0.0), max(y1 - py, 0.0), min(x2 + px, float(w)), min(y2 + py, float(h))]


def test_cam_is_the_weighted_channel_sum() -> None:
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(3, 5, 4, 6, generator=g)
    weights = torch.randn(7, 5, generator=g)
    target = torch.tensor([6, 0, 3])
    out = cam(fmap, weights, target)
    expected = torch.zeros(3, 4, 6)
    for b in range(3):
        for y in range(4):
            for x in range(6):
                for k in range(5):
                    expected[b, y, x] += weights[target[b], k] * fmap[b, k, y, x]
    torch.testing.assert_close(out, expected)


def test_unit_head_logit_is_the_mean_of_its_cam_plus_bias() -> None:
    torch.manual_seed(0)
    head = UnitHead(in_channels=32, channels=8, num_classes=5).eval()
    assert isinstance(head.reduce, torch.nn.Conv2d)  # 32 > 8: 1x1 reduction first
    fmap, logits = head(torch.randn(2, 32, 6, 6))
    assert fmap.shape == (2, 8, 6, 6) and logits.shape == (2, 5)
    for c in range(5):
        maps = cam(fmap, head.classifier.weight, torch.full((2,), c))
        torch.testing.assert_close(maps.mean(dim=(1, 2)) + head.classifier.bias[c], logits[:, c])
    assert isinstance(UnitHead(4, 8, 5).reduce, torch.nn.Identity)


def test_hot_squares_give_their_boxes_plus_padding() -> None:
    maps = torch.zeros(4, 64, 64)
    maps[0, 16:32, 20:44] = 5.0  # rows 16..31, cols 20..43
    maps[1, 0:10, 50:64] = 1.0  # touches the border: padding is clipped
    maps[2, 5:9, 5:9] = 2.0  # two squares: one box covering both
    maps[2, 40:50, 30:34] = 2.0
    # image 3: flat -> full image
    boxes = attention_boxes(maps, (64, 64), theta=0.5, pad=0.1)
    expected = torch.tensor(
        [
            [20 - 2.4, 16 - 1.6, 44 + 2.4, 32 + 1.6],
            [50 - 1.4, 0.0, 64.0, 10 + 1.0],
            [5 - 2.9, 5 - 4.5, 34 + 2.9, 50 + 4.5],
            [0.0, 0.0, 64.0, 64.0],
        ]
    )
    torch.testing.assert_close(boxes, expected)


def test_boxes_match_a_plain_loop_on_random_maps() -> None:
    g = torch.Generator().manual_seed(1)
    low = torch.rand(6, 5, 7, generator=g) ** 4
    low[5] = 3.0  # flat
    maps = attention_maps(low, (40, 56))
    assert maps.shape == (6, 40, 56)
    for b in range(5):
        assert float(maps[b].min()) == 0.0 and abs(float(maps[b].max()) - 1.0) < 1e-6
    assert float(maps[5].abs().max()) == 0.0
    for theta, pad in ((0.5, 0.1), (0.3, 0.0), (0.8, 0.25)):
        boxes = mask_boxes(maps, theta, pad)
        for b in range(6):
            torch.testing.assert_close(boxes[b], torch.tensor(naive_box(maps[b], theta, pad)))


def test_low_resolution_hot_cell_is_found_where_it_is() -> None:
    cams = torch.zeros(1, 4, 4)
    cams[0, 1, 2] = 1.0  # the cell covering rows 16..31, cols 32..47 of a 64 px image
    x1, y1, x2, y2 = attention_boxes(cams, (64, 64), theta=0.5, pad=0.0)[0].tolist()
    assert abs((x1 + x2) / 2 - 40.0) <= 1.0 and abs((y1 + y2) / 2 - 24.0) <= 1.0
    assert 8 <= x2 - x1 <= 24 and 8 <= y2 - y1 <= 24


def test_combined_map_is_the_normalised_sum() -> None:
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(4, 2, 8, 8, generator=g)
    out = combine_maps(maps)
    for b in range(2):
        s = maps[0, b] + maps[1, b] + maps[2, b] + maps[3, b]
        torch.testing.assert_close(out[b], (s - s.min()) / (s.max() - s.min()))


def test_crop_resize_returns_the_pixels_of_the_box() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 32, 48, generator=g)
    boxes = torch.tensor([[8.0, 4.0, 24.0, 20.0], [0.0, 16.0, 16.0, 32.0], [32.0, 0.0, 48.0, 16.0]])
    crops = crop_resize(images, boxes, (16, 16))
    torch.testing.assert_close(crops[0], images[0, :, 4:20, 8:24])
    torch.testing.assert_close(crops[1], images[1, :, 16:32, 0:16])
    torch.testing.assert_close(crops[2], images[2, :, 0:16, 32:48])
    # The full box at the input size is the identity; a box of a constant region stays constant.
    full = torch.tensor([[0.0, 0.0, 48.0, 32.0]]).repeat(3, 1)
    torch.testing.assert_close(crop_resize(images, full), images)
    flat = torch.zeros(1, 3, 32, 32)
    flat[..., 8:24, 8:24] = 0.7
    up = crop_resize(flat, torch.tensor([[10.0, 10.0, 22.0, 22.0]]), (32, 32))
    torch.testing.assert_close(up, torch.full_like(up, 0.7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crop_resize_upsampling_matches_bilinear_interpolation(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 16, 16, generator=g)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 4.0, 12.0, 12.0]])
    crops = crop_resize(images.to(dtype), boxes, (32, 32))
    assert crops.dtype == dtype
    # roi_align (aligned) samples like F.interpolate(align_corners=False) away from the border.
    ref0 = F.interpolate(images[:1], size=(32, 32), mode="bilinear", align_corners=False)
    ref1 = F.interpolate(images[1:, :, 4:12, 4:12], size=(32, 32), mode="bilinear")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(
        crops[0, :, 2:-2, 2:-2].float(), ref0[0, :, 2:-2, 2:-2], atol=tol, rtol=0
    )
    # Inside a crop, roi_align may read pixels outside the box (bilinear neighbours) where
    # interpolating the cut-out tensor clamps: compare the interior only.
    torch.testing.assert_close(
        crops[1, :, 4:-4, 4:-4].float(), ref1[0, :, 4:-4, 4:-4], atol=tol, rtol=0
    )


def test_constant_maps_stay_flat_despite_resize_rounding() -> None:
    # Bilinear resizing of a constant map rounds (2.5 -> 2.5 +- 2.4e-7 in float32); min-max must
    # not blow that up into a region: every constant map falls back to the full image.
    cams = torch.stack([torch.full((4, 4), 2.5), torch.zeros(4, 4), torch.full((4, 4), -0.1)])
    boxes = attention_boxes(cams, (32, 48))
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 48.0, 32.0]] * 3))
    assert float(attention_maps(cams, (32, 48)).abs().max()) == 0.0
