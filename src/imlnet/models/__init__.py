"""IML-Net models: the four-unit encoder, IRN decoder, MUML heads (imports without Lightning)."""

from imlnet.models.backbone import ARCHITECTURES, UnitBackbone, UnitFeatures, build_backbone
from imlnet.models.imlnet import IMLNet, IMLNetOutput
from imlnet.models.irn import IRNDecoder
from imlnet.models.muml import (
    UnitHead,
    attention_boxes,
    attention_maps,
    cam,
    class_activation_map,
    crop_resize,
)

__all__ = [
    "ARCHITECTURES",
    "IMLNet",
    "IMLNetOutput",
    "IRNDecoder",
    "UnitBackbone",
    "UnitFeatures",
    "UnitHead",
    "attention_boxes",
    "attention_maps",
    "build_backbone",
    "cam",
    "class_activation_map",
    "crop_resize",
]
