"""Transforms: shapes, ranges, normalisation, seeding, and the optional weather augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imlnet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomWeather,
    build_transforms,
    denormalize,
)


def _image(seed: int = 0, h: int = 40, w: int = 52) -> torch.Tensor:
    """A smooth random image (bicubic resizing of noise would mostly test ringing)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 5, 6, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("view", ["drone", "satellite"])
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_dtype_and_normalisation(view: str, train: bool) -> None:
    x = _image()
    raw = build_transforms(view, train, 32, normalize=False)  # type: ignore[arg-type]
    torch.manual_seed(0)
    y = raw(x)
    assert y.shape == (3, 32, 32) and y.dtype == torch.float32 and type(y) is torch.Tensor
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    norm = build_transforms(view, train, 32)  # type: ignore[arg-type]
    torch.manual_seed(0)
    z = norm(x)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(z, (y - mean) / std, atol=1e-5)
    assert torch.allclose(denormalize(z), y, atol=1e-5)


def test_eval_is_a_deterministic_resize() -> None:
    x = _image(1)
    t = build_transforms("drone", False, 24)
    torch.manual_seed(0)
    a = t(x)
    torch.manual_seed(1)
    assert torch.equal(a, t(x))
    resized = F.interpolate(x[None], size=(24, 24), mode="bicubic", antialias=True)[0]
    assert torch.allclose(denormalize(a), resized.clamp(0, 1), atol=1e-4)


def test_pil_uint8_and_float_inputs_agree() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (30, 34, 3), dtype=np.uint8)
    t = build_transforms("satellite", False, 16)
    from_pil = t(Image.fromarray(pixels))
    as_uint8 = torch.from_numpy(pixels).permute(2, 0, 1)
    assert torch.allclose(from_pil, t(as_uint8), atol=1e-5)
    assert torch.allclose(from_pil, t(as_uint8.float() / 255), atol=1e-5)
    grey = t(Image.fromarray(pixels[..., 0]))
    assert grey.shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        t(torch.rand(4, 10, 10))


@pytest.mark.parametrize("view", ["drone", "satellite"])
def test_train_transforms_follow_the_seed(view: str) -> None:
    x = _image(2)
    t = build_transforms(view, True, 32)  # type: ignore[arg-type]
    outs = []
    for seed in (0, 0, 1, 2):
        torch.manual_seed(seed)
        outs.append(t(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[2], outs[3])


def test_satellite_rotation_and_flip_switches() -> None:
    x = _image(3)
    # without pad, flip and rotation the training transform is the evaluation transform
    plain = build_transforms("satellite", True, 32, pad=0, flip=False, satellite_rotation=False)
    torch.manual_seed(0)
    assert torch.equal(plain(x), build_transforms("satellite", False, 32)(x))
    rotating = build_transforms("satellite", True, 32, pad=0, flip=False, normalize=False)
    torch.manual_seed(0)
    y = rotating(x)
    assert not torch.allclose(y, build_transforms("satellite", False, 32, normalize=False)(x))
    black = []  # rotations uncover black corners, as the baseline's RandomAffine(90) does
    for seed in range(4):
        torch.manual_seed(seed)
        black.append(int((rotating(x) == 0).all(0).sum()))
    assert max(black) > 0
    drone = build_transforms("drone", True, 32, pad=0, flip=False)  # never rotated
    torch.manual_seed(0)
    assert torch.equal(drone(x), build_transforms("drone", False, 32)(x))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="view"):
        build_transforms("street", True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        build_transforms("drone", True, 0)
    with pytest.raises(ValueError, match="drone images only"):
        build_transforms("satellite", True, weather_prob=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        RandomWeather(1.5)
    with pytest.raises(ValueError, match="subset"):
        RandomWeather(0.5, kinds=("tornado",))
    with pytest.raises(ValueError):
        denormalize(torch.rand(2, 4, 8, 8))


def test_random_weather() -> None:
    pytest.importorskip("imlnet.data.synthetic.weather")
    x = _image(4, 48, 48)
    never = RandomWeather(0.0, seed=0)
    torch.manual_seed(0)
    assert torch.equal(never(x), x)
    always = RandomWeather(1.0, kinds=("fog", "night"), seed=0)
    torch.manual_seed(0)
    y = always(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert not torch.allclose(y, x, atol=0.02)
    torch.manual_seed(0)
    assert torch.equal(always(x), y)  # same default-generator state, same weather
    other = RandomWeather(1.0, kinds=("fog", "night"), seed=1)
    torch.manual_seed(0)
    assert not torch.equal(other(x), y)  # the seed is mixed in
    t = build_transforms("drone", True, 32, weather_prob=1.0, weather_kinds=("night",))
    torch.manual_seed(0)
    dark = denormalize(t(x))
    assert float(dark.mean()) < 0.6 * float(x.mean())  # night is darker


def test_default_padding_scales_with_the_image_side() -> None:
    """The baseline pads 10 px at 256 px; at 64 px the same fraction is 2 px (10 would move the
    image by up to a sixth of its side). The translation is checked on a one-pixel marker."""
    from imlnet.data.transforms import default_pad

    assert [default_pad(s) for s in (256, 384, 128, 64, 32)] == [10, 15, 5, 2, 1]
    image = torch.zeros(3, 64, 64)
    image[:, 32, 32] = 1.0
    train = build_transforms("drone", True, 64, flip=False, normalize=False)
    shifts = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = train(image)
        y, x = divmod(int(out[0].argmax()), 64)
        shifts.add((y - 32, x - 32))
    assert max(max(abs(dy), abs(dx)) for dy, dx in shifts) == 2 and len(shifts) > 5
