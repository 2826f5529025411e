"""University-WX weather corruptions, deterministic per (condition, image, seed).

University-WX (MuSe-Net, Wang et al. 2024; the same list in WeatherPrompt and later papers)
evaluates University-1652 with its *drone* images under ten conditions made with imgaug:
normal, fog (``CloudLayer``), rain (5 x ``Rain``), snow (5 x ``Snowflakes``), fog+rain, fog+snow,
rain+snow, dark (``MultiplyAndAddToBrightness``), over-exposure
(``MultiplyAndAddToBrightness``) and wind (``MotionBlur(15)``). imgaug is unmaintained and does not
install with today's numpy, so the effects are re-implemented here in numpy and OpenCV, following
imgaug 0.4's algorithms step by step (salt noise gated at low resolution, cubic upscaling, gaussian
and motion blur, gamma, sum/max blending for snow, alpha blending for rain; frequency noise for the
cloud layer; brightness on the Y or V channel) with University-WX's parameters. They are not
bit-identical to imgaug (different random streams, and rain's drop colour is drawn instead of
imgaug's checksum trick); ``docs/evaluation.md`` lists the mapping.

Reproducibility, the complaint about the original: there every augmenter has one fixed seed
and consumes its random stream image after image, so an image's corruption depends on the order
and number of images before it. Here each image's random stream is seeded from a SHA-256 of
(condition, the image's path relative to the dataset root, seed): the same on every run,
machine, worker count and model, independent of the other images.

Images are corrupted at their file size, before the evaluation transform resizes them, as
MuSe-Net's test loader does (the particle sizes and blur lengths are fractions of the image
size), as ``(H, W, 3)`` uint8 arrays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import cv2
import numpy as np

from imlnet.errors import ImlnetError

#: The ten University-WX conditions, in the order papers report them.
CONDITIONS: tuple[str, ...] = (
    "normal",
    "fog",
    "rain",
    "snow",
    "fog_rain",
    "fog_snow",
    "rain_snow",
    "dark",
    "overexposure",
    "wind",
)

Image = np.ndarray  # (H, W, 3) uint8
Rng = np.random.Generator


class UnknownConditionError(ImlnetError, ValueError):
    """A corruption condition name that University-WX does not define."""


def parse_conditions(spec: str | Sequence[str]) -> list[str]:
    """``"wx"`` (all ten) or names separated by commas -> the conditions, in :data:`CONDITIONS`
    order, each once.

    Raises:
        UnknownConditionError: a name is not a condition (the message lists them).
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip().lower().replace("+", "_").replace("-", "_") for n in names if n.strip()]
    if names == ["wx"]:
        return list(CONDITIONS)
    aliases = {
        "over_exposure": "overexposure",
        "light": "overexposure",
        "rain_fog": "fog_rain",
        "snow_fog": "fog_snow",
        "snow_rain": "rain_snow",
        "clean": "normal",
    }
    names = [aliases.get(n, n) for n in names]
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown or not names:
        raise UnknownConditionError(
            f"unknown corruption condition(s) {unknown or spec!r}; use --corrupt wx (all ten) or "
            f"a comma-separated subset of: {', '.join(CONDITIONS)}"
        )
    return [c for c in CONDITIONS if c in names]


def corruption_seed(condition: str, key: str, seed: int) -> np.random.SeedSequence:
    """The seed of one image's corruption: SHA-256 of (condition, key, seed), not ``hash()``.

    Args:
        condition: a name from :data:`CONDITIONS`.
        key: the image's identity, normally its path relative to the dataset root, with ``/``.
        seed: the user's seed.
    """
    digest = hashlib.sha256(f"{condition}\0{key}\0{int(seed)}".encode()).digest()
    return np.random.SeedSequence(list(np.frombuffer(digest, dtype=np.uint32)))


