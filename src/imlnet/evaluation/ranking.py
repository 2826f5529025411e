"""The fast exact ranking engine behind :func:`imlnet.evaluation.protocol.evaluate_retrieval`.

A query's metrics only need the rank of each of its good items, i.e. the number of non-junk
gallery items that come before it; no full sort is needed. Junk does not depend on the query in
either protocol, so the caller drops it from the gallery once. Exactly equal scores follow the
protocol's index rule (the larger gallery index first) in both paths below; no loop over queries.

- Direct path, one or two good items per query (a satellite image per building): per chunk of
  queries one matrix product gives the scores ``(c, G')``, and each good item's rank is a count
  of the higher scores, from two sums of ``sign(score - t)``.
- Bucket path (:mod:`imlnet.evaluation.buckets`), many good items per query (54 drone images per
  building): per chunk of queries, one pass over the gallery in cache-sized blocks, each a
  matrix product ranked at once, so the scores are never written to memory (that costs as much
  as the product itself). Every item is put in one of a few thousand per-query buckets spanning
  the query's good scores; a per-query table gives, for each bucket, the number of good items
  above it, whose histogram gives the ranks; the few items that may share a bucket with a good
  item are set aside and compared exactly. The buckets come from estimates of the good scores
  (a small batched product), with a margin for rounding; a query whose exact good scores fall
  outside it is redone from its whole score row (never seen in practice; the results are exact
  either way).

On the CPU, large evaluations run in one piece of queries per torch thread, each single-threaded
(see :func:`in_parallel`). Memory is bounded by the chunk size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from imlnet.evaluation.buckets import ranking_order, ranks_binned, valid_slots

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
#: Bucket path: margin around the estimated good scores, in units of sqrt(D) u |q| |g|, the
#: typical rounding difference of two float dot products (see ``_ranks_from_features``).
DELTA_FACTOR = 8.0
#: On the CPU, evaluations of at least this many scores run in pieces of queries, one per torch
#: thread at most (see ``_in_parallel``), each of at least PIECE_QUERIES queries.
PARALLEL_MIN_SCORES = 1 << 22
PIECE_QUERIES = 256
#: Most pieces on the CPU (None: torch.get_num_threads()).
CPU_WORKERS: int | None = None


#: ``(start, stop) -> (ranks (c, M), n_good (c,))`` per chunk of the queries ``start:stop``.
RankChunks = Callable[[int, int], Iterator[tuple[Tensor, Tensor]]]


def good_rank_chunks(
    qf: Tensor, gf: Tensor, ql: Tensor, gl: Tensor, chunk_size: int | None = None
) -> RankChunks:
    """The ranks of every query's good items, chunk by chunk, by the fastest exact path.

    Args:
        qf: ``(Q, D)`` query features; ql: ``(Q,)`` int64 labels.
        gf: ``(G', D)`` gallery features with junk removed; gl: ``(G',)`` their labels.
        chunk_size: queries per matrix product (None: chosen for speed; results do not
            depend on it).

    Returns:
        A function ``(start, stop)`` yielding, per chunk of the queries ``start:stop`` in order,
        ``ranks (c, M)`` int64 (0-based ranks of the good items in ranking order, see
        :func:`good_ranks`) and ``n_good (c,)``.
    """
    table, table_counts, query_rows = _good_table(gl, ql)
    if table.shape[1] > DIRECT_MAX_GOOD:
        chunks = _binned_chunks
    elif table.shape[1] > 0:  # some query has a good item
        chunks = _direct_chunks
    else:
        chunks = None

    def run(start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        if chunks is None:
            return iter(())
        rows = query_rows[start:stop]
        return chunks(qf[start:stop], gf, table, table_counts, rows, chunk_size)

    return run


def in_parallel(
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
    valid = valid_slots(n_good, m)
    good_scores = scores.gather(1, torch.where(valid, good_idx, 0))
    if m <= DIRECT_MAX_GOOD:
        thr, thr_idx = ranking_order(good_scores, good_idx, valid, n)
        blocks = [(a, min(a + (block_rows or c), c)) for a in range(0, c, block_rows or c)]
        return _ranks_direct(scores, thr, thr_idx, blocks)
    # The scores are at hand: the bucket path's estimates are exact (no margin needed).
    delta = torch.zeros_like(good_scores)
    ranks, _ = ranks_binned(
        lambda a, b: scores[:, a:b].contiguous(), n, n, good_scores, delta, good_idx, n_good
    )
    return ranks  # the check cannot fail: the estimates are the scores themselves


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
    valid = valid_slots(n_good, m)
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

    ranks, ok = ranks_binned(block, n, block_cols, estimate, delta, good_idx, n_good)
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
def ieee_matmul(device: torch.device) -> Iterator[None]:
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
