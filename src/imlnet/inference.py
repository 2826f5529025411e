"""One inference path: load an exported model with its transform, read images, embed them.

Every caller that turns images into descriptors goes through this module, as open_clip's
``create_model_and_transforms`` makes every caller embed images the same way: evaluation, the
trainer's validation, indexing and localisation, visualisation and the demo. It decides:

- which encoder a view uses (:func:`view_domain`: University-1652 / SUES-200 view names);
- how an image file is decoded (:func:`read_image`: RGB, one clear error naming the file);
- the input size and normalisation (:func:`load_model` gives the model, its training size and
  its evaluation transform; :func:`eval_transform`);
- the descriptor (:func:`embed`): the official University-1652 test feature, the descriptor of
  the image plus that of its horizontal mirror, summed, then L2-normalised
  (``extract_feature`` in layumi/University1652-Baseline). The sum makes the feature nearly
  invariant to left-right flips, which the drone orbits contain.

This module imports neither Lightning nor the trainer: serving needs only the model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

from imlnet.errors import CheckpointError, DeviceError, ImageReadError

Domain = Literal["drone", "satellite"]
#: An image transform: PIL image -> ``(3, H, W)`` float32 tensor, ImageNet-normalised.
Transform = Callable[[Image.Image], Tensor]
#: Input side used when a model does not record its training size.
DEFAULT_IMAGE_SIZE = 256


def view_domain(view: str) -> Domain:
    """The encoder domain of a view: ``"drone"`` or ``"satellite"``.

    Accepts the University-1652 / SUES-200 folder names (``query_drone``, ``gallery_satellite``,
    ``query_satellite``, ``gallery_drone``, ``drone``, ``satellite``) and the domains themselves.

    Raises:
        ValueError: the name mentions neither drone nor satellite (e.g. University-1652's
            ``street`` views, which IML-Net does not use).
    """
    name = str(view).lower()
    if "drone" in name:
        return "drone"
    if "satellite" in name:
        return "satellite"
    raise ValueError(
        f"view {view!r} is neither a drone nor a satellite view; use one of query_drone, "
        "gallery_satellite, query_satellite, gallery_drone"
    )


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file as an RGB PIL image (fully loaded, the file closed).

    Raises:
        ImageReadError: the file does not exist, or it is truncated or not an image; the
            message names the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image not found; check the path")
    try:
        with Image.open(path) as image:
            if image.mode in _WIDE_MODES:  # PIL's convert would clip 16-bit values at 255
                return _wide_to_rgb(image)
            return image.convert("RGB")  # forces the full decode: truncation is caught here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(
            f"{path}: cannot decode image ({err}); replace it with a JPEG or PNG file"
        ) from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(
            f"{path}: image too large to decode safely ({err}); resize it first"
        ) from err


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _wide_to_rgb(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image as RGB, its range scaled to 0..255 (not clipped)."""
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max(initial=0))
    if image.mode == "F":
        top = 1.0 if peak <= 1.0 else peak
    else:  # 16-bit, or 32-bit integers holding 8-bit or 16-bit values
        top = 255.0 if image.mode == "I" and peak <= 255 else max(65535.0, peak)
    grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def eval_transform(image_size: int) -> Transform:
    """The evaluation transform at ``image_size`` pixels (the same for drone and satellite).

    Bicubic resize to ``image_size x image_size``, clamp to [0, 1], ImageNet normalisation
    (:func:`imlnet.data.transforms.build_transforms` with ``train=False``). Accepts PIL images
    and ``(3, H, W)`` tensors in [0, 1].

    Raises:
        ValueError: ``image_size < 1``.
    """
    from imlnet.data.transforms import build_transforms

    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return build_transforms("drone", train=False, size=int(image_size))


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference, with the input size and transform it expects.

    What :func:`load_model` returns and what :func:`embed`, :func:`imlnet.geo.index.build_index`
    and :func:`imlnet.geo.localize.localize` take.

    Attributes:
        model: the :class:`~imlnet.models.imlnet.IMLNet` in eval mode on the chosen device, or
            an :class:`~imlnet.runtime.OnnxDescriptor` (an exported ``.onnx`` run by
            onnxruntime); either has ``encode(x, domain)``.
        image_size: input side in pixels (the training size saved with the model, else 256,
            unless the caller overrode it).
        transform: :func:`eval_transform` at ``image_size``.
        source: the model folder or ``.onnx`` file it was loaded from (None when built in
            memory).
    """

    model: Any
    image_size: int
    transform: Transform
    source: Path | None = None

    def encoder(self, domain: Domain | str) -> Callable[[Tensor], Tensor]:
        """``x -> model.encode(x, domain)`` for ``"drone"`` queries or ``"satellite"`` tiles."""
        side = view_domain(domain)
        return lambda x: self.model.encode(x, side)

    @property
    def device(self) -> torch.device:
        """Where batches must go (the CPU for an ONNX model)."""
        return _model_device(self.model)

    @property
    def dim(self) -> int | None:
        """The descriptor size, when the model says."""
        return int(getattr(self.model, "descriptor_dim", 0) or 0) or None

    @functools.cached_property
    def weights_hash(self) -> str:
        """What identifies the weights a gallery was embedded with (recorded in its manifest).

        The sha256 of ``model.safetensors``; an exported ONNX file carries the hash of the
        weights it was exported from (so galleries built with either are interchangeable),
        with ``+flip`` when the mirror sum is inside the graph (its descriptors differ).
        Empty for a model built in memory.
        """
        own = getattr(self.model, "weights_hash", None)
        if own:
            return str(own)
        if self.source is None:
            return ""
        from imlnet.models.persistence import weights_sha256

        return weights_sha256(self.source)


def load_model(
    checkpoint: str | os.PathLike[str],
    device: str | torch.device = "auto",
    *,
    image_size: int | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """Load an exported model with its input size and transform.

    Example:
        >>> import imlnet
        >>> model = imlnet.load_model("runs/demo/model")  # doctest: +SKIP
        >>> model.image_size  # doctest: +SKIP
        128

    Args:
        checkpoint: the model folder (``model.safetensors`` + ``config.json``, as
            ``IMLNet.save_pretrained`` and training write it) or its weights file, or an
            ``.onnx`` file from ``imlnet export`` (run by onnxruntime on the CPU; needs
            ``pip install 'imlnet[onnx]'``).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``, ...
        image_size: override the saved training size (None: the saved size, else 256).
        threads: onnxruntime threads for an ``.onnx`` file (None: torch's thread count).

    Raises:
        CheckpointError: a file is missing, corrupt, or written by a newer imlnet, or the
            weights do not match the config.
        DeviceError: ``device`` asks for CUDA on a machine without it, or for an ``.onnx``.
    """
    from imlnet.cliargs import resolve_device

    path = Path(checkpoint)
    if path.suffix.lower() == ".onnx":
        from imlnet.runtime import OnnxDescriptor

        if str(device) not in ("auto", "cpu"):
            raise DeviceError(
                f"--device {device}: an .onnx model runs on the CPU with onnxruntime here; "
                "use --device cpu (or --checkpoint with the model folder for CUDA)"
            )
        model: Any = OnnxDescriptor(path, threads=threads)
    else:
        from imlnet.models.imlnet import IMLNet  # lazy: `import imlnet.inference` stays light

        dev = resolve_device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(
                f"--device {device}: no CUDA device is available here; use --device cpu"
            )
        model = IMLNet.from_pretrained(path, map_location=dev).to(dev).eval()
    size = int(image_size or model.input_size(DEFAULT_IMAGE_SIZE))
    return LoadedModel(model, size, eval_transform(size), path)


# --------------------------------------------------------------------------- embedding
class _ImageList(torch.utils.data.Dataset):
    """Image files (read with :func:`read_image`) or PIL images, through ``transform``."""

    def __init__(self, items: Sequence[Any], transform: Transform) -> None:
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        item = self.items[i]
        image = item if isinstance(item, Image.Image) else read_image(item)
        return self.transform(image)


def _is_image_list(images: Any) -> bool:
    return (
        isinstance(images, Sequence)
        and not isinstance(images, (str, bytes))
        and len(images) > 0
        and all(isinstance(x, (str, os.PathLike, Image.Image)) for x in images)
    )


def batch_images(batch: Any) -> Tensor:
    """The images of a loader batch: a tensor, a dict's ``"image"``, or a tuple's first item.

    Raises:
        TypeError: none of these shapes.
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping) and isinstance(batch.get("image"), Tensor):
        return batch["image"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        "a batch must be an image tensor (B, 3, H, W), a dict with an 'image' tensor or an "
        f"(image, label, ...) tuple, got {type(batch).__name__}"
    )


