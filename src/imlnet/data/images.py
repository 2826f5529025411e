"""Decoding a dataset's images, and what to do with the ones that cannot be decoded.

Every image is decoded by :func:`imlnet.inference.read_image` (the package's one decoder: RGB,
16-bit and palette images handled, one clear error naming the file); here it becomes a tensor,
and a dataset's ``on_bad_image`` policy decides whether an unreadable file stops the run or is
reported and left out.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from imlnet import inference
from imlnet.errors import ImageReadError

BadImagePolicy = Literal["raise", "skip"]

_SKIP_HINT = (
    "To train without unreadable images instead, set data.on_bad_image: skip in the imlnet fit "
    "config (on_bad_image='skip' in Python)."
)


def read_image(path: str | os.PathLike[str]) -> Tensor:
    """Decode an image file as RGB (with :func:`imlnet.inference.read_image`, the one decoder).

    Returns:
        ``(3, H, W)`` float32 in [0, 1].

    Raises:
        ImageReadError: naming the file, when it is missing, truncated or not an image.
    """
    try:
        rgb = inference.read_image(path)
    except ImageReadError as err:
        raise ImageReadError(f"{err}. {_SKIP_HINT}") from err
    array = np.array(rgb, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def check_policy(on_bad_image: str) -> BadImagePolicy:
    """Validate ``on_bad_image``."""
    if on_bad_image not in ("raise", "skip"):
        raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
    return on_bad_image  # type: ignore[return-value]


class BadImages:
    """The per-dataset record of unreadable files (``skipped``) and the policy for them."""

    def __init__(self, on_bad_image: str) -> None:
        self.on_bad_image = check_policy(on_bad_image)
        self.skipped: list[str] = []
        self._bad: set[str] = set()

    def is_bad(self, path: Path) -> bool:
        return str(path) in self._bad

    def mark(self, path: Path, err: Exception, *, warn: bool = True) -> None:
        if str(path) in self._bad:
            return
        self._bad.add(str(path))
        self.skipped.append(str(path))
        if warn:
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=3)

    def read(self, path: Path) -> Tensor | None:
        """The image, or None when it is unreadable and the policy is ``"skip"``."""
        if self.is_bad(path):
            return None
        try:
            return read_image(path)
        except ImageReadError as err:
            if self.on_bad_image == "raise":
                raise
            self.mark(path, err)
            return None

    def scan(self, paths: Sequence[Path], progress: bool, desc: str) -> list[str]:
        """Decode every file; return the unreadable ones (recorded as skipped with ``skip``)."""
        bad = []
        for path in tqdm(paths, desc=desc, unit="image", disable=not progress):
            try:
                read_image(path)
            except ImageReadError as err:
                bad.append(str(path))
                if self.on_bad_image == "skip":
                    self.mark(path, err, warn=False)
        return bad
