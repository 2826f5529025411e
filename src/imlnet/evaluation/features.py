"""Features of the test views: extraction (through :mod:`imlnet.inference`), ``.npz`` files,
and the two directions of an evaluation.

A features file holds, per view V in :data:`~imlnet.evaluation.protocol.VIEWS`, the arrays
``V_features`` ``(N, D)`` float and ``V_labels`` ``(N,)`` int (label -1 = junk); the keys of
one setting (a SUES-200 altitude) start with ``"<setting>/"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from imlnet.errors import DatasetLayoutError
from imlnet.evaluation.protocol import DIRECTIONS, VIEWS, ArrayLike, Protocol, evaluate_retrieval
from imlnet.inference import embed
from imlnet.io import atomic_write


def extract_features(
    encode: Any,
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    flip: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    progress: bool = True,
    domain: str = "drone",
) -> tuple[Tensor, Tensor]:
    """The official test features of a labelled loader, and its labels.

    The features are :func:`imlnet.inference.embed`'s: ``encode(x) + encode(flip(x))``, then
    L2-normalised; this adds the labels of each batch.

    Args:
        encode: a model with ``encode(x, domain)`` (then ``domain`` picks the encoder), or a
            ``(B, 3, H, W) -> (B, D)`` callable, e.g. ``lambda x: model.encode(x, "drone")``.
        loader: yields dicts with ``image_key`` ``(B, 3, H, W)`` and ``label_key`` ``(B,)``
            (the test datasets' ``{"image", "label", "path"}``), or ``(image, label)`` pairs.
        device: where ``encode`` runs (default: the model's device, else the CPU).
        flip: add the mirrored image's descriptor (the official feature); False for one pass.
        image_key, label_key: dict keys of the images and labels.
        progress: show a tqdm bar.
        domain: ``"drone"`` or ``"satellite"`` (or a view name) for a model.

    Returns:
        ``features (N, D)`` float32 on the CPU, unit L2 norm, and ``labels (N,)`` int64.

    Raises:
        DatasetLayoutError: a batch lacks the image or label key.
        CheckpointError: the encoder does not return one row per image.
    """
    labels: list[Tensor] = []

    def images() -> Iterator[Tensor]:
        for batch in loader:
            x, y = _unpack(batch, image_key, label_key)
            labels.append(torch.as_tensor(y).reshape(-1).to(torch.int64).cpu())
            yield x

    feats = embed(encode, images(), domain, flip=flip, device=device, progress=progress)
    if not labels:
        return feats, torch.empty(0, dtype=torch.int64)
    return feats, torch.cat(labels)


def _unpack(batch: Any, image_key: str, label_key: str) -> tuple[Tensor, Any]:
    if isinstance(batch, Mapping):
        missing = [k for k in (image_key, label_key) if k not in batch]
        if missing:
            raise DatasetLayoutError(
                f"a batch has keys {sorted(batch)} but not {missing}; pass image_key/label_key"
            )
        return batch[image_key], batch[label_key]
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], batch[1]
    raise DatasetLayoutError(
        f"a batch must be a dict with {image_key!r} and {label_key!r} or an (image, label) pair"
    )


def features_key(view: str, kind: Literal["features", "labels", "paths"], setting: str = "") -> str:
    """Name of an array in a features file: ``[<setting>/]<view>_<kind>``.

    ``view`` is one of :data:`VIEWS`; ``setting`` groups the views of one evaluation (e.g.
    ``"150m"`` for a SUES-200 altitude) and is empty for University-1652.
    """
    return f"{setting}/{view}_{kind}" if setting else f"{view}_{kind}"


def save_features(
    path: str | os.PathLike[str],
    views: Mapping[str, tuple[Tensor, Tensor]],
    setting: str = "",
    *,
    paths: Mapping[str, Sequence[str | os.PathLike[str]]] | None = None,
) -> None:
    """Write features and labels per view to an ``.npz`` file, atomically.

    Args:
        path: the ``.npz`` file.
        views: view name (see :data:`VIEWS`) -> ``(features (N, D), labels (N,))``.
        setting: prefix of the keys (see :func:`features_key`).
        paths: view -> the image file of each row (stored as ``V_paths``, so that
            ``imlnet evaluate --features F --data D --by ...`` can find each image's conditions).
    """
    arrays: dict[str, np.ndarray] = {}
    for view, (feats, labels) in views.items():
        arrays[features_key(view, "features", setting)] = np.asarray(torch.as_tensor(feats).cpu())
        arrays[features_key(view, "labels", setting)] = np.asarray(
            torch.as_tensor(labels).cpu(), dtype=np.int64
        )
        if paths is not None and view in paths:
            if len(paths[view]) != len(labels):
                raise ValueError(f"{view}: {len(paths[view])} paths for {len(labels)} rows")
            names = [str(p) for p in paths[view]]
            arrays[features_key(view, "paths", setting)] = np.asarray(names, dtype=str)
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_features(
    path: str | os.PathLike[str],
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Read a features file: setting -> view -> ``(features (N, D), labels (N,))``.

    Raises:
        DatasetLayoutError: the file is missing or unreadable, an array has the wrong shape, or
            a view has features without labels (or the other way round).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"features file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise DatasetLayoutError(f"cannot read features file {path} as .npz: {err}") from err
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for key in arrays:
        setting, _, name = key.rpartition("/")
        for view in VIEWS:
            if name != f"{view}_features":
                continue
            label_key = features_key(view, "labels", setting)
            if label_key not in arrays:
                raise DatasetLayoutError(f"{path}: {key!r} has no matching {label_key!r} array")
            feats, labels = arrays[key], arrays[label_key]
            if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels):
                raise DatasetLayoutError(
                    f"{path}: {key!r} must be (N, D) and {label_key!r} (N,), got "
                    f"{feats.shape} and {labels.shape}"
                )
            out.setdefault(setting, {})[view] = (feats, labels)
    for key in arrays:
        setting, _, name = key.rpartition("/")
        view = name.removesuffix("_labels")
        if view in VIEWS and view not in out.get(setting, {}):
            raise DatasetLayoutError(f"{path}: {key!r} has no matching features array")
    if not out:
        raise DatasetLayoutError(
            f"{path} holds no features: expected arrays named like "
            f"{features_key('query_drone', 'features')!r} and "
            f"{features_key('query_drone', 'labels')!r} (see imlnet.evaluation.features_key)"
        )
    return out


def load_feature_paths(path: str | os.PathLike[str]) -> dict[str, dict[str, list[str]]]:
    """The image paths stored with a features file: setting -> view -> paths (may be empty).

    Raises:
        DatasetLayoutError: the file is missing or unreadable.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = [k for k in data.files if k.endswith("_paths")]
            arrays = {k: data[k].tolist() for k in keys}
    except (OSError, ValueError) as err:
        raise DatasetLayoutError(f"cannot read features file {path} as .npz: {err}") from err
    out: dict[str, dict[str, list[str]]] = {}
    for key, names in arrays.items():
        setting, _, name = key.rpartition("/")
        out.setdefault(setting, {})[name.removesuffix("_paths")] = [str(n) for n in names]
    return out


def evaluate_views(
    views: Mapping[str, tuple[ArrayLike, ArrayLike]],
    protocol: Protocol = "official",
    *,
    setting: str = "",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Both directions that ``views`` allows: direction name -> metrics.

    A direction runs when its query and gallery views are both present; its name is
    ``"drone->satellite"`` or ``"satellite->drone"``, followed by `` (<setting>)`` if given.
    """
    results: dict[str, dict[str, float]] = {}
    for name, query, gallery in DIRECTIONS:
        if query in views and gallery in views:
            label = f"{name} ({setting})" if setting else name
            results[label] = evaluate_retrieval(
                *views[query], *views[gallery], protocol, chunk_size=chunk_size, device=device
            )
    return results
