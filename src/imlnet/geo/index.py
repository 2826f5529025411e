"""``imlnet index``: embed gallery tiles with a model and store them as a searchable gallery.

The gallery itself (FAISS index, metadata, manifest; no model needed to search it) is
:class:`imlnet.geo.gallery.GalleryIndex`. This module is the part that needs a model: the
checkpoint's hash, embedding tile images, :func:`build_index` and the command. Every input (the
tile tables, their rows, the existing gallery, the model's descriptor size) is checked before
the first image is embedded; the gallery folder is replaced as a whole at the end, so a failure
or a kill leaves the previous gallery as it was (rerun the command to finish the job).

    imlnet index tiles/ --checkpoint runs/ckpt --out gallery/ [--type flat|ivf|hnsw] [--append]
    imlnet index MAP.tif --tile-size-m 180 --stride-m 45 --checkpoint runs/ckpt --out gallery/
        [--devices N --num-nodes K --strategy ddp] [--shard-size 256]

With rasters (MAP.tif ...), the windows are read straight into the model and embedded with
Lightning's ``Trainer.predict``, sharded and resumable (:mod:`imlnet.embedding`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imlnet import inference
from imlnet.cliargs import add_common
from imlnet.errors import GeoError
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
from imlnet.inference import LoadedModel
from imlnet.io import recover_staged_dir
from imlnet.models.persistence import weights_sha256

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


def checkpoint_hash(checkpoint: str | Path) -> str:
    """sha256 (hex) of a checkpoint's weights (:func:`imlnet.models.persistence.weights_sha256`).

    Why: the index must be searched with descriptors from the model that built it; the hash
    identifies the weights whatever the folder is called.

    Raises:
        CheckpointError: the weights file does not exist.
    """
    return weights_sha256(checkpoint)


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
    model: LoadedModel | Callable[[torch.Tensor], torch.Tensor],
    tile_table: TileSet | str | Path,
    *,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
    index: GalleryIndex | None = None,
    index_type: IndexType = "flat",
    params: Mapping[str, Any] | None = None,
    checkpoint_hash: str | None = None,
    checkpoint: str | None = None,
    radius: float | None = None,
    model_config: Mapping[str, Any] | None = None,
    num_workers: int = 0,
) -> GalleryIndex:
    """Embed every tile of a tile table and add it to a (new or given) :class:`GalleryIndex`.

    Example:
        >>> import imlnet
        >>> model = imlnet.load_model("runs/demo/model")  # doctest: +SKIP
        >>> gallery = imlnet.build_index(model, "runs/demo/tiles")  # doctest: +SKIP
        >>> gallery.save("gallery/")  # doctest: +SKIP

    Args:
        model: what :func:`imlnet.load_model` returns (a model folder or an ``.onnx`` file:
            its satellite encoder, transform, weights hash, radius and config are used), or a
            callable batch ``(B, 3, H, W)`` -> satellite-view descriptors ``(B, D)``, which
            then needs ``transform``.
        tile_table: a :class:`~imlnet.geo.tables.TileSet`, a tile folder, or its ``tiles.csv``.
        transform: PIL image -> ``(3, H, W)`` tensor (default: the loaded model's).
        batch_size: tiles per batch.
        device: where the batches go (default: the loaded model's device, else the CPU).
        progress: show a tqdm bar.
        index: append to this index instead of creating one (the other index options are
            then ignored).
        index_type: ``flat``, ``ivf`` or ``hnsw`` for a new index.
        params: options of the new index (see :class:`GalleryIndex`).
        checkpoint_hash, checkpoint, radius, model_config: recorded in the manifest of a new
            index (default: the loaded model's weights hash, source, radius and config).
        num_workers: DataLoader workers decoding images.

    Returns:
        The index, with metadata rows = tile rows whose ``path`` is the absolute image path.

    Raises:
        GeoError: the table is empty, a row is unfit, or a tile (path or ``tile_id``) is twice
            in the table or already in ``index`` (see :func:`_check_tables`).
        TypeError: a bare callable without ``transform``.
    """
    encode, transform, device, facts = model_parts(model, "satellite", transform, device)
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
        given = {
            "checkpoint_hash": checkpoint_hash,
            "checkpoint": checkpoint,
            "radius": radius,
            "model_config": model_config,
        }
        index = GalleryIndex(
            desc.shape[1],
            index_type=index_type,
            params=params,
            **{k: facts.get(k) if v is None else v for k, v in given.items()},
        )
    index.add(desc, rows)
    return index


def model_parts(
    model: Any,
    domain: str,
    transform: Callable[[Image.Image], torch.Tensor] | None,
    device: str | torch.device | None,
) -> tuple[Callable, Callable, torch.device, dict[str, Any]]:
    """``(encode, transform, device, manifest facts)`` of a loaded model or a bare encoder."""
    if isinstance(model, LoadedModel):
        facts = {
            "checkpoint_hash": model.weights_hash,
            "checkpoint": str(model.source.resolve()) if model.source else "",
            "radius": getattr(model.model, "radius", None),
            "model_config": getattr(model.model, "config", None),
        }
        dev = torch.device(device) if device is not None else model.device
        return model.encoder(domain), transform or model.transform, dev, facts
    if not callable(model) or transform is None:
        raise TypeError(
            "model must be what imlnet.load_model returns, or an encoder callable given "
            "with transform="
        )
    facts = {"checkpoint_hash": "", "checkpoint": ""}
    return model, transform, torch.device(device or "cpu"), facts


# -- command line ------------------------------------------------------------------------
def add_model_args(ap: argparse.ArgumentParser, *, batch_size: int = 32) -> None:
    """Command-line options shared by ``imlnet index`` and ``imlnet localize``."""
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="model folder")
    which.add_argument(
        "--onnx", type=Path, help="an .onnx file from `imlnet export` (onnxruntime, CPU)"
    )
    add_common(ap, image_size=None, batch_size=batch_size, workers=True, device=True)
    ap.add_argument("--threads", type=int, help="onnxruntime threads (default: torch's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def index_params(args: argparse.Namespace) -> dict[str, Any]:
    """The index options of the command line that apply to ``--type``."""
    given = {"nlist": args.nlist, "nprobe": args.nprobe, "M": args.hnsw_m, "m": args.m}
    given["nbits"] = args.nbits
    given["efSearch"] = args.ef_search
    return {k: v for k, v in given.items() if v is not None and k in DEFAULT_PARAMS[args.type]}


def load_model_arg(args: argparse.Namespace) -> LoadedModel:
    """The model of ``--checkpoint`` or ``--onnx``, at ``--image-size`` on ``--device``."""
    return inference.load_model(
        args.checkpoint or args.onnx, args.device, image_size=args.image_size, threads=args.threads
    )


#: inputs of `imlnet index` read as rasters (one pass, no tile files) rather than tile folders
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


def add_raster_args(ap: argparse.ArgumentParser) -> None:
    """The options of ``imlnet index MAP.tif ...`` (tiling as ``imlnet tile``; Lightning)."""
    g = ap.add_argument_group("one pass from rasters (MAP.tif ...: no tile files)")
    g.add_argument("--tile-size-m", type=float, help="tile side on the ground")
    g.add_argument("--stride-m", type=float, help="distance between tiles")
    g.add_argument("--min-valid", type=float, default=0.9, help="least share of valid pixels")
    g.add_argument("--bands", type=int, nargs="+", help="band numbers: 1 (grey) or 3 (RGB)")
    g.add_argument("--resampling", default="bilinear", help="rasterio resampling name")
    g.add_argument("--no-cover-edges", action="store_true", help="no tiles flush with edges")
    g.add_argument("--allow-large", action="store_true", help="no limit on the tile count")
    g.add_argument("--shard-size", type=int, default=256, help="tiles per shard (256)")
    g.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto)")
    g.add_argument("--devices", default="1", help="devices per machine (Lightning)")
    g.add_argument("--num-nodes", type=int, default=1, help="machines (Lightning)")
    g.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")


def main(argv: Sequence[str]) -> int:
    """``imlnet index TILES... --checkpoint CKPT --out DIR``: build or extend a gallery;
    ``imlnet index MAP.tif ... --tile-size-m M --stride-m S ...``: one pass from rasters."""
    ap = argparse.ArgumentParser(prog="imlnet index", description=__doc__.split("\n")[0])
    ap.add_argument("tiles", type=Path, nargs="+", help="tile folder(s) from `imlnet tile`")
    ap.add_argument("--out", type=Path, required=True, help="gallery folder")
    ap.add_argument("--type", choices=("flat", "ivf", "ivfpq", "hnsw"), default="flat")
    ap.add_argument("--append", action="store_true", help="add to the gallery in --out")
    ap.add_argument("--overwrite", action="store_true", help="replace the gallery in --out")
    ap.add_argument("--nlist", type=int, help="ivf: number of lists (default 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, help="ivf: lists searched per query (default 16)")
    ap.add_argument("--hnsw-m", type=int, help="hnsw: links per node (default 32)")
    ap.add_argument("--m", type=int, help="ivfpq: sub-quantizers, dividing the dim (default 64)")
    ap.add_argument("--nbits", type=int, help="ivfpq: bits per sub-quantizer code (default 8)")
    ap.add_argument("--ef-search", type=int, help="hnsw: search breadth (default 128)")
    add_model_args(ap)
    add_raster_args(ap)
    args = ap.parse_args(list(argv))
    rasters = [t for t in args.tiles if t.suffix.lower() in RASTER_SUFFIXES]
    if rasters:
        from imlnet.embedding import index_command  # Lightning: only for this route

        return index_command(args, rasters, index_params(args))
    model_file = args.checkpoint or args.onnx
    if args.checkpoint is not None:
        checkpoint_hash(args.checkpoint)  # the weights exist, before anything else is read
    recover_staged_dir(args.out)  # a save killed between its two renames
    if not args.append and (args.out / MANIFEST_FILE).exists() and not args.overwrite:
        raise GeoError(
            f"{args.out / MANIFEST_FILE}: a gallery exists; pass --append to add tiles to it "
            "or --overwrite to replace it"
        )
    tilesets = [read_tileset(folder) for folder in args.tiles]
    loaded = load_model_arg(args)
    index: GalleryIndex | None = None
    if args.append:
        index = GalleryIndex.load(
            args.out,
            expect_checkpoint_hash=loaded.weights_hash,
            expect_dim=loaded.dim,
            checkpoint_name=str(model_file),
        )
        index.set_search_params(nprobe=args.nprobe, efSearch=args.ef_search)
    _check_tables(tilesets, index)  # all tables together, before the first image is embedded
    params = index_params(args)
    for tiles in tilesets:  # at least one (nargs="+")
        index = build_index(
            loaded,
            tiles,
            batch_size=args.batch_size,
            progress=not args.quiet,
            index=index,
            index_type=args.type,
            params=params,
            num_workers=args.workers,
        )
    index.save(args.out)
    print(
        f"gallery {args.out}: {index.count} tiles, {index.index_type} index, dim {index.dim} "
        f"({', '.join(f'{k}={v}' for k, v in index.params.items()) or 'exact'})"
    )
    return 0
