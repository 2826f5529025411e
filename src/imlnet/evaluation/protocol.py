"""The official University-1652 retrieval metrics, as a reader would check them against the code.

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

The metrics are computed here from the ranks of each query's good items; how those ranks are
found fast and exactly (without sorting, without a loop over queries) is
:mod:`imlnet.evaluation.ranking`'s business. ``tests/test_evaluation.py`` checks the two against
a plain transcription of the official loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from imlnet.errors import DatasetLayoutError
from imlnet.evaluation.ranking import good_rank_chunks, ieee_matmul, in_parallel

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

ArrayLike = Tensor | np.ndarray | Sequence[float] | Sequence[int]


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
            :data:`~imlnet.evaluation.ranking.CHUNK_ELEMENTS` scores held at once (128 MiB in
            float32). Results do not depend on it.
        device: where to compute; default: the device of ``query_features`` if it is a tensor,
            else the CPU. Scores are computed in the inputs' floating dtype (float16/bfloat16
            and integer features are promoted to float32, as the official ``FloatTensor``), and
            on CUDA with full-precision float32 matrix products (no TF32). On the CPU a large
            evaluation runs in pieces of queries on torch's threads, one Python thread each
            (``torch.set_num_threads`` is set inside them and restored afterwards).

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
    ranks_of = good_rank_chunks(qf, gf, ql, gl, chunk_size)

    def metric_sums(start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Hits at the CMC cutoffs and the sum of AP over queries ``start:stop``."""
        hits = torch.zeros(len(cutoffs), dtype=torch.int64, device=dev)
        ap_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for ranks, n_good in ranks_of(start, stop):
            # CMC is 1 from the first good position on; a query without good items never hits
            first = torch.where(n_good > 0, ranks[:, 0], n_gallery)
            hits += (first[:, None] <= cutoffs[None, :]).sum(0)
            ap_sum += average_precision(ranks, n_good).sum()
        return hits, ap_sum

    with ieee_matmul(dev):
        sums = in_parallel(metric_sums, n_queries, n_queries * len(gl), dev)
    hits = sum(h for h, _ in sums)
    ap_sum = sum(a for _, a in sums)
    recall = (hits.double() / n_queries * 100.0).tolist()
    return {
        "R@1": recall[0],
        "R@5": recall[1],
        "R@10": recall[2],
        "R@1%": recall[3],
        "AP": float(ap_sum) * 100.0 / n_queries,
    }


def average_precision(ranks: Tensor, n_good: Tensor) -> Tensor:
    """AP per query from the ranks of its good items, as ``compute_mAP`` computes it.

    For the i-th good item (0-based) at 0-based rank ``r_i``: precision ``(i + 1) / (r_i + 1)``,
    old precision ``i / r_i`` (1 when ``r_i = 0``); AP is the mean over good items of their
    average (the trapezoid rule).

    Args:
        ranks: ``(C, M)`` ranks in ranking order (entries at or after ``n_good`` ignored).
        n_good: ``(C,)`` good items per query.

    Returns:
        ``(C,)`` float64 AP in [0, 1]; 0 for a query without good items.
    """
    i = torch.arange(ranks.shape[1], dtype=torch.float64, device=ranks.device)[None, :]
    r = ranks.double()
    precision = (i + 1) / (r + 1)
    old = torch.where(r > 0, i / r.clamp(min=1), 1.0)
    valid = i < n_good[:, None]
    total = torch.where(valid, (old + precision) / 2, 0.0).sum(1)
    return total / n_good.clamp(min=1)


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


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table, one row per direction (e.g. ``"drone->satellite"``), two decimals."""
    lines = ["| direction | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, metrics in results.items():
        cells = " | ".join(f"{metrics[k]:.2f}" for k in METRICS)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)
