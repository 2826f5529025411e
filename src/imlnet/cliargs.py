"""One dialect for every ``imlnet`` command's common flags.

Every command that takes an image size, a batch size, data-loading workers or a device adds them
through :func:`add_common`, so the names, defaults and help texts agree across ``synth``,
``evaluate``, ``tile``, ``index``, ``localize``, ``visualize`` and ``demo``. Old spellings
(``--size``, ``--num-workers``) stay as hidden aliases for one release.
"""

from __future__ import annotations

import argparse
import os

import torch

#: the data-loading workers a command uses when the user does not say (at most 8; 0 on one core)
DEFAULT_WORKERS = min(8, max(0, (os.cpu_count() or 1) - 1))


def add_common(
    parser: argparse.ArgumentParser,
    *,
    image_size: int | bool | None = False,
    batch_size: int | None = None,
    workers: bool = False,
    device: bool = False,
) -> None:
    """Add the shared flags to ``parser``.

    Args:
        image_size: add ``--image-size`` (alias ``--size``, hidden) with this default; ``None``
            means "the model's training size"; ``False`` leaves the flag out.
        batch_size: add ``--batch-size`` with this default (``None`` leaves it out).
        workers: add ``--workers`` (alias ``--num-workers``, hidden), default
            :data:`DEFAULT_WORKERS`.
        device: add ``--device`` (``auto``: CUDA when available, else CPU).
    """
    if image_size is not False:
        what = "the model's training size" if image_size is None else f"{image_size}"
        parser.add_argument(
            "--image-size",
            dest="image_size",
            type=int,
            default=image_size,
            help=f"image side in pixels (default: {what})",
        )
        parser.add_argument("--size", dest="image_size", type=int, help=argparse.SUPPRESS)
    if batch_size is not None:
        parser.add_argument(
            "--batch-size", type=int, default=batch_size, help=f"images per batch ({batch_size})"
        )
    if workers:
        parser.add_argument(
            "--workers",
            dest="workers",
            type=int,
            default=DEFAULT_WORKERS,
            help=f"data-loading processes (default: {DEFAULT_WORKERS})",
        )
        parser.add_argument("--num-workers", dest="workers", type=int, help=argparse.SUPPRESS)
    if device:
        parser.add_argument(
            "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ..."
        )


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; anything else as torch reads it."""
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)
