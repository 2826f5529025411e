"""imlnet: IML-Net for cross-view geo-localisation (drone <-> satellite).

The Python API is the functions the commands call::

    import imlnet

    model = imlnet.load_model("runs/demo/model")             # a model folder, or an .onnx file
    gallery = imlnet.build_index(model, "runs/demo/tiles")    # tiles from `imlnet tile`
    fixes = imlnet.localize(model, gallery, ["drone.jpg"])    # top-k tiles and a position
    print(fixes[0].lat, fixes[0].lon)
    descriptors = imlnet.embed(model, ["drone.jpg"], "drone")  # (N, D), unit length

They are imported on first use, so ``import imlnet`` stays light (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    "load_model": "imlnet.inference",
    "embed": "imlnet.inference",
    "LoadedModel": "imlnet.inference",
    "build_index": "imlnet.geo.index",
    "GalleryIndex": "imlnet.geo.gallery",
    "localize": "imlnet.geo.localize",
    "export_onnx": "imlnet.export",
    "IMLNet": "imlnet.models.imlnet",
}
__all__ = [
    "GalleryIndex",
    "IMLNet",
    "LoadedModel",
    "__version__",
    "build_index",
    "embed",
    "export_onnx",
    "load_model",
    "localize",
]

if TYPE_CHECKING:
    from imlnet.export import export_onnx
    from imlnet.geo.gallery import GalleryIndex
    from imlnet.geo.index import build_index
    from imlnet.geo.localize import localize
    from imlnet.inference import LoadedModel, embed, load_model
    from imlnet.models.imlnet import IMLNet


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imlnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
