"""``imlnet synth``: write the synthetic multi-domain cross-view benchmark to disk.

The output has the University-1652 layout, so the loaders, trainer and evaluator of the real
dataset run on it unchanged::

    OUT/
      train/drone/<id>/image-01.jpeg ... image-VV.jpeg
      train/satellite/<id>/<id>.jpg
      test/query_drone/<id>/...      test/gallery_satellite/<id>/<id>.jpg  (+ distractors)
      test/query_satellite/<id>/...  test/gallery_drone/<id>/...           (+ distractors)
      metadata.json

Locations are the landmark targets of procedural cities, several per city
(:mod:`imlnet.data.synthetic.targets`); training locations come from training cities only and
test and distractor locations from other cities, as University-1652's training and test
buildings come from different universities. Cities are rendered in parallel worker processes.
Determinism: the same options and seed give byte-identical files (no timestamps anywhere), with
any number of workers. A second run with the same options on a complete output does nothing.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from imlnet.data.synthetic.common import random_stream, recover_staging, staging_dir
from imlnet.data.synthetic.config import SynthConfig
from imlnet.data.synthetic.targets import RenderedTarget, orbit, render_city
from imlnet.io import write_json

__all__ = ["FORMAT_VERSION", "SynthConfig", "generate", "orbit", "plan", "up_to_date"]

FORMAT_VERSION = 2  # 2: several targets per city, train and test cities disjoint
SPLIT_DIRS = {
    "train": (["train/satellite"], ["train/drone"]),
    "test": (
        ["test/gallery_satellite", "test/query_satellite"],
        ["test/query_drone", "test/gallery_drone"],
    ),
    "distractor": (["test/gallery_satellite"], ["test/gallery_drone"]),
}


def plan(cfg: SynthConfig) -> list[tuple[int, str, list[tuple[int, int]]]]:
    """Which city renders which locations: ``[(city, split, [(slot, location index), ...])]``.

    Training locations fill the first cities, test and distractor locations (shuffled together)
    the following ones; each city's used targets are a random choice of its lattice slots.
    Location indices: train ``0..n_train-1``, then test, then distractors.
    """
    per_city = cfg.targets_per_city
    train = [(i, "train") for i in range(cfg.n_train)]
    rest = list(range(cfg.n_train, cfg.locations + cfg.n_distractors))
    order = torch.randperm(len(rest), generator=random_stream(cfg.seed, -1, 2)).tolist()
    rest = [rest[k] for k in order]
    jobs = []
    city = 0
    for split, indices in (("train", [i for i, _ in train]), ("test", rest)):
        for start in range(0, len(indices), per_city):
            chunk = indices[start : start + per_city]
            slots = torch.randperm(per_city, generator=random_stream(cfg.seed, city, 3))
            used = sorted(slots[: len(chunk)].tolist())
            jobs.append((city, split, list(zip(used, chunk, strict=True))))
            city += 1
    return jobs


def _role(cfg: SynthConfig, index: int) -> str:
    if index < cfg.n_train:
        return "train"
    return "test" if index < cfg.locations else "distractor"


def _location_ids(seed: int, total: int) -> list[str]:
    """Folder names like the real dataset's (``0839``): distinct, shuffled, zero-padded."""
    width = max(4, len(str(total * 4)))
    space = max(10_000, total * 4)
    picks = torch.randperm(space, generator=random_stream(seed, -1, 3))[:total].tolist()
    return [f"{p:0{width}d}" for p in picks]


def _config_dict(cfg: SynthConfig) -> dict:
    d = asdict(cfg)
    d["n_train"], d["n_test"], d["n_distractors"] = cfg.n_train, cfg.n_test, cfg.n_distractors
    return json.loads(json.dumps(d))  # tuples -> lists, as read back from metadata.json


