"""Datasets, transforms and the Lightning data module.

- :mod:`imlnet.data.university1652`: University-1652 (and the synthetic benchmark, same layout).
- :mod:`imlnet.data.sues200`: SUES-200, per altitude, split or raw layout.
- :mod:`imlnet.data.transforms`: the baseline's augmentations, weather, normalisation.
- :mod:`imlnet.data.datamodule`: :class:`CrossViewDataModule` for LightningCLI (imports Lightning,
  so it is not imported here: serving code needs only the transforms).
- :mod:`imlnet.data.synthetic`: the synthetic multi-domain benchmark generator.
"""

from imlnet.data.folders import PairedViewDataset, ViewDataset
from imlnet.data.images import read_image
from imlnet.data.sues200 import SUES200Test, SUES200Train
from imlnet.data.transforms import RandomWeather, build_transforms, denormalize
from imlnet.data.university1652 import TEST_VIEWS, University1652Test, University1652Train

__all__ = [
    "TEST_VIEWS",
    "PairedViewDataset",
    "RandomWeather",
    "SUES200Test",
    "SUES200Train",
    "University1652Test",
    "University1652Train",
    "ViewDataset",
    "build_transforms",
    "denormalize",
    "read_image",
]
