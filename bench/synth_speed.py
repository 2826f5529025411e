"""Synthetic benchmark generator speed: the whole ``imlnet synth`` pipeline, wall clock.

Runs :func:`imlnet.data.synthetic.generate.generate` (cities, lighting, satellite and drone
rendering, weather, JPEG encoding, writing) into a temporary folder and reports seconds and
locations per second, with the load average of the machine before and after (the machine may be
shared: a load above the number of cores slows every row). With ``--compare-ref REV`` it also
times the generator of git revision REV on the same machine right after, one process, on
``--compare-locations`` locations, and gives the per-location ratio (old / new, one process each)
so a shared machine still yields a fair comparison. Prints a Markdown table and writes
bench/results/synth_speed.json.

    python bench/synth_speed.py --locations 1000 --views 8 --size 64 --compare-ref 6de464b
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from imlnet.data.synthetic.generate import SynthConfig, default_workers, generate
from imlnet.io import write_json

REPO = Path(__file__).resolve().parents[1]
OLD_RUN = """
import sys, time, torch
torch.set_num_threads(1)
from imlnet.data.synthetic.generate import SynthConfig, generate
cfg = SynthConfig(locations=int(sys.argv[1]), views=int(sys.argv[2]), size=int(sys.argv[3]),
                  distractors=0)
t = time.perf_counter()
generate(cfg, sys.argv[4], progress=False)
print(time.perf_counter() - t)
"""


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _cpu() -> float:
    """CPU seconds (user + system) used so far by this process and its reaped children."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_new(cfg: SynthConfig, workers: int) -> dict:
    """Time one generation with ``workers`` processes (0: in this process, one thread)."""
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    load0 = _load()
    with tempfile.TemporaryDirectory() as tmp:
        t, cpu = time.perf_counter(), _cpu()
        generate(cfg, Path(tmp) / "synth", progress=False, workers=workers)
        seconds, cpu = time.perf_counter() - t, _cpu() - cpu
    torch.set_num_threads(threads)
    n = cfg.locations + cfg.n_distractors
    return {
        "generator": "new",
        "workers": workers,
        "locations": n,
        "train": cfg.n_train,
        "seconds": round(seconds, 1),
        "s_per_location": round(seconds / n, 4),
        "cpu_s": round(cpu, 1),
        "cpu_s_per_location": round(cpu / n, 4),
        "load_before": load0,
        "load_after": _load(),
    }


def run_old(ref: str, locations: int, views: int, size: int) -> dict:
    """Time the generator of git revision ``ref`` (one process) in a subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "src.tar"
        subprocess.run(
            ["git", "-C", str(REPO), "archive", "-o", str(archive), ref, "src"], check=True
        )
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        env = {**os.environ, "PYTHONPATH": str(Path(tmp) / "src")}
        load0, cpu = _load(), _cpu()
        args = [str(locations), str(views), str(size), str(Path(tmp) / "out")]
        out = subprocess.run(
            [sys.executable, "-c", OLD_RUN, *args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = float(out.stdout.strip().splitlines()[-1])
        cpu = _cpu() - cpu  # includes the old generator's imports (a second or two)
    return {
        "generator": f"old ({ref})",
        "workers": 0,
        "locations": locations,
        "seconds": round(seconds, 1),
        "s_per_location": round(seconds / locations, 4),
        "cpu_s": round(cpu, 1),
        "cpu_s_per_location": round(cpu / locations, 4),
        "load_before": load0,
        "load_after": _load(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--locations", type=int, default=1000, help="train + test locations")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="default: one per core")
    ap.add_argument("--single", type=int, default=0, help="also time N locations in 1 process")
    ap.add_argument("--compare-ref", default=None, help="git revision of the old generator")
    ap.add_argument("--compare-locations", type=int, default=40)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "synth_speed.json"))
    args = ap.parse_args()
    cfg = SynthConfig(locations=args.locations, views=args.views, size=args.size)
    workers = default_workers(cfg, "cpu") if args.workers is None else args.workers
    rows = [run_new(cfg, workers)]
    if args.single:
        small = SynthConfig(locations=args.single, views=args.views, size=args.size, distractors=0)
        rows.append(run_new(small, 0))
    if args.compare_ref:
        rows.append(run_old(args.compare_ref, args.compare_locations, args.views, args.size))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
    }
    print(
        f"machine: {machine}; {args.views} views + 1 satellite image per location, {args.size} px"
    )
    print(
        "| generator | processes | locations (train) | wall s | s/location | CPU s/location "
        "| load (1 min) before -> after |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['generator']} | {max(1, r['workers'])} | {r['locations']} "
            f"({r.get('train', '-')}) | {r['seconds']} | {r['s_per_location']} | "
            f"{r['cpu_s_per_location']} | {r['load_before'][0]} -> {r['load_after'][0]} |"
        )
    cores = machine["cores"]
    first = rows[0]
    print(
        f"CPU time of the first row spread over {cores} otherwise idle cores: "
        f"{first['cpu_s'] / cores:.0f} s (the wall time a quiet machine would need)"
    )
    single = [r for r in rows if r["generator"] == "new" and r["workers"] == 0]
    old = [r for r in rows if r["generator"] != "new"]
    if single and old:
        ratio = old[0]["s_per_location"] / single[0]["s_per_location"]
        cpu_ratio = old[0]["cpu_s_per_location"] / single[0]["cpu_s_per_location"]
        print(f"per-location speed-up, one process each: {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU")
    write_json(args.out, {"machine": machine, "rows": rows})


if __name__ == "__main__":
    main()
