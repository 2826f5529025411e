"""``imlnet index``: embed gallery tiles with a model and store them as a searchable gallery.

The gallery itself (FAISS index, metadata, manifest; no model needed to search it) is
:class:`imlnet.geo.gallery.GalleryIndex`. This module is the part that needs a model: the
checkpoint's hash, embedding tile images, :func:`build_index` and the command. Every input (the
tile tables, their rows, the existing gallery, the model's descriptor size) is checked before
the first image is embedded; the gallery folder is replaced as a whole at the end, so a failure
or a kill leaves the previous gallery as it was (rerun the command to finish the job).

    imlnet index tiles/ --checkpoint runs/ckpt --out gallery/ [--type flat|ivf|hnsw] [--append]
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imlnet import inference
from imlnet.cliargs import add_common, resolve_device
from imlnet.errors import CheckpointError, GeoError
from imlnet.geo.gallery import (
    DEFAULT_PARAMS,
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    GalleryIndex,
    IndexType,
    new_faiss_index,
)
from imlnet.geo.tables import TileSet, check_gallery_row, read_tileset
from imlnet.io import recover_staged_dir

__all__ = [
    "DEFAULT_PARAMS",
    "INDEX_FILE",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "GalleryIndex",
    "build_index",
    "checkpoint_hash",
    "embed_images",
    "main",
    "new_faiss_index",
]
WEIGHTS_FILE = "model.safetensors"


def checkpoint_hash(checkpoint: str | Path) -> str:
    """sha256 (hex) of a checkpoint's weights: ``<dir>/model.safetensors`` or that file itself.

    Why: the index must be searched with descriptors from the model that built it; the hash
    identifies the weights whatever the folder is called.

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