def corrupt(image: Image, condition: str, key: str, seed: int = 0) -> Image:
    """Apply one University-WX condition to an ``(H, W, 3)`` uint8 image.

    Args:
        image: the drone image at evaluation size.
        condition: a name from :data:`CONDITIONS`.
        key: the image's identity (see :func:`corruption_seed`).
        seed: the user's seed.

    Returns:
        A new ``(H, W, 3)`` uint8 array (``normal``: a copy).

    Raises:
        UnknownConditionError: an unknown condition.
    """
    if condition not in _PIPELINES:
        parse_conditions(condition)  # raises with the list of names
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    steps = _PIPELINES[condition]
    children = corruption_seed(condition, key, seed).spawn(max(1, len(steps)))
    out = image.copy()
    for (step, step_seed), child in zip(steps, children, strict=False):
        # University-WX's own seed per augmenter keeps e.g. the five rain layers distinct
        rng = np.random.default_rng(np.random.SeedSequence([step_seed, *child.generate_state(4)]))
        out = step(out, rng)
    return out


# --------------------------------------------------------------------------- building blocks
def _resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a float map (imgaug's ``imresize_single_image(..., "cubic")``)."""
    if x.shape[:2] == (height, width):
        return x
    return cv2.resize(x.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)


def _motion_kernel(k: int, angle: float, direction: float) -> np.ndarray:
    """imgaug's MotionBlur kernel: a vertical line of weights fading by ``direction`` in [-1, 1],
    rotated by ``angle`` degrees (bilinear), normalised to sum 1."""
    kernel = np.zeros((k, k), np.float32)
    d = (np.clip(direction, -1, 1) + 1) / 2
    kernel[:, k // 2] = np.linspace(d, 1.0 - d, num=k)
    rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), -angle, 1.0)
    kernel = cv2.warpAffine(kernel, rot, (k, k), flags=cv2.INTER_LINEAR)
    total = kernel.sum()
    return kernel / total if total > 0 else np.eye(k, dtype=np.float32) / k


def _filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _frequency_noise(h: int, w: int, exponent: float, size_px_max: int, rng: Rng) -> np.ndarray:
    """imgaug's FrequencyNoise: white noise shaped by ``f ** exponent`` in the Fourier domain,
    at most ``size_px_max`` pixels on its longer side, normalised to [0, 1], upscaled cubic."""
    scale = min(1.0, size_px_max / max(h, w))
    hs, ws = max(1, int(h * scale)), max(1, int(w * scale))
    radius = rng.random((hs, ws)) * max(hs, ws) ** 2
    phase = rng.random((hs, ws)) * 2 * np.pi
    yy = np.minimum(np.arange(hs), hs - np.arange(hs))[:, None]
    xx = np.minimum(np.arange(ws), ws - np.arange(ws))[None, :]
    f = np.sqrt(yy**2 + xx**2).astype(np.float64)
    f[0, 0] = 1.0
    amplitude = f**exponent
    amplitude[0, 0] = 0.0
    noise = np.real(np.fft.ifft2(radius * np.exp(1j * phase) * amplitude))
    noise -= noise.min()
    noise /= max(noise.max(), 1e-12)
    return _resize(noise, h, w)


# --------------------------------------------------------------------------- imgaug effects
def cloud_layer(image: Image, rng: Rng) -> Image:
    """University-WX fog: ``CloudLayer(intensity_mean=225, intensity_freq_exponent=-2,
    intensity_coarse_scale=2, alpha_min=1.0, alpha_multiplier=0.9, alpha_size_px_max=10,
    alpha_freq_exponent=-2, sparsity=0.9, density_multiplier=0.5)``."""
    h, w = image.shape[:2]
    coarse = _resize(225.0 + rng.normal(0.0, 2.0, (8, 8)), h, w)
    fine = 225.0 * (2.0 * _frequency_noise(h, w, -2.0, max(h, w), rng) - 1.0) / 5.0
    intensity = np.clip(coarse + fine, 0, 255)[..., None]
    alpha = 1.0 + 0.9 * _frequency_noise(h, w, -2.0, 10, rng)
    alpha = np.clip(np.maximum(alpha, 0) ** 0.9 * 0.5, 0.0, 1.0)[..., None]
    out = (1 - alpha) * image.astype(np.float32) + alpha * intensity
    return np.clip(out, 0, 255).astype(np.uint8)


