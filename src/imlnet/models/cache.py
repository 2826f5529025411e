"""The frozen units' features of a training set, computed once and reused every step.

With ``IMLNet(freeze_units=k)`` the first k units never change, so their output for a given input
image never changes either. On a CPU these units cost a large share of a step (EfficientNet-Lite0
at 128 px: U1-U3 are 0.62 s of the 0.93 s forward of 64 images, on 2 cores), so a trainer can
compute them once per training image and resume the encoder after them
(:meth:`IMLNet.forward(prefix=...) <imlnet.models.imlnet.IMLNet.forward>`).

Augmentation allows this only where the augmented input is one of a few fixed images: the
cache holds each satellite image at its four rotations by 90 degrees (exact: the images are
rotated before the frozen units), each drone image as it is, and with the module's
``cache_flips`` also their mirror images (the eight symmetries of the square for a satellite
image, two for a drone image; :func:`dihedral`). Random crops and free rotations would need a
new pass. The maps are held in half precision (half the memory; the difference to a live pass
is within float16 rounding, ~1e-3 relative).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from imlnet.models.backbone import UnitFeatures


def dihedral(image: torch.Tensor, t: int) -> torch.Tensor:
    """``image (..., H, W)`` under symmetry ``t`` of the square: for ``t >= 4`` mirrored left to
    right first, then rotated by ``t % 4`` x 90 degrees (``torch.rot90`` over H, W); 0-3 are
    the plain rotations."""
    t = int(t) % 8
    if t >= 4:
        image = torch.flip(image, dims=(-1,))
    return torch.rot90(image, t % 4, dims=(-2, -1))


class PrefixCache:
    """Frozen-unit features keyed by ``(key, t)``, ``t`` a :func:`dihedral` symmetry (0-3 the
    rotations, 4-7 the mirrored ones); built by :meth:`build`.

    Args:
        maps: per frozen unit, ``(N, C_i, h_i, w_i)`` float16 maps of the N cached inputs.
        pool_indices: ``(N, ...)`` maxpool indices (ResNets with 2+ frozen units) or None.
        pre_pool_size: the maxpool's input size, or None.
        rows: ``(key, rotation) -> row``.
    """

    def __init__(
        self,
        maps: Sequence[torch.Tensor],
        pool_indices: torch.Tensor | None,
        pre_pool_size: torch.Size | None,
        rows: dict[tuple[str, int], int],
    ) -> None:
        self.maps, self.pool_indices = tuple(maps), pool_indices
        self.pre_pool_size, self.rows = pre_pool_size, rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        extra = 0 if self.pool_indices is None else self.pool_indices.nbytes
        return sum(m.nbytes for m in self.maps) + extra

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        items: Sequence[tuple[str, str, int]],
        load: Callable[[str, str], torch.Tensor],
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        progress: bool = False,
    ) -> PrefixCache:
        """Run the frozen units once over ``items``.

        Args:
            model: an :class:`~imlnet.models.imlnet.IMLNet` with ``freeze_units >= 1``.
            items: ``(key, domain, t)``: the image ``load(key)`` under the symmetry ``t``
                (:func:`dihedral`; 0-3: rotated by ``t`` x 90 degrees), through ``domain``'s
                encoder.
            load: ``(key, domain)`` -> normalised ``(3, H, W)`` image (the training set's own
                transform).
            batch_size: images per pass; device: where the passes run (the cache is on the CPU).
        """
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        maps: list[list[torch.Tensor]] = []
        indices: list[torch.Tensor] = []
        size = None
        rows: dict[tuple[str, int], int] = {}
        groups: dict[str, list[tuple[str, int]]] = {}
        for key, domain, rot in items:
            groups.setdefault(domain, []).append((key, int(rot) % 8))
        bar = tqdm(total=len(items), desc="caching frozen units", disable=not progress)
        for domain, entries in groups.items():
            for at in range(0, len(entries), batch_size):
                chunk = entries[at : at + batch_size]
                images: dict[str, torch.Tensor] = {}
                batch = []
                for key, rot in chunk:
                    if key not in images:
                        images[key] = load(key, domain)
                    batch.append(dihedral(images[key], rot))
                feats = model.frozen_prefix(torch.stack(batch).to(device), domain)
                for i, m in enumerate(feats.maps):
                    if len(maps) <= i:
                        maps.append([])
                    maps[i].append(m.to("cpu", torch.float16))
                if feats.pool_indices is not None:
                    indices.append(feats.pool_indices.to("cpu", torch.int32))
                    size = feats.pre_pool_size
                for key, rot in chunk:
                    rows[(key, rot)] = len(rows)
                bar.update(len(chunk))
        bar.close()
        model.train(was_training)
        pool = torch.cat(indices) if indices else None
        return cls([torch.cat(m) for m in maps], pool, size, rows)

    def get(
        self,
        keys: Sequence[str],
        rotations: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> UnitFeatures:
        """The cached features of ``keys`` (under the symmetries ``rotations``, default 0: as
        they are) as one batch.

        Raises:
            KeyError: a key (or rotation) that was not cached, named in the message.
        """
        rots = [0] * len(keys) if rotations is None else [int(r) % 8 for r in rotations]
        try:
            index = torch.tensor([self.rows[(k, r)] for k, r in zip(keys, rots, strict=True)])
        except KeyError as err:
            raise KeyError(
                f"{err.args[0]} is not in the frozen-feature cache: it holds the training set's "
                "images (satellite at 4 rotations, and mirrored with flips); rebuild it after "
                "changing the data"
            ) from None
        maps = tuple(m[index].to(device=device, dtype=dtype) for m in self.maps)
        pool = None
        if self.pool_indices is not None:
            pool = self.pool_indices[index].to(device=device, dtype=torch.int64)
        return UnitFeatures(maps, pool, self.pre_pool_size)
