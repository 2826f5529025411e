"""Image transforms of the University-1652 baseline, plus optional weather for drone photos.

Training (``train=True``), as the official University-1652 code does:

- resize to ``size x size`` (bicubic),
- pad ``pad`` pixels by repeating the edge, then crop a random ``size x size`` window back out
  (a small random translation; the baseline's 10 px at 256 px, and the same fraction of the side
  at other sizes: 2 px at 64 px, where 10 px would shift by a sixth of the image),
- satellite only: a random rotation by a free angle in [-90, 90] degrees before the crop (the
  baseline's ``RandomAffine(90)``; the corners it uncovers are black, as there),
- a random horizontal flip,
- drone only, optional: :class:`RandomWeather` (haze, fog, rain, snow, night) with probability
  ``weather_prob``, from :func:`imlnet.data.synthetic.weather.apply_weather`,
- ImageNet normalisation.

Evaluation (``train=False``): resize and normalise only, so it is deterministic.

Inputs are a PIL image or a ``(3, H, W)`` tensor (uint8, or float in [0, 1]); the output is a
plain ``(3, size, size)`` float32 tensor. Random draws use torch's default generator, which the
training datasets seed per item from ``(seed, epoch, index)`` (see
:class:`~imlnet.data.folders.PairedViewDataset`); call ``torch.manual_seed`` to reproduce a
transform outside a dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from imlnet.data.seeding import derive_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Weather kinds :class:`RandomWeather` can draw ("clear" is the no-op).
WEATHER_KINDS = ("clear", "haze", "fog", "rain", "snow", "night")


class ToFloatImage:
    """PIL image or ``(3, H, W)`` / ``(1, H, W)`` tensor -> plain ``(3, H, W)`` float32 tensor.

    uint8 input is scaled to [0, 1]; float input is kept as it is (it should be in [0, 1]).
    """

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        if isinstance(image, Image.Image):
            image = v2.functional.pil_to_tensor(image.convert("RGB"))
        if not isinstance(image, Tensor):
            raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            shape = tuple(image.shape)
            raise ValueError(f"expected an image tensor of shape (3, H, W), got {shape}")
        image = image.as_subclass(Tensor)
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if image.dtype == torch.uint8:
            return image.float().div(255.0)
        return image.float().contiguous()

    def __repr__(self) -> str:
        return "ToFloatImage()"


class Clamp01:
    """Clamp to [0, 1] (bicubic resizing overshoots slightly at edges)."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return "Clamp01()"


class RandomWeather:
    """With probability ``prob``, render the drone photo in a random weather from ``kinds``.

    Each call builds its own ``torch.Generator``, seeded from ``seed`` and one draw of torch's
    default generator: inside a training dataset (which seeds that generator per item) the
    weather of an item is a function of ``(seed, epoch, index)``, and two datasets with different
    ``seed`` differ. The generator then decides whether to apply weather, which kind, and is
    passed to :func:`~imlnet.data.synthetic.weather.apply_weather` for its particles and noise
    (imported on first use, so this module works without the synthetic package).

    Args:
        prob: probability of applying weather, in [0, 1].
        kinds: weathers to draw from, uniformly (see :data:`WEATHER_KINDS`).
        seed: seed mixed into every draw.
        strength: strength passed to ``apply_weather`` (it jitters it by +-25 % itself).
    """

    def __init__(
        self,
        prob: float,
        kinds: Sequence[str] = ("haze", "fog", "rain", "snow", "night"),
        seed: int = 0,
        strength: float = 1.0,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"weather probability must be in [0, 1], got {prob}")
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in WEATHER_KINDS]
        if unknown or not kinds:
            raise ValueError(
                f"weather kinds must be a non-empty subset of {WEATHER_KINDS}, got {kinds}"
            )
        self.prob, self.kinds, self.seed, self.strength = float(prob), kinds, int(seed), strength

    def __call__(self, image: Tensor) -> Tensor:
        """``(3, H, W)`` float in [0, 1] -> the same shape and range."""
        draw = int(torch.randint(0, 2**62, ()).item())
        gen = torch.Generator().manual_seed(derive_seed(self.seed, draw))
        if float(torch.rand((), generator=gen)) >= self.prob:
            return image
        kind = self.kinds[int(torch.randint(len(self.kinds), (), generator=gen))]
        from imlnet.data.synthetic.weather import apply_weather

        return apply_weather(image, kind, generator=gen, strength=self.strength)

    def __repr__(self) -> str:
        return f"RandomWeather(prob={self.prob}, kinds={self.kinds}, seed={self.seed})"


