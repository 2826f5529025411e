"""The official University-1652 retrieval protocol (vectorised), feature extraction, CLI.

The metrics are those of ``evaluate_gpu.py`` / ``compute_mAP`` in layumi/University1652-Baseline
(the benchmark's reference code; SUES-200 uses the same code per altitude):

- score = dot product of the (L2-normalised) features; per query the gallery is ranked by
  descending score;
- good = gallery items with the query's label; junk = gallery items labelled -1, removed from the
  ranking (they do not shift the ranks of the others);
- CMC: 1 from the first good position on; R@k = CMC[k - 1]; R@1% = CMC[round(0.01 * G)] with G
  the gallery size *including* junk, Python's ``round`` (so CMC[10], i.e. "R@11", for the 951
  satellite images of University-1652);
- AP: for the i-th good item (0-based, in ranking order) at 0-based rank r_i after junk removal,
  precision = (i + 1) / (r_i + 1), old precision = i / r_i (1 when r_i = 0);
  AP = sum_i (old + precision) / 2 / n_good (the trapezoid rule);
- queries without any good item add nothing but still count in the divisor, as in the official
  loop (``continue`` before accumulating, then divide by the number of queries).

All values are reported in percent. ``protocol="sample4geo"`` additionally makes every gallery
item whose label is not among the query labels junk (Sample4Geo's ``U1652DatasetEval`` gives them
label -1); it exists to compare with that line of work and is never the default.

Ties. The official code ranks with ``np.argsort(score)[::-1]``, numpy's default (unstable)
quicksort, whose order among *exactly equal* scores is unspecified. We use the order of
``np.argsort(score, kind="stable")[::-1]``: among equal scores, the larger gallery index ranks
first. Without exactly equal scores (the normal case for float features) both orders coincide.

How it is vectorised. A query's metrics only need the rank of each of its good items, i.e. the
number of non-junk gallery items that come before it; no full sort is needed. Junk does not
depend on the query in either protocol, so it is dropped from the gallery once. Per chunk of
queries, one matrix product gives the scores ``(c, G')`` and each query's good scores are sorted
(score descending, then index descending). With one or two good items per query (a satellite
image per building) the ranks are direct counts of higher scores. With many (54 drone images per
building) every gallery item is put in one of a few thousand per-query buckets spanning the good
scores; a histogram of the buckets gives, for each good item, the items in higher buckets, and
only the few items that share a bucket with a good item are compared exactly. Exactly equal
scores follow the index rule above in both paths. No loop over queries; memory is bounded by the
chunk size.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from imlnet.errors import DatasetLayoutError
from imlnet.io import atomic_write, write_json

Protocol = Literal["official", "sample4geo"]
PROTOCOLS: tuple[str, ...] = ("official", "sample4geo")
#: Keys of the dictionary :func:`evaluate_retrieval` returns, in table order.
METRICS: tuple[str, ...] = ("R@1", "R@5", "R@10", "R@1%", "AP")
#: (direction, query view, gallery view); the views are the University-1652 test folders.
DIRECTIONS: tuple[tuple[str, str, str], ...] = (
    ("drone->satellite", "query_drone", "gallery_satellite"),
    ("satellite->drone", "query_satellite", "gallery_drone"),
)
#: The four test views, in the order the features file lists them.
VIEWS: tuple[str, ...] = ("query_drone", "gallery_satellite", "query_satellite", "gallery_drone")
#: Most score-matrix entries held at once when ``chunk_size`` is not given (float32: 128 MiB).
CHUNK_ELEMENTS = 1 << 25
#: On the CPU, score entries ranked at a time (a block of rows that stays in cache).
RANK_ELEMENTS = 1 << 19
#: On the CPU, queries per matrix product (within CHUNK_ELEMENTS): fewer re-reads of the gallery.
MATMUL_ROWS = 512
#: Up to this many good items per query, ranks come from direct comparisons (two passes each);
#: above it, from per-query buckets (see ``_ranks_binned``).
DIRECT_MAX_GOOD = 2

ArrayLike = Tensor | np.ndarray | Sequence[float] | Sequence[int]


# --------------------------------------------------------------------------- the protocol
def evaluate_retrieval(
    query_features: ArrayLike,
    query_labels: ArrayLike,
    gallery_features: ArrayLike,
    gallery_labels: ArrayLike,
    protocol: Protocol = "official",
    *,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Recall@1/5/10, Recall@1% and AP (percent) of the official University-1652 protocol.

    Args:
        query_features: ``(Q, D)`` float features (torch or numpy), normally L2-normalised.
        query_labels: ``(Q,)`` integer labels (building ids). A query labelled -1 has no good
            item: it counts in the divisor and adds nothing.
        gallery_features: ``(G, D)`` float features.
        gallery_labels: ``(G,)`` integer labels; -1 marks junk.
        protocol: ``"official"`` (default) or ``"sample4geo"`` (gallery labels absent from the
            queries become junk too).
        chunk_size: queries per matrix product; by default chosen for speed, with at most
            :data:`CHUNK_ELEMENTS` scores held at once (128 MiB in float32). Results do not
            depend on it.
        device: where to compute; default: the device of ``query_features`` if it is a tensor,
            else the CPU. Scores are computed in the inputs' floating dtype (float16/bfloat16
            and integer features are promoted to float32, as the official ``FloatTensor``), and
            on CUDA with full-precision float32 matrix products (no TF32).

    Returns:
        ``{"R@1", "R@5", "R@10", "R@1%", "AP"}`` as Python floats in percent. For galleries
        smaller than k, R@k is the share of queries with any good item (the official code would
        index past its CMC array).

    Raises:
        DatasetLayoutError: empty query set or gallery, mismatched shapes, non-integer labels or
            non-finite features (the message says which argument).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    dev = _pick_device(device, query_features)
    qf = _features(query_features, "query_features", dev)
    gf = _features(gallery_features, "gallery_features", dev)
    ql = _labels(query_labels, "query_labels", dev)
    gl = _labels(gallery_labels, "gallery_labels", dev)
    _check_shapes(qf, ql, gf, gl)
    dtype = _score_dtype(qf.dtype, gf.dtype)
    qf, gf = qf.to(dtype), gf.to(dtype)

    n_queries, n_gallery = len(ql), len(gl)
    r1pct = round(n_gallery * 0.01)  # Python's round, as the official code: 951 -> 10
    cutoffs = torch.tensor([0, 4, 9, r1pct], device=dev)  # CMC indices of R@1, @5, @10, @1%

    keep = gl != -1
    if protocol == "sample4geo":
        keep &= torch.isin(gl, ql)
    if not bool(keep.all()):  # the copy costs as much as the ranking of a large gallery
        gf, gl = gf[keep], gl[keep]
    table, table_counts, query_rows = _good_table(gl, ql)

    hits = torch.zeros(len(cutoffs), dtype=torch.int64, device=dev)
    ap_sum = torch.zeros((), dtype=torch.float64, device=dev)
    if table.shape[1] > 0:  # some query has a good item
        n_kept = len(gl)
        cap = max(1, CHUNK_ELEMENTS // n_kept)
        if dev.type == "cpu":
            # The passes over the scores take blocks of rows small enough to stay in cache; the
            # matrix product takes at least MATMUL_ROWS queries at once, so that a large
            # gallery is read from memory once per MATMUL_ROWS queries, not once per block.
            sub = max(1, RANK_ELEMENTS // n_kept)
            step = chunk_size or min(max(sub, MATMUL_ROWS), cap)
        else:
            step = sub = chunk_size or cap
        step = -(-n_queries // -(-n_queries // step))  # equal chunks: 701 -> 2 x 351, not 512 + 189
        buffer = torch.empty(step, n_kept, dtype=dtype, device=dev)
        with _ieee_matmul(dev):
            for start in range(0, n_queries, step):
                stop = min(start + step, n_queries)
                scores = torch.mm(qf[start:stop], gf.T, out=buffer[: stop - start])
                rows = query_rows[start:stop]
                n_good = table_counts[rows]
                ranks = good_ranks(scores, table[rows], n_good, block_rows=sub)
                first = torch.where(n_good > 0, ranks[:, 0], n_gallery)
                hits += (first[:, None] <= cutoffs[None, :]).sum(0)
                ap_sum += _average_precision(ranks, n_good).sum()
    recall = (hits.double() / n_queries * 100.0).tolist()
    return {
        "R@1": recall[0],
        "R@5": recall[1],
        "R@10": recall[2],
        "R@1%": recall[3],
        "AP": float(ap_sum) * 100.0 / n_queries,
    }


def good_ranks(
    scores: Tensor, good_idx: Tensor, n_good: Tensor, *, block_rows: int | None = None
) -> Tensor:
    """0-based ranks of each query's good items among all gallery items, in ranking order.

    The ranking is by descending score; among exactly equal scores the larger gallery index
    comes first (``np.argsort(score, kind="stable")[::-1]``). Junk must already be removed.

    Args:
        scores: ``(C, G)`` query-gallery scores.
        good_idx: ``(C, M)`` int64 gallery indices of each query's good items, ascending, padded
            on the right with any value (``G`` by convention).
        n_good: ``(C,)`` number of valid entries in each row of ``good_idx`` (0 allowed).
        block_rows: rows per pass over ``scores`` (small blocks stay in cache); default all.

    Returns:
        ``(C, M)`` int64 ranks ``r_0 < r_1 < ...`` of the good items in ranking order; entries
        at or after ``n_good`` are meaningless.
    """
    c, n = scores.shape
    m = good_idx.shape[1]
    slots = torch.arange(m, device=scores.device)
    valid = slots[None, :] < n_good[:, None]
    if n == 0 or m == 0:
        return torch.zeros(c, m, dtype=torch.int64, device=scores.device)
    idx = torch.where(valid, good_idx, 0)
    good_scores = scores.gather(1, idx).masked_fill(~valid, -math.inf)
    # Ranking order of the good items: score descending, then gallery index descending. The
    # indices are ascending, so flipping them and sorting stably by score gives exactly that.
    thr, order = torch.sort(good_scores.flip(1), dim=1, descending=True, stable=True)
    thr_idx = torch.where(valid, good_idx, n).flip(1).gather(1, order)
    blocks = [(a, min(a + (block_rows or c), c)) for a in range(0, c, block_rows or c)]
    if m <= DIRECT_MAX_GOOD:
        return _ranks_direct(scores, thr, thr_idx, blocks)
    return _ranks_binned(scores, thr, thr_idx, n_good, blocks)


def _ranks_direct(
    scores: Tensor, thr: Tensor, thr_idx: Tensor, blocks: list[tuple[int, int]]
) -> Tensor:
    """Rank of each threshold: #{k: s_k > t} + #{k: s_k == t, k > j}, two passes per slot."""
    above = torch.empty(thr.shape, dtype=torch.int64, device=scores.device)
    at_least = torch.empty_like(above)
    for a, b in blocks:
        for i in range(thr.shape[1]):  # good-item slots (at most DIRECT_MAX_GOOD), not queries
            t = thr[a:b, i : i + 1]
            above[a:b, i] = _count(scores[a:b] > t)
            at_least[a:b, i] = _count(scores[a:b] >= t)
    rows, slots = (at_least > above + 1).nonzero(as_tuple=True)  # another item equals t
    if len(rows):
        t = thr[rows, slots][:, None]
        later = torch.arange(scores.shape[1], device=scores.device) > thr_idx[rows, slots][:, None]
        above[rows, slots] += _count((scores[rows] == t) & later)
    return above


