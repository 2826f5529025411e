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
depend on the query in either protocol, so it is dropped from the gallery once. Exactly equal
scores follow the index rule above in both paths below; no loop over queries.

- Direct path, one or two good items per query (a satellite image per building): per chunk of
  queries one matrix product gives the scores ``(c, G')``, and each good item's rank is a count
  of the higher scores, from two sums of ``sign(score - t)``.
- Bucket path, many good items per query (54 drone images per building): per chunk of queries,
  one pass over the gallery in cache-sized blocks, each a matrix product ranked at once, so the
  scores are never written to memory (that costs as much as the product itself). Every item is
  put in one of a few thousand per-query buckets spanning the query's good scores; a per-query
  table gives, for each bucket, the number of good items above it, whose histogram gives the
  ranks; the few items that may share a bucket with a good item are set aside and compared
  exactly. The buckets come from estimates of the good scores (a small batched product), with
  a margin for rounding; a query whose exact good scores fall outside it is redone from its
  whole score row (never seen in practice; the results are exact either way).

On the CPU, large evaluations run in one piece of queries per torch thread, each single-threaded
(see ``_in_parallel``). Memory is bounded by the chunk size.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from imlnet.errors import DatasetLayoutError
from imlnet.inference import embed, load_model, view_domain
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
#: On the CPU, direct path: score entries ranked at a time (a block of rows that stays in cache).
RANK_ELEMENTS = 1 << 19
#: On the CPU, direct path: queries per matrix product (within CHUNK_ELEMENTS), so that a large
#: gallery is read from memory once per MATMUL_ROWS queries.
MATMUL_ROWS = 512
#: On the CPU, bucket path: queries per pass over the gallery (the gallery is read once each).
BINNED_ROWS = 1024
#: On the CPU, bucket path: gallery items per block (one matrix product, ranked at once while
#: its scores and the temporaries of the ranking are in cache; 256 with 351 queries: 351 KiB of
#: float32 scores).
BINNED_COLS = 256
#: Up to this many good items per query, ranks come from direct counts (the direct path); above
#: it, from per-query buckets (the bucket path, see ``_ranks_binned``).
DIRECT_MAX_GOOD = 2
#: Bucket path: buckets per query = BINS_FACTOR * sqrt(good items * gallery size). More buckets
#: set aside fewer items for the exact comparison but make the per-query table larger.
BINS_FACTOR = 1.0
#: Bucket path: margin around the estimated good scores, in units of sqrt(D) u |q| |g|, the
#: typical rounding difference of two float dot products (see ``_ranks_from_features``).
DELTA_FACTOR = 8.0
#: On the CPU, evaluations of at least this many scores run in pieces of queries, one per torch
#: thread at most (see ``_in_parallel``), each of at least PIECE_QUERIES queries.
PARALLEL_MIN_SCORES = 1 << 22
PIECE_QUERIES = 256
#: Most pieces on the CPU (None: torch.get_num_threads()).
CPU_WORKERS: int | None = None

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
    table, table_counts, query_rows = _good_table(gl, ql)

    if table.shape[1] > DIRECT_MAX_GOOD:
        chunks = _binned_chunks
    elif table.shape[1] > 0:  # some query has a good item
        chunks = _direct_chunks
    else:
        chunks = None

    def metric_sums(start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Hits at the cutoffs and the sum of AP over queries ``start:stop``."""
        hits = torch.zeros(len(cutoffs), dtype=torch.int64, device=dev)
        ap_sum = torch.zeros((), dtype=torch.float64, device=dev)
        if chunks is None:
            return hits, ap_sum
        rows = query_rows[start:stop]
        for ranks, n_good in chunks(qf[start:stop], gf, table, table_counts, rows, chunk_size):
            first = torch.where(n_good > 0, ranks[:, 0], n_gallery)
            hits += (first[:, None] <= cutoffs[None, :]).sum(0)
            ap_sum += _average_precision(ranks, n_good).sum()
        return hits, ap_sum

    with _ieee_matmul(dev):
        sums = _in_parallel(metric_sums, n_queries, n_queries * len(gl), dev)
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


def _in_parallel(
    work: Callable[[int, int], tuple[Tensor, Tensor]], n: int, size: int, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """``work(start, stop)`` over ``0:n``: in one piece, or on the CPU in one piece per thread.

    On the CPU, large evaluations (``size`` scores, at least PARALLEL_MIN_SCORES) are split
    into contiguous pieces of at least PIECE_QUERIES queries, one per torch thread at most, each
    run in its own Python thread with its share of the torch threads (one on a 2-core machine).
    The ranking runs hundreds of small operations; split inside each operation (torch's
    default) every one of them waits for all threads, and on a shared machine one descheduled
    thread stalls the others at every step (measured: 2 to 16 s instead of 0.9 s for satellite
    -> drone under a load of 3); independent pieces only meet at the end. Each worker sets
    its own torch thread count (per thread with OpenMP; MKL's setting is process-wide), and the
    caller's count is restored afterwards, also when a worker raises.
    """
    threads = torch.get_num_threads()
    workers = min(CPU_WORKERS or threads, max(1, n // PIECE_QUERIES))
    if device.type != "cpu" or workers < 2 or size < PARALLEL_MIN_SCORES:
        return [work(0, n)]
    step = -(-n // workers)
    share = max(1, threads // workers)

    def run(start: int) -> tuple[Tensor, Tensor]:
        torch.set_num_threads(share)
        return work(start, min(start + step, n))

    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(run, range(0, n, step)))
    finally:
        torch.set_num_threads(threads)


def _equal_steps(total: int, step: int) -> int:
    """Chunk length that splits ``total`` into the fewest chunks of at most ``step``, equally."""
    return -(-total // -(-total // step))  # 701 with 512 -> 2 x 351, not 512 + 189


def _direct_chunks(
    qf: Tensor,
    gf: Tensor,
    table: Tensor,
    table_counts: Tensor,
    query_rows: Tensor,
    chunk_size: int | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(ranks, n_good)`` per chunk of queries whose ``(c, G')`` scores are held whole.

    For one or two good items per query, whose thresholds come from the chunk's own scores. On
    the CPU, a small gallery (at most RANK_ELEMENTS / MATMUL_ROWS items, e.g. 951 satellite
    images) is ranked against MATMUL_ROWS queries at a time, scored as ``gallery @ queries.T``
    (10 % faster than the transpose with MKL on one thread here); with a larger one the passes
    over the scores take blocks of rows small enough to stay in cache, and the matrix product
    at least MATMUL_ROWS queries at once, so that the gallery is read from memory once per
    MATMUL_ROWS queries, not once per block.
    """
    n_queries, n_kept = len(qf), len(gf)
    cap = max(1, CHUNK_ELEMENTS // n_kept)
    cpu = qf.device.type == "cpu"
    transposed = cpu and n_kept * MATMUL_ROWS <= RANK_ELEMENTS
    if transposed:
        step = sub = chunk_size or MATMUL_ROWS
    elif cpu:
        sub = max(1, RANK_ELEMENTS // n_kept)
        step = chunk_size or min(max(sub, MATMUL_ROWS), cap)
    else:
        step = sub = chunk_size or cap
    step = _equal_steps(n_queries, step)
    buffer = torch.empty(step * n_kept, dtype=qf.dtype, device=qf.device)
    for start in range(0, n_queries, step):
        stop = min(start + step, n_queries)
        q, c = qf[start:stop], stop - start
        if transposed:
            scores = torch.mm(gf, q.T, out=buffer[: c * n_kept].view(n_kept, c)).T
        else:
            scores = torch.mm(q, gf.T, out=buffer[: c * n_kept].view(c, n_kept))
        rows = query_rows[start:stop]
        n_good = table_counts[rows]
        yield good_ranks(scores, table[rows], n_good, block_rows=sub), n_good


def _binned_chunks(
    qf: Tensor,
    gf: Tensor,
    table: Tensor,
    table_counts: Tensor,
    query_rows: Tensor,
    chunk_size: int | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(ranks, n_good)`` per chunk of queries, each ranked in one pass over the gallery.

    For many good items per query (:func:`_ranks_from_features`). On the CPU, BINNED_ROWS
    queries at a time (the gallery is read once per chunk) against cache-sized blocks of
    gallery items; on a GPU, as many queries as CHUNK_ELEMENTS scores allow, against the whole
    gallery.
    """
    n_queries, n_kept = len(qf), len(gf)
    if qf.device.type == "cpu":
        step = _equal_steps(n_queries, chunk_size or BINNED_ROWS)
        cols = BINNED_COLS
    else:
        step = _equal_steps(n_queries, chunk_size or max(1, CHUNK_ELEMENTS // n_kept))
        cols = max(1, CHUNK_ELEMENTS // step)
    for start in range(0, n_queries, step):
        rows = query_rows[start : start + step]
        n_good = table_counts[rows]
        ranks = _ranks_from_features(
            qf[start : start + step], gf, table[rows], n_good, block_cols=cols
        )
        yield ranks, n_good


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
        block_rows: rows per pass over ``scores`` in the direct path (small blocks stay in
            cache); default all.

    Returns:
        ``(C, M)`` int64 ranks ``r_0 < r_1 < ...`` of the good items in ranking order; entries
        at or after ``n_good`` are meaningless.
    """
    c, n = scores.shape
    m = good_idx.shape[1]
    if n == 0 or m == 0:
        return torch.zeros(c, m, dtype=torch.int64, device=scores.device)
    valid = _valid_slots(n_good, m)
    good_scores = scores.gather(1, torch.where(valid, good_idx, 0))
    if m <= DIRECT_MAX_GOOD:
        thr, thr_idx = _ranking_order(good_scores, good_idx, valid, n)
        blocks = [(a, min(a + (block_rows or c), c)) for a in range(0, c, block_rows or c)]
        return _ranks_direct(scores, thr, thr_idx, blocks)
    # The scores are at hand: the bucket path's estimates are exact (no margin needed).
    delta = torch.zeros_like(good_scores)
    ranks, _ = _ranks_binned(
        lambda a, b: scores[:, a:b].contiguous(), n, n, good_scores, delta, good_idx, n_good
    )
    return ranks  # the check cannot fail: the estimates are the scores themselves


def _valid_slots(n_good: Tensor, m: int) -> Tensor:
    """``(C, M)`` bool: slot i of row r holds a good item (i < n_good[r])."""
    return torch.arange(m, device=n_good.device)[None, :] < n_good[:, None]


def _ranking_order(
    good_scores: Tensor, good_idx: Tensor, valid: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """Good scores and gallery indices ``(C, M)`` in ranking order (padding: -inf and n, last).

    Ranking order: score descending, then gallery index descending. The indices are ascending,
    so flipping them and sorting stably by score gives exactly that.
    """
    masked = good_scores.masked_fill(~valid, -math.inf)
    thr, order = torch.sort(masked.flip(1), dim=1, descending=True, stable=True)
    thr_idx = torch.where(valid, good_idx, n).flip(1).gather(1, order)
    return thr, thr_idx


def _ranks_direct(
    scores: Tensor, thr: Tensor, thr_idx: Tensor, blocks: list[tuple[int, int]]
) -> Tensor:
    """Rank of each threshold: #{k: s_k > t} + #{k: s_k == t, k > j}.

    With ``d = s - t``, whose sign is exact in IEEE arithmetic, ``sum(sign(d))`` is #above -
    #below and ``sum(|sign(d)|)`` is #above + #below: two sums of cheap arithmetic instead of
    two comparisons (which torch makes several times slower on the CPU). The sums of +-1 are
    exact (float32 up to 2^24 items, float64 beyond). Rows where another item equals ``t`` get
    the index rule.
    """
    n = scores.shape[1]
    acc = scores.dtype if n < 1 << 24 else torch.float64
    above = torch.empty(thr.shape, dtype=torch.int64, device=scores.device)
    others = torch.empty_like(above)  # items not equal to t
    for a, b in blocks:
        for i in range(thr.shape[1]):  # good-item slots (at most DIRECT_MAX_GOOD), not queries
            d = torch.sub(scores[a:b], thr[a:b, i : i + 1]).sign_()
            diff = d.sum(1, dtype=acc)
            total = d.abs_().sum(1, dtype=acc)
            above[a:b, i] = (diff + total).div_(2)
            others[a:b, i] = total
    rows, slots = (others < n - 1).nonzero(as_tuple=True)  # another item equals t
    if len(rows):
        t = thr[rows, slots][:, None]
        later = torch.arange(n, device=scores.device) > thr_idx[rows, slots][:, None]
        above[rows, slots] += _count((scores[rows] == t) & later)
    return above


def _count(mask: Tensor) -> Tensor:
    """``(C,)`` number of True per row of a ``(C, G)`` mask (summing bytes is the fastest way)."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def _ranks_from_features(
    q: Tensor, g: Tensor, good_idx: Tensor, n_good: Tensor, *, block_cols: int
) -> Tensor:
    """:func:`good_ranks` of the scores ``q @ g.T``, made a block of gallery items at a time.

    The bucket path needs each query's good scores before its pass over the scores; here they
    are estimated from the good items' features (a small batched product) with a bound on how
    far the matrix product's own rounding can put them, and the pass checks that the exact ones
    fell where expected. Rows where one did not (none, unless the bound is broken) are redone
    from their whole score rows.

    Args:
        q: ``(C, D)`` query features; g: ``(G, D)`` gallery features (junk removed).
        good_idx, n_good: as in :func:`good_ranks`.
        block_cols: gallery items per matrix product.

    Returns:
        ``(C, M)`` int64 ranks, as :func:`good_ranks`.
    """
    c, m = good_idx.shape
    n, dim = g.shape
    valid = _valid_slots(n_good, m)
    estimate, g_norm = _good_scores(q, g, torch.where(valid, good_idx, 0))
    # Two float dot products of q and g_j (two summation orders) differ by at most
    # 2 gamma_D |q| |g_j|, gamma_D ~ D u (Higham, Accuracy and Stability, 3.1), but in practice
    # by about sqrt(D) u |q| |g_j| (rounding errors add up like a random walk; 2e-7 at most for
    # University-1652's 512-d unit vectors). The margin below is 8 times the latter (5e-6 there),
    # a fraction of a bucket. Should an exact score still fall outside, the check catches it
    # and the row is redone.
    u = torch.finfo(q.dtype).eps / 2
    q_norm = torch.linalg.vector_norm(q, dim=1, keepdim=True)
    delta = DELTA_FACTOR * math.sqrt(dim) * u * q_norm * g_norm + torch.finfo(q.dtype).tiny
    buffer = torch.empty(c * min(block_cols, n), dtype=q.dtype, device=q.device)

    def block(a: int, b: int) -> Tensor:
        return torch.mm(q, g[a:b].T, out=buffer[: c * (b - a)].view(c, b - a))

    ranks, ok = _ranks_binned(block, n, block_cols, estimate, delta, good_idx, n_good)
    if not bool(ok.all()):
        redo = (~ok).nonzero().squeeze(1)
        for part in redo.split(max(1, CHUNK_ELEMENTS // n)):
            ranks[part] = good_ranks(q[part] @ g.T, good_idx[part], n_good[part])
    return ranks


def _good_scores(q: Tensor, g: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Dot products ``(C, M)`` of each query with its gallery items ``idx``, and their norms.

    A small batched product, a few queries at a time (the gathered features stay in cache).
    """
    c, m = idx.shape
    scores = torch.empty(c, m, dtype=q.dtype, device=q.device)
    norms = torch.empty_like(scores)
    step = max(1, (1 << 20) // max(1, m * g.shape[1]))  # at most 2^20 gathered values at once
    for a in range(0, c, step):
        b = min(a + step, c)
        items = g.index_select(0, idx[a:b].reshape(-1)).view(b - a, m, -1)
        torch.bmm(items, q[a:b, :, None], out=scores[a:b, :, None])
        torch.linalg.vector_norm(items, dim=2, out=norms[a:b])
    return scores, norms


def _ranks_binned(
    score_block: Callable[[int, int], Tensor],
    n: int,
    block_cols: int,
    estimate: Tensor,
    delta: Tensor,
    good_idx: Tensor,
    n_good: Tensor,
) -> tuple[Tensor, Tensor]:
    """Ranks of many good items per query from per-row buckets, exact, in one pass.

    Each row gets a monotone bucket function ``f(s) = trunc(clamp((s + shift) * scale))`` whose
    ``bins`` buckets span the row's good scores. Monotone means ``f(s) > f(t)`` implies
    ``s > t``: a gallery item in a higher bucket than a good item is ahead of it, one in a lower
    bucket behind it, and only the items sharing a bucket with a good item (a few per cent) need
    an exact comparison (with the index rule for equal scores). ``f`` is applied with the same
    elementwise operations to the scores and to the good scores (no fused multiply-add), so it
    is the same function for both.

    The good scores are only known once the pass has seen them, so ``f`` comes from estimates:
    the exact score of good item j lies within ``delta`` of its estimate, so its bucket lies in
    ``[f(estimate_j - delta_j), f(estimate_j + delta_j)]``. Items in those "kept" buckets are
    set aside (position and score) for the exact comparison. Any other bucket lies wholly above
    or below each such interval, so a per-row table gives, for each bucket, the number ``v`` of
    good items ahead of its items; since the good items ahead of an item are the first ``v`` in
    ranking order, the item adds one to the ranks of slots ``v, v + 1, ...``: a histogram of
    ``v`` (a few dozen counters per row, in cache) and a running sum give the ranks. The exact
    good scores are picked from the blocks as they pass, and the check that each fell in its own
    estimate interval is returned.

    Args:
        score_block: ``(a, b) -> (C, b - a)`` contiguous scores of gallery items ``a:b``.
        n: gallery size; block_cols: gallery items per block.
        estimate: ``(C, M)`` estimates of the good items' scores, in ``good_idx`` order.
        delta: ``(C, M)`` bound on |score - estimate| (zero when the estimates are the scores).
        good_idx, n_good: as in :func:`good_ranks`.

    Returns:
        ``(C, M)`` int64 ranks as :func:`good_ranks`, and ``(C,)`` bool: every exact good score
        of the row fell in its own estimate interval (its ranks are exact; otherwise they are
        not).
    """
    c, m = good_idx.shape
    dev, dtype = estimate.device, estimate.dtype
    valid = _valid_slots(n_good, m)
    has = n_good[:, None] > 0
    bins = int(min(max(BINS_FACTOR * math.sqrt(m * n), 64), 1 << 16))
    nb = bins + 5  # bucket 0: far below the lowest good score; nb - 1: far above the highest
    lo = (estimate - delta).masked_fill_(~valid, math.inf).amin(1, keepdim=True)
    hi = (estimate + delta).masked_fill_(~valid, -math.inf).amax(1, keepdim=True)
    lo, hi = torch.where(has, lo, 0.0), torch.where(has, hi, 0.0)
    width = torch.maximum(hi - lo, 1e-2 * torch.maximum(hi.abs(), lo.abs()))
    scale = (bins / torch.where(width > 0, width, 1.0)).clamp(max=1e30)
    shift = 2.0 / scale - lo  # the lowest good score lands near bucket 2

    def bucket(x: Tensor) -> Tensor:
        return ((x + shift) * scale).clamp_(0, nb - 1).long()

    # Per row and bucket: kept (may hold a good item), else the number of good items above.
    ones = torch.ones((), dtype=torch.int64, device=dev).expand(c, m)
    first_b = torch.where(valid, bucket(estimate - delta), nb + 1)
    last_b = torch.where(valid, bucket(estimate + delta) + 1, nb + 1)
    starts = torch.zeros(c, nb + 2, dtype=torch.int64, device=dev).scatter_add_(1, first_b, ones)
    ends = torch.zeros_like(starts).scatter_add_(1, last_b, ones)
    kept = (starts - ends).cumsum(1)[:, :nb] > 0
    above = n_good[:, None] - starts.cumsum(1)[:, :nb]  # intervals starting at a higher bucket
    # Kept buckets get the code ``aside``, a power of two above any count, so that one bit
    # tells them apart; small entries, because the table is read at random and should stay in
    # cache (one row per query: c x nb bytes).
    aside = 1 << m.bit_length()
    small = torch.uint8 if aside < 256 else torch.int16 if aside < 1 << 15 else torch.int32
    table = above.masked_fill_(kept, aside).to(small).view(-1)
    index_dtype = torch.int32 if c * nb < 1 << 31 else torch.int64  # int32: cheaper to make
    row_start = torch.arange(0, c * nb, nb, dtype=index_dtype, device=dev)[:, None]

    # Where each good item's exact score is in the blocks: flat slots sorted by gallery index.
    flat_idx = torch.where(valid, good_idx, n).view(-1)
    by_index = torch.argsort(flat_idx)
    sorted_idx = flat_idx[by_index]
    exact = torch.full((c * m,), -math.inf, dtype=dtype, device=dev)
    block_starts = list(range(0, n, block_cols))
    bounds = torch.searchsorted(sorted_idx, torch.tensor([*block_starts, n], device=dev)).tolist()

    # The pass: per block, each item's bucket, its table entry v, the histogram of v, and the
    # set-aside items (flat position in the block and score).
    hist = torch.zeros(c, aside + 1, dtype=torch.int32, device=dev)
    size = c * min(block_cols, n)
    u_buf = torch.empty(size, dtype=dtype, device=dev)
    b_buf = torch.empty(size, dtype=index_dtype, device=dev)
    v_buf = torch.empty(size, dtype=small, device=dev)
    f_buf = torch.empty(size, dtype=small, device=dev)
    v_long = torch.empty(size, dtype=torch.int64, device=dev)
    ones_buf = torch.ones(size, dtype=torch.int32, device=dev)  # faster than an expanded one
    parts: list[tuple[Tensor, Tensor]] = []
    for k, a in enumerate(block_starts):
        b = min(a + block_cols, n)
        w = b - a
        s = score_block(a, b)
        u = torch.add(s, shift, out=u_buf[: c * w].view(c, w))
        u.mul_(scale).clamp_(0, nb - 1)
        bk = b_buf[: c * w].view(c, w).copy_(u).add_(row_start)  # copy_ truncates, as .long()
        v = torch.index_select(table, 0, bk.view(-1), out=v_buf[: c * w])
        hist.scatter_add_(1, v_long[: c * w].copy_(v).view(c, w), ones_buf[: c * w].view(c, w))
        pos = torch.bitwise_and(v, aside, out=f_buf[: c * w]).nonzero().squeeze(1)
        rows = pos // w
        parts.append((rows * n + (pos - rows * w + a), s.view(-1).index_select(0, pos)))
        i0, i1 = bounds[k], bounds[k + 1]
        if i1 > i0:
            slots = by_index[i0:i1]
            where = (slots // m) * w + sorted_idx[i0:i1] - a
            exact.index_copy_(0, slots, s.view(-1).index_select(0, where))

    thr, thr_idx = _ranking_order(exact.view(c, m), good_idx, valid, n)
    tb = torch.where(valid, bucket(thr), nb)
    # Exact only if each good score fell in its *own* interval: the table counted every other
    # item against the intervals, so a score in another good item's interval is not enough.
    own = bucket(exact.view(c, m))
    ok = (~valid | ((own >= first_b) & (own < last_b))).all(1)
    del table, kept, above

    # Set-aside items: p = the number of good items ahead of each (those in higher buckets,
    # then an exact comparison with those in its own bucket: usually none or one).
    flat = torch.cat([p[0] for p in parts])
    s = torch.cat([p[1] for p in parts])
    rows, cols = flat // n, flat % n
    th_count = torch.zeros(c, nb + 1, dtype=torch.int64, device=dev)
    th_count.scatter_add_(1, tb, ones)
    th_count = th_count[:, :nb].contiguous()
    # The same bucket function, elementwise: the same operations on the same values.
    xb = (s + shift.view(-1).index_select(0, rows)) * scale.view(-1).index_select(0, rows)
    xb = xb.clamp_(0, nb - 1).long() + rows * nb
    first = (n_good[:, None] - th_count.cumsum(1)).view(-1).index_select(0, xb)
    count = th_count.view(-1).index_select(0, xb)
    thr_flat, idx_flat = thr.reshape(-1), thr_idx.reshape(-1)
    p = first.clone()
    for o in range(int(count.max()) if len(count) else 0):  # goods per bucket: usually 1
        i = rows * m + (first + o).clamp(max=m - 1)
        t, j = thr_flat.index_select(0, i), idx_flat.index_select(0, i)
        p += (o < count) & ((t > s) | ((t == s) & (j >= cols)))
    counts = hist[:, : m + 1].to(torch.int64).contiguous().view(-1)
    counts.index_add_(0, rows * (m + 1) + p, torch.ones_like(p))
    return counts.view(c, m + 1).cumsum(1)[:, :m], ok


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
def _test_views(args: argparse.Namespace, transform: Any) -> dict[str, dict[str, Any]]:
    """setting -> view -> test dataset through ``transform``, for the chosen benchmark."""
    if args.dataset == "sues200":
        from imlnet.data.sues200 import SUES200Test

        return {
            f"{alt}m": {v: SUES200Test(args.data, alt, v, transform=transform) for v in VIEWS}
            for alt in args.altitudes
        }
    from imlnet.data.university1652 import University1652Test  # the synthetic set shares it

    return {"": {v: University1652Test(args.data, v, transform=transform) for v in VIEWS}}


def _evaluate_model(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    loaded = load_model(args.checkpoint, device, image_size=args.image_size)
    results: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, int]] = {}
    for setting, datasets in _test_views(args, loaded.transform).items():
        views: dict[str, tuple[Tensor, Tensor]] = {}
        for view, dataset in datasets.items():
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=args.batch_size,
                shuffle=False,
                num_workers=args.num_workers,
                pin_memory=device.type == "cuda",
            )
            views[view] = extract_features(
                loaded.model,
                loader,
                domain=view_domain(view),
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
    ap.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="model input size in pixels (default: the training size saved with the model, "
        "else 256)",
    )
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
