"""A gallery straight from rasters, embedded with Lightning on any number of devices and machines.

``imlnet index MAP.tif [MAP2.tif ...] --tile-size-m M --stride-m S --checkpoint DIR --out G``
plans the tiles of every raster (:func:`imlnet.geo.windows.plan_raster`: the rows ``imlnet
tile`` would write), cuts the plan into chunks of ``--shard-size`` windows and runs
``Trainer.predict`` over them (:class:`~imlnet.geo.windows.WindowChunks`: each window read
from its raster into the model, no tile files). With ``--devices N --num-nodes K --strategy
ddp`` Lightning gives each rank its own chunks (its sampler for prediction repeats none);
each chunk's descriptors are written as one shard file (``chunk-000123.npz``, atomically) as
soon as it is embedded. Rank 0 then merges the shards in chunk order, so tile ids and order are
those of the plan whatever the number of devices, and writes the gallery.

Resuming: the shards live beside the gallery (``.<name>.shards-<key>``, the key a hash of the
plans, the model's weights and input size) until the gallery is saved; a rerun of a killed job
embeds only the chunks without a shard.

Memory: a worker holds one chunk of windows; the embedding pass does not grow with the map.
The gallery itself (FAISS index and metadata rows) grows with the tile count: a flat index holds
``4 D`` bytes per tile, IVF-PQ ``m`` bytes (see docs/localization.md for the arithmetic).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from imlnet.errors import GeoError
from imlnet.geo.gallery import MANIFEST_FILE, GalleryIndex, IndexType
from imlnet.geo.windows import RasterPlan, WindowChunks
from imlnet.inference import LoadedModel
from imlnet.io import atomic_path, recover_staged_dir

__all__ = ["index_command", "index_rasters", "shard_folder"]

#: vectors gathered from the first shards before the first add (an IVF index trains on them)
TRAIN_GATHER = 65_536


def _first(items: list[Any]) -> Any:
    """DataLoader collate of one chunk per batch: the chunk itself."""
    return items[0]


class _Embedder(L.LightningModule):
    """``predict_step``: a chunk of windows -> its descriptors, ``micro_batch`` at a time."""

    def __init__(self, loaded: LoadedModel, micro_batch: int) -> None:
        super().__init__()
        self.loaded = loaded
        if isinstance(loaded.model, torch.nn.Module):
            self.net = loaded.model  # a submodule: Lightning moves it to the rank's device
        self.micro_batch = max(1, int(micro_batch))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        encode = self.loaded.encoder("satellite")
        valid, images = batch["valid"], batch["image"]
        out = None
        with torch.inference_mode():
            keep = images[valid]
            parts = [
                encode(keep[i : i + self.micro_batch].to(self.device)).float().cpu()
                for i in range(0, len(keep), self.micro_batch)
            ]
        if parts:
            found = torch.cat(parts)
            out = torch.zeros(len(valid), found.shape[1])
            out[valid] = found
        return {"chunk": batch["chunk"], "index": batch["index"], "valid": valid, "desc": out}


class _ShardWriter(BasePredictionWriter):
    """Writes each chunk's descriptors to ``folder/chunk-<c>.npz`` as soon as it is embedded."""

    def __init__(self, folder: Path) -> None:
        super().__init__(write_interval="batch")
        self.folder = folder

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        desc = prediction["desc"]
        arrays = {
            "index": prediction["index"].numpy(),
            "valid": prediction["valid"].numpy(),
            "desc": np.zeros((0, 0), np.float32) if desc is None else desc.numpy(),
        }
        path = shard_file(self.folder, int(prediction["chunk"]))
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def shard_file(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:06d}.npz"


def shard_folder(out: Path, plans: Sequence[RasterPlan], loaded: LoadedModel, size: int) -> Path:
    """Where the shards of this job live: beside the gallery, named by what decides them."""
    what = {
        "plans": [{**p.params, "count": len(p.rows)} for p in plans],
        "weights": loaded.weights_hash,
        "image_size": loaded.image_size,
        "shard_size": size,
    }
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return out.resolve().parent / f".{out.name}.shards-{key[:12]}"


def _done(folder: Path, count: int) -> set[int]:
    """Chunks whose shard is on disk and readable (a kill leaves whole files or none)."""
    done = set()
    for c in range(count):
        path = shard_file(folder, c)
        if not path.is_file():
            continue
        try:
            with np.load(path) as z:
                if len(z["index"]) == len(z["valid"]) and z["desc"].ndim == 2:
                    done.add(c)
                    continue
        except (OSError, ValueError, KeyError):
            pass
        path.unlink(missing_ok=True)  # not a whole shard: embedded again
    return done


