"""Weather and light as image operations, for rendering and for augmenting real drone photos.

With a depth map (from the renderer) haze and fog follow the atmospheric scattering model
``I = J t + A (1 - t)``, ``t = exp(-beta d)``; without one (a real photo), depth is approximated
by a vertical gradient, far at the top of an oblique view. Rain and falling snow are particles
drawn from the given generator; night is a dark, blue, noisy grade (the renderer also lights
windows at night).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEATHERS = ("clear", "haze", "fog", "rain", "snow", "night")


def _pseudo_depth(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``(H, W)`` metres: 600 m at the top row down to 60 m at the bottom (oblique view)."""
    ramp = torch.linspace(1.0, 0.0, h, device=device)[:, None].expand(h, w)
    return 60.0 + 540.0 * ramp**2


def _scatter(img: torch.Tensor, depth: torch.Tensor, beta: float, air: tuple) -> torch.Tensor:
    trans = torch.exp(-beta * depth.clamp(max=5000.0))[None]
    airlight = torch.tensor(air, device=img.device)[:, None, None]
    return img * trans + airlight * (1 - trans)


def _streaks(
    h: int, w: int, density: float, length: int, slant: int, gen: torch.Generator
) -> torch.Tensor:
    """``(H, W)`` in [0, 1]: sparse seeds smeared along a slanted line kernel."""
    seeds = (torch.rand(h, w, generator=gen) < density).float()
    k = torch.zeros(length, length)
    for i in range(length):  # a short diagonal line; ``slant`` columns of drift over its length
        k[i, min(length - 1, max(0, length // 2 + (i - length // 2) * slant // length))] = 1.0
    out = F.conv2d(seeds[None, None], k[None, None], padding=length // 2)[0, 0, :h, :w]
    return out.clamp(0, 1)


def apply_weather(
    image: torch.Tensor,
    weather: str,
    *,
    generator: torch.Generator,
    strength: float = 1.0,
    depth: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``image`` ``(3, H, W)`` in [0, 1] as seen in ``weather``.

    Args:
        image: ``(3, H, W)`` float in [0, 1].
        weather: one of :data:`WEATHERS`.
        generator: source of all randomness (particles, noise, intensity jitter).
        strength: scales the effect; 0 leaves the image unchanged.
        depth: optional ``(H, W)`` distance in metres (``inf`` for sky).

    Returns:
        ``(3, H, W)`` float in [0, 1], on the device of ``image``.
    """
    if weather not in WEATHERS:
        raise ValueError(f"weather must be one of {WEATHERS}, got {weather!r}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if weather == "clear" or strength <= 0:
        return image
    dev = image.device
    _, h, w = image.shape
    d = depth.to(dev) if depth is not None else _pseudo_depth(h, w, dev)
    jitter = 0.75 + 0.5 * float(torch.rand((), generator=generator))
    s = strength * jitter
    img = image.float()
    if weather == "haze":
        out = _scatter(img, d, 0.0028 * s, (0.78, 0.80, 0.82))
        out = out * (1 - 0.08 * s) + 0.04 * s
    elif weather == "fog":
        out = _scatter(img, d, 0.0055 * s, (0.84, 0.85, 0.86))
    elif weather == "rain":
        grey = img.mean(0, keepdim=True)
        out = torch.lerp(img, grey.expand_as(img), 0.35 * min(s, 1.0)) * (1 - 0.28 * min(s, 1.0))
        out = _scatter(out, d, 0.0035 * s, (0.55, 0.57, 0.60))
        out = (
            F.avg_pool2d(out[None], 3, stride=1, padding=1, count_include_pad=False)[0] * 0.5
            + out * 0.5
        )
        rain = _streaks(h, w, 0.004 * s, max(5, h // 20), 3, generator).to(dev)
        out = out * (1 - 0.35 * rain) + 0.75 * 0.35 * rain
    elif weather == "snow":
        out = _scatter(img, d, 0.004 * s, (0.86, 0.87, 0.90))
        flakes = (torch.rand(h, w, generator=generator) < 0.006 * s).float()
        flakes = F.max_pool2d(flakes[None, None], 3, stride=1, padding=1)[0, 0]
        flakes = F.avg_pool2d(flakes[None, None], 3, stride=1, padding=1)[0, 0].to(dev)
        out = torch.lerp(out, torch.ones_like(out), 0.85 * flakes[None])
    else:  # night
        gamma = 1.0 + 0.9 * s
        out = img.clamp_min(0) ** gamma * (0.45 / (1 + 0.3 * s))
        out = out * torch.tensor([0.80, 0.88, 1.15], device=dev)[:, None, None]
        bright = (img - 1.0).clamp_min(0)  # emissive values above 1 (lit windows) stay bright
        out = out + bright.clamp(max=1.0) * 0.9
        noise = torch.randn(1, h, w, generator=generator).to(dev)
        out = out + 0.02 * s * noise
    return out.clamp(0, 1)
