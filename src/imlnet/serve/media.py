"""Pictures of ``imlnet serve``: upload checks, thumbnails, the match figure, the base map.

Every check of an uploaded image happens before the job is queued, so a bad file is refused
with one message (:class:`UploadError`, an HTTP status and a text) and costs no model time.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from imlnet.errors import ImlnetError
from imlnet.io import atomic_path, write_json

IMAGE_FORMATS = {"JPEG", "PNG", "TIFF", "WEBP", "BMP", "MPO"}


class UploadError(ImlnetError, ValueError):
    """A refused upload: ``status`` is the HTTP status (413, 415, 422 ...)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def safe_name(name: str, index: int) -> str:
    """A file name that stays inside its folder: the base name, ``[A-Za-z0-9._-]`` only.

    ``../../etc/passwd`` gives ``passwd``; an empty or dotted name gives ``upload-<index>``.
    """
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name).replace("\\", "/")).name)
    base = base.lstrip(".")
    return base or f"upload-{index:03d}"


def check_image(data: bytes, name: str, *, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of an uploaded image after checking that it can be used.

    Raises:
        UploadError: 415 not an image (or a format PIL cannot use), 413 more pixels than
            ``max_pixels`` (checked from the header, before decoding), 422 a corrupt or
            truncated image.
    """
    try:
        with warnings.catch_warnings():  # the pixel count is checked below, with its own limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise UploadError(413, f"{name}: too many pixels to decode safely ({err})") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UploadError(
            415, f"{name}: not an image (no JPEG, PNG, TIFF or WebP header); upload photos"
        ) from err
    with image:
        width, height = image.size
        if image.format not in IMAGE_FORMATS:
            raise UploadError(415, f"{name}: {image.format} images are not accepted; use JPEG")
        if width * height > max_pixels:
            raise UploadError(
                413,
                f"{name}: {width} x {height} = {width * height / 1e6:.0f} megapixels, over the "
                f"limit of {max_pixels / 1e6:.0f}; downscale the photo (the model reads it at a "
                "few hundred pixels)",
            )
        try:
            image.load()  # the full decode: a truncated JPEG fails here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UploadError(
                422, f"{name}: corrupt or truncated image ({err}); upload the file again"
            ) from err
    return width, height


def thumbnail(src: Path, out: Path, side: int = 256) -> Path:
    """A JPEG thumbnail of ``src`` (longest side ``side``), written atomically."""
    with Image.open(src) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        with atomic_path(out) as tmp:
            image.save(tmp, "JPEG", quality=85)
    return out


def match_figure(
    query: Path,
    query_px: np.ndarray,
    map_grey: np.ndarray,
    map_px: np.ndarray,
    out: Path,
    *,
    max_query_px: int,
    height: int = 360,
    lines: int = 80,
) -> Path:
    """The photo and the map window side by side, with lines between inlier matches.

    Args:
        query: the photo; ``query_px`` are inlier pixels in it after the verifier's resize
            (longest side at most ``max_query_px``).
        map_grey: the map window (grey); ``map_px`` the inliers' window pixels.
        out: the JPEG, written atomically.
        height: the figure's height in pixels.
        lines: at most this many lines (an even sample of the inliers).
    """
    with Image.open(query) as image:
        photo = np.asarray(image.convert("RGB"))[:, :, ::-1]
    scale = max_query_px / max(photo.shape[:2])
    if scale < 1.0:
        photo = cv2.resize(
            photo,
            (round(photo.shape[1] * scale), round(photo.shape[0] * scale)),
            interpolation=cv2.INTER_AREA,
        )
    left_s = height / photo.shape[0]
    right_s = height / map_grey.shape[0]
    left = cv2.resize(photo, (max(round(photo.shape[1] * left_s), 1), height))
    right = cv2.cvtColor(
        cv2.resize(map_grey, (max(round(map_grey.shape[1] * right_s), 1), height)),
        cv2.COLOR_GRAY2BGR,
    )
    gap = 8
    canvas = np.full((height, left.shape[1] + gap + right.shape[1], 3), 255, np.uint8)
    canvas[:, : left.shape[1]] = left
    canvas[:, left.shape[1] + gap :] = right
    pick = np.linspace(0, len(query_px) - 1, min(lines, len(query_px))).round().astype(int)
    offset = left.shape[1] + gap
    for i in pick if len(query_px) else []:
        a = tuple(int(v) for v in np.round(query_px[i] * left_s))
        b = (round(float(map_px[i][0]) * right_s) + offset, round(float(map_px[i][1]) * right_s))
        colour = (0, 200, 255) if i % 2 else (60, 220, 60)
        cv2.line(canvas, a, b, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 3, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, b, 3, colour, -1, cv2.LINE_AA)
    ok, data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ImlnetError(f"{out}: cannot encode the match figure")
    with atomic_path(out) as tmp:
        tmp.write_bytes(data.tobytes())
    return out


@dataclass
class BaseMap:
    """One orthophoto of the gallery as a Web Mercator PNG and its lat/lon bounds."""

    source: str
    png: Path
    bounds: tuple[tuple[float, float], tuple[float, float]]  # ((south, west), (north, east))


def base_maps(
    rows: Sequence[Mapping[str, Any]], folder: Path, *, max_px: int = 2048
) -> list[BaseMap]:
    """The gallery's orthophotos (its rows' ``source``) as Web Mercator PNGs for the page.

    Each raster is read once at the resolution the page needs (rasterio takes a matching
    overview level when the file has one), warped to EPSG:3857 (what Leaflet draws) with
    transparent nodata, and cached in ``folder`` with its bounds (``basemaps.json``) so a
    restart of the server reads nothing again. Sources that cannot be opened are skipped (the
    page then draws the footprints on a blank map).
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import calculate_default_transform, reproject, transform_bounds

    sources = list(dict.fromkeys(str(r.get("source") or "") for r in rows if r.get("source")))
    index_file = folder / "basemaps.json"
    cached = _read_cache(index_file, sources)
    if cached is not None:
        return cached
    maps = []
    for i, source in enumerate(sources):
        try:
            ds = rasterio.open(source)
        except rasterio.errors.RasterioIOError:
            continue
        with ds:
            step = max(1, math.ceil(max(ds.width, ds.height) / max_px))
            shape = (max(ds.height // step, 1), max(ds.width // step, 1))
            bands = [1, 2, 3] if ds.count >= 3 else [1, 1, 1]
            data = ds.read(bands, out_shape=(3, *shape), resampling=Resampling.average)
            valid = ds.read_masks(1, out_shape=shape) > 0
            transform = ds.transform @ ds.transform.scale(ds.width / shape[1], ds.height / shape[0])
            crs = ds.crs
        data = _to_uint8(data)
        dst_t, w, h = calculate_default_transform(
            crs,
            "EPSG:3857",
            shape[1],
            shape[0],
            *rasterio.transform.array_bounds(*shape, transform),
        )
        out = np.zeros((4, h, w), np.uint8)
        rgba = np.concatenate([data, (valid * 255).astype(np.uint8)[None]])
        for b in range(4):
            how = Resampling.bilinear if b < 3 else Resampling.nearest
            reproject(
                rgba[b], out[b], src_transform=transform, src_crs=crs, dst_transform=dst_t,
                dst_crs="EPSG:3857", resampling=how,
            )  # fmt: skip
        west, south, east, north = transform_bounds(
            "EPSG:3857", "EPSG:4326", *rasterio.transform.array_bounds(h, w, dst_t)
        )
        png = folder / f"basemap-{i}.png"
        with atomic_path(png) as tmp:
            Image.fromarray(np.moveaxis(out, 0, -1), "RGBA").save(tmp, "PNG", optimize=True)
        maps.append(BaseMap(source, png, ((south, west), (north, east))))
    write_json(
        index_file,
        [{"source": m.source, "png": m.png.name, "bounds": m.bounds} for m in maps],
    )
    return maps


def _read_cache(index_file: Path, sources: list[str]) -> list[BaseMap] | None:
    import json

    try:
        entries = json.loads(index_file.read_text(encoding="utf-8"))
        maps = [
            BaseMap(e["source"], index_file.parent / e["png"], tuple(map(tuple, e["bounds"])))
            for e in entries
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if [m.source for m in maps] != sources or not all(m.png.is_file() for m in maps):
        return None
    return maps


def _to_uint8(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint8:
        return data
    lo, hi = np.percentile(data, (2, 98))
    return (np.clip((data - lo) / max(float(hi - lo), 1e-9), 0, 1) * 255).astype(np.uint8)
