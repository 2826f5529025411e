"""The bucket path of the ranking engine: exact ranks of many good items per query in one pass.

Used by :mod:`imlnet.evaluation.ranking` when a query has many good items (the 54 drone images
of a building in satellite -> drone). See :func:`ranks_binned` for how and why it is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: Buckets per query = BINS_FACTOR * sqrt(good items * gallery size). More buckets set aside
#: fewer items for the exact comparison but make the per-query table larger.
BINS_FACTOR = 1.0


def valid_slots(n_good: Tensor, m: int) -> Tensor:
    """``(C, M)`` bool: slot i of row r holds a good item (i < n_good[r])."""
    return torch.arange(m, device=n_good.device)[None, :] < n_good[:, None]


def ranking_order(
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


def ranks_binned(
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
    valid = valid_slots(n_good, m)
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

    thr, thr_idx = ranking_order(exact.view(c, m), good_idx, valid, n)
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
