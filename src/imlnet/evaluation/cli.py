"""``imlnet evaluate``: the official metrics of a model on a test set, or of a features file.

imlnet evaluate --checkpoint runs/x/export --data DATA [--dataset sues200] [--out r.json]
imlnet evaluate --features feats.npz
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imlnet.cliargs import add_common, resolve_device
from imlnet.errors import ConfigError, DatasetLayoutError, DeviceError
from imlnet.evaluation.breakdown import FIELDS, parse_bins, parse_fields
from imlnet.evaluation.corruption import CONDITIONS, parse_conditions
from imlnet.evaluation.features import (
    evaluate_views,
    extract_features,
    load_feature_paths,
    load_features,
    save_features,
)
from imlnet.evaluation.protocol import PROTOCOLS, VIEWS, format_table
from imlnet.inference import load_model, view_domain
from imlnet.io import write_json


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


def _evaluate_model(args: argparse.Namespace, device: torch.device) -> tuple[dict, dict, dict]:
    """Features of every test view once, then the metrics, the breakdown and the weather
    protocol of each setting. Returns results, sizes and the extra reports per setting."""
    loaded = load_model(args.checkpoint, device, image_size=args.image_size)
    if args.satellite_rotations is not None:  # the model's own choice unless asked
        from imlnet.runtime import OnnxDescriptor

        if isinstance(loaded.model, OnnxDescriptor):
            raise ConfigError(
                f"{args.checkpoint}: an ONNX graph's satellite pooling is fixed at export; "
                "give the model folder to change --satellite-rotations"
            )
        loaded.model.satellite_rotations = int(args.satellite_rotations)
    results: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, int]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for setting, datasets in _test_views(args, loaded.transform).items():
        start = time.perf_counter()
        views: dict[str, tuple[Tensor, Tensor]] = {}
        for view, dataset in datasets.items():
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_size=args.batch_size,
                shuffle=False,
                num_workers=args.workers,
                pin_memory=device.type == "cuda",
            )
            views[view] = extract_features(
                loaded.model,
                loader,
                domain=view_domain(view),
                device=device,
                progress=not args.quiet,
            )
        features_s = time.perf_counter() - start
        if args.save_features is not None:
            target = args.save_features
            if setting:
                target = target.with_name(f"{target.stem}_{setting}{target.suffix or '.npz'}")
            paths = {v: [p for p, _ in ds.samples] for v, ds in datasets.items()}
            save_features(target, views, setting, paths=paths)
        start = time.perf_counter()
        results.update(_run(views, args, device, setting))
        timings = {"features_s": features_s, "metrics_s": time.perf_counter() - start}
        sizes[setting or "all"] = {v: len(views[v][1]) for v in views}
        report = _multi_domain(args, setting, datasets, views, loaded, device)
        if report:
            extra[setting or "all"] = {**report, "timings": {**timings, **report["timings"]}}
    return results, sizes, extra


def _multi_domain(
    args: argparse.Namespace,
    setting: str,
    datasets: Mapping[str, Any],
    views: Mapping[str, tuple[Tensor, Tensor]],
    loaded: Any,
    device: torch.device,
) -> dict[str, Any]:
    """``--by`` and ``--corrupt`` for one setting: their reports (tables, JSON, PNG)."""
    out: dict[str, Any] = {}
    timings: dict[str, float] = {}
    folder = args.report_dir / setting if setting else args.report_dir
    if args.by:
        start = time.perf_counter()
        paths = {v: [p for p, _ in ds.samples] for v, ds in datasets.items()}
        out["breakdown"] = _breakdown(args, setting, views, paths, device)
        timings["breakdown_s"] = time.perf_counter() - start
    if args.corrupt:
        from imlnet.evaluation.robustness import corruption_report

        start = time.perf_counter()
        save = args.save_corrupted
        if save is not None and setting:  # SUES-200: one tree per altitude
            save = save / setting
        out["corruption"] = corruption_report(
            loaded.model, datasets, args.data, loaded.transform, clean=views,
            conditions=args.corrupt, seed=args.corrupt_seed, protocol=args.protocol,
            batch_size=args.batch_size, workers=args.workers, device=device, out=folder,
            save_corrupted=save, progress=not args.quiet,
        )  # fmt: skip
        timings["corruption_s"] = time.perf_counter() - start
    if out:
        out["timings"] = timings
    return out


def _breakdown(
    args: argparse.Namespace,
    setting: str,
    views: Mapping[str, tuple[Any, Any]],
    paths: Mapping[str, Sequence[Any]],
    device: torch.device,
) -> dict[str, Any]:
    """``--by`` for one setting: the conditions of the drone images, then the report."""
    from imlnet.evaluation.breakdown import breakdown_report, view_conditions

    altitude = int(setting.removesuffix("m")) if args.dataset == "sues200" else None
    conditions = {}
    for view in ("query_drone", "gallery_drone"):
        if view in views:
            if not paths.get(view):
                raise DatasetLayoutError(
                    f"{args.features}: no {view}_paths array, so --by cannot find each image's "
                    "conditions; save the features again with --save-features"
                )
            conditions[view] = view_conditions(args.data, paths[view], altitude=altitude)
    folder = args.report_dir / setting if setting else args.report_dir
    return breakdown_report(
        views, conditions, args.by, bins=args.bins, protocol=args.protocol, out=folder,
        device=device,
    )  # fmt: skip


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
    add_common(ap, image_size=None, batch_size=64, workers=True, device=True)
    ap.add_argument("--chunk-size", type=int, help="queries per matrix product of the metrics")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--save-features", type=Path, help="also save the extracted features (.npz)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument(
        "--satellite-rotations",
        type=int,
        choices=(1, 2, 4),
        help="satellite descriptors pooled over this many turns (default: the model's "
        "satellite_rotations; 1 is the paper's single pass)",
    )
    multi = ap.add_argument_group("multi-domain evaluation (a model on a dataset)")
    multi.add_argument(
        "--by",
        metavar="FIELDS",
        help=f"metrics per group of drone images, by any of {','.join(FIELDS)} (the synthetic "
        "benchmark's metadata.json; SUES-200: altitude)",
    )
    multi.add_argument(
        "--bins",
        action="append",
        metavar="FIELD=SPEC",
        help="bins of a continuous --by field: a step (altitude=25) or edges "
        "(pitch=35,40,45,50); repeatable. Defaults: altitude 25 m, pitch 5 deg",
    )
    multi.add_argument(
        "--corrupt",
        metavar="CONDITIONS",
        help="University-WX weather protocol on the drone images: wx (all ten) or a "
        f"comma-separated subset of {', '.join(CONDITIONS)}",
    )
    multi.add_argument(
        "--corrupt-seed", type=int, default=0, metavar="N", help="seed of the corruptions"
    )
    multi.add_argument(
        "--save-corrupted",
        type=Path,
        metavar="DIR",
        help="also write the corrupted drone images here (PNG)",
    )
    multi.add_argument(
        "--report-dir",
        type=Path,
        metavar="DIR",
        default=Path("runs/evaluate"),
        help="where --by and --corrupt write their JSON and PNG (default: runs/evaluate)",
    )
    return ap


def main(argv: Sequence[str]) -> int:
    """``imlnet evaluate``: print the metrics table and optionally write them as JSON."""
    ap = _parser()
    args = ap.parse_args(list(argv))
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {args.device}: no CUDA device is available here; use cpu")
    args.bins = parse_bins(args.bins)
    args.by = parse_fields(args.by) if args.by else None
    args.corrupt = parse_conditions(args.corrupt) if args.corrupt else None
    extra: dict[str, Any] = {}
    if args.features is not None:
        if args.checkpoint is not None or (args.data is not None and not args.by):
            ap.error("give either --features (with --data for --by) or --checkpoint with --data")
        if args.corrupt:
            ap.error("--corrupt needs the images and the model: give --checkpoint and --data")
        if args.by and args.data is None:
            ap.error("--by with --features needs --data (the dataset the features come from)")
        results: dict[str, dict[str, float]] = {}
        sizes: dict[str, dict[str, int]] = {}
        stored = load_feature_paths(args.features) if args.by else {}
        for setting, views in load_features(args.features).items():
            results.update(_run(views, args, device, setting))
            sizes[setting or "all"] = {v: len(views[v][1]) for v in views}
            if args.by:
                start = time.perf_counter()
                report = _breakdown(args, setting, views, stored.get(setting, {}), device)
                extra[setting or "all"] = {
                    "breakdown": report,
                    "timings": {"breakdown_s": time.perf_counter() - start},
                }
        if not results:
            raise DatasetLayoutError(
                f"{args.features} has no complete direction: it needs query_drone with "
                "gallery_satellite, or query_satellite with gallery_drone"
            )
        source = {"features": str(args.features)}
    else:
        if args.checkpoint is None or args.data is None:
            ap.error("give --checkpoint and --data (or --features)")
        results, sizes, extra = _evaluate_model(args, device)
        source = {"checkpoint": str(args.checkpoint), "data": str(args.data)}
    print(format_table(results))
    for setting, report in extra.items():
        for kind in ("breakdown", "corruption"):
            if kind in report:
                print(f"\n{kind} ({setting}):\n\n{report[kind]['table']}")
                print("wrote " + ", ".join(report[kind]["files"]))
        timing = ", ".join(f"{k} {v:.2f}" for k, v in report["timings"].items())
        print(f"timings ({setting}): {timing}")
    if args.out is not None:
        write_json(
            args.out,
            {
                "dataset": args.dataset if args.features is None else None,
                "protocol": args.protocol,
                "sizes": sizes,
                "results": results,
                **{
                    kind: {
                        setting: {k: v for k, v in rep[kind].items() if k not in ("table", "files")}
                        for setting, rep in extra.items()
                        if kind in rep
                    }
                    for kind in ("breakdown", "corruption")
                    if any(kind in rep for rep in extra.values())
                },
                **({"timings": {k: r["timings"] for k, r in extra.items()}} if extra else {}),
                **source,
            },
        )
        print(f"wrote {args.out}")
    return 0