# -- embedding ----------------------------------------------------------------------------
def embed_images(
    encode: Callable[[torch.Tensor], torch.Tensor],
    paths: Sequence[str | Path],
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Descriptors ``(N, D)`` float32 (L2-normalised, one pass, no mirror) of image files.

    :func:`imlnet.inference.embed` (``flip=False``, as galleries have always been built) over
    the files read by :func:`imlnet.inference.read_image`.

    Args:
        encode: maps a batch ``(B, 3, H, W)`` on ``device`` to descriptors ``(B, D)``.
        paths: image files (any format PIL reads; converted to RGB).
        transform: PIL image -> ``(3, H, W)`` tensor (the model's eval transform).
        batch_size: images per call of ``encode``.
        device: where batches go.
        num_workers: DataLoader worker processes decoding the files.
        progress: show a tqdm bar.
        desc: the bar's label.

    Raises:
        ImageReadError: an image is missing or cannot be decoded (one line naming it).
    """
    out = inference.embed(
        encode,
        [Path(p) for p in paths],
        "satellite",
        flip=False,
        batch_size=max(1, int(batch_size)),
        workers=num_workers,
        device=device,
        transform=transform,
        progress=progress,
        desc=desc,
    )
    return out.numpy()


def _check_tables(tilesets: Sequence[TileSet], index: GalleryIndex | None) -> list[list[dict]]:
    """Every tile table's rows as gallery rows (absolute image paths), checked before any work.

    Raises:
        GeoError: a table is empty; a row is unfit (see
            :func:`~imlnet.geo.tables.check_gallery_row`); a ``tile_id`` or an image appears
            twice (within the tables or already in ``index``). The message names the table and
            line of each offending row.
    """
    seen_id: dict[str, str] = {}
    seen_path: dict[str, str] = {}
    if index is not None:
        for i, row in enumerate(index.metadata):
            seen_path[row["path"]] = f"already in the gallery (row {i})"
            if row.get("tile_id"):
                seen_id[row["tile_id"]] = f"gallery row {i}"
    out = []
    for tiles in tilesets:
        if not tiles.rows:
            raise GeoError(f"{tiles.table}: no tiles to index (all skipped as nodata?)")
        rows = [{**row, "path": str(tiles.image_path(row))} for row in tiles.rows]
        for line, row in enumerate(rows, start=2):
            where = f"{tiles.table}, line {line}"
            check_gallery_row(row, where)
            tile_id = str(row.get("tile_id") or "")
            if row["path"] in seen_path:
                raise GeoError(
                    f"{where}: tile {tile_id or row['path']!r} ({row['path']}) is "
                    f"{seen_path[row['path']]}; each tile must be indexed once: rerun `imlnet "
                    "tile` (a stride of at least one pixel), do not append the same tiles twice"
                )
            if tile_id in seen_id:
                raise GeoError(
                    f"{where} and {seen_id[tile_id]} have the same tile_id {tile_id!r}; each "
                    "tile must be listed once: rerun `imlnet tile` (a stride of at least one "
                    "pixel) or index the tables separately"
                )
            seen_path[row["path"]] = f"also on {where}"
            if tile_id:
                seen_id[tile_id] = where
        out.append(rows)
    return out


def build_index(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tile_table: TileSet | str | Path,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    index: GalleryIndex | None = None,
    index_type: IndexType = "flat",
    params: Mapping[str, Any] | None = None,
    checkpoint_hash: str = "",
    checkpoint: str = "",
    radius: float | None = None,
    model_config: Mapping[str, Any] | None = None,
    num_workers: int = 0,
) -> GalleryIndex:
    """Embed every tile of a tile table and add it to a (new or given) :class:`GalleryIndex`.

    Args:
        encode: batch ``(B, 3, H, W)`` -> satellite-view descriptors ``(B, D)``.
        tile_table: a :class:`~imlnet.geo.tables.TileSet`, a tile folder, or its ``tiles.csv``.
        transform: PIL image -> ``(3, H, W)`` tensor.
        batch_size: tiles per batch.
        device: where the batches go.
        progress: show a tqdm bar.
        index: append to this index instead of creating one (the other index options are
            then ignored).
        index_type: ``flat``, ``ivf`` or ``hnsw`` for a new index.
        params: options of the new index (see :class:`GalleryIndex`).
        checkpoint_hash: recorded in the manifest of a new index.
        checkpoint: recorded in the manifest of a new index (for messages).
        radius: the model's descriptor radius, recorded.
        model_config: the model's config, recorded.
        num_workers: DataLoader workers decoding images.

    Returns:
        The index, with metadata rows = tile rows whose ``path`` is the absolute image path.

    Raises:
        GeoError: the table is empty, a row is unfit, or a tile (path or ``tile_id``) is twice
            in the table or already in ``index`` (see :func:`_check_tables`).
    """
    tiles = tile_table if isinstance(tile_table, TileSet) else read_tileset(tile_table)
    (rows,) = _check_tables([tiles], index)
    desc = embed_images(
        encode,
        [row["path"] for row in rows],
        transform=transform,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
        desc=f"indexing {tiles.root.name}",
    )
    if index is None:
        index = GalleryIndex(
            desc.shape[1],
            index_type=index_type,
            params=params,
            checkpoint_hash=checkpoint_hash,
            checkpoint=checkpoint,
            radius=radius,
            model_config=model_config,
        )
    index.add(desc, rows)
    return index


# -- model glue -------------------------------------------------------------------------
def model_encoder(model: Any, domain: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> model.encode(x, domain)``: satellite for gallery tiles, drone for queries."""
    return lambda x: model.encode(x, domain)


def model_dim(model: Any) -> int | None:
    """The descriptor size a loaded model makes, when it says (None otherwise)."""
    return int(getattr(model, "descriptor_dim", 0) or 0) or None


def add_model_args(ap: argparse.ArgumentParser, *, batch_size: int = 32) -> None:
    """Command-line options shared by ``imlnet index`` and ``imlnet localize``."""
    ap.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder")
    add_common(ap, image_size=None, batch_size=batch_size, workers=True, device=True)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: Sequence[str]) -> int:
    """``imlnet index TILES... --checkpoint CKPT --out DIR``: build or extend a gallery."""
    ap = argparse.ArgumentParser(prog="imlnet index", description=__doc__.split("\n")[0])
    ap.add_argument("tiles", type=Path, nargs="+", help="tile folder(s) from `imlnet tile`")
    ap.add_argument("--out", type=Path, required=True, help="gallery folder")
    ap.add_argument("--type", choices=("flat", "ivf", "hnsw"), default="flat")
    ap.add_argument("--append", action="store_true", help="add to the gallery in --out")
    ap.add_argument("--overwrite", action="store_true", help="replace the gallery in --out")
    ap.add_argument("--nlist", type=int, help="ivf: number of lists (default 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, help="ivf: lists searched per query (default 16)")
    ap.add_argument("--hnsw-m", type=int, help="hnsw: links per node (default 32)")
    ap.add_argument("--ef-search", type=int, help="hnsw: search breadth (default 128)")
    add_model_args(ap)
    args = ap.parse_args(list(argv))
    device = resolve_device(args.device)
    ckpt_hash = checkpoint_hash(args.checkpoint)
    recover_staged_dir(args.out)  # a save killed between its two renames
    if not args.append and (args.out / MANIFEST_FILE).exists() and not args.overwrite:
        raise GeoError(
            f"{args.out / MANIFEST_FILE}: a gallery exists; pass --append to add tiles to it "
            "or --overwrite to replace it"
        )
    tilesets = [read_tileset(folder) for folder in args.tiles]
    loaded = inference.load_model(args.checkpoint, device, image_size=args.image_size)
    model = loaded.model
    index: GalleryIndex | None = None
    if args.append:
        index = GalleryIndex.load(
            args.out,
            expect_checkpoint_hash=ckpt_hash,
            expect_dim=model_dim(model),
            checkpoint_name=str(args.checkpoint),
        )
        index.set_search_params(nprobe=args.nprobe, efSearch=args.ef_search)
    _check_tables(tilesets, index)  # all tables together, before the first image is embedded
    params = {
        k: v
        for k, v in {
            "nlist": args.nlist,
            "nprobe": args.nprobe,
            "M": args.hnsw_m,
            "efSearch": args.ef_search,
        }.items()
        if v is not None and k in DEFAULT_PARAMS[args.type]
    }
    transform = loaded.transform
    for tiles in tilesets:  # at least one (nargs="+")
        index = build_index(
            model_encoder(model, "satellite"),
            tiles,
            transform=transform,
            batch_size=args.batch_size,
            device=device,
            progress=not args.quiet,
            index=index,
            index_type=args.type,
            params=params,
            checkpoint_hash=ckpt_hash,
            checkpoint=str(Path(args.checkpoint).resolve()),
            radius=getattr(model, "radius", None),
            model_config=getattr(model, "config", None),
            num_workers=args.workers,
        )
    index.save(args.out)
    print(
        f"gallery {args.out}: {index.count} tiles, {index.index_type} index, dim {index.dim} "
        f"({', '.join(f'{k}={v}' for k, v in index.params.items()) or 'exact'})"
    )
    return 0
