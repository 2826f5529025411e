"""Cost of ``imlnet evaluate --by`` and ``--corrupt`` next to the plain evaluation.

On a synthetic test set (``imlnet synth``) and a model (an exported checkpoint, or by default an
untrained demo-sized one: ResNet-18, 64 px; the costs do not depend on the weights), this times:

- the features of the four test views (image + mirror, once per image), and the metrics;
- the breakdown by season, weather, altitude and pitch from those features (metrics per group,
  no second feature pass), and its JSON + PNG report;
- per weather condition: corrupting the drone images alone, and corrupting + embedding them.

The breakdown is timed ``--repeats`` times (best kept). Prints a Markdown table and writes
``bench/results/breakdown_overhead.json`` atomically.

    imlnet synth /tmp/synth --locations 20 --views 8 --image-size 128
    python bench/breakdown_overhead.py /tmp/synth [--checkpoint runs/demo/model]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imlnet.data.university1652 import University1652Test
from imlnet.evaluation import VIEWS, evaluate_views, extract_features
from imlnet.evaluation.breakdown import breakdown, breakdown_report, view_conditions
from imlnet.evaluation.corruption import CONDITIONS, corrupt
from imlnet.evaluation.robustness import corrupted_features
from imlnet.inference import LoadedModel, eval_transform, load_model, read_image, view_domain
from imlnet.io import write_json

FIELDS = ["season", "weather", "altitude", "pitch"]


def _model(checkpoint: str | None) -> LoadedModel:
    if checkpoint:
        return load_model(checkpoint, "cpu")
    from imlnet.models.imlnet import IMLNet

    torch.manual_seed(0)
    net = IMLNet(num_classes=8, backbone="resnet18", muml=False, irn=False).eval()
    return LoadedModel(net, 64, eval_transform(64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a synthetic benchmark folder (with metadata.json)")
    ap.add_argument("--checkpoint", help="exported model (default: untrained ResNet-18, 64 px)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench/results/breakdown_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = _model(args.checkpoint)
    datasets = {v: University1652Test(args.data, v, transform=loaded.transform) for v in VIEWS}

    t = time.perf_counter()
    views = {}
    for view, ds in datasets.items():
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size)
        views[view] = extract_features(
            loaded.model, loader, domain=view_domain(view), progress=False
        )
    features_s = time.perf_counter() - t
    t = time.perf_counter()
    evaluate_views(views)
    metrics_s = time.perf_counter() - t

    t = time.perf_counter()
    records = {
        v: view_conditions(args.data, [p for p, _ in datasets[v].samples])
        for v in ("query_drone", "gallery_drone")
    }
    metadata_s = time.perf_counter() - t
    group_s = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        result = breakdown(views, records, FIELDS)
        group_s.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        breakdown_report(views, records, FIELDS, out=tmp)
        report_s = time.perf_counter() - t
    n_groups = sum(len(g) for d in result.values() for g in d.values())

    drone_paths = [p for v in ("query_drone", "gallery_drone") for p, _ in datasets[v].samples]
    images = [np.asarray(read_image(p)) for p in drone_paths]
    per_condition = {}
    for condition in CONDITIONS[1:]:
        t = time.perf_counter()
        for path, image in zip(drone_paths, images, strict=True):
            corrupt(image, condition, str(path), 0)
        corrupt_s = time.perf_counter() - t
        t = time.perf_counter()
        corrupted_features(
            loaded.model, datasets, [condition], args.data, loaded.transform,
            batch_size=args.batch_size,
        )  # fmt: skip
        per_condition[condition] = {
            "corrupt_s": corrupt_s,
            "corrupt_and_embed_s": time.perf_counter() - t,
        }

    sizes = {v: len(views[v][1]) for v in views}
    base = features_s + metrics_s
    record = {
        "data": str(args.data),
        "checkpoint": args.checkpoint or "untrained resnet18, 64 px",
        "image_size": loaded.image_size,
        "sizes": sizes,
        "fields": FIELDS,
        "groups": n_groups,
        "features_s": features_s,
        "metrics_s": metrics_s,
        "metadata_s": metadata_s,
        "breakdown_metrics_s": min(group_s),
        "breakdown_metrics_all_s": group_s,
        "breakdown_report_s": report_s,
        "breakdown_overhead_pct": 100 * (metadata_s + min(group_s)) / base,
        "corruption": per_condition,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg": os.getloadavg(),
    }
    print(f"test set: {sizes}; {n_groups} groups over {', '.join(FIELDS)}")
    print("| step | seconds |\n|---|---|")
    for key in ("features_s", "metrics_s", "metadata_s", "breakdown_metrics_s",
                "breakdown_report_s"):  # fmt: skip
        print(f"| {key.removesuffix('_s')} | {record[key]:.3f} |")
    print(f"\nbreakdown overhead (metadata + per-group metrics) / (features + metrics): "
          f"{record['breakdown_overhead_pct']:.1f} %\n")  # fmt: skip
    print("| condition | corrupt s | corrupt + embed s |\n|---|---|---|")
    for c, r in per_condition.items():
        print(f"| {c} | {r['corrupt_s']:.2f} | {r['corrupt_and_embed_s']:.2f} |")
    write_json(args.out, record)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
