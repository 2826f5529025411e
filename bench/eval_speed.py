"""Speed of ``imlnet.evaluation.evaluate_retrieval`` against the official per-query loop.

Both directions of University-1652 at their real sizes, with labels laid out like the real test
set: 701 test buildings, 54 drone images each (plus one extra image, so 37,855 drone queries), a
satellite gallery of 951 images (the 701 buildings and 250 distractors) and a drone gallery of
51,355 images (54 per gallery building, plus one). Features: 512-d, L2-normalised float32, drawn
around one random centre per building (``--noise`` sets the spread), so the metrics are in a
realistic range rather than near zero; ``--noise 0`` draws every feature independently (uniform
on the sphere; metrics near zero). The costs of both implementations barely depend on it.

The baseline is the official algorithm written as a plain loop, as in ``evaluate_gpu.py``: per
query a ``torch.mm`` score vector, ``np.argsort`` (default kind), junk and good masks with
``np.isin`` (``np.in1d`` in the original; removed from numpy 2.4), CMC and AP accumulated in
Python. It can run on a random subset of the queries (``--loop-queries``); its time is then
extrapolated linearly to all queries (marked in the table) and the metrics are checked on that
subset ("max metric diff", in percentage points: the official code averages the CMC in
float32). "of which matmul" times the query-gallery matrix product alone (256 queries per
product, torch's threads), the floor of any exact evaluation.

The machine may be shared, so the methods are timed in interleaved rounds (``--repeats``, default
3): each round runs the vectorised evaluation, then the loop, then the matrix product, so both
methods see the same load. The table gives the best time of each, their ratio ("best"), and the
median of the per-round ratios; the JSON keeps every round and the load average before and
after. Prints a Markdown table and writes ``bench/results/eval_speed.json`` atomically.

    python bench/eval_speed.py                      # full loop baseline, 3 rounds (about a minute)
    python bench/eval_speed.py --loop-queries 500   # quicker, extrapolated
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imlnet.evaluation import METRICS, evaluate_retrieval
from imlnet.io import write_json

N_TEST, N_DISTRACTORS, PER_BUILDING, DIM = 701, 250, 54, 512


def make_set(seed: int, noise: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four test views: view -> (features (N, 512) float32 unit norm, labels (N,) int64)."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, 2000))[: N_TEST + N_DISTRACTORS]  # building ids
    test_ids, all_ids = ids[:N_TEST], ids
    centres = {int(b): rng.standard_normal(DIM).astype(np.float32) for b in all_ids}

    def draw(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if noise > 0:
            x = np.stack([centres[int(b)] for b in labels])
            x += noise * rng.standard_normal(x.shape, dtype=np.float32)
        else:
            x = rng.standard_normal((len(labels), DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, labels.astype(np.int64)

    drone_q = np.concatenate([np.repeat(test_ids, PER_BUILDING), test_ids[:1]])  # 37,855
    drone_g = np.concatenate([np.repeat(all_ids, PER_BUILDING), all_ids[:1]])  # 51,355
    return {
        "query_drone": draw(drone_q),
        "gallery_satellite": draw(all_ids),  # 951
        "query_satellite": draw(test_ids),  # 701
        "gallery_drone": draw(drone_g),
    }


def official_loop(
    qf: torch.Tensor, ql: np.ndarray, gf: torch.Tensor, gl: np.ndarray
) -> dict[str, float]:
    """The official evaluation, one query at a time, as ``evaluate_gpu.py`` runs it (on the CPU)."""
    cmc_total = torch.IntTensor(len(gl)).zero_()
    ap_total = 0.0
    for i in range(len(ql)):
        score = torch.mm(gf, qf[i].view(-1, 1)).squeeze(1).numpy()
        index = np.argsort(score)[::-1]
        good = np.argwhere(gl == ql[i])
        junk = np.argwhere(gl == -1)
        ap, cmc = _compute_map(index, good, junk)
        if cmc[0] == -1:
            continue
        cmc_total = cmc_total + cmc
        ap_total += ap
    cmc_pct = cmc_total.float() / len(ql) * 100  # float32, as the official code
    return {
        "R@1": float(cmc_pct[0]),
        "R@5": float(cmc_pct[4]),
        "R@10": float(cmc_pct[9]),
        "R@1%": float(cmc_pct[round(len(gl) * 0.01)]),
        "AP": ap_total / len(ql) * 100,
    }


def _compute_map(
    index: np.ndarray, good: np.ndarray, junk: np.ndarray
) -> tuple[float, torch.Tensor]:
    """One query's AP and CMC vector (``compute_mAP``)."""
    cmc = torch.IntTensor(len(index)).zero_()
    if good.size == 0:
        cmc[0] = -1
        return 0.0, cmc
    index = index[np.isin(index, junk, invert=True)]
    rows_good = np.argwhere(np.isin(index, good)).flatten()
    cmc[rows_good[0] :] = 1
    ap = 0.0
    for j in range(len(good)):
        precision = (j + 1) / (rows_good[j] + 1)
        old = j / rows_good[j] if rows_good[j] != 0 else 1.0
        ap += (old + precision) / 2 / len(good)
    return ap, cmc