def index_rasters(
    loaded: LoadedModel,
    plans: Sequence[RasterPlan],
    out: str | Path,
    *,
    shard_size: int = 256,
    batch_size: int = 32,
    workers: int = 0,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    index_type: IndexType = "flat",
    params: dict[str, Any] | None = None,
    progress: bool = True,
) -> GalleryIndex | None:
    """Embed every tile window of ``plans`` and save the gallery in ``out`` (see the module
    docstring). Every rank of a distributed job calls it; rank 0 merges and saves.

    Returns:
        The saved gallery on rank 0 (its ``embedded`` attribute: how many tiles this run
        embedded, ``reused`` how many came from an earlier run's shards); None on other ranks.

    Raises:
        GeoError: no tile in any plan has enough valid pixels.
    """
    out = Path(out)
    chunks = WindowChunks(plans, loaded.transform, shard_size)
    folder = shard_folder(out, plans, loaded, shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    done = _done(folder, chunks.count)
    chunks.chunks = [c for c in range(chunks.count) if c not in done]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=[_ShardWriter(folder)],
        default_root_dir=str(folder),
    )
    if chunks.chunks:
        loader = torch.utils.data.DataLoader(
            chunks, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_first
        )
        trainer.predict(_Embedder(loaded, batch_size), loader, return_predictions=False)
    trainer.strategy.barrier()
    if trainer.global_rank != 0:
        return None
    gallery = _merge(chunks, folder, loaded, index_type, params)
    gallery.embedded = sum(len(chunks_of(chunks, c)) for c in chunks.chunks)
    gallery.reused = len(chunks.where) - gallery.embedded
    gallery.save(out)
    shutil.rmtree(folder, ignore_errors=True)
    return gallery


def chunks_of(chunks: WindowChunks, c: int) -> range:
    return range(c * chunks.size, min((c + 1) * chunks.size, len(chunks.where)))


def _merge(
    chunks: WindowChunks,
    folder: Path,
    loaded: LoadedModel,
    index_type: IndexType,
    params: dict[str, Any] | None,
) -> GalleryIndex:
    """The shards in chunk order as one gallery (the first ``TRAIN_GATHER`` vectors added at
    once, so that an IVF index trains on them)."""
    gallery: GalleryIndex | None = None
    pending_desc: list[np.ndarray] = []
    pending_rows: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal gallery
        if not pending_rows:
            return
        desc = np.concatenate(pending_desc)
        if gallery is None:
            gallery = GalleryIndex(
                desc.shape[1],
                index_type=index_type,
                params=params,
                checkpoint_hash=loaded.weights_hash,
                checkpoint=str(loaded.source.resolve()) if loaded.source else "",
                radius=getattr(loaded.model, "radius", None),
                model_config=getattr(loaded.model, "config", None),
            )
        gallery.add(desc, pending_rows)
        pending_desc.clear()
        pending_rows.clear()

    for c in range(chunks.count):
        path = shard_file(folder, c)
        if not path.is_file():
            raise GeoError(f"{path}: a shard is missing after embedding; rerun the command")
        with np.load(path) as z:
            index, valid, desc = z["index"], z["valid"], z["desc"]
        if valid.any():
            pending_desc.append(desc[valid])
            pending_rows += [chunks.row(int(g)) for g in index[valid]]
        if gallery is not None or sum(len(d) for d in pending_desc) >= TRAIN_GATHER:
            flush()
    flush()
    if gallery is None:
        raise GeoError(
            "no tile of "
            + ", ".join(str(p.src) for p in chunks.plans)
            + " has enough valid pixels; lower --min-valid or check the rasters' nodata"
        )
    return gallery


def index_command(args: argparse.Namespace, rasters: list[Path], params: dict[str, Any]) -> int:
    """``imlnet index MAP.tif ...``: plan, embed with Lightning (sharded, resumable), save.

    Args:
        args: the parsed ``imlnet index`` command line (:func:`imlnet.geo.index.main`).
        rasters: its raster inputs.
        params: the index options that apply to ``--type``.
    """
    if len(rasters) != len(args.tiles):
        raise GeoError(
            "give either rasters (MAP.tif ...) or tile folders from `imlnet tile`, not both"
        )
    if args.append:
        raise GeoError(
            "--append takes tile folders; index all rasters in one run (a rerun resumes)"
        )
    if args.tile_size_m is None or args.stride_m is None:
        raise GeoError("indexing rasters needs --tile-size-m and --stride-m (as `imlnet tile`)")
    from imlnet.geo.windows import DEFAULT_MAX_TILES, plan_raster
    from imlnet.inference import load_model
    from imlnet.models.persistence import weights_sha256

    if args.checkpoint is not None:
        weights_sha256(args.checkpoint)  # the weights exist, before anything else is read
    recover_staged_dir(args.out)
    if (args.out / MANIFEST_FILE).exists() and not args.overwrite:
        raise GeoError(
            f"{args.out / MANIFEST_FILE}: a gallery exists; pass --overwrite to replace it"
        )
    loaded = load_model(
        args.checkpoint or args.onnx, args.device, image_size=args.image_size, threads=args.threads
    )
    plans = [
        plan_raster(
            src,
            tile_size_m=args.tile_size_m,
            stride_m=args.stride_m,
            out_px=loaded.image_size,
            min_valid=args.min_valid,
            bands=args.bands,
            resampling=args.resampling,
            cover_edges=not args.no_cover_edges,
            max_tiles=None if args.allow_large else DEFAULT_MAX_TILES,
        )
        for src in rasters
    ]
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    gallery = index_rasters(
        loaded,
        plans,
        args.out,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        workers=args.workers,
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        index_type=args.type,
        params=params,
        progress=not args.quiet,
    )
    if gallery is not None:  # rank 0
        print(
            f"gallery {args.out}: {gallery.count} tiles from {len(rasters)} raster(s), "
            f"{gallery.index_type} index, dim {gallery.dim}; embedded {gallery.embedded} "
            f"windows, {gallery.reused} from an earlier run's shards"
        )
    return 0
