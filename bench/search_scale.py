"""Gallery search at country scale: IVF-PQ (and IVF-Flat) over 10^6 and 10^7 512-d vectors.

Question: can ``imlnet localize`` search 10^7 tiles with recall@10 >= 0.9 and a p50 latency of
at most 10 ms on 2 cores, from an index mapped from disk (``GalleryIndex.load(mmap=True)``)?

Data: clustered synthetic descriptors, never all in memory. ``--centroids`` (2^14) centres
uniform on the 512-d sphere; a vector is a centre plus isotropic Gaussian noise of expected norm
``--noise`` (1.0: cosine ~0.5 to its centre's other points, ~0 across centres), L2-normalised.
Chunk ``i`` of the gallery is drawn from ``numpy.random.default_rng([seed, 1, i, half])``, so
any chunk can be re-generated alone and the run is the same on every machine; the queries
(``--queries``, 1000) come from their own stream: near the centres, not in the gallery.

One streaming pass per gallery size (chunks of ``--chunk`` vectors) does everything that needs
the vectors: the exact top-10 of every query (``faiss.IndexFlatIP`` per chunk, merged: the
ground truth), adding the chunk to the indexes, and appending it as float16 to a file that the
search opens as an ``np.memmap`` (for the re-ranking design below). Indexes are built as
``GalleryIndex`` builds them (``new_faiss_index``: ``IVF{nlist},PQ{m}x{nbits}`` and
``IVF{nlist},Flat``, inner product), trained on ``training_sample(first chunks, train_size)``
with the gallery's default ``train_size``; ``nlist`` is the gallery's default ``4 sqrt(N)``
unless ``--nlist-cap`` is lower (at 10^7: 12649 lists would make the flat coarse assignment of
the adds, N x nlist x dim, take ~3x longer than 4096 lists and the k-means ~10x). The coarse
assignment of each chunk is computed once and shared by both indexes (``add_core``), and the
IVF-Flat index reuses the IVF-PQ one's k-means centres (same sample, same k-means); each
index's build time counts the shared parts in full. Build time = train + add (generation and
ground truth excluded, reported apart).

Search is measured in a fresh subprocess per index (clean memory numbers): the index is opened
with the flag of ``read_faiss_index(path, mmap=True)`` (what ``GalleryIndex.load(mmap=True)``
does; the worker does not import the gallery module, whose torch import alone is ~0.5 GB), VmRSS
(and its anonymous / file-backed parts) is read from ``/proc/self/status`` before and after
loading and after the searches of each configuration. Per ``nprobe``: p50/p95 latency of
``--single`` single-query calls (k=10, one query per call, ``faiss.omp_set_num_threads``
``--threads``; FAISS's default ``parallel_mode`` runs one query on one thread, and splitting it
over probes was ~15x slower on this shared 2-core machine), recall@10 = |found top-10 ∩ exact
top-10| / 10 over all queries. Designs:

- ``ivfpq``: the raw IVF-PQ ranking (codes only: 64 bytes per vector with m=64).
- ``ivfpq+rerank``: IVF-PQ top-``k'`` (``--rerank``, 100), re-scored with exact inner products
  of the float16 vectors read from the memmap (``np.memmap`` with ``MADV_RANDOM``, so only the
  pages of the rows used are read; the rows sorted for locality),
  top-10 of those. Needs the float16 file on disk (1 KiB per vector) but not in memory.
- ``ivf``: IVF-Flat (the existing ``ivf`` type; float32 lists), at sizes <= ``--ivf-flat-max``.

The file-backed part of the RSS (``RssFile``) counts page-cache pages mapped into the process:
shared and reclaimable, and it grows past the pages actually read (the kernel maps cached
neighbours of each faulting page), so after 10^3 re-ranked queries it is about the whole
float16 file; the private memory of a search is ``RssAnon``.

Latencies are with the files in the page cache (they were just written; the machine has room
for them at 10^6, and for the index at 10^7): a cold disk adds random reads per probed list and
per re-ranked row. Prints a Markdown table and writes ``bench/results/search_scale.json``
(command, load average before/after, cpu count, faiss version, rows); a run replaces the rows
of the sizes it ran and keeps the others.

    nice -n 10 python bench/search_scale.py --sizes 1000000
    nice -n 10 python bench/search_scale.py --sizes 10000000 --nlist-cap 4096
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import mmap
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from imlnet.io import write_json  # (imlnet.geo.gallery imports torch: only in the builder)

K = 10
GOAL = {"n": 10_000_000, "recall_at_10": 0.9, "p50_ms": 10.0}


def memory_mib() -> dict[str, float]:
    """This process's VmRSS, RssAnon, RssFile and VmHWM (peak RSS) in MiB."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