def _count(mask: Tensor) -> Tensor:
    """``(C,)`` number of True per row of a ``(C, G)`` mask (summing bytes is the fastest way)."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def _ranks_binned(
    scores: Tensor, thr: Tensor, thr_idx: Tensor, n_good: Tensor, blocks: list[tuple[int, int]]
) -> Tensor:
    """Ranks of many good items per query from per-row buckets, exact.

    Each row gets a monotone bucket function ``f(s) = trunc(clamp((s + shift) * scale))`` whose
    ``bins`` buckets span the row's good scores. Monotone means ``f(s) > f(t)`` implies
    ``s > t``; so every gallery item in a higher bucket than a good item is ahead of it (a
    histogram, summed from the top), every item in a lower bucket behind it, and only the
    items sharing a bucket with some good item (a few per cent) are compared exactly, with the
    index rule for equal scores. ``f`` is applied with the same elementwise operations to the
    scores and the thresholds (no fused multiply-add), so it is the same function for both.
    """
    c, n = scores.shape
    m = thr.shape[1]
    dev = scores.device
    bins = int(min(max(2 * math.sqrt(m * n), 64), 1 << 16))
    nb = bins + 5  # bucket 0: far below the lowest good score; nb - 1: far above the highest
    has = n_good > 0
    hi = torch.where(has, thr[:, 0], 0.0)[:, None]
    lo = torch.where(has, thr.gather(1, (n_good - 1).clamp(min=0)[:, None])[:, 0], 0.0)[:, None]
    width = torch.maximum(hi - lo, 1e-2 * torch.maximum(hi.abs(), lo.abs()))
    scale = (bins / torch.where(width > 0, width, 1.0)).clamp(max=1e30)
    shift = 2.0 / scale - lo  # the lowest good score lands near bucket 2
    valid = torch.arange(m, device=dev)[None, :] < n_good[:, None]
    tb = ((thr + shift) * scale).clamp(0, nb - 1).long()
    tb = torch.where(valid, tb, nb)  # padding goes to a dummy bucket
    ones = torch.ones((), dtype=torch.int64, device=dev)
    th_count = torch.zeros(c, nb + 1, dtype=torch.int64, device=dev)
    th_count.scatter_add_(1, tb, ones.expand(c, m))
    th_count = th_count[:, :nb]
    shared = th_count > 0  # buckets holding a good item

    # The passes over the scores, a block of rows at a time: bucket of every item, histogram,
    # and the (flat) positions and buckets of the items that share a bucket with a good item.
    hist = torch.zeros(c, nb, dtype=torch.int64, device=dev)
    flat_parts, bucket_parts = [], []
    for a, b in blocks:
        u = scores[a:b] + shift[a:b]
        u.mul_(scale[a:b]).clamp_(0, nb - 1)
        bucket = u.long()
        hist[a:b].scatter_add_(1, bucket, ones.expand_as(bucket))
        flat = shared[a:b].gather(1, bucket).view(-1).nonzero().squeeze(1)
        bucket_parts.append(bucket.view(-1).index_select(0, flat))
        flat_parts.append(flat + a * n)
    ranks = (n - hist.cumsum(1)).gather(1, tb.clamp(max=nb - 1))  # items in higher buckets

    # Items sharing a bucket with good items: exact comparisons with those good items only.
    # Flat indices: advanced indexing with one 1-D index is much cheaper than with two.
    flat = torch.cat(flat_parts)
    rows, cols = flat // n, flat % n
    x = rows * nb + torch.cat(bucket_parts)
    s = scores.reshape(-1).index_select(0, flat)
    first = (n_good[:, None] - th_count.cumsum(1)).view(-1).index_select(0, x)  # #{i: tb_i > x}
    count = th_count.reshape(-1).index_select(0, x)
    thr_flat, idx_flat = thr.reshape(-1), thr_idx.reshape(-1)
    p = first.clone()  # first good slot that item (rows, cols) is ahead of
    for o in range(int(count.max()) if len(count) else 0):  # goods per bucket: usually 1
        i = rows * m + (first + o).clamp(max=m - 1)
        t, j = thr_flat.index_select(0, i), idx_flat.index_select(0, i)
        p += (o < count) & ((t > s) | ((t == s) & (j >= cols)))
    step = torch.zeros(c * (m + 1), dtype=torch.int64, device=dev)
    step.index_add_(0, rows * (m + 1) + p, torch.ones_like(p))
    step.index_add_(0, rows * (m + 1) + first + count, torch.full_like(p, -1))
    return ranks + step.view(c, m + 1).cumsum(1)[:, :m]


def _average_precision(ranks: Tensor, n_good: Tensor) -> Tensor:
    """``(C,)`` float64 AP per query (0 without good items) from ``(C, M)`` ranks."""
    i = torch.arange(ranks.shape[1], dtype=torch.float64, device=ranks.device)[None, :]
    r = ranks.double()
    precision = (i + 1) / (r + 1)
    old = torch.where(r > 0, i / r.clamp(min=1), 1.0)
    valid = i < n_good[:, None]
    total = torch.where(valid, (old + precision) / 2, 0.0).sum(1)
    return total / n_good.clamp(min=1)


def _good_table(gallery_labels: Tensor, query_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per gallery label that some query has, the ascending indices of its items, padded with G.

    Returns:
        ``table (U + 1, M)`` int64, M the largest such label's count (the last row is empty,
        for queries without a match), ``counts (U + 1,)``, and ``query_rows (Q,)``: the table
        row of each query.
    """
    dev, n = gallery_labels.device, len(gallery_labels)
    uniq, inverse, counts = torch.unique(gallery_labels, return_inverse=True, return_counts=True)
    used = torch.where(torch.isin(uniq, query_labels), counts, 0)  # unmatched labels: no row
    n_labels = len(uniq)
    width = int(used.max()) if n_labels else 0
    table = torch.full((n_labels + 1, width), n, dtype=torch.int64, device=dev)
    if width:
        order = torch.argsort(inverse, stable=True)  # gallery indices grouped by label
        group = inverse[order]
        slot = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[group]
        matched = used[group] > 0
        table[group[matched], slot[matched]] = order[matched]
    counts = torch.cat([used, used.new_zeros(1)])
    if n_labels:
        pos = torch.searchsorted(uniq, query_labels).clamp_(max=n_labels - 1)
        query_rows = torch.where(uniq[pos] == query_labels, pos, n_labels)
    else:
        query_rows = torch.full_like(query_labels, n_labels)
    return table, counts, query_rows


