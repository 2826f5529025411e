"""MUML: unit heads, class activation maps, normalisation, boxes and crops, against plain loops
and hand-computed values; the model's attention reuses the forward pass it is given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imlnet.models import IMLNet, UnitHead
from imlnet.models.muml import (
    attention_boxes,
    attention_maps,
    cam,
    combine_maps,
    crop_resize,
    mask_boxes,
)


def naive_cam(fmap: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CAM(x, y) = sum_k w_k^c F_k(x, y), one pixel and one channel at a time."""
    b, c, h, w = fmap.shape
    out = torch.zeros(b, h, w, dtype=torch.float64)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    out[i, y, x] += float(weight[target[i], k]) * float(fmap[i, k, y, x].detach())
    return out


def naive_minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-image min-max of (B, H, W), written plainly; a flat map gives zeros."""
    out = torch.zeros_like(m)
    for i in range(m.shape[0]):
        lo, hi = float(m[i].min()), float(m[i].max())
        if hi > lo:
            out[i] = (m[i] - lo) / (hi - lo)
    return out


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


# --------------------------------------------------------------------------- heads and CAMs
def test_unit_head_reduces_only_wide_units_and_pools_before_the_classifier():
    torch.manual_seed(0)
    wide, narrow = UnitHead(64, 16, 5), UnitHead(8, 16, 5)
    assert isinstance(wide.reduce, torch.nn.Conv2d) and wide.reduce.kernel_size == (1, 1)
    assert wide.conv.in_channels == 16 and wide.conv.kernel_size == (3, 3)
    assert isinstance(narrow.reduce, torch.nn.Identity) and narrow.conv.in_channels == 8
    assert isinstance(wide.act, torch.nn.ELU) and isinstance(wide.bn, torch.nn.BatchNorm2d)
    wide.eval()
    x = torch.randn(3, 64, 6, 5)
    fmap, logits = wide(x)
    assert tuple(fmap.shape) == (3, 16, 6, 5) and tuple(logits.shape) == (3, 5)
    ref = F.elu(wide.bn(wide.conv(wide.reduce(x))))
    torch.testing.assert_close(fmap, ref)
    torch.testing.assert_close(logits, wide.classifier(ref.mean(dim=(2, 3))))
    # The defining property of a CAM: its spatial mean plus the bias is the class logit.
    for c in range(5):
        maps = cam(fmap, wide.classifier.weight, torch.full((3,), c))
        torch.testing.assert_close(maps.mean(dim=(1, 2)) + wide.classifier.bias[c], logits[:, c])


def test_pooled_head_pools_reduces_then_convolves():
    """pool=4, width=8: avg-pool 4x4, linear 1x1 to 8 channels, conv3x3 -> BN -> ELU."""
    torch.manual_seed(0)
    head = UnitHead(32, 16, 5, pool=4, width=8).eval()
    assert head.reduce.weight.shape == (8, 32, 1, 1) and head.conv.weight.shape == (16, 8, 3, 3)
    x = torch.randn(2, 32, 16, 12)
    fmap, logits = head(x)
    pooled = x.reshape(2, 32, 4, 4, 3, 4).mean(dim=(3, 5))  # 4x4 blocks, by hand
    reduced = F.conv2d(pooled, head.reduce.weight)
    ref = F.elu(head.bn(F.conv2d(reduced, head.conv.weight, None, 1, 1)))
    torch.testing.assert_close(fmap, ref)
    torch.testing.assert_close(logits, head.classifier(ref.mean(dim=(2, 3))))
    # a unit narrower than the width is not reduced
    assert isinstance(UnitHead(4, 16, 5, pool=2, width=8).reduce, torch.nn.Identity)
    with pytest.raises(ValueError, match="pool"):
        UnitHead(4, 16, 5, pool=0)


def test_cam_equals_a_plain_loop():
    g = torch.Generator().manual_seed(1)
    fmap = torch.randn(3, 5, 4, 6, generator=g)
    weight = torch.randn(7, 5, generator=g)
    target = torch.tensor([6, 0, 6])
    got = cam(fmap, weight, target)
    # one image at a time gives the same rows (no mixing across the batch)
    for b in range(3):
        assert torch.equal(cam(fmap[b : b + 1], weight, target[b : b + 1])[0], got[b])
    assert tuple(got.shape) == (3, 4, 6)
    torch.testing.assert_close(got.double(), naive_cam(fmap, weight, target), rtol=1e-5, atol=1e-5)


def test_attention_maps_resize_bilinearly_then_min_max():
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    same = attention_maps(m, (2, 2))  # no resize: min-max only
    torch.testing.assert_close(same[0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(same[1], torch.zeros(2, 2))  # flat: nothing stands out
    g = torch.Generator().manual_seed(2)
    cams = torch.randn(4, 3, 5, generator=g)
    got = attention_maps(cams, (12, 20))
    up = F.interpolate(cams[:, None], size=(12, 20), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got, naive_minmax(up))
    assert float(got.amin()) == 0.0 and float(got.amax()) == 1.0


def test_combine_maps_is_the_min_max_of_the_sum():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(4, 2, 6, 7, generator=g)
    got = combine_maps(maps)
    total = maps[0] + maps[1] + maps[2] + maps[3]
    torch.testing.assert_close(got, naive_minmax(total))


# --------------------------------------------------------------------------- boxes
def test_hot_squares_give_their_boxes_plus_padding():
    maps = torch.zeros(3, 20, 20)
    maps[0, 5:10, 8:14] = 1.0  # rows 5..9, columns 8..13: box (8, 5, 14, 10), 6 wide, 5 high
    maps[1, 0:4, 15:20] = 0.8  # at the top right corner: box (15, 0, 20, 4)
    maps[1, 2, 17] = 1.0
    maps[2, 3:6, 3:6] = 0.5  # exactly theta: not strictly greater, so an empty mask
    boxes = mask_boxes(maps, theta=0.5, pad=0.1)
    expected = torch.tensor(
        [
            [8 - 0.6, 5 - 0.5, 14 + 0.6, 10 + 0.5],
            [15 - 0.5, 0.0, 20.0, 4 + 0.4],  # y1 = -0.4 and x2 = 20.5 clipped to the image
            [0.0, 0.0, 20.0, 20.0],  # empty mask -> the whole image
        ]
    )
    torch.testing.assert_close(boxes, expected)
    # The same through attention_boxes (a CAM at the input size: the resize is the identity,
    # and min-max lifts the third square from 0.5 to 1, so it is found, padded by 0.3).
    expected[2] = torch.tensor([3 - 0.3, 3 - 0.3, 6 + 0.3, 6 + 0.3])
    torch.testing.assert_close(attention_boxes(maps, (20, 20), 0.5, 0.1), expected)
    # Another threshold and padding.
    torch.testing.assert_close(
        mask_boxes(maps[2:], theta=0.4, pad=0.0), torch.tensor([[3.0, 3.0, 6.0, 6.0]])
    )
    # At 64 px: two squares in one map give one box covering both; a flat map, the image.
    more = torch.zeros(4, 64, 64)
    more[0, 16:32, 20:44] = 5.0  # rows 16..31, cols 20..43
    more[1, 0:10, 50:64] = 1.0  # touches the border: padding is clipped
    more[2, 5:9, 5:9] = 2.0
    more[2, 40:50, 30:34] = 2.0
    boxes = attention_boxes(more, (64, 64), theta=0.5, pad=0.1)
    expected = torch.tensor(
        [
            [20 - 2.4, 16 - 1.6, 44 + 2.4, 32 + 1.6],
            [50 - 1.4, 0.0, 64.0, 10 + 1.0],
            [5 - 2.9, 5 - 4.5, 34 + 2.9, 50 + 4.5],
            [0.0, 0.0, 64.0, 64.0],
        ]
    )
    torch.testing.assert_close(boxes, expected)


def test_boxes_match_a_plain_loop_on_random_maps():
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


def test_a_flat_cam_falls_back_to_the_full_image():
    # A constant map stays flat up to rounding after the bilinear resize (2.5 comes back as
    # 2.5 +- 2.4e-7); min-max must not blow that rounding up into a box.
    cams = torch.stack([torch.full((4, 4), 2.5), torch.zeros(4, 4), torch.full((4, 4), -0.1)])
    boxes = attention_boxes(cams, (32, 48))
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 48.0, 32.0]] * 3))
    assert float(attention_maps(cams, (32, 48)).abs().max()) == 0.0


def test_a_low_resolution_cam_is_upsampled_before_thresholding():
    """One hot cell of a 4x4 CAM, upsampled x4 to 16x16 (bilinear, align_corners=False).

    Output row i samples source row (i + 0.5) / 4 - 0.5, so the weights of source row 1 are
    0.375, 0.625, 0.875, 0.875, 0.625, 0.375 on rows 3..8; the peak is 0.875^2 = 0.766. After
    min-max, pixels above 0.5 are those with product > 0.383: rows 4..7 (0.625 * 0.625 = 0.39 is
    in, 0.875 * 0.375 = 0.33 is out), columns 8..11 for source column 2. Box (8, 4, 12, 8),
    4 x 4, padded by 0.4 per side.
    """
    c = torch.zeros(1, 4, 4)
    c[0, 1, 2] = 3.0
    boxes = attention_boxes(c, (16, 16), theta=0.5, pad=0.1)
    torch.testing.assert_close(boxes, torch.tensor([[7.6, 3.6, 12.4, 8.4]]))
    # Upsampled x16 (64 px), the box of the same cell (rows 16..31, columns 32..47) sits
    # around its centre with about its size.
    x1, y1, x2, y2 = attention_boxes(c, (64, 64), theta=0.5, pad=0.0)[0].tolist()
    assert abs((x1 + x2) / 2 - 40.0) <= 1.0 and abs((y1 + y2) / 2 - 24.0) <= 1.0
    assert 8 <= x2 - x1 <= 24 and 8 <= y2 - y1 <= 24


# --------------------------------------------------------------------------- crops
def test_crop_of_output_size_returns_exactly_the_box_pixels():
    g = torch.Generator().manual_seed(4)
    img = torch.randn(2, 3, 8, 8, generator=g)
    boxes = torch.tensor([[2.0, 1.0, 6.0, 5.0], [4.0, 4.0, 8.0, 8.0]])  # columns 2..5, rows 1..4
    out = crop_resize(img, boxes, (4, 4))
    assert torch.equal(out[0], img[0, :, 1:5, 2:6])
    assert torch.equal(out[1], img[1, :, 4:8, 4:8])
    # Default size: the input size (the full box returns the image), also for H != W.
    full = crop_resize(img, torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2))
    assert torch.equal(full, img)
    images = torch.rand(3, 3, 32, 48, generator=g)
    boxes = torch.tensor([[8.0, 4.0, 24.0, 20.0], [0.0, 16.0, 16.0, 32.0], [32.0, 0.0, 48.0, 16.0]])
    crops = crop_resize(images, boxes, (16, 16))
    torch.testing.assert_close(crops[0], images[0, :, 4:20, 8:24])
    torch.testing.assert_close(crops[1], images[1, :, 16:32, 0:16])
    torch.testing.assert_close(crops[2], images[2, :, 0:16, 32:48])
    full = torch.tensor([[0.0, 0.0, 48.0, 32.0]]).repeat(3, 1)
    torch.testing.assert_close(crop_resize(images, full), images)
    # A box inside a constant region stays constant when upsampled.
    flat = torch.zeros(1, 3, 32, 32)
    flat[..., 8:24, 8:24] = 0.7
    up = crop_resize(flat, torch.tensor([[10.0, 10.0, 22.0, 22.0]]), (32, 32))
    torch.testing.assert_close(up, torch.full_like(up, 0.7))


def test_crop_of_half_size_is_a_2x_bilinear_upsampling():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(2, 3, 8, 8, generator=g)
    # the whole image into twice its size: F.interpolate's bilinear x2 exactly
    out = crop_resize(img, torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2), (16, 16))
    ref = F.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref)
    # an inner box: the upsampling of its pixels, whose outermost samples blend in the
    # neighbouring pixel (a crop of a continuous image): upsample the box grown by one pixel
    # per side and cut the two extra output pixels per side
    box = torch.tensor([[2.0, 1.0, 6.0, 5.0], [3.0, 2.0, 7.0, 6.0]])
    out = crop_resize(img, box, (8, 8))
    for i, (x1, y1, x2, y2) in enumerate(box.long().tolist()):
        grown = img[i : i + 1, :, y1 - 1 : y2 + 1, x1 - 1 : x2 + 1]
        up = F.interpolate(grown, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[i], up[0, :, 2:-2, 2:-2])
        inner = F.interpolate(
            img[i : i + 1, :, y1:y2, x1:x2], scale_factor=2, mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(out[i, :, 1:-1, 1:-1], inner[0, :, 1:-1, 1:-1])


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


# --------------------------------------------------------------------------- the model's MUML
@pytest.fixture(scope="module")
def tiny():
    """A resnet18 IML-Net with heads (no IRN), three 64 px images and their labels."""
    torch.manual_seed(0)
    model = IMLNet(5, backbone="resnet18", muml_channels=16, descriptor_dim=16, irn=False)
    g = torch.Generator().manual_seed(6)
    return model, torch.randn(3, 3, 64, 64, generator=g), torch.tensor([4, 0, 2])


def test_model_attention_follows_the_recipe(tiny):
    model, x, y = tiny
    model.eval()
    out = model(x)
    maps, boxes = model.attention(x, y, output=out)
    assert tuple(maps.shape) == (5, 3, 64, 64) and tuple(boxes.shape) == (5, 3, 4)
    per_unit = []
    for i, head in enumerate(model.heads):
        c = naive_cam(out.unit_maps[i], head.classifier.weight.detach(), y).float()
        up = F.interpolate(c[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        per_unit.append(naive_minmax(up))
        torch.testing.assert_close(maps[i], per_unit[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps[4], naive_minmax(sum(per_unit)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxes, torch.stack([mask_boxes(m, 0.5, 0.1) for m in maps]))
    crops = model.muml_crops(x, y, output=out)
    for k, name in enumerate(("unit1", "unit2", "unit3", "unit4", "combined")):
        assert torch.equal(crops[name], crop_resize(x, crops["boxes"][k]))
    assert not crops["combined"].requires_grad


def test_muml_crops_are_per_image_and_gradient_free(tiny):
    model, _, _ = tiny
    model.eval()
    images = torch.randn(3, 3, 64, 64, requires_grad=True)
    labels = torch.tensor([2, 0, 1])
    crops = model.muml_crops(images, labels, "drone")
    assert crops["maps"].shape == (5, 3, 64, 64) and crops["boxes"].shape == (5, 3, 4)
    assert not any(v.requires_grad for v in crops.values())
    maps = crops["maps"]
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    for b in range(3):
        one = model.muml_crops(images[b : b + 1], labels[b : b + 1], "drone")
        torch.testing.assert_close(one["maps"][:, 0], maps[:, b], atol=1e-5, rtol=0)
        torch.testing.assert_close(one["boxes"][:, 0], crops["boxes"][:, b])
        for k, name in enumerate(("unit1", "unit2", "unit3", "unit4", "combined")):
            ref = crop_resize(images[b : b + 1].detach(), crops["boxes"][k, b : b + 1])
            torch.testing.assert_close(crops[name][b : b + 1], ref)


def test_attention_reuses_the_given_forward_pass(tiny):
    """With ``output`` no second pass runs: batch-norm statistics are updated once."""
    model, x, y = tiny
    model.train()
    out = model(x, reconstruct=False)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.muml_crops(x, y, output=out)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    model.muml_crops(x, y)  # without it the forward pass runs again
    after = model.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())


def test_attention_and_crops_need_the_heads():
    model = IMLNet(3, backbone="resnet18", muml=False, irn=False, descriptor_dim=16)
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([0])
    with pytest.raises(RuntimeError, match="muml=True"):
        model.attention(x, y)
    with pytest.raises(RuntimeError, match="muml=True"):
        model.muml_crops(x, y)
