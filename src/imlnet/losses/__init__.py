"""IML-Net losses, one file per part of the paper; pure functions of outputs and labels.

- :mod:`~imlnet.losses.drcl`: the radius-r sphere, batch-hard mining, the DRCL triplet loss.
- :mod:`~imlnet.losses.reconstruction`: the IRN's reconstruction loss.
- :mod:`~imlnet.losses.mutual`: the id losses and MUML's mutual-learning rule on crops.
- :mod:`~imlnet.losses.infonce`: symmetric InfoNCE (Sample4Geo), to compare DRCL with.
- :mod:`~imlnet.losses.objective`: weights and switches, the named parts of one batch.
"""

from imlnet.losses.drcl import (
    HardTriplets,
    batch_hard_mine,
    batch_hard_triplet,
    cross_view_triplet,
    drcl_loss,
    plain_triplet_loss,
    to_sphere,
)
from imlnet.losses.infonce import InfoNCE, infonce_loss
from imlnet.losses.mutual import classifier_loss, id_loss, mutual_crop_loss
from imlnet.losses.objective import IMLNetObjective
from imlnet.losses.reconstruction import reconstruction_loss

__all__ = [
    "HardTriplets",
    "IMLNetObjective",
    "InfoNCE",
    "batch_hard_mine",
    "batch_hard_triplet",
    "classifier_loss",
    "cross_view_triplet",
    "drcl_loss",
    "id_loss",
    "infonce_loss",
    "mutual_crop_loss",
    "plain_triplet_loss",
    "reconstruction_loss",
    "to_sphere",
]