def _particles(
    image: Image,
    rng: Rng,
    *,
    density: tuple[float, float],
    density_uniformity: tuple[float, float],
    size: tuple[float, float],
    size_uniformity: tuple[float, float],
    angle: tuple[float, float],
    speed: tuple[float, float],
    blur_sigma_fraction: tuple[float, float],
) -> tuple[np.ndarray, float, float]:
    """imgaug's SnowflakesLayer noise: salt at low resolution (finer for larger ``size``),
    gated by an 8x8 Beta map, upscaled, gaussian- then motion-blurred. Returns the map
    ``(H, W)`` float in [0, 255], the speed and the size uniformity drawn."""
    h, w = image.shape[:2]
    size_s, uniformity_s = rng.uniform(*size), rng.uniform(*size_uniformity)
    angle_s, speed_s = rng.uniform(*angle), rng.uniform(*speed)
    sigma_s = rng.uniform(*blur_sigma_fraction)
    down = float(np.clip(1.0 - size_s, 0.001, 1.0))
    hd, wd = max(1, int(h * down)), max(1, int(w * down))
    salt = rng.random((hd, wd)) < rng.uniform(*density)
    # Salt's values: the upper half of a Beta(0.5, 0.5), as imgaug's Salt draws them
    values = 255.0 * (0.5 + np.abs(rng.beta(0.5, 0.5, (hd, wd)) - 0.5))
    noise = np.where(salt, values, 0.0)
    gate = rng.beta(1.0, max(1e-3, 1.0 - rng.uniform(*density_uniformity)), (8, 8))
    noise = noise * np.clip(_resize(gate, hd, wd), 0.0, 1.0)
    noise = np.clip(_resize(noise, h, w), 0, 255).astype(np.float32)
    sigma = float(np.clip(max(h, w) * sigma_s, 0.5, 3.75))
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    k = int(speed_s * max(h, w))
    if k > 1:
        noise = _filter(noise, _motion_kernel(max(k, 3), angle_s, 1.0))
    return np.clip(noise, 0, 255), speed_s, uniformity_s


def snowflakes(flake_size: tuple[float, float], speed: tuple[float, float]) -> Callable:
    """imgaug's ``Snowflakes(flake_size, speed)``: one to three snowflake layers."""

    def apply(image: Image, rng: Rng) -> Image:
        for _ in range(int(rng.integers(1, 4))):
            noise, speed_s, uniformity = _particles(
                image, rng, density=(0.005, 0.075), density_uniformity=(0.3, 0.9),
                size=flake_size, size_uniformity=(0.4, 0.8), angle=(-30, 30), speed=speed,
                blur_sigma_fraction=(0.0001, 0.001),
            )  # fmt: skip
            gamma = 1.0 + 2 * (1 - uniformity)
            flakes = (255.0 * (noise / 255.0) ** gamma * (1.0 + 5 * (1 - uniformity)))[..., None]
            out = np.clip(image.astype(np.float32) + (0.1 + 20 * speed_s) * flakes, 0, 255)
            image = np.clip(np.maximum(out, (1.0 + 20 * speed_s) * flakes), 0, 255)
            image = image.astype(np.uint8)
        return image

    return apply


