"""Gallery search speed: per-query latency, batched throughput and recall@10 vs exact search.

Builds the FAISS indexes exactly as ``imlnet.geo.index.GalleryIndex`` does (through
``new_faiss_index``: flat inner product, IVF-Flat, HNSW-Flat) over random L2-normalised
512-d vectors, for several gallery sizes and two kinds of data:

- ``clustered``: a Gaussian mixture (``N / 1000`` centres on the sphere, each point = centre +
  isotropic noise of the same expected norm, then normalised; queries drawn from the same
  mixture, not copies of gallery points).
  Like real descriptors, similar tiles form groups; this is where IVF and HNSW are meant to work.
- ``uniform``: points uniform on the sphere. The nearest neighbours are barely nearer than any
  other point: the worst case for IVF and HNSW, reported so nobody mistakes it for typical.

Per configuration: build seconds (train + add), p50/p99 latency of single-query ``search``
calls (k=10, one query per call, as ``imlnet localize`` would for one image), throughput of one
batched call over all queries, and recall@10 = |approx top-10 ∩ exact top-10| / 10 averaged over
queries. Raw FAISS calls are timed; ``GalleryIndex.search`` adds its input checks and query
normalisation, timed separately (``wrapper_overhead_us``). Prints a Markdown table and writes
``bench/results/search_speed.json`` (atomically).

    python bench/search_speed.py                       # 10k, 100k, 1M; both data kinds
    python bench/search_speed.py --sizes 10000 --queries 100 --kinds clustered   # quick
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from imlnet.geo.index import DEFAULT_PARAMS, GalleryIndex, new_faiss_index
from imlnet.io import write_json

K = 10


def make_data(
    kind: str,
    n: int,
    dim: int,
    seed: int,
    n_queries: int,
    per_cluster: int = 1000,
    noise: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gallery ``(n, dim)`` and queries ``(n_queries, dim)``, float32, unit norm.

    ``clustered``: ``n / per_cluster`` centres (at least 10) uniform on the sphere; a point is a
    centre plus Gaussian noise of expected norm ``noise``, normalised (cosine ~1 / (1 + noise^2)
    within a cluster, ~0 across: noise 1 gives 0.5, noise 2 gives 0.2).
    ``uniform``: normalised Gaussian vectors. Generated in chunks to bound memory.
    """
    chunk = 100_000
    rng = np.random.default_rng(seed)
    centres = None
    if kind == "clustered":
        centres = rng.standard_normal((max(10, n // per_cluster), dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if centres is not None:
            x *= noise / math.sqrt(dim)  # expected norm ~noise; the centre has norm 1
            x += centres[rng.integers(0, len(centres), m)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    gallery = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        gallery[start : start + chunk] = draw(min(chunk, n - start))
    return gallery, draw(n_queries)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of the exact top-k found in the approximate top-k."""
    return float(
        np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found, exact, strict=True)])
    )


def time_queries(index: faiss.Index, queries: np.ndarray, n_single: int) -> dict[str, float]:
    """p50/p99 ms of single-query calls and queries/s of one batched call."""
    index.search(queries[:1], K)  # warm-up
    lat = []
    for q in queries[:n_single]:
        t = time.perf_counter()
        index.search(q[None], K)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    _, ids = index.search(queries, K)
    batch_s = time.perf_counter() - t
    return {
        "p50_ms": 1000 * float(np.percentile(lat, 50)),
        "p99_ms": 1000 * float(np.percentile(lat, 99)),
        "batch_qps": len(queries) / batch_s,
        "ids": ids,
    }


def wrapper_overhead_us(dim: int, repeats: int = 2000) -> float:
    """Median extra microseconds of ``GalleryIndex.search`` over raw FAISS (tiny flat index)."""
    rng = np.random.default_rng(0)
    gallery = GalleryIndex(dim)
    vecs = rng.standard_normal((100, dim), dtype=np.float32)
    row = {"path": "p", "lat": 0.0, "lon": 0.0, "crs": "EPSG:4326", "source": "s"}
    gallery.add(vecs, [row] * 100)
    raw = gallery._index
    q = vecs[:1] / np.linalg.norm(vecs[:1])
    wrapped, plain = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        gallery.search(q, K)
        wrapped.append(time.perf_counter() - t)
        t = time.perf_counter()
        raw.search(q, K)
        plain.append(time.perf_counter() - t)
    return 1e6 * float(np.median(wrapped) - np.median(plain))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--kinds", nargs="+", default=["clustered", "uniform"])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=500, help="queries for recall and batch")
    ap.add_argument("--single", type=int, default=300, help="single-query calls timed")
    ap.add_argument("--flat-single", type=int, default=50, help="single calls for flat >= 1M")
    ap.add_argument("--nlist", type=int, nargs="+", help="IVF lists (default 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    hnsw_defaults = DEFAULT_PARAMS["hnsw"]
    ap.add_argument("--hnsw-m", type=int, default=hnsw_defaults["M"])
    ap.add_argument("--ef-construction", type=int, default=hnsw_defaults["efConstruction"])
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument(
        "--skip",
        nargs="*",
        default=["uniform:1000000:ivf", "uniform:1000000:hnsw"],
        help="KIND:N:INDEX combinations not to run (default: the approximate indexes on 1M "
        "uniform vectors, whose recall is already hopeless at 100k, to keep the run short)",
    )
    ap.add_argument("--points-per-cluster", type=int, default=1000)
    ap.add_argument("--noise", type=float, default=1.0, help="clustered: noise norm / centre")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_speed.json"))
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        print(
            f"{row['kind']:>9} {row['n']:>8} {row['index']:>5} {row['params']:<22} "
            f"build {row['build_s']:7.1f} s  p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f}"
            f" ms  batch {row['batch_qps']:9.0f} q/s  recall@10 {row['recall_at_10']:.3f}",
            flush=True,
        )

    for kind in args.kinds:
        for n in args.sizes:
            gallery, queries = make_data(
                kind, n, args.dim, args.seed, args.queries, args.points_per_cluster, args.noise
            )
            base = {"kind": kind, "n": n, "dim": args.dim, "queries": len(queries)}
            t = time.perf_counter()
            flat, _ = new_faiss_index("flat", args.dim, {})
            flat.add(gallery)
            build = time.perf_counter() - t
            single = args.single if n < 1_000_000 else args.flat_single
            timing = time_queries(flat, queries, single)
            exact = timing.pop("ids")
            report(
                {
                    **base,
                    "index": "flat",
                    "params": "exact",
                    "build_s": build,
                    **timing,
                    "recall_at_10": recall_at_k(exact, exact),
                    "single_calls": single,
                }
            )
            del flat
            gc.collect()
            skip = {tuple(x.split(":")) for x in args.skip}
            for nlist in [] if (kind, str(n), "ivf") in skip else args.nlist or [None]:
                t = time.perf_counter()
                ivf, params = new_faiss_index("ivf", args.dim, {"nlist": nlist}, n_train=n)
                ivf.train(gallery)
                ivf.add(gallery)
                build = time.perf_counter() - t
                for nprobe in args.nprobe:
                    if nprobe > params["nlist"]:
                        continue
                    ivf.nprobe = nprobe
                    timing = time_queries(ivf, queries, args.single)
                    found = timing.pop("ids")
                    report(
                        {
                            **base,
                            "index": "ivf",
                            "params": f"nlist={params['nlist']} nprobe={nprobe}",
                            "build_s": build,
                            **timing,
                            "recall_at_10": recall_at_k(found, exact),
                            "single_calls": args.single,
                        }
                    )
                del ivf
                gc.collect()
            if (kind, str(n), "hnsw") not in skip:
                t = time.perf_counter()
                hnsw, _ = new_faiss_index(
                    "hnsw", args.dim, {"M": args.hnsw_m, "efConstruction": args.ef_construction}
                )
                hnsw.add(gallery)
                build = time.perf_counter() - t
                for ef in args.ef_search:
                    hnsw.hnsw.efSearch = ef
                    timing = time_queries(hnsw, queries, args.single)
                    found = timing.pop("ids")
                    report(
                        {
                            **base,
                            "index": "hnsw",
                            "params": f"M={args.hnsw_m} efC={args.ef_construction} efS={ef}",
                            "build_s": build,
                            **timing,
                            "recall_at_10": recall_at_k(found, exact),
                            "single_calls": args.single,
                        }
                    )
                del hnsw
                gc.collect()
            del gallery
            gc.collect()

    overhead = wrapper_overhead_us(args.dim)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "faiss_threads": args.threads,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }
    print(f"\nmachine: {machine}; GalleryIndex.search overhead over raw FAISS: {overhead:.0f} us")
    print("| data | N | index | params | build s | p50 ms | p99 ms | batch q/s | recall@10 |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['n']:,} | {r['index']} | {r['params']} | {r['build_s']:.1f} | "
            f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['batch_qps']:,.0f} | "
            f"{r['recall_at_10']:.3f} |"
        )
    aim = [r for r in rows if r["n"] >= 1_000_000 and r["p50_ms"] < 5 and r["recall_at_10"] >= 0.95]
    for r in aim:
        print(
            f"meets the aim (1M, p50 < 5 ms, recall@10 >= 0.95): {r['kind']} {r['index']} "
            f"{r['params']}"
        )
    write_json(
        args.out,
        {"machine": machine, "args": vars(args), "wrapper_overhead_us": overhead, "rows": rows},
    )


if __name__ == "__main__":
    main()
