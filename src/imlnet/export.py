"""``imlnet export``: the descriptor network as an ONNX file, and running such a file.

On-board computers of drones (Jetson, Raspberry Pi class) run ONNX Runtime or TensorRT, not a
Lightning install. :func:`export_onnx` writes the part of IML-Net that localisation needs, the
image -> radius-r descriptor network (the four units and the descriptor head; no IRN, MUML or
classifier), with a dynamic batch axis, through ``torch.onnx.export(dynamo=True)``.

The graph's input ``image`` is ``(N, 3, S, S)`` float32, resized and ImageNet-normalised
exactly as :func:`imlnet.inference.eval_transform` does (the file records ``S``, the mean and
the std); its output ``descriptor`` is ``(N, D)``. With ``flip=True`` the graph adds the
descriptor of the mirrored image and L2-normalises the sum (the official University-1652 test
feature) so that one call gives the final feature.

The file's metadata (``onnx.ModelProto.metadata_props``) carries what a runtime needs:
``imlnet.format`` (:data:`ONNX_FORMAT`), the package version, the input size, normalisation,
the domains the graph encodes, ``flip``, the radius and the sha256 of the weights it was
exported from. :class:`imlnet.runtime.OnnxDescriptor` runs such a file with onnxruntime
behind the torch model's ``encode(x, domain)``, so ``imlnet index --onnx`` and
``imlnet localize --onnx`` go through the one embedding path
(:func:`imlnet.inference.embed`), and a gallery built from the checkpoint can be searched
with the ONNX file and the other way round (same weights hash).

    imlnet export runs/demo/model --onnx model.onnx [--flip] [--domain drone|satellite]

Needs the optional dependencies: ``pip install 'imlnet[onnx]'`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imlnet import __version__
from imlnet.errors import ImlnetError
from imlnet.runtime import _KEY, ONNX_FORMAT, _require

__all__ = ["ONNX_FORMAT", "export_onnx", "main"]


class _Descriptor(nn.Module):
    """``image -> encode(image, domain)`` (``+ mirrored``, L2-normalised, with ``flip``)."""

    def __init__(self, model: nn.Module, domain: str, flip: bool) -> None:
        super().__init__()
        self.model, self.domain, self.flip = model, domain, flip

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(image, self.domain)
        if self.flip:
            out = F.normalize(out + self.model.encode(torch.flip(image, dims=[3]), self.domain))
        return out


def export_onnx(
    checkpoint: str | os.PathLike[str] | Any,
    out: str | os.PathLike[str],
    *,
    domain: str | None = None,
    flip: bool = False,
    image_size: int | None = None,
    opset: int = 18,
) -> Path:
    """Write the descriptor network of a model as an ONNX file with a dynamic batch axis.

    Example:
        >>> import imlnet
        >>> imlnet.export_onnx("runs/demo/model", "model.onnx")  # doctest: +SKIP
        PosixPath('model.onnx')

    Args:
        checkpoint: a model folder (or what :func:`imlnet.load_model` returns for one).
        out: the ``.onnx`` file, written atomically.
        domain: ``"drone"`` or ``"satellite"``: which encoder. None: both, which needs one
            encoder for both domains (``share_weights``) that encodes them alike; a model with
            one encoder per domain, or whose satellite descriptors pool over turns
            (``satellite_rotations``, the demo's), is exported once per domain.
        flip: put the mirror sum and the L2 normalisation inside the graph.
        image_size: the input side (None: the model's training size).
        opset: the ONNX opset.

    Raises:
        ImlnetError: the ONNX packages are missing, or ``domain`` is None for a model with two
            encoders; CheckpointError: the model folder is missing or corrupt.
    """
    from imlnet.inference import LoadedModel, load_model
    from imlnet.io import atomic_path

    onnx = _require("onnx")
    _require("onnxscript")
    loaded = checkpoint if isinstance(checkpoint, LoadedModel) else load_model(checkpoint, "cpu")
    model = loaded.model
    if not isinstance(model, nn.Module):
        raise ImlnetError(f"{loaded.source}: export takes a model folder, not an .onnx file")
    if domain is None and not model.config.get("share_weights", True):
        raise ImlnetError(
            f"{loaded.source}: the model has one encoder per domain; export each with "
            "--domain drone (queries) and --domain satellite (gallery tiles)"
        )
    if domain is None and int(model.config.get("satellite_rotations", 1)) > 1:
        raise ImlnetError(
            f"{loaded.source}: the model pools satellite descriptors over "
            f"{model.config['satellite_rotations']} turns, so the two domains' graphs differ; "
            "export each with --domain drone (queries) and --domain satellite (gallery tiles)"
        )
    side = domain or "drone"
    size = int(image_size or loaded.image_size)
    module = _Descriptor(model.to("cpu").eval(), side, flip).eval()
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    out = Path(out)
    from imlnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    meta = {
        "format": ONNX_FORMAT,
        "version": __version__,
        "image_size": size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "domains": [domain] if domain else ["drone", "satellite"],
        "flip": bool(flip),
        "radius": float(model.radius),
        "descriptor_dim": int(model.descriptor_dim),
        "weights_sha256": loaded.weights_hash,
        "config": model.config,
    }
    precision = getattr(model, "frozen_precision", "fp32")
    model.frozen_precision = "fp32"  # an ONNX graph is fp32 throughout (no autocast in it)
    with atomic_path(out) as tmp, torch.inference_mode(False), torch.no_grad():
        try:
            program = torch.onnx.export(
                module,
                (example,),
                input_names=["image"],
                output_names=["descriptor"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
        finally:
            model.frozen_precision = precision
        proto = program.model_proto
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = _KEY + key, json.dumps(value)
        onnx.save_model(proto, str(tmp))
    return out


def main(argv: Sequence[str]) -> int:
    """``imlnet export MODEL_DIR --onnx OUT.onnx``."""
    ap = argparse.ArgumentParser(prog="imlnet export", description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path, help="model folder (model.safetensors + config.json)")
    ap.add_argument("--onnx", type=Path, required=True, help="the .onnx file to write")
    ap.add_argument("--domain", choices=("drone", "satellite"), help="one encoder only")
    ap.add_argument(
        "--flip", action="store_true", help="mirror sum + L2 normalisation inside the graph"
    )
    ap.add_argument("--image-size", type=int, help="input side (default: the training size)")
    ap.add_argument("--opset", type=int, default=18)
    args = ap.parse_args(list(argv))
    if args.onnx.suffix.lower() != ".onnx":
        raise ImlnetError(f"--onnx {args.onnx}: the file name must end in .onnx")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        path = export_onnx(
            args.model,
            args.onnx,
            domain=args.domain,
            flip=args.flip,
            image_size=args.image_size,
            opset=args.opset,
        )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
