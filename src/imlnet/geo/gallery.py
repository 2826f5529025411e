"""A searchable gallery of tile descriptors: FAISS index + metadata table + manifest.

A gallery folder holds three files:

- ``index.faiss``: the descriptors in FAISS, searched by inner product. Descriptors are
  L2-normalised on the way in (the model's radius-``r`` descriptors only differ by the factor
  ``r``), so a score is the cosine similarity in [-1, 1] whatever the radius.
  ``flat`` (exact, default), ``ivf`` (inverted lists, trained on the data), ``ivfpq``
  (inverted lists of product-quantised codes: 64 bytes per 512-d vector instead of 2048, for
  country-scale galleries) or ``hnsw`` (graph).
- ``metadata.csv``: one row per vector, in index order: tile path, lat, lon, CRS, source, and
  every other column of the tile table.
- ``manifest.json``: format version, the sha256 of the checkpoint's ``model.safetensors``,
  descriptor dim, radius, model config, index type and parameters, count, creation time.

:meth:`GalleryIndex.save` writes the three files into a staging folder that replaces the gallery
folder as a whole (:func:`imlnet.io.staged_dir`), so a failed or killed save leaves the old
gallery; :meth:`GalleryIndex.load` checks that the three files agree. Searching needs no model.
``GalleryIndex.load(folder, mmap=True)`` maps ``index.faiss`` instead of reading it, so a gallery
larger than the memory can be searched (pages are read on demand); such a gallery is read-only.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

from imlnet.errors import GeoError
from imlnet.geo.tables import GALLERY_COLUMNS as REQUIRED_COLUMNS
from imlnet.geo.tables import check_gallery_row, csv_text, read_csv
from imlnet.io import recover_staged_dir, staged_dir, write_json

FORMAT = "imlnet-gallery-index"
FORMAT_VERSION = 1
INDEX_FILE, METADATA_FILE, MANIFEST_FILE = "index.faiss", "metadata.csv", "manifest.json"
IndexType = Literal["flat", "ivf", "ivfpq", "hnsw"]
#: Default parameters per index type (see :class:`GalleryIndex`). None: chosen from the size of
#: the first batch added (filled in, and recorded in the manifest, when the index is trained).
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivf": {"nlist": None, "nprobe": 16, "train_size": None},
    "ivfpq": {"nlist": None, "m": 64, "nbits": 8, "nprobe": 16, "train_size": None},
    "hnsw": {"M": 32, "efConstruction": 80, "efSearch": 128},
}
SEARCH_PARAMS = ("nprobe", "efSearch")
GALLERY_FILES = (INDEX_FILE, METADATA_FILE, MANIFEST_FILE)
#: Index types trained (k-means) on the first batch added; their index exists only after it.
TRAINED_TYPES = ("ivf", "ivfpq")
#: FAISS's minimum of training points per k-means centroid (it warns below that).
MIN_POINTS_PER_CENTROID = 39
#: Default training points per inverted list: within FAISS's advice of 39 to 256, at a quarter
#: of the k-means time of 256 (4000 lists on 2 cores: about 1 min instead of 4).
TRAIN_POINTS_PER_LIST = 64
#: Default training points per PQ centroid (FAISS's own cap for PQ codebooks).
TRAIN_POINTS_PER_PQ_CENTROID = 256
#: Seed of the training sample drawn from the first batch (the same gallery trains the same).
TRAIN_SEED = 0
#: ``faiss.read_index`` flag of :meth:`GalleryIndex.load` with ``mmap=True``: in FAISS 1.15
#: ``IO_FLAG_MMAP_IFC`` maps the file and leaves every index type's codes (flat vectors, HNSW
#: graph and vectors, IVF-Flat and IVF-PQ lists) as views into it, searched as fast as in
#: memory. ``IO_FLAG_MMAP`` maps only inverted lists (as ``OnDiskInvertedLists``, ~1.5x slower
#: on IVF-Flat here) and still reads flat and HNSW indexes whole.
MMAP_FLAG = faiss.IO_FLAG_MMAP_IFC


def _as_matrix(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise GeoError(f"{what} must have shape (N, D), got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise GeoError(f"{what} contain NaN or infinity; check the model checkpoint")
    return x


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def check_params(index_type: str, dim: int, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` merged over the defaults of ``index_type``, checked before any work is done.

    Why: a bad option (a typo, ``m`` that does not divide the dim) should fail when the gallery
    is created, not after the tiles were embedded, with a message that names the option.

    Raises:
        GeoError: an unknown type or option, an option that is not a positive integer (None
            is allowed where the default is None), or an ivfpq ``m`` that does not divide
            ``dim`` or ``nbits`` outside 1..16. The message names the option and the fix.
    """
    if index_type not in DEFAULT_PARAMS:
        raise GeoError(f"index type must be one of {', '.join(DEFAULT_PARAMS)}, not {index_type!r}")
    unknown = set(params) - set(DEFAULT_PARAMS[index_type])
    if unknown:
        raise GeoError(
            f"unknown {index_type} option(s) {sorted(unknown)}; the options are "
            f"{sorted(DEFAULT_PARAMS[index_type]) or 'none'}"
        )
    merged = {**DEFAULT_PARAMS[index_type], **params}
    for key, value in merged.items():
        if value is None and DEFAULT_PARAMS[index_type][key] is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise GeoError(
                f"{index_type} option {key} must be a positive integer, got {value!r}; "
                f"omit it for the default ({DEFAULT_PARAMS[index_type][key] or 'automatic'})"
            )
        merged[key] = int(value)
    if index_type == "ivfpq":
        if dim % merged["m"]:
            divisors = [d for d in range(1, min(dim, 128) + 1) if dim % d == 0][-4:]
            raise GeoError(
                f"ivfpq option m={merged['m']} (sub-quantizers) must divide the descriptor dim "
                f"{dim}; choose a divisor of {dim}, e.g. {', '.join(map(str, divisors))}"
            )
        if merged["nbits"] > 16:
            raise GeoError(
                f"ivfpq option nbits={merged['nbits']} (bits per sub-quantizer code) must be at "
                "most 16; use 8 (the default, fastest) or fewer"
            )
    return merged