class Synthetic:
    """The clustered data set: ``chunk(i)`` re-generates rows ``[i * size, (i + 1) * size)``.

    Each chunk is drawn in two halves on two threads (numpy releases the GIL), each from its own
    ``default_rng([seed, 1, i, half])``: the same rows whatever the number of threads.
    """

    def __init__(self, dim: int, n_centroids: int, noise: float, seed: int, size: int) -> None:
        self.dim, self.noise, self.seed, self.size = dim, noise, seed, size
        c = np.random.default_rng([seed, 0]).standard_normal((n_centroids, dim), np.float32)
        self.centroids = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.pool = ThreadPoolExecutor(2)

    def _draw(self, key: list[int], m: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, *key])
        which = rng.integers(0, len(self.centroids), m)
        x = rng.standard_normal((m, self.dim), np.float32)
        x *= self.noise / math.sqrt(self.dim)  # expected norm ~noise; a centre has norm 1
        x += self.centroids[which]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunk(self, i: int, n: int) -> np.ndarray:
        """Rows ``i * size`` to ``min((i + 1) * size, n)`` of a gallery of ``n`` vectors."""
        m = min(self.size, n - i * self.size)
        halves = [m // 2, m - m // 2]
        parts = self.pool.map(lambda h: self._draw([1, i, h], halves[h]), (0, 1))
        return np.ascontiguousarray(np.concatenate(list(parts)))

    def queries(self, q: int) -> np.ndarray:
        return self._draw([2], q)


def merge_top(
    best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` highest scores (and their ids) of two (scores, ids) candidate sets."""
    scores = np.concatenate([best[0], new[0]], axis=1)
    ids = np.concatenate([best[1], new[1]], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def build(args: argparse.Namespace, n: int, work: Path) -> dict[str, Any]:
    """One streaming pass: train, add, exact top-10, float16 file. Returns build facts."""
    from imlnet.geo.gallery import new_faiss_index, training_sample

    data = Synthetic(args.dim, args.centroids, args.noise, args.seed, args.chunk)
    queries = data.queries(args.queries)
    n_chunks = math.ceil(n / args.chunk)
    nlist = min(new_faiss_index("ivf", args.dim, {}, n_train=n)[1]["nlist"], args.nlist_cap)
    pq_params = {"nlist": nlist, "m": args.m, "nbits": args.nbits}
    ivfpq, pq_params = new_faiss_index("ivfpq", args.dim, pq_params, n_train=n)
    with_flat = n <= args.ivf_flat_max
    ivf, ivf_params = new_faiss_index("ivf", args.dim, {"nlist": nlist}, n_train=n)
    train_size = pq_params["train_size"]
    n_first = min(n_chunks, math.ceil(train_size / args.chunk))  # the 'first batch'
    first = np.concatenate([data.chunk(i, n) for i in range(n_first)])
    sample = training_sample(first, train_size)
    del first
    print(f"N={n:,}: training IVF{nlist},PQ{args.m}x{args.nbits} on {len(sample):,}", flush=True)
    t = time.perf_counter()
    ivfpq.train(sample)
    train_s = time.perf_counter() - t
    if with_flat:  # the same centres (same sample and k-means): train only the list centres
        ivf.quantizer.add(ivfpq.quantizer.reconstruct_n(0, nlist))
        ivf.train(sample)
    del sample
    gc.collect()
    vec_path = work / f"vectors_{n}.f16"
    # plain writes, not a writable memmap: its dirty pages would count as this process's RSS
    vectors = vec_path.open("wb")
    exact = (np.full((len(queries), K), -np.inf, np.float32), np.full((len(queries), K), -1))
    assign_s = add_pq_s = add_flat_s = gen_s = truth_s = 0.0
    t_pass = time.perf_counter()
    for i in range(n_chunks):
        t = time.perf_counter()
        x = data.chunk(i, n)
        start = i * args.chunk
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(x)
        scores, ids = flat.search(queries, K)
        exact = merge_top(exact, (scores, np.where(ids >= 0, ids + start, -1)), K)
        del flat
        truth_s += time.perf_counter() - t
        t = time.perf_counter()
        _, assign = ivfpq.quantizer.search(x, 1)
        assign = np.ascontiguousarray(assign.ravel())
        assign_s += time.perf_counter() - t
        xids = np.arange(start, start + len(x), dtype=np.int64)
        for index, clock in ((ivfpq, "pq"), (ivf, "flat")):
            if clock == "flat" and not with_flat:
                continue
            t = time.perf_counter()
            index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(xids), faiss.swig_ptr(assign))
            if clock == "pq":
                add_pq_s += time.perf_counter() - t
            else:
                add_flat_s += time.perf_counter() - t
        vectors.write(x.astype(np.float16).tobytes())
        if i % max(1, n_chunks // 10) == 0 or i == n_chunks - 1:
            print(
                f"  chunk {i + 1}/{n_chunks}: {time.perf_counter() - t_pass:.0f} s (gen "
                f"{gen_s:.0f}, truth {truth_s:.0f}, assign {assign_s:.0f}, add {add_pq_s:.0f}"
                f"+{add_flat_s:.0f}), RSS {memory_mib()['VmRSS']:.0f} MiB",
                flush=True,
            )
    vectors.close()
    np.save(work / f"queries_{n}.npy", queries)
    np.save(work / f"exact_ids_{n}.npy", exact[1])
    out = {
        "n": n,
        "vectors": str(vec_path),
        "vectors_bytes": vec_path.stat().st_size,
        "gen_s": gen_s,
        "truth_s": truth_s,
        "build_peak_rss_mib": memory_mib()["VmHWM"],
        "indexes": [],
    }
    builds = [("ivfpq", ivfpq, pq_params, add_pq_s)]
    if with_flat:
        builds.append(("ivf", ivf, {**ivf_params, "train_size": train_size}, add_flat_s))
    for name, index, params, add_s in builds:
        path = work / f"{name}_{n}.faiss"
        faiss.write_index(index, str(path))
        out["indexes"].append(
            {
                "index": name,
                "path": str(path),
                "params": params,
                "train_s": train_s,
                "add_s": assign_s + add_s,
                "build_s": train_s + assign_s + add_s,
                "index_bytes": path.stat().st_size,
            }
        )
    del ivfpq, ivf
    gc.collect()
    return out


def worker(args: argparse.Namespace) -> None:
    """In a fresh process: open one index mmapped, time searches, write rows to ``--result``."""
    faiss.omp_set_num_threads(args.threads)
    job = json.loads(Path(args.worker).read_text())
    n = job["n"]
    work = Path(job["work"])
    queries = np.load(work / f"queries_{n}.npy")
    exact = np.load(work / f"exact_ids_{n}.npy")
    mem_start = memory_mib()
    t = time.perf_counter()
    index = faiss.read_index(job["path"], job["read_flag"])  # = read_faiss_index(mmap=True)
    load_s = time.perf_counter() - t
    mem_loaded = memory_mib()
    vectors = np.memmap(job["vectors"], np.float16, "r", shape=(n, queries.shape[1]))
    # no readahead around each re-ranked row: reads (and file-backed RSS) only of rows used
    vectors._mmap.madvise(mmap.MADV_RANDOM)
    ivf = faiss.extract_index_ivf(index)
    rows = []

    def rerank(q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        ids = np.sort(ids[ids >= 0])  # sorted rows: fewer, more sequential page reads
        scores = vectors[ids].astype(np.float32) @ q
        top = np.argsort(-scores, kind="stable")[:K]
        return ids[top]

    designs = [("", 0)] + ([("+rerank", k) for k in args.rerank] if job["rerank"] else [])
    for nprobe in args.nprobe:
        if nprobe > ivf.nlist:
            continue
        ivf.nprobe = nprobe
        for suffix, k_prime in designs:
            k_search = k_prime or K

            def one(q: np.ndarray, k_prime: int = k_prime, k_search: int = k_search) -> np.ndarray:
                _, ids = index.search(q[None], k_search)
                return rerank(q, ids[0]) if k_prime else ids[0]

            found = np.stack([one(q) for q in queries])  # all queries: recall; warms the pages
            recall = float(
                np.mean([len(set(f) & set(e)) / K for f, e in zip(found, exact, strict=True)])
            )
            lat = []
            for q in queries[: args.single]:
                t = time.perf_counter()
                one(q)
                lat.append(time.perf_counter() - t)
            mem = memory_mib()
            rows.append(
                {
                    "design": job["index"] + suffix,
                    "nprobe": nprobe,
                    "rerank_k": k_prime or None,
                    "p50_ms": 1000 * float(np.percentile(lat, 50)),
                    "p95_ms": 1000 * float(np.percentile(lat, 95)),
                    "recall_at_10": recall,
                    "rss_after_search_mib": mem["VmRSS"],
                    "rss_anon_after_search_mib": mem["RssAnon"],
                    "rss_file_after_search_mib": mem["RssFile"],
                    "single_calls": len(lat),
                }
            )
            print(
                f"    {rows[-1]['design']:<14} nprobe {nprobe:>3}: p50 {rows[-1]['p50_ms']:6.2f} "
                f"ms p95 {rows[-1]['p95_ms']:6.2f} ms recall@10 {recall:.3f} RSS "
                f"{mem['VmRSS']:.0f} MiB",
                flush=True,
            )
    write_json(
        args.result,
        {
            "load_s": load_s,
            "rss_before_load_mib": mem_start["VmRSS"],
            "rss_after_load_mib": mem_loaded["VmRSS"],
            "peak_rss_mib": memory_mib()["VmHWM"],
            "rows": rows,
        },
    )


def measure(args: argparse.Namespace, built: dict[str, Any], entry: dict[str, Any], work: Path):
    """Run :func:`worker` for one index in a fresh interpreter; its rows with build facts."""
    from imlnet.geo.gallery import MMAP_FLAG

    job = {
        "read_flag": MMAP_FLAG,
        "n": built["n"],
        "work": str(work),
        "path": entry["path"],
        "index": entry["index"],
        "vectors": built["vectors"],
        "rerank": entry["index"] == "ivfpq",
    }
    job_file, result = work / f"job_{entry['index']}.json", work / f"result_{entry['index']}.json"
    job_file.write_text(json.dumps(job))
    forward = ["--threads", str(args.threads), "--single", str(args.single), "--nprobe"]
    forward += [str(p) for p in args.nprobe] + ["--rerank"] + [str(k) for k in args.rerank]
    cmd = [sys.executable, __file__, "--worker", str(job_file), "--result", str(result)]
    subprocess.run(cmd + forward, check=True)
    res = json.loads(result.read_text())
    p = entry["params"]
    spec = f"IVF{p['nlist']},PQ{p['m']}x{p['nbits']}" if "m" in p else f"IVF{p['nlist']},Flat"
    return [
        {
            "n": built["n"],
            "index_spec": spec,
            "params": p,
            **{k: entry[k] for k in ("train_s", "add_s", "build_s", "index_bytes")},
            "vectors_f16_bytes": built["vectors_bytes"] if row["rerank_k"] else None,
            **{k: res[k] for k in ("load_s", "rss_before_load_mib", "rss_after_load_mib")},
            "search_peak_rss_mib": res["peak_rss_mib"],
            "build_peak_rss_mib": built["build_peak_rss_mib"],
            "stream_gen_s": built["gen_s"],
            "stream_truth_s": built["truth_s"],
            **row,
        }
        for row in res["rows"]
    ]


def goal_label(r: dict[str, Any]) -> str:
    k = f" k'={r['rerank_k']}" if r["rerank_k"] else ""
    return f"{r['design']} {r['index_spec']} nprobe={r['nprobe']}{k}: recall@10 " + (
        f"{r['recall_at_10']:.3f}, p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms"
    )


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| N | design | index | nprobe | k' | build s | index MiB | RSS MiB: start→loaded→"
        "searched (anon+file) | p50 ms | p95 ms | recall@10 |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['design']} | {r['index_spec']} | {r['nprobe']} | "
            f"{r['rerank_k'] or '-'} | {r['build_s']:.0f} | {r['index_bytes'] / 2**20:,.0f} | "
            f"{r['rss_before_load_mib']:.0f}→{r['rss_after_load_mib']:.0f}→"
            f"{r['rss_after_search_mib']:.0f} ({r['rss_anon_after_search_mib']:.0f}+"
            f"{r['rss_file_after_search_mib']:.0f}) | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
            f"{r['recall_at_10']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--centroids", type=int, default=2**14)
    ap.add_argument("--noise", type=float, default=1.0, help="noise norm / centre norm")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=300, help="single-query calls timed")
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument(
        "--nlist-cap",
        type=int,
        default=1 << 30,
        help="at most this many lists (default: none, the gallery's 4 sqrt(N)); the flat coarse "
        "quantizer makes adding cost N x nlist x dim",
    )
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--rerank", type=int, nargs="+", default=[100], help="k' re-ranked")
    ap.add_argument("--ivf-flat-max", type=int, default=1_000_000, help="largest N for ivf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="scratch folder for indexes and vectors (default: a temp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files")
    ap.add_argument("--note", default="", help="why this run is what it is (into the JSON)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_scale.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()
    command = shlex.join(["python", *sys.argv])
    print(f"{command}\nload average before: {load_before}, cpus {os.cpu_count()}", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="search_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    t_run = time.perf_counter()
    try:
        for n in args.sizes:
            t = time.perf_counter()
            built = build(args, n, work)
            print(f"  built in {time.perf_counter() - t:.0f} s: {built['indexes']}", flush=True)
            for entry in built["indexes"]:
                rows += measure(args, built, entry, work)
                Path(entry["path"]).unlink()
            Path(built["vectors"]).unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    goal = [
        r
        for r in rows
        if r["n"] >= GOAL["n"]
        and r["recall_at_10"] >= GOAL["recall_at_10"]
        and r["p50_ms"] <= GOAL["p50_ms"]
    ]
    run = {
        "command": command,
        "note": args.note,
        "sizes": args.sizes,
        "wall_s": time.perf_counter() - t_run,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpu_count": os.cpu_count(),
        "faiss_threads": args.threads,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result")},
        "goal": GOAL,
        "meets_goal": [goal_label(r) for r in goal],
        "rows": rows,
    }
    print(
        f"\n{command}\nload average before {load_before}, after {load_after}; cpus "
        f"{os.cpu_count()}, faiss {faiss.__version__}, {args.threads} threads"
    )
    print(table(rows))
    for line in run["meets_goal"] or ["none"]:
        print(f"meets the goal (10^7, recall@10 >= 0.9, p50 <= 10 ms): {line}")
    out = Path(args.out)
    runs = json.loads(out.read_text()).get("runs", []) if out.exists() else []
    runs = [r for r in runs if not set(r["sizes"]) & set(args.sizes)] + [run]
    write_json(out, {"runs": sorted(runs, key=lambda r: min(r["sizes"]))})


if __name__ == "__main__":
    main()
