"""Saving and loading an IML-Net as ``model.safetensors`` + ``config.json`` (no pickle, no trainer).

:meth:`IMLNet.save_pretrained <imlnet.models.imlnet.IMLNet.save_pretrained>` and
:meth:`IMLNet.from_pretrained <imlnet.models.imlnet.IMLNet.from_pretrained>` call these.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imlnet.errors import CheckpointError
from imlnet.io import atomic_path, write_json

if TYPE_CHECKING:
    from imlnet.models.imlnet import IMLNet

#: the temporary names of imlnet.io.atomic_path / atomic_write for the two files
_LEFTOVER = re.compile(r"^\.(model\.[a-z0-9_]{8}\.safetensors|config\.json\.[a-z0-9_]{8}\.tmp)$")

#: The weights file of a model folder.
WEIGHTS_FILE = "model.safetensors"

#: Written into config.json and the safetensors metadata; the number is bumped on incompatible
#: changes, and a folder of a higher number is refused with a message (written by a newer imlnet).
FORMAT = "imlnet-model/1"
_PREFIX, _VERSION = FORMAT.rsplit("/", 1)


def save_model(model: IMLNet, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``, each atomically.

    The temporary files a killed save left in ``directory`` are removed first (one process
    exports a model folder at a time).

    The saved config has ``pretrained=False``: the weights are in the file, so loading needs
    no ImageNet file.

    Args:
        directory: the model folder (created if missing).
        meta: JSON-serialisable facts about how the model was trained, e.g.
            ``{"image_size": 256}``; stored under ``"meta"`` in config.json and given back
            as :attr:`meta` by :meth:`from_pretrained` (the commands take their default input
            size from it).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(directory):  # the temporaries of a save that was killed
        if _LEFTOVER.match(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    from imlnet import __version__
    from imlnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    # what a runtime needs besides the weights: input size (when known), normalisation
    norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    meta = {**norm, **model.meta, **(meta or {})}
    write_json(
        directory / "config.json",
        {
            **model.config,
            "pretrained": False,
            "format": FORMAT,
            "imlnet_version": __version__,
            "meta": meta,
        },
    )
    return directory


def load_model(
    cls: type[IMLNet], path: str | Path, map_location: str | torch.device = "cpu"
) -> IMLNet:
    """Load a model written by :meth:`save_pretrained`, in eval mode.

    Args:
        path: the folder, or its ``model.safetensors`` (``config.json`` must sit beside it).
        map_location: device of the loaded weights.

    Raises:
        CheckpointError: a file is missing or corrupt, or the weights do not match the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    config_file = weights.with_name("config.json")
    for f in (weights, config_file):
        if not f.is_file():
            raise CheckpointError(
                f"{f} is missing: a model folder holds model.safetensors and config.json as "
                "written by IMLNet.save_pretrained (training exports one to <log dir>/export)"
            )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from err
    fmt = config.pop("format", None) if isinstance(config, dict) else None
    prefix, _, number = str(fmt).rpartition("/")
    if prefix != _PREFIX or not number.isdigit():
        raise CheckpointError(
            f'{config_file} is not an imlnet model config (no "format": "{FORMAT}"); a '
            "model folder is written by IMLNet.save_pretrained or by training (<log dir>/export)"
        )
    written_by = config.pop("imlnet_version", None)
    if int(number) > int(_VERSION):
        from imlnet import __version__

        raise CheckpointError(
            f"{config_file} was written by imlnet {written_by or '?'} in format {fmt}; this "
            f"imlnet {__version__} reads {FORMAT} and older: upgrade imlnet "
            "(pip install -U imlnet)"
        )
    meta = config.pop("meta", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f'{config_file}: "meta" must be an object, got {meta!r}')
    # written before the pooled MUML head existed: those models have the paper's head
    config.setdefault("muml_head", "paper")
    try:
        model = cls(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file} has unknown, missing or bad keys: {err}") from err
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{weights} does not match {config_file} (saved by another model?): {err}"
        ) from err
    model.meta = dict(meta)
    return model.to(map_location).eval()


def weights_sha256(checkpoint: str | Path) -> str:
    """sha256 (hex) of a checkpoint's weights: ``<dir>/model.safetensors`` or that file itself.

    Galleries record it, so that they are searched with descriptors of the weights that built
    them, whatever the folder is called.

    Raises:
        CheckpointError: the weights file does not exist.
    """
    path = Path(checkpoint)
    weights = path / WEIGHTS_FILE if path.is_dir() or not path.suffix else path
    if not weights.is_file():
        raise CheckpointError(
            f"{weights}: checkpoint weights not found; --checkpoint must be a folder with "
            f"{WEIGHTS_FILE} (as written by the trainer) or that file"
        )
    digest = hashlib.sha256()
    with open(weights, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