def matmul_only(qf: np.ndarray, gf: np.ndarray, rows: int = 256) -> None:
    """All query-gallery scores, 256 queries at a time: the floor of any exact evaluation."""
    q, g = torch.from_numpy(qf), torch.from_numpy(gf)
    out = torch.empty(rows, len(g))
    for start in range(0, len(q), rows):
        block = q[start : start + rows]
        torch.mm(block, g.T, out=out[: len(block)])


def timed(fn: Any) -> tuple[float, Any]:
    """Wall time of one call and its result."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=3.0, help="spread around a centre (0: none)")
    ap.add_argument("--loop-queries", type=int, help="time the loop on this many random queries")
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds per direction; each round times the vectorised version, the loop and the "
        "matrix product, one after the other (best and median reported)",
    )
    ap.add_argument("--threads", type=int, help="torch threads for both (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results/eval_speed.json")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    views = make_set(args.seed, args.noise)
    rng = np.random.default_rng(args.seed + 1)
    rows = []
    for name, query, gallery in (
        ("drone->satellite", "query_drone", "gallery_satellite"),
        ("satellite->drone", "query_satellite", "gallery_drone"),
    ):
        qf, ql = views[query]
        gf, gl = views[gallery]
        sub = np.arange(len(ql))
        if args.loop_queries is not None and args.loop_queries < len(ql):
            sub = np.sort(rng.choice(len(ql), args.loop_queries, replace=False))
        qt, gt = torch.from_numpy(qf[sub]), torch.from_numpy(gf)
        # Interleaved rounds: both methods see the same load (the machine is shared).
        t_vec, t_loop, t_mm = [], [], []
        for _ in range(args.repeats):
            t, ours = timed(lambda: evaluate_retrieval(qf, ql, gf, gl))  # noqa: B023
            t_vec.append(t)
            t, loop = timed(lambda: official_loop(qt, ql[sub], gt, gl))  # noqa: B023
            t_loop.append(t * len(ql) / len(sub))
            t_mm.append(timed(lambda: matmul_only(qf, gf))[0])  # noqa: B023
        ours_sub = ours if len(sub) == len(ql) else evaluate_retrieval(qf[sub], ql[sub], gf, gl)
        diff = max(abs(ours_sub[k] - loop[k]) for k in METRICS)
        ratios = [b / a for a, b in zip(t_vec, t_loop, strict=True)]
        rows.append(
            {
                "direction": name,
                "queries": len(ql),
                "gallery": len(gl),
                "good_per_query": float(np.mean([np.sum(gl == q) for q in ql[:1000]])),
                "vectorised_s": min(t_vec),
                "matmul_only_s": min(t_mm),
                "loop_s": min(t_loop),
                "vectorised_runs_s": t_vec,
                "matmul_only_runs_s": t_mm,
                "loop_runs_s": t_loop,
                "loop_queries_timed": len(sub),
                "loop_extrapolated": len(sub) != len(ql),
                "speedup": min(t_loop) / min(t_vec),
                "speedup_median": float(np.median(ratios)),
                "speedup_runs": ratios,
                "max_abs_metric_diff": diff,
                "metrics": ours,
                "metrics_loop_subset": loop,
            }
        )

    print(
        "| direction | queries x gallery | good/query | vectorised (s) | of which matmul (s) "
        "| loop (s) | speed-up (best) | speed-up (median round) | max metric diff | R@1 | AP |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        loop_cell = f"{r['loop_s']:.2f}"
        if r["loop_extrapolated"]:
            loop_cell += f" (extrapolated from {r['loop_queries_timed']} queries)"
        print(
            f"| {r['direction']} | {r['queries']:,} x {r['gallery']:,} "
            f"| {r['good_per_query']:.0f} | {r['vectorised_s']:.3f} | {r['matmul_only_s']:.3f} "
            f"| {loop_cell} | {r['speedup']:.1f}x | {r['speedup_median']:.1f}x "
            f"| {r['max_abs_metric_diff']:.2g} "
            f"| {r['metrics']['R@1']:.2f} | {r['metrics']['AP']:.2f} |"
        )
    load_after = os.getloadavg()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    print(f"peak RSS: {peak_rss_mb:.0f} MiB")
    write_json(
        args.out,
        {
            "benchmark": "eval_speed",
            "machine": {
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "processor": platform.processor(),
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "load_average_before": list(load_before),
            "load_average_after": list(load_after),
            "peak_rss_mb": peak_rss_mb,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
