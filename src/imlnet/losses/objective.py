"""The IML-Net training objective: which parts are on, their weights, and the crop-unit draw.

It is a function of the model's outputs (:class:`~imlnet.models.imlnet.TrainOutput`) and the
labels, never of the model: the trainer runs :meth:`IMLNet.forward_train
<imlnet.models.imlnet.IMLNet.forward_train>` once and hands its output here. The parts come back
by name, unweighted, plus ``"total"`` (the weighted sum), so that the trainer logs every one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from imlnet.losses.drcl import drcl_loss, plain_triplet_loss
from imlnet.losses.infonce import InfoNCE
from imlnet.losses.mutual import classifier_loss, mutual_crop_loss
from imlnet.losses.reconstruction import reconstruction_loss

if TYPE_CHECKING:
    from imlnet.models.outputs import TrainOutput

Triplet = Literal["drcl", "plain", "infonce", "none"]
TRIPLETS = ("drcl", "plain", "infonce", "none")


class IMLNetObjective(nn.Module):
    """The IML-Net training objective of one batch of paired drone / satellite images.

    ``total = w_rec * rec + w_rec_satellite * rec_satellite + w_drcl * triplet + w_id * id
    + w_crop * id_crops + w_infonce * infonce``; parts whose switch is off are absent.

    - ``rec`` (IRN): MSE between the reconstruction from the *drone* image's features and the
      satellite image of the same building. ``rec_satellite`` (when ``w_rec_satellite > 0``):
      satellite -> satellite autoencoding.
    - ``triplet`` (the metric loss, weight ``w_drcl``): DRCL on the radius-r descriptors
      (``"drcl"``), the same on the unnormalised embeddings (``"plain"``), symmetric InfoNCE over
      the batch's pairs on the descriptors (``"infonce"``, Sample4Geo's loss, not the paper's:
      :mod:`imlnet.losses.infonce`), or absent (``"none"``).
    - ``id``: summed over the two domains, cross-entropy of the descriptor classifier plus the
      mean over the four unit classifiers (MUML). Without MUML this is the baseline's loss.
    - ``infonce`` (when ``w_infonce > 0`` and ``triplet`` is not ``"infonce"``): symmetric InfoNCE
      on the descriptors *beside* the triplet loss, an auxiliary that uses the whole batch. From
      scratch on the synthetic benchmark, DRCL's batch-hard triplet alone collapses (every
      distance equal, loss = margin) within a CPU budget; InfoNCE does not (docs/benchmarks.md).
    - ``id_crops`` (MUML): the mutual-learning rule (:func:`imlnet.losses.mutual.mutual_crop_loss`)
      per domain, summed over the two domains. ``crop_units="random"`` uses one random unit's
      crop per batch (plus the combined one), a cheaper approximation.

    Args:
        triplet: ``"drcl"``, ``"plain"``, ``"infonce"`` or ``"none"``.
        margin: triplet margin (for DRCL in the units of the radius: distances lie in [0, 2r]).
        w_rec, w_rec_satellite, w_drcl, w_id, w_crop, w_infonce: loss weights.
        crop_units: ``"all"`` (every unit's crop, the paper) or ``"random"``.
        crop_rows: MUML crops of the first ``crop_rows`` pairs of a batch only (None: every
            pair, the paper): the crops pass the whole encoder, frozen units included, so on a
            small budget a sub-batch of crops leaves the steps to the originals.
        seed: of the random unit choice; the draw of call k depends only on (seed, k), and k is
            a buffer, so a resumed run continues the same sequence.
        temperature, learn_temperature, label_smoothing: of InfoNCE (``triplet="infonce"`` or
            ``w_infonce > 0`` only; Sample4Geo: 0.07, learned, 0.1).
        rec_turns: 4: ``rec`` is the least error over the satellite target's four turns
            (:func:`imlnet.losses.reconstruction.reconstruction_loss`; the drone photo does not
            say which way is north); 1: the paper's plain error.
    """

    def __init__(
        self,
        triplet: Triplet = "drcl",
        margin: float = 0.3,
        w_rec: float = 1.0,
        w_drcl: float = 1.0,
        w_id: float = 1.0,
        w_crop: float = 1.0,
        w_rec_satellite: float = 0.0,
        crop_units: Literal["all", "random"] = "all",
        crop_rows: int | None = None,
        seed: int = 0,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        label_smoothing: float = 0.1,
        w_infonce: float = 0.0,
        rec_turns: int = 1,
    ) -> None:
        super().__init__()
        if int(rec_turns) not in (1, 4):
            raise ValueError(f"rec_turns must be 1 or 4, got {rec_turns}")
        self.rec_turns = int(rec_turns)
        if triplet not in TRIPLETS:
            raise ValueError(f"triplet must be one of {TRIPLETS}, got {triplet!r}")
        if crop_units not in ("all", "random"):
            raise ValueError(f"crop_units must be 'all' or 'random', got {crop_units!r}")
        if crop_rows is not None and int(crop_rows) < 1:
            raise ValueError(f"crop_rows must be >= 1 or None, got {crop_rows}")
        self.crop_rows = None if crop_rows is None else int(crop_rows)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if w_infonce < 0 or (w_infonce > 0 and triplet == "infonce"):
            raise ValueError(
                f"w_infonce must be >= 0 and is for InfoNCE beside another triplet loss, got "
                f"{w_infonce} with triplet={triplet!r} (use w_drcl to weight triplet='infonce')"
            )
        self.triplet, self.margin = triplet, float(margin)
        self.weights = {
            "rec": float(w_rec),
            "rec_satellite": float(w_rec_satellite),
            "triplet": float(w_drcl),
            "id": float(w_id),
            "id_crops": float(w_crop),
            "infonce": float(w_infonce),
        }
        self.crop_units, self.seed = crop_units, int(seed)
        # only with InfoNCE, so that the other objectives' state dicts stay as they were
        self.infonce = (
            InfoNCE(temperature, learn_temperature, label_smoothing)
            if triplet == "infonce" or w_infonce > 0
            else None
        )
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    @property
    def reconstruct_satellite(self) -> bool:
        """Whether the step needs the satellite images' reconstruction (``w_rec_satellite > 0``)."""
        return self.weights["rec_satellite"] > 0

    def next_crop_units(self) -> tuple[int, ...]:
        """The 0-based units whose crops the next step uses: all four, or one drawn at random.

        The draw depends only on ``(seed, calls)``; :meth:`forward` counts the calls.
        """
        if self.crop_units == "all":
            return (0, 1, 2, 3)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.calls))
        return (int(torch.randint(4, (), generator=gen)),)

    def forward(
        self, out: TrainOutput, satellite: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named loss parts of one batch.

        Args:
            out: :meth:`IMLNet.forward_train`'s output for the batch.
            satellite: ``(B, 3, H, W)`` satellite images, the reconstruction target.
            labels: ``(B,)`` building indices.

        Returns:
            ``{"id", "triplet", "infonce", "rec", "rec_satellite", "id_crops", "total"}``
            (switched-off parts and parts the output lacks are absent), scalar float32 tensors.
        """
        d, s = out.drone, out.satellite
        parts: dict[str, torch.Tensor] = {}
        parts["id"] = classifier_loss(d.logits, d.unit_logits, labels) + classifier_loss(
            s.logits, s.unit_logits, labels
        )
        if self.triplet == "drcl":
            parts["triplet"] = drcl_loss(d.descriptor, s.descriptor, labels, self.margin)
        elif self.triplet == "plain":
            parts["triplet"] = plain_triplet_loss(d.embedding, s.embedding, labels, self.margin)
        elif self.triplet == "infonce" and self.infonce is not None:
            parts["triplet"] = self.infonce(d.descriptor, s.descriptor, labels)
        if self.weights["infonce"] > 0 and self.infonce is not None:
            parts["infonce"] = self.infonce(d.descriptor, s.descriptor, labels)
        if d.reconstruction is not None:
            parts["rec"] = reconstruction_loss(d.reconstruction, satellite, self.rec_turns)
        if s.reconstruction is not None and self.reconstruct_satellite:
            parts["rec_satellite"] = reconstruction_loss(s.reconstruction, satellite)
        if out.drone_crops is not None and out.satellite_crops is not None:
            # crops of the first n pairs (IMLNet.forward_train's crop_rows), per crop set
            n = out.drone_crops.logits.shape[0] // (len(out.crop_units) + 1)
            parts["id_crops"] = sum(
                mutual_crop_loss(c.logits, c.unit_logits, labels[:n], out.crop_units)
                for c in (out.drone_crops, out.satellite_crops)
            )
        self.calls += 1
        parts["total"] = sum(self.weights[k] * v for k, v in parts.items())
        return parts
