"""What the network returns: one forward pass (:class:`IMLNetOutput`) and one training step's
passes (:class:`TrainOutput`), the inputs of every loss in :mod:`imlnet.losses`."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class IMLNetOutput:
    """What one forward pass gives.

    Attributes:
        descriptor: ``(B, D)`` on the sphere of radius ``r``: what retrieval and DRCL use.
        embedding: ``(B, D)`` the bottleneck feature before normalisation (plain triplet, id).
        logits: ``(B, num_classes)`` of the descriptor classifier.
        unit_logits: four ``(B, num_classes)`` of the MUML unit classifiers (empty without MUML).
        unit_maps: the four head maps ``F_i`` ``(B, C', h_i, w_i)``, the CAMs' input (empty
            without MUML).
        reconstruction: ``(B, 3, H, W)`` from the IRN, or None (no IRN, or not asked for).
    """

    descriptor: torch.Tensor
    embedding: torch.Tensor
    logits: torch.Tensor
    unit_logits: tuple[torch.Tensor, ...] = ()
    unit_maps: tuple[torch.Tensor, ...] = ()
    reconstruction: torch.Tensor | None = None

    def split(self, n: int) -> tuple[IMLNetOutput, IMLNetOutput]:
        """The output of a batch ``cat([a, b])`` as the outputs of ``a`` (``n`` rows) and ``b``."""
        halves = []
        for part in (slice(0, n), slice(n, None)):
            rec = None if self.reconstruction is None else self.reconstruction[part]
            halves.append(
                replace(
                    self,
                    descriptor=self.descriptor[part],
                    embedding=self.embedding[part],
                    logits=self.logits[part],
                    unit_logits=tuple(u[part] for u in self.unit_logits),
                    unit_maps=tuple(m[part] for m in self.unit_maps),
                    reconstruction=rec,
                )
            )
        return halves[0], halves[1]


@dataclass
class TrainOutput:
    """Everything the losses of one training step need (:meth:`IMLNet.forward_train`).

    Attributes:
        drone: output of the ``B`` drone images (with the IRN's reconstruction when it exists).
        satellite: output of the ``B`` satellite images (reconstruction only when asked for).
        crop_units: 0-based units whose MUML crops were taken (empty without MUML).
        drone_crops: output of the drone crops, ``(len(crop_units) + 1) * B`` rows: the crops of
            each unit in ``crop_units`` order, then the crops of the combined map; no
            reconstruction. None without MUML.
        satellite_crops: the same for the satellite images.
    """

    drone: IMLNetOutput
    satellite: IMLNetOutput
    crop_units: tuple[int, ...] = ()
    drone_crops: IMLNetOutput | None = None
    satellite_crops: IMLNetOutput | None = None