@contextlib.contextmanager
def _ieee_matmul(device: torch.device) -> Iterator[None]:
    """Full float32 matrix products on CUDA (the official scores), restoring the setting after."""
    if device.type != "cuda":
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _pick_device(device: str | torch.device | None, like: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    return like.device if isinstance(like, Tensor) else torch.device("cpu")


def _features(x: ArrayLike, name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(device)
    if t.ndim != 2:
        raise DatasetLayoutError(f"{name} must be a (N, D) matrix, got shape {tuple(t.shape)}")
    # A sum is finite when every value is (bar overflow, which the exact check then clears).
    if t.is_floating_point() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise DatasetLayoutError(
            f"{name} contains NaN or infinite values; check the model or the features file"
        )
    return t


def _labels(x: ArrayLike, name: str, device: torch.device) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim != 1:
        raise DatasetLayoutError(f"{name} must be a vector (N,), got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise DatasetLayoutError(f"{name} must hold integer ids, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _check_shapes(qf: Tensor, ql: Tensor, gf: Tensor, gl: Tensor) -> None:
    if len(qf) == 0:
        raise DatasetLayoutError("the query set is empty (0 features): nothing to evaluate")
    if len(gf) == 0:
        raise DatasetLayoutError("the gallery is empty (0 features): nothing to search")
    if qf.shape[1] != gf.shape[1]:
        raise DatasetLayoutError(
            f"query and gallery features differ in dimension: {qf.shape[1]} vs {gf.shape[1]}"
        )
    for feats, labels, what in ((qf, ql, "query"), (gf, gl, "gallery")):
        if len(feats) != len(labels):
            raise DatasetLayoutError(
                f"{len(feats)} {what} features but {len(labels)} {what} labels"
            )


def _score_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    dtype = torch.promote_types(a, b)
    if dtype not in (torch.float32, torch.float64):
        return torch.float32
    return dtype


# --------------------------------------------------------------------------- features
@torch.inference_mode()
def extract_features(
    encode: Callable[[Tensor], Tensor],
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    flip: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """The official test features: ``encode(x) + encode(flip(x))``, then L2-normalised.

    Summing the descriptor of the image and of its horizontal mirror (University-1652's
    ``extract_feature``) makes the feature nearly invariant to left-right flips, which the
    drone orbits contain.

    Args:
        encode: ``(B, 3, H, W) -> (B, D)`` descriptor function, e.g.
            ``lambda x: model.encode(x, "drone")``.
        loader: yields dicts with ``image_key`` ``(B, 3, H, W)`` and ``label_key`` ``(B,)``
            (the test datasets' ``{"image", "label", "path"}``), or ``(image, label)`` pairs.
        device: where ``encode`` runs (default: the CPU).
        flip: add the mirrored image's descriptor (the official feature); False for one pass.
        image_key, label_key: dict keys of the images and labels.
        progress: show a tqdm bar.

    Returns:
        ``features (N, D)`` float32 on the CPU, unit L2 norm, and ``labels (N,)`` int64.

    Raises:
        DatasetLayoutError: a batch lacks the image or label key, or the encoder does not
            return one row per image.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    for batch in tqdm(loader, desc="features", unit="batch", disable=not progress):
        images, batch_labels = _unpack(batch, image_key, label_key)
        x = images.to(dev)
        f = encode(x).float()
        if flip:
            f = f + encode(torch.flip(x, dims=[3])).float()
        if f.ndim != 2 or len(f) != len(x):
            raise DatasetLayoutError(
                f"the encoder returned shape {tuple(f.shape)} for {len(x)} images; "
                "expected one descriptor row per image, (B, D)"
            )
        feats.append(F.normalize(f, dim=1).cpu())
        labels.append(torch.as_tensor(batch_labels).reshape(-1).to(torch.int64).cpu())
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels)


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


# --------------------------------------------------------------------------- reporting
def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table, one row per direction (e.g. ``"drone->satellite"``), two decimals."""
    lines = ["| direction | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, metrics in results.items():
        cells = " | ".join(f"{metrics[k]:.2f}" for k in METRICS)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- features files
def features_key(view: str, kind: Literal["features", "labels"], setting: str = "") -> str:
    """Name of an array in a features file: ``[<setting>/]<view>_<kind>``.

    ``view`` is one of :data:`VIEWS`; ``setting`` groups the views of one evaluation (e.g.
    ``"150m"`` for a SUES-200 altitude) and is empty for University-1652.
    """
    return f"{setting}/{view}_{kind}" if setting else f"{view}_{kind}"


def save_features(
    path: str | os.PathLike[str], views: Mapping[str, tuple[Tensor, Tensor]], setting: str = ""
) -> None:
    """Write features and labels per view to an ``.npz`` file, atomically.

    Args:
        path: the ``.npz`` file.
        views: view name (see :data:`VIEWS`) -> ``(features (N, D), labels (N,))``.
        setting: prefix of the keys (see :func:`features_key`).
    """
    arrays: dict[str, np.ndarray] = {}
    for view, (feats, labels) in views.items():
        arrays[features_key(view, "features", setting)] = np.asarray(torch.as_tensor(feats).cpu())
        arrays[features_key(view, "labels", setting)] = np.asarray(
            torch.as_tensor(labels).cpu(), dtype=np.int64
        )
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


# --------------------------------------------------------------------------- imlnet evaluate
def _load_model(checkpoint: str | Path, device: torch.device) -> Any:
    """``IMLNet.from_pretrained(checkpoint)`` in eval mode on ``device`` (tests replace this)."""
    from imlnet.models.imlnet import IMLNet  # lazy: only the model path needs the model

    return IMLNet.from_pretrained(checkpoint).to(device).eval()


def _test_views(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """setting -> view -> test dataset, for the chosen benchmark."""
    from imlnet.data.transforms import build_transforms  # lazy: heavy, and not needed for .npz

    def transform(view: str) -> Any:
        return build_transforms(view.split("_")[1], train=False, size=args.image_size)

    if args.dataset == "sues200":
        from imlnet.data.sues200 import SUES200Test

        return {
            f"{alt}m": {v: SUES200Test(args.data, alt, v, transform=transform(v)) for v in VIEWS}
            for alt in args.altitudes
        }
    from imlnet.data.university1652 import University1652Test  # the synthetic set shares it

    return {"": {v: University1652Test(args.data, v, transform=transform(v)) for v in VIEWS}}


def _evaluate_model(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    model = _load_model(args.checkpoint, device)
    results: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for setting, datasets in _test_views(args).items():
        views: dict[str, tuple[Tensor, Tensor]] = {}
        for view, dataset in datasets.items():
            domain = view.split("_")[1]
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=args.batch_size,
                shuffle=False,
                num_workers=args.num_workers,
                pin_memory=device.type == "cuda",
            )
            views[view] = extract_features(
                lambda x, d=domain: model.encode(x, d),
                loader,
                device=device,
                progress=not args.quiet,
            )
        if args.save_features is not None:
            target = args.save_features
            if setting:
                target = target.with_name(f"{target.stem}_{setting}{target.suffix or '.npz'}")
            save_features(target, views, setting)
        results.update(_run(views, args, device, setting))
        sizes[setting or "all"] = {v: len(views[v][1]) for v in views}
    return results, sizes


def _run(views: Mapping, args: argparse.Namespace, device: torch.device, setting: str) -> dict:
    return evaluate_views(
        views, args.protocol, setting=setting, chunk_size=args.chunk_size, device=device
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="imlnet evaluate",
        description="Official University-1652 / SUES-200 retrieval metrics (R@1, R@5, R@10, "
        "R@1%, AP) for drone->satellite and satellite->drone.",
        epilog="Features file (--features / --save-features): an .npz with, per view V in "
        f"{', '.join(VIEWS)}, the arrays V_features (N, D) float and V_labels (N,) int "
        "(label -1 = junk); SUES-200 keys start with '<altitude>m/'.",
    )
    src = ap.add_argument_group("what to evaluate (a model or a features file)")
    src.add_argument("--checkpoint", type=Path, help="folder saved by IMLNet.save_pretrained")
    src.add_argument("--data", type=Path, help="dataset root (University-1652 layout)")
    src.add_argument("--features", type=Path, help="precomputed features .npz (no model)")
    ap.add_argument(
        "--dataset", choices=("university1652", "sues200", "synthetic"), default="university1652"
    )
    ap.add_argument(
        "--altitudes", type=int, nargs="+", default=[150, 200, 250, 300], help="SUES-200 only"
    )
    ap.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="official",
        help="official (default) or sample4geo: gallery ids absent from the queries are junk",
    )
    ap.add_argument("--image-size", type=int, default=256, help="model input size in pixels")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model and the metrics run (default: cuda if available)",
    )
    ap.add_argument("--chunk-size", type=int, help="queries per matrix product of the metrics")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--save-features", type=Path, help="also save the extracted features (.npz)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str]) -> int:
    """``imlnet evaluate``: print the metrics table and optionally write them as JSON."""
    ap = _parser()
    args = ap.parse_args(list(argv))
    device = torch.device(args.device)
    if args.features is not None:
        if args.checkpoint is not None or args.data is not None:
            ap.error("give either --features or --checkpoint with --data, not both")
        results: dict[str, dict[str, float]] = {}
        sizes: dict[str, dict[str, int]] = {}
        for setting, views in load_features(args.features).items():
            results.update(_run(views, args, device, setting))
            sizes[setting or "all"] = {v: len(views[v][1]) for v in views}
        if not results:
            raise DatasetLayoutError(
                f"{args.features} has no complete direction: it needs query_drone with "
                "gallery_satellite, or query_satellite with gallery_drone"
            )
        source = {"features": str(args.features)}
    else:
        if args.checkpoint is None or args.data is None:
            ap.error("give --checkpoint and --data (or --features)")
        results, sizes = _evaluate_model(args, device)
        source = {"checkpoint": str(args.checkpoint), "data": str(args.data)}
    print(format_table(results))
    if args.out is not None:
        write_json(
            args.out,
            {
                "dataset": args.dataset if args.features is None else None,
                "protocol": args.protocol,
                "sizes": sizes,
                "results": results,
                **source,
            },
        )
        print(f"wrote {args.out}")
    return 0