def up_to_date(cfg: SynthConfig, out: str | os.PathLike[str]) -> bool:
    """True when ``out`` is a complete output of this generator for exactly ``cfg``.

    Complete: its ``metadata.json`` (written last, inside the staged folder) records the same
    format version and options, and every image it lists is there.
    """
    out = Path(out)
    try:
        meta = json.loads((out / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format_version") != FORMAT_VERSION or meta.get("config") != _config_dict(cfg):
        return False
    for bid, loc in meta.get("locations", {}).items():
        sat_dirs, drone_dirs = SPLIT_DIRS[loc["split"]]
        files = [out / d / bid / loc["satellite"]["file"] for d in sat_dirs]
        files += [out / d / bid / v["file"] for d in drone_dirs for v in loc["views"]]
        if not all(f.is_file() for f in files):
            return False
    return True


def _watch_parent(parent: int) -> None:
    """Worker initialiser: one thread, and exit as soon as the parent is gone (even SIGKILLed)."""
    torch.set_num_threads(1)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(0.5)

    threading.Thread(target=watch, daemon=True).start()


def _render_job(job: tuple[SynthConfig, int, list[int], str]) -> list[RenderedTarget]:
    return render_city(*job)


WORKER_MEMORY = 1.5e9  # bytes a rendering process may hold (an 800 m city, its light, torch)


def _available_memory() -> float | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def default_workers(cfg: SynthConfig, device: str) -> int:
    """One process per usable core for runs of several cities on the CPU, else 0 (in-process);
    never more than the free memory holds (:data:`WORKER_MEMORY` each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    free = _available_memory()
    if free is not None:
        cores = min(cores or 1, max(1, int(free // WORKER_MEMORY)))
    cities = math.ceil(cfg.n_train / cfg.targets_per_city) + math.ceil(
        (cfg.n_test + cfg.n_distractors) / cfg.targets_per_city
    )
    if device != "cpu" or cities < 4 or (cores or 1) < 2:
        return 0
    return min(cores or 1, cities)


def _rendered(
    cfg: SynthConfig, jobs: list, device: str, workers: int
) -> Iterator[tuple[list[tuple[int, int]], list[RenderedTarget]]]:
    args = [(cfg, city, [s for s, _ in pairs], device) for city, _, pairs in jobs]
    if workers <= 0:
        for (_, _, pairs), a in zip(jobs, args, strict=True):
            yield pairs, _render_job(a)
        return
    ctx = get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_watch_parent, initargs=(os.getpid(),)
    ) as pool:
        for (_, _, pairs), result in zip(jobs, pool.map(_render_job, args), strict=True):
            yield pairs, result


def generate(
    cfg: SynthConfig,
    out: str | os.PathLike[str],
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Write the benchmark to ``out`` and return its path.

    Everything is written into a temporary sibling folder that replaces ``out`` at the end, so an
    interrupted run leaves no half dataset behind (and an existing ``out`` untouched unless
    ``overwrite``). When ``out`` already holds a complete output for the same options
    (:func:`up_to_date`), nothing is done.

    Args:
        workers: rendering processes; ``None`` picks :func:`default_workers`, 0 renders here.
    """
    cfg.validate()
    out = Path(out)
    recover_staging(out)
    if up_to_date(cfg, out):
        return out
    jobs = plan(cfg)
    total = cfg.locations + cfg.n_distractors
    ids = _location_ids(cfg.seed, total)
    workers = default_workers(cfg, device) if workers is None else workers
    with staging_dir(out, overwrite) as tmp:
        locations = {}
        bar = tqdm(total=total, desc="imlnet synth", unit="location", disable=not progress)
        for pairs, rendered in _rendered(cfg, jobs, device, workers):
            for (_, index), loc in zip(pairs, rendered, strict=True):
                bid, role = ids[index], _role(cfg, index)
                sat_dirs, drone_dirs = SPLIT_DIRS[role]
                sat_name = f"{bid}.jpg"
                for d in sat_dirs:
                    (tmp / d / bid).mkdir(parents=True, exist_ok=True)
                    (tmp / d / bid / sat_name).write_bytes(loc.satellite)
                for d in drone_dirs:
                    (tmp / d / bid).mkdir(parents=True, exist_ok=True)
                    for view, data in zip(loc.meta["views"], loc.views, strict=True):
                        (tmp / d / bid / view["file"]).write_bytes(data)
                loc.meta["satellite"]["file"] = sat_name
                locations[bid] = {"split": role, "index": index, **loc.meta}
            bar.update(len(pairs))
        bar.close()
        meta = {
            "format_version": FORMAT_VERSION,
            "generator": "imlnet synth",
            "config": _config_dict(cfg),
            "counts": {
                "train": cfg.n_train,
                "test": cfg.n_test,
                "distractors": cfg.n_distractors,
                "views": cfg.views,
                "cities": len(jobs),
                "train_cities": sum(1 for _, split, _ in jobs if split == "train"),
            },
            "locations": dict(sorted(locations.items())),
        }
        write_json(tmp / "metadata.json", meta)
    return out
