"""Running an ``imlnet export`` ONNX file with onnxruntime behind the torch model's interface.

:class:`OnnxDescriptor` has the ``encode(x, domain)``, ``input_size()``, ``radius`` and
``config`` of an :class:`~imlnet.models.imlnet.IMLNet`, so :func:`imlnet.inference.load_model`
returns it for an ``.onnx`` file and :func:`imlnet.inference.embed`, ``imlnet index --onnx`` and
``imlnet localize --onnx`` use it through the one embedding path. The file format is described
in :mod:`imlnet.export`. Needs ``pip install 'imlnet[onnx]'``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imlnet import __version__
from imlnet.errors import CheckpointError, ImlnetError

__all__ = ["ONNX_FORMAT", "OnnxDescriptor"]

#: written into the file's metadata; bumped on incompatible changes
ONNX_FORMAT = "imlnet-onnx/1"
_KEY = "imlnet."
_MISSING = (
    "needs the optional ONNX dependencies: pip install 'imlnet[onnx]' "
    "(onnx, onnxscript and onnxruntime)"
)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImlnetError(
            f"{module} is not installed: ONNX export and inference {_MISSING}"
        ) from err


class OnnxDescriptor:
    """An ``imlnet export`` file run by onnxruntime (CPU), with the torch model's interface.

    ``encode(x, domain)`` takes the ``(B, 3, S, S)`` batches of
    :func:`imlnet.inference.eval_transform` and returns ``(B, D)`` tensors, so
    :func:`imlnet.inference.embed` and everything above it use it as they use an
    :class:`~imlnet.models.imlnet.IMLNet`.

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime intra-op threads (None: torch's thread count).

    Raises:
        CheckpointError: the file is missing, truncated, not an imlnet export, or written by a
            newer format; ImlnetError: onnxruntime is not installed.
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"{self.path}: ONNX model not found; write one with imlnet export"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{self.path}: cannot load the ONNX model ({first}); the file is truncated or "
                "not an ONNX file: export it again with imlnet export"
            ) from err
        raw = self.session.get_modelmeta().custom_metadata_map
        self.meta = {k[len(_KEY) :]: json.loads(v) for k, v in raw.items() if k.startswith(_KEY)}
        fmt = str(self.meta.get("format", ""))
        if not fmt.startswith("imlnet-onnx/"):
            raise CheckpointError(
                f"{self.path}: not an imlnet export (no {_KEY}format metadata); export the model "
                "with imlnet export, which records the input size and normalisation"
            )
        if _format_version(fmt, self.path) > _format_version(ONNX_FORMAT, self.path):
            raise CheckpointError(
                f"{self.path}: written by imlnet {self.meta.get('version', '?')} in format {fmt}; "
                f"this imlnet {__version__} reads {ONNX_FORMAT}: upgrade imlnet "
                "(pip install -U imlnet) or export the model again with this version"
            )
        self.input_name = self.session.get_inputs()[0].name
        self.domains = tuple(self.meta.get("domains") or ("drone", "satellite"))
        self.flip = bool(self.meta.get("flip", False))
        self.radius = float(self.meta.get("radius", 1.0))
        self.descriptor_dim = int(self.meta.get("descriptor_dim", 0))
        self.config = dict(self.meta.get("config") or {})
        sha = str(self.meta.get("weights_sha256") or "")
        self.weights_hash = f"{sha}+flip" if sha and self.flip else sha

    def input_size(self, default: int = 256) -> int:
        """The input side the graph was exported for."""
        return int(self.meta.get("image_size") or default)

    def encode(self, x: torch.Tensor, domain: str = "drone") -> torch.Tensor:
        """Descriptors ``(B, D)`` of a ``(B, 3, S, S)`` batch, on the CPU.

        Raises:
            ImlnetError: the file encodes the other domain only.
        """
        if domain not in self.domains:
            raise ImlnetError(
                f"{self.path} encodes {' and '.join(self.domains)} images only; export the "
                f"{domain} encoder with imlnet export --domain {domain}"
            )
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: batch})[0])

    def __repr__(self) -> str:
        return f"OnnxDescriptor({str(self.path)!r}, domains={self.domains}, flip={self.flip})"


def _format_version(fmt: str, path: Path) -> int:
    try:
        return int(fmt.rsplit("/", 1)[1])
    except (IndexError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable format {fmt!r} in its metadata") from err
