"""IML-Net models: the four-unit encoder, IRN decoder, MUML heads (imports without Lightning).

By file: ``backbone.py`` (the four units), ``irn.py`` (reconstruction), ``muml.py`` (heads, CAMs,
boxes, crops), ``imlnet.py`` (assembly: ``forward`` for inference, ``forward_train`` for a
training step), ``pooling.py``, ``persistence.py`` (safetensors export). DRCL's sphere and loss
are in :mod:`imlnet.losses.drcl`.
"""

from imlnet.models.backbone import ARCHITECTURES, UnitBackbone, UnitFeatures
from imlnet.models.imlnet import IMLNet, IMLNetOutput, TrainOutput
from imlnet.models.irn import IRNDecoder
from imlnet.models.muml import (
    CROP_NAMES,
    UnitHead,
    attention_boxes,
    attention_maps,
    cam,
    crop_resize,
    unit_attention,
)

__all__ = [
    "ARCHITECTURES",
    "CROP_NAMES",
    "IMLNet",
    "IMLNetOutput",
    "IRNDecoder",
    "TrainOutput",
    "UnitBackbone",
    "UnitFeatures",
    "UnitHead",
    "attention_boxes",
    "attention_maps",
    "cam",
    "crop_resize",
    "unit_attention",
]