class ImageTransform:
    """A list of transforms applied in order; the callable :func:`build_transforms` returns."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]]) -> None:
        self.steps = list(steps)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        """PIL image or ``(3, H, W)`` tensor -> ``(3, size, size)`` float32 tensor."""
        for step in self.steps:
            image = step(image)
        return image.as_subclass(Tensor)

    def __repr__(self) -> str:
        inner = "\n".join(f"  {step!r}" for step in self.steps)
        return f"ImageTransform(\n{inner}\n)"


def default_pad(size: int) -> int:
    """The random-translation padding at ``size`` px: University-1652's 10 px at 256 px, scaled."""
    return max(1, round(10 * int(size) / 256))


def build_transforms(
    view: Literal["drone", "satellite"],
    train: bool,
    size: int = 256,
    *,
    pad: int | None = None,
    flip: bool = True,
    satellite_rotation: bool = True,
    weather_prob: float = 0.0,
    weather_kinds: Sequence[str] = ("haze", "fog", "rain", "snow", "night"),
    normalize: bool = True,
    seed: int = 0,
) -> ImageTransform:
    """The transform of one view for training or evaluation (see the module docstring).

    Args:
        view: ``"drone"`` or ``"satellite"``.
        train: random augmentation (True) or the deterministic evaluation transform (False).
        size: output side in pixels.
        pad: edge padding before the random crop (0: no translation; None:
            :func:`default_pad` of ``size``).
        flip: random horizontal flip (training).
        satellite_rotation: random rotation in [-90, 90] degrees of satellite images (training).
        weather_prob: probability of :class:`RandomWeather` on drone images (training).
        weather_kinds: the weathers it draws from.
        normalize: ImageNet mean/std normalisation; False keeps [0, 1].
        seed: seed of :class:`RandomWeather`.

    Returns:
        A callable: PIL image or ``(3, H, W)`` tensor -> ``(3, size, size)`` float32 tensor.

    Raises:
        ValueError: an unknown view, a size < 1, a negative pad, or weather on satellite images.
    """
    if view not in ("drone", "satellite"):
        raise ValueError(f"view must be 'drone' or 'satellite', got {view!r}")
    if pad is None:
        pad = default_pad(size)
    if int(size) < 1 or int(pad) < 0:
        raise ValueError(f"size must be >= 1 and pad >= 0, got size={size}, pad={pad}")
    if weather_prob > 0 and view != "drone":
        raise ValueError(
            "weather augmentation applies to drone images only (weather_prob > 0 "
            "with view='satellite')"
        )
    size, pad = int(size), int(pad)
    steps: list[Callable[[Any], Any]] = [
        ToFloatImage(),
        v2.Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True),
        Clamp01(),
    ]
    if train:
        if pad > 0:
            steps.append(v2.Pad(pad, padding_mode="edge"))
        if view == "satellite" and satellite_rotation:
            steps.append(v2.RandomRotation(90, interpolation=InterpolationMode.BILINEAR))
        if pad > 0:
            steps.append(v2.RandomCrop(size))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        if weather_prob > 0:
            steps.append(RandomWeather(weather_prob, weather_kinds, seed))
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return ImageTransform(steps)


def denormalize(x: Tensor) -> Tensor:
    """Undo the ImageNet normalisation for display.

    Args:
        x: ``(3, H, W)`` or ``(B, 3, H, W)`` normalised images.

    Returns:
        The same shape, in [0, 1] (clamped).
    """
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W), got {tuple(x.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)[:, None, None]
    return (x * std + mean).clamp(0.0, 1.0)
