"""What every four-unit encoder shares: the features it returns and the reading of weights files.

Kept apart from the encoders (``backbone.py`` for torchvision ResNets, ``timm_backbone.py`` for
timm CNNs) so that both import it and neither imports the other.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from imlnet.errors import CheckpointError, WeightsNotFoundError


@dataclass
class UnitFeatures:
    """The four unit maps of a batch, plus what the IRN decoder needs to unpool.

    Attributes:
        maps: ``(U1, U2, U3, U4)`` with shapes ``(B, C_i, H / r_i, W / r_i)``, r = 2, 4, 8, 16.
        pool_indices: ``(B, 64, H / 4, W / 4)`` flat arg-max positions of the stem's maxpool
            within each ``(H / 2) x (W / 2)`` input plane; ``None`` for an encoder that
            downsamples by strided convolutions only (the timm families).
        pre_pool_size: ``(H / 2, W / 2)``, the spatial size of the maxpool's input (= U1), or
            ``None`` with the indices.
    """

    maps: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    pool_indices: torch.Tensor | None
    pre_pool_size: torch.Size | None

    @staticmethod
    def cat(parts: list[UnitFeatures]) -> UnitFeatures:
        """The features of the concatenated batches (same number of maps in every part)."""
        maps = tuple(torch.cat(m) for m in zip(*(p.maps for p in parts), strict=True))
        has = [p.pool_indices is not None for p in parts]
        indices = torch.cat([p.pool_indices for p in parts]) if all(has) else None
        return UnitFeatures(maps, indices, parts[0].pre_pool_size)

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> UnitFeatures:
        """Maps cast to ``dtype`` (and moved); the indices keep their integer type."""
        maps = tuple(m.to(device=device, dtype=dtype) for m in self.maps)
        idx = None if self.pool_indices is None else self.pool_indices.to(device)
        return UnitFeatures(maps, idx, self.pre_pool_size)

    def rows(self, index: slice | torch.Tensor) -> UnitFeatures:
        """The same features for a subset of the batch's rows."""
        indices = None if self.pool_indices is None else self.pool_indices[index]
        return UnitFeatures(tuple(m[index] for m in self.maps), indices, self.pre_pool_size)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file.

    Torch files are read with ``weights_only=True`` (no code from the file runs). A dict holding
    a ``"state_dict"`` entry (common training checkpoints) is unwrapped.

    Raises:
        WeightsNotFoundError: the file does not exist.
        CheckpointError: the file cannot be read or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {path} does not exist: pass the path of a torchvision state dict "
            "(.pth) or .safetensors file, pretrained=true for torchvision's cache, or "
            "pretrained=false for random weights"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():  # a damaged file, not a refused one
            first = next((line for line in str(err).splitlines() if line.strip()), "")
            raise CheckpointError(
                f"{path}: cannot read the weights file ({first.strip()}); it must be a state "
                "dict saved with torch.save or safetensors"
            ) from err
        raise CheckpointError(
            f"{path}: refused: the weights file holds pickled Python objects besides tensors, "
            "which could run code when loaded, so it was not loaded; use a plain state dict "
            "(torch.save(model.state_dict())) or a .safetensors file"
        ) from err
    except Exception as err:  # zip and safetensors errors have no common base class
        first = next((line for line in str(err).splitlines() if line.strip()), "")
        raise CheckpointError(
            f"{path}: cannot read the weights file ({type(err).__name__}: {first.strip()}); "
            "it must be a state dict saved with torch.save or safetensors"
        ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state