def training_sample(x: np.ndarray, size: int, seed: int = TRAIN_SEED) -> np.ndarray:
    """At most ``size`` rows of ``x``, drawn without replacement with a fixed seed, in order.

    Why: k-means (IVF lists, PQ codebooks) costs time linear in its training set and gains
    little beyond a few dozen points per centroid; training on a whole country-scale first
    batch would take hours and a copy of the batch per residual.
    """
    if len(x) <= size:
        return x
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return np.ascontiguousarray(x[rows])


def new_faiss_index(
    index_type: IndexType, dim: int, params: Mapping[str, Any], n_train: int = 0
) -> tuple[faiss.Index, dict[str, Any]]:
    """An empty FAISS index of ``index_type`` for inner product, configured from ``params``.

    Args:
        index_type: ``flat``, ``ivf``, ``ivfpq`` or ``hnsw``.
        dim: descriptor dimension.
        params: options as in :data:`DEFAULT_PARAMS` (missing keys take the defaults).
        n_train: for ivf and ivfpq, the size of the first batch (sets ``nlist`` and
            ``train_size`` when they are None); the index is to be trained on
            ``training_sample(batch, params["train_size"])``.

    Returns:
        The index (ivf and ivfpq still untrained) and the parameters with ``nlist`` and
        ``train_size`` filled in.

    Raises:
        GeoError: a bad option (see :func:`check_params`); ``train_size`` below 39 points per
            list (or per PQ centroid); or a first batch too small to train (fewer descriptors
            than lists, or for ivfpq fewer than 39 x 2^nbits).
    """
    params = check_params(index_type, dim, params)
    if index_type == "flat":
        return faiss.IndexFlatIP(dim), params
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
        return index, params
    nlist = params["nlist"]
    if nlist is None:
        top = max(1, n_train // MIN_POINTS_PER_CENTROID)
        nlist = int(np.clip(round(4 * math.sqrt(n_train)), 1, top))
    if n_train < nlist:
        raise GeoError(
            f"an {index_type} index with nlist={nlist} needs at least {nlist} descriptors in "
            f"its first batch to train, got {n_train}; lower nlist or use --type flat"
        )
    minimum = MIN_POINTS_PER_CENTROID * nlist
    default_size = TRAIN_POINTS_PER_LIST * nlist
    if index_type == "ivfpq":
        ksub = 2 ** params["nbits"]
        minimum = max(minimum, MIN_POINTS_PER_CENTROID * ksub)
        default_size = max(default_size, TRAIN_POINTS_PER_PQ_CENTROID * ksub)
        if n_train < MIN_POINTS_PER_CENTROID * ksub:
            raise GeoError(
                f"an ivfpq index with nbits={params['nbits']} trains {ksub}-centroid PQ "
                f"codebooks and needs at least {MIN_POINTS_PER_CENTROID * ksub} descriptors in "
                f"its first batch, got {n_train}; add more tiles in the first batch, lower "
                "nbits, or use --type ivf or flat (as fast at this size)"
            )
    if params["train_size"] is None:
        params["train_size"] = default_size
    elif params["train_size"] < minimum:
        raise GeoError(
            f"{index_type} option train_size={params['train_size']} is below the "
            f"{minimum} training vectors that nlist={nlist}"
            + (f" and nbits={params['nbits']}" if index_type == "ivfpq" else "")
            + f" need ({MIN_POINTS_PER_CENTROID} per centroid); raise train_size or omit it "
            f"(default {default_size})"
        )
    params["nlist"] = int(nlist)
    if index_type == "ivf":
        spec = f"IVF{nlist},Flat"
    else:
        spec = f"IVF{nlist},PQ{params['m']}x{params['nbits']}"
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    if index_type == "ivfpq":
        # polysemous training orders the PQ codes for Hamming-filtered search, which is never
        # switched on here (polysemous_ht 0); it would take 4x the time of the PQ training
        index.do_polysemous_training = False
    index.nprobe = params["nprobe"]
    return index, params


def read_faiss_index(path: str | Path, *, mmap: bool = False) -> faiss.Index:
    """``faiss.read_index`` of ``path``; with ``mmap`` the file is mapped (:data:`MMAP_FLAG`):
    the codes stay on disk and their pages are read on demand, and the index must not be
    modified (FAISS aborts the process on an ``add`` to it)."""
    return faiss.read_index(str(path), MMAP_FLAG if mmap else 0)


class GalleryIndex:
    """Descriptors in FAISS (inner product on L2-normalised vectors) with aligned metadata.

    Args:
        dim: descriptor dimension D.
        index_type: ``"flat"`` exact search (``IndexFlatIP``); ``"ivf"`` (``IndexIVFFlat``,
            trained with k-means on a sample of the first batch added); ``"ivfpq"``
            (``IndexIVFPQ``, FAISS ``IVF{nlist},PQ{m}x{nbits}``: the residual of each vector to
            its list centre coded in ``m * nbits / 8`` bytes, trained like ivf; approximate
            scores, for galleries too large for ivf in memory); ``"hnsw"``
            (``IndexHNSWFlat``, inner-product metric).
        params: per-type options, defaults in :data:`DEFAULT_PARAMS`, checked by
            :func:`check_params`. ivf and ivfpq: ``nlist`` (None: ``4 sqrt(N)`` of the first
            batch, clipped to ``N / 39`` so k-means has 39 points per list as FAISS asks),
            ``nprobe`` (lists searched, see :meth:`set_search_params`), ``train_size`` (None:
            64 per list, for ivfpq at least 256 per PQ centroid, i.e. 65536 with nbits 8; the
            k-means training set, drawn with a fixed seed from the first batch when that is
            larger; at least 39 per list and per PQ centroid). ivfpq also: ``m`` sub-quantizers
            (default 64; must divide the dim), ``nbits`` bits per sub-code (default 8; the first
            batch needs at least ``39 * 2**nbits`` vectors). hnsw ``M``, ``efConstruction``,
            ``efSearch``.
        checkpoint_hash: sha256 of the weights that made the descriptors (see
            :func:`checkpoint_hash`); checked when the index is re-opened.
        checkpoint: where those weights were (for messages only).
        radius: the model's descriptor radius r (recorded, not used for search).
        model_config: the model's config dict (recorded).
    """

    def __init__(
        self,
        dim: int,
        *,
        index_type: IndexType = "flat",
        params: Mapping[str, Any] | None = None,
        checkpoint_hash: str = "",
        checkpoint: str = "",
        radius: float | None = None,
        model_config: Mapping[str, Any] | None = None,
    ) -> None:
        if index_type not in DEFAULT_PARAMS:
            raise GeoError(
                f"index type must be one of {', '.join(DEFAULT_PARAMS)}, not {index_type!r}"
            )
        if int(dim) < 1:
            raise GeoError(f"descriptor dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.index_type: IndexType = index_type
        self.params: dict[str, Any] = check_params(index_type, self.dim, params or {})
        self.checkpoint_hash = checkpoint_hash
        self.checkpoint = checkpoint
        self.radius = radius
        # through JSON so that the manifest can always be written (tuples, paths -> lists, str)
        self.model_config = json.loads(json.dumps(dict(model_config or {}), default=str))
        self.created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        self.metadata: list[dict[str, str]] = []
        self.columns: list[str] = list(REQUIRED_COLUMNS)
        #: True for a gallery loaded with ``mmap=True``: its codes are views of the file.
        self.read_only = False
        self._index: faiss.Index | None = (
            None if index_type in TRAINED_TYPES else self._new_index(0)
        )

    # -- construction -------------------------------------------------------------------
    def _new_index(self, n_train: int) -> faiss.Index:
        index, self.params = new_faiss_index(self.index_type, self.dim, self.params, n_train)
        return index

    def add(
        self, descriptors: np.ndarray | torch.Tensor, metadata_rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Append descriptors ``(N, D)`` and their ``N`` metadata rows (any index type).

        An ivf or ivfpq index is trained on a sample of at most ``train_size`` vectors of the
        first batch added; later batches go into the lists (and PQ codebooks) found then
        (append data from the same kind of map, or rebuild, to keep recall).

        Raises:
            GeoError: the gallery was loaded with ``mmap=True`` (read-only), shapes disagree,
                values are not finite, a row lacks path/lat/lon/crs/source or has a
                latitude/longitude out of range or a bad footprint, a ``tile_id`` is already in
                the gallery or twice in the rows, or a first batch is too small to train.
        """
        if self.read_only:
            raise GeoError(
                "this gallery was loaded with mmap=True and is read-only (its index is a view "
                "of index.faiss on disk); load it with mmap=False to add tiles"
            )
        x = _as_matrix(descriptors, "descriptors")
        if x.shape[1] != self.dim:
            raise GeoError(f"descriptors have dim {x.shape[1]}, the index has dim {self.dim}")
        if len(metadata_rows) != len(x):
            raise GeoError(f"{len(x)} descriptors but {len(metadata_rows)} metadata rows")
        rows = [
            check_gallery_row(row, f"metadata row {self.count + i}")
            for i, row in enumerate(metadata_rows)
        ]
        seen = {row["tile_id"]: i for i, row in enumerate(self.metadata) if row.get("tile_id")}
        for i, row in enumerate(rows, start=self.count):
            tile_id = row.get("tile_id")
            if tile_id and tile_id in seen:
                raise GeoError(
                    f"metadata rows {seen[tile_id]} and {i} have the same tile_id {tile_id!r}; "
                    "each tile must be in the gallery once"
                )
            if tile_id:
                seen[tile_id] = i
        if len(x) == 0:
            return
        x = _l2_normalise(x)
        if self._index is None:
            index = self._new_index(len(x))
            index.train(training_sample(x, self.params["train_size"]))
            self._index = index
        self._index.add(x)
        for row in rows:
            for key in row:
                if key not in self.columns:
                    self.columns.append(key)
        self.metadata.extend(rows)

    # -- search ---------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of vectors in the index."""
        return 0 if self._index is None else int(self._index.ntotal)

    def __len__(self) -> int:
        return self.count

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best tiles per query.

        Args:
            queries: descriptors ``(Q, D)`` (normalised here like the gallery).
            k: tiles per query; at most the gallery size.

        Returns:
            ``scores (Q, k)`` float32 cosine similarities, descending, and ``ids (Q, k)`` int64
            row numbers into :attr:`metadata` (-1 where an approximate index found fewer).

        Raises:
            GeoError: the index is empty or the query dim differs from the index dim.
        """
        x = _as_matrix(queries, "query descriptors")
        if x.shape[1] != self.dim:
            raise GeoError(
                f"query descriptors have dim {x.shape[1]}, the index has dim {self.dim}; "
                "use the checkpoint the index was built with"
            )
        if self.count == 0:
            raise GeoError("the gallery index is empty; index some tiles first")
        k = max(1, min(int(k), self.count))
        scores, ids = self._index.search(_l2_normalise(x), k)
        return scores, ids

    def search_rows(self, queries: np.ndarray | torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Like :meth:`search` but returns, per query, its hits as metadata dicts with
        ``rank`` (0-based), ``id``, ``score``, and ``lat``/``lon`` as floats."""
        scores, ids = self.search(queries, k)
        out = []
        for srow, irow in zip(scores, ids, strict=True):
            hits = []
            for rank, (s, i) in enumerate((s, i) for s, i in zip(srow, irow, strict=True)):
                if i < 0:
                    continue
                meta = self.metadata[int(i)]
                hit: dict[str, Any] = {**meta, "rank": rank, "id": int(i), "score": float(s)}
                hit["lat"], hit["lon"] = float(meta["lat"]), float(meta["lon"])
                hits.append(hit)
            out.append(hits)
        return out

    # -- persistence ----------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """The manifest dict written to ``manifest.json``."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "checkpoint_hash": self.checkpoint_hash,
            "checkpoint": self.checkpoint,
            "descriptor_dim": self.dim,
            "radius": self.radius,
            "model_config": self.model_config,
            "index_type": self.index_type,
            "index_params": self.params,
            "metric": "inner_product",
            "normalized": True,
            "count": self.count,
            "created": self.created,
            "faiss_version": faiss.__version__,
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``index.faiss``, ``metadata.csv`` and ``manifest.json`` as ``folder``.

        The files are written into a staging folder that replaces ``folder`` as a whole, so an
        error or a kill during the save leaves the previous gallery as it was.

        Raises:
            GeoError: the index is empty (an untrained ivf or ivfpq index cannot be saved), or
                ``folder`` holds other files than a gallery's.
        """
        folder = Path(folder)
        if self._index is None:
            raise GeoError(f"cannot save an empty {self.index_type} index: add descriptors first")
        recover_staged_dir(folder)
        if folder.is_file():
            raise GeoError(f"{folder}: is a file; give a folder for the gallery")
        other = sorted(p.name for p in folder.glob("*") if p.name not in GALLERY_FILES)
        if other:
            raise GeoError(
                f"{folder}: holds files that are not part of a gallery (e.g. {other[0]}) and "
                "would be replaced; give an empty or new folder for the gallery"
            )
        table = csv_text(self.metadata, self.columns)
        with staged_dir(folder) as stage:
            faiss.write_index(self._index, str(stage / INDEX_FILE))
            (stage / METADATA_FILE).write_text(table, encoding="utf-8")
            write_json(stage / MANIFEST_FILE, self.manifest())
        return folder

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        expect_checkpoint_hash: str | None = None,
        expect_dim: int | None = None,
        checkpoint_name: str | None = None,
        mmap: bool = False,
    ) -> GalleryIndex:
        """Re-open a gallery saved by :meth:`save` (no model needed).

        Args:
            folder: the gallery folder.
            expect_checkpoint_hash: if given, the sha256 of the weights about to embed queries;
                must equal the manifest's.
            expect_dim: if given, the query descriptor dim; must equal the index's.
            checkpoint_name: the checkpoint being used, for the mismatch message.
            mmap: map ``index.faiss`` instead of reading it (``faiss.IO_FLAG_MMAP_IFC``, see
                :data:`MMAP_FLAG`; works for every index type in FAISS 1.15): the codes stay
                in the file and the OS reads pages when a search touches them, so resident
                memory grows with the lists searched, not with the gallery, and pages are
                shared between processes. The gallery is then read-only (:meth:`add` raises
                GeoError; :meth:`save` to another folder works). Searches give the same
                results as without mmap. Replacing the folder while it is mapped is safe on
                POSIX (the mapped file lives until it is unmapped). ``metadata.csv`` is still
                read into memory.

        Raises:
            GeoError: a file is missing or unreadable, the index is corrupt, the files disagree
                on the count or dim, or the checkpoint does not match. The message names the file.
        """
        folder = Path(folder)
        recover_staged_dir(folder, clean=False)  # a save killed in the middle of its swap
        paths = {name: folder / name for name in (MANIFEST_FILE, INDEX_FILE, METADATA_FILE)}
        for path in paths.values():
            if not path.is_file():
                raise GeoError(f"{path}: missing; build the gallery with `imlnet index`")
        manifest = _read_manifest(paths[MANIFEST_FILE])
        try:
            raw = read_faiss_index(paths[INDEX_FILE], mmap=mmap)
        except Exception as err:  # faiss raises RuntimeError with a C++ trace
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            first = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text)  # drop C++ frame
            raise GeoError(
                f"{paths[INDEX_FILE]}: corrupt or not a FAISS index ({first[:200]}); "
                "rebuild it with `imlnet index`"
            ) from err
        metadata = read_csv(paths[METADATA_FILE], REQUIRED_COLUMNS)
        counts = (int(manifest["count"]), int(raw.ntotal), len(metadata))
        if len(set(counts)) != 1:
            raise GeoError(
                f"{folder}: files disagree on the number of tiles (manifest.json {counts[0]}, "
                f"index.faiss {counts[1]}, metadata.csv {counts[2]}); a save was interrupted or "
                "the files come from different galleries; rebuild with `imlnet index`"
            )
        dim = int(manifest["descriptor_dim"])
        if raw.d != dim:
            raise GeoError(
                f"{paths[INDEX_FILE]}: has dim {raw.d} but manifest.json says {dim}; the files "
                "come from different galleries; rebuild with `imlnet index`"
            )
        built_by = manifest.get("checkpoint") or "an unnamed checkpoint"
        if expect_dim is not None and int(expect_dim) != dim:
            raise GeoError(
                f"{paths[MANIFEST_FILE]}: the gallery holds {dim}-d descriptors (built by "
                f"{built_by}) but the model in use makes {expect_dim}-d descriptors; "
                "use the same checkpoint or rebuild the gallery"
            )
        if expect_checkpoint_hash is not None and expect_checkpoint_hash != manifest.get(
            "checkpoint_hash"
        ):
            using = checkpoint_name or "the checkpoint in use"
            raise GeoError(
                f"{paths[MANIFEST_FILE]}: the gallery was built by {built_by} "
                f"(sha256 {str(manifest.get('checkpoint_hash'))[:12]}...) but {using} has "
                f"sha256 {expect_checkpoint_hash[:12]}...; descriptors of different weights "
                "cannot be compared: use that checkpoint or rebuild the gallery"
            )
        index_type = manifest["index_type"]
        expected_cls = {
            "flat": faiss.IndexFlat,
            "ivf": faiss.IndexIVFFlat,
            "ivfpq": faiss.IndexIVFPQ,
            "hnsw": faiss.IndexHNSW,
        }
        if index_type not in expected_cls or not isinstance(raw, expected_cls[index_type]):
            raise GeoError(
                f"{paths[INDEX_FILE]}: is a {type(raw).__name__}, but manifest.json says "
                f"{index_type!r}; rebuild with `imlnet index`"
            )
        try:
            self = cls(
                dim,
                index_type=index_type,
                params=manifest.get("index_params") or {},
                checkpoint_hash=manifest.get("checkpoint_hash", ""),
                checkpoint=manifest.get("checkpoint", ""),
                radius=manifest.get("radius"),
                model_config=manifest.get("model_config") or {},
            )
        except GeoError as err:  # index_params edited by hand or from another version
            raise GeoError(
                f"{paths[MANIFEST_FILE]}: {err}; fix index_params or rebuild with `imlnet index`"
            ) from err
        self.created = manifest.get("created", self.created)
        self._index = raw
        self.read_only = bool(mmap)
        self.set_search_params(**{k: v for k, v in self.params.items() if k in SEARCH_PARAMS})
        self.metadata = [dict(row) for row in metadata]
        self.columns = list(metadata[0]) if metadata else list(REQUIRED_COLUMNS)
        return self

    def set_search_params(self, *, nprobe: int | None = None, efSearch: int | None = None) -> None:
        """Change the accuracy/speed trade-off of an ivf or ivfpq (``nprobe``: lists searched)
        or hnsw (``efSearch``) index; recorded in the manifest on the next save. An option that
        does not apply to the index type is ignored (one command line serves every type); works
        on a read-only (mmapped) gallery too.

        Raises:
            GeoError: a value that is not a positive integer.
        """
        for key, value in (("nprobe", nprobe), ("efSearch", efSearch)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1
            ):
                raise GeoError(f"search option {key} must be a positive integer, got {value!r}")
        if nprobe is not None and self.index_type in TRAINED_TYPES:
            self.params["nprobe"] = int(nprobe)
            if self._index is not None:
                faiss.extract_index_ivf(self._index).nprobe = int(nprobe)
        if efSearch is not None and self.index_type == "hnsw":
            self.params["efSearch"] = int(efSearch)
            if self._index is not None:
                self._index.hnsw.efSearch = int(efSearch)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise GeoError(f"{path}: cannot read ({err}); rebuild with `imlnet index`") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GeoError(f"{path}: not an imlnet gallery manifest; rebuild with `imlnet index`")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise GeoError(
            f"{path}: format version {manifest['format_version']} is newer than this imlnet "
            f"reads ({FORMAT_VERSION}); upgrade imlnet"
        )
    missing = [k for k in ("count", "descriptor_dim", "index_type") if k not in manifest]
    if missing:
        raise GeoError(f"{path}: lacks {', '.join(missing)}; rebuild with `imlnet index`")
    return manifest