def rain(drop_size: tuple[float, float], speed: tuple[float, float]) -> Callable:
    """imgaug's ``Rain(drop_size, speed)``: one to three rain layers (dense, short-range
    gating, steeper angles than snow), alpha-blended in a drawn grey-blue drop colour."""

    def apply(image: Image, rng: Rng) -> Image:
        for _ in range(int(rng.integers(1, 4))):
            noise, _, _ = _particles(
                image, rng, density=(0.03, 0.14), density_uniformity=(0.8, 1.0),
                size=drop_size, size_uniformity=(0.2, 0.5), angle=(-15, 15), speed=speed,
                blur_sigma_fraction=(0.001, 0.001),
            )  # fmt: skip
            alpha = (noise / 255.0)[..., None]
            colour = rng.uniform(110, 240)
            out = (1 - alpha) * image.astype(np.float32) + alpha * colour
            image = np.clip(out, 0, 255).astype(np.uint8)
        return image

    return apply


def _brightness(image: Image, rng: Rng, mul: float, add: tuple[float, float]) -> Image:
    """imgaug's ``MultiplyAndAddToBrightness(mul, add)``: Y of YCrCb or V of HSV (drawn),
    multiplied and shifted in random order."""
    add_s = rng.uniform(*add)
    ycrcb = bool(rng.integers(2))
    code, back, ch = (
        (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, 0)
        if ycrcb
        else (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, 2)
    )
    space = cv2.cvtColor(image, code)
    channel = space[..., ch].astype(np.float32)
    if rng.integers(2):
        channel = np.clip(np.clip(channel * mul, 0, 255) + add_s, 0, 255)
    else:
        channel = np.clip(np.clip(channel + add_s, 0, 255) * mul, 0, 255)
    space[..., ch] = np.round(channel).astype(np.uint8)
    return cv2.cvtColor(space, back)


def dark(image: Image, rng: Rng) -> Image:
    """``MultiplyAndAddToBrightness(mul=0.4, add=-15)`` (MuSe-Net's test set; WeatherPrompt's
    training list adds a ``BlendAlpha`` and uses ``mul=0.2``)."""
    return _brightness(image, rng, 0.4, (-15, -15))


def overexposure(image: Image, rng: Rng) -> Image:
    """``MultiplyAndAddToBrightness(mul=1.6, add=(0, 30))``."""
    return _brightness(image, rng, 1.6, (0, 30))


def wind(image: Image, rng: Rng) -> Image:
    """``MotionBlur(k=15)``: angle uniform in [0, 360), direction uniform in [-1, 1]."""
    kernel = _motion_kernel(15, rng.uniform(0, 360), rng.uniform(-1, 1))
    return _filter(image, kernel)


# (step, University-WX's seed of that augmenter) per condition
_RAIN_THIN, _RAIN_MID, _RAIN_ALL = (
    rain((0.05, 0.1), (0.04, 0.06)),
    rain((0.1, 0.2), (0.04, 0.06)),
    rain((0.05, 0.2), (0.04, 0.06)),
)
_SNOW_A, _SNOW_B, _SNOW_C = (
    snowflakes((0.5, 0.8), (0.007, 0.03)),
    snowflakes((0.6, 0.9), (0.007, 0.03)),
    snowflakes((0.5, 0.9), (0.007, 0.03)),
)
_PIPELINES: dict[str, list[tuple[Callable[[Image, Rng], Image], int]]] = {
    "normal": [],
    "fog": [(cloud_layer, 35)],
    "rain": [(_RAIN_THIN, 38), (_RAIN_THIN, 35), (_RAIN_MID, 73), (_RAIN_MID, 93), (_RAIN_ALL, 95)],
    "snow": [(_SNOW_A, 38), (_SNOW_A, 35), (_SNOW_B, 74), (_SNOW_B, 94), (_SNOW_C, 96)],
    "fog_rain": [(cloud_layer, 35), (_RAIN_ALL, 35), (_RAIN_ALL, 36)],
    "fog_snow": [(cloud_layer, 35), (_SNOW_C, 35), (_SNOW_C, 36)],
    "rain_snow": [(_SNOW_A, 35), (_RAIN_THIN, 35), (_RAIN_MID, 92), (_RAIN_ALL, 91), (_SNOW_B, 74)],
    "dark": [(dark, 1991)],
    "overexposure": [(overexposure, 1992)],
    "wind": [(wind, 17)],
}