def _encoder(model: Any, domain: Domain) -> Callable[[Tensor], Tensor]:
    if hasattr(model, "encode"):
        return lambda x: model.encode(x, domain)
    if callable(model):
        return model
    raise TypeError(f"model must have encode(x, domain) or be callable, got {type(model)}")


def _model_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@torch.inference_mode()
def embed(
    model: Any,
    images: Sequence[str | os.PathLike[str] | Image.Image] | Iterable[Any] | Tensor,
    domain: Domain | str,
    *,
    flip: bool = True,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device | None = None,
    transform: Transform | None = None,
    progress: bool = False,
    desc: str = "embedding",
) -> Tensor:
    """Descriptors of images, the official way: ``normalize(f(x) + f(hflip(x)))``.

    Example:
        >>> import imlnet
        >>> model = imlnet.load_model("runs/demo/model")  # doctest: +SKIP
        >>> imlnet.embed(model, ["drone.jpg"], "drone").shape  # doctest: +SKIP
        torch.Size([1, 512])

    Args:
        model: what :func:`load_model` returns (its transform is used for image files), an
            IMLNet (or anything with ``encode(x, domain)``), or a callable
            ``(B, 3, H, W) -> (B, D)`` (``domain`` is then not used). Its mode is not changed:
            load it with :func:`load_model` (eval mode).
        images: one of
            - a sequence of image paths or PIL images, read with :func:`read_image` and passed
              through ``transform`` in a DataLoader with ``workers`` processes;
            - a DataLoader or other iterable of batches: ``(B, 3, H, W)`` tensors, dicts with an
              ``"image"`` tensor (the datasets' ``{"image", "label", "path"}``) or
              ``(image, label, ...)`` tuples, already transformed;
            - a ``(N, 3, H, W)`` tensor, already transformed, embedded ``batch_size`` at a time.
        domain: ``"drone"`` or ``"satellite"``, or a view name (see :func:`view_domain`).
        flip: add the descriptor of the horizontally mirrored image (the official feature);
            False for one pass.
        batch_size: images per forward pass (paths and tensors).
        workers: DataLoader processes decoding image files.
        device: where the model runs (default: the device of the model's parameters, else
            the CPU).
        transform: PIL image -> ``(3, H, W)`` for paths / PIL images (default:
            :func:`eval_transform` at ``model.input_size()``, else 256).
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        ``(N, D)`` float32 on the CPU, each row of unit L2 norm; ``(0, 0)`` for no images.

    Raises:
        ImageReadError: an image file is missing or cannot be decoded (named).
        CheckpointError: the model does not return one ``(B, D)`` row per image.
    """
    if isinstance(model, LoadedModel):
        transform = transform or model.transform
        model = model.model
    encode = _encoder(model, view_domain(domain))
    dev = torch.device(device) if device is not None else _model_device(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total: int | None = None
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        batches: Iterable[Any] = images.split(batch_size)
        total = len(images)
    elif _is_image_list(images):
        if transform is None:
            size_of = getattr(model, "input_size", None)
            transform = eval_transform(size_of() if callable(size_of) else DEFAULT_IMAGE_SIZE)
        batches = torch.utils.data.DataLoader(
            _ImageList(images, transform),  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            pin_memory=dev.type == "cuda",
        )
        total = len(images)  # type: ignore[arg-type]
    else:
        batches = images  # type: ignore[assignment]
    feats: list[Tensor] = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            x = batch_images(batch).to(dev, non_blocking=True)
            f = _checked(encode(x), len(x)).float()
            if flip:
                f = f + _checked(encode(torch.flip(x, dims=[3])), len(x)).float()
            feats.append(F.normalize(f, dim=1).cpu())
            bar.update(len(x))
    if not feats:
        return torch.empty(0, 0)
    return torch.cat(feats)


def _checked(out: Any, n: int) -> Tensor:
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CheckpointError(
            f"the model returned {shape} for {n} images, expected one descriptor row per "
            f"image ({n}, D); is the checkpoint an imlnet model?"
        )
    return out
