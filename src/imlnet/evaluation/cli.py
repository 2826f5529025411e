"""``imlnet evaluate``: the official metrics of a model on a test set, or of a features file.

imlnet evaluate --checkpoint runs/x/export --data DATA [--dataset sues200] [--out r.json]
imlnet evaluate --features feats.npz
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imlnet.cliargs import add_common, resolve_device
from imlnet.errors import DatasetLayoutError, DeviceError
from imlnet.evaluation.features import (
    evaluate_views,
    extract_features,
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
    add_common(ap, image_size=None, batch_size=64, workers=True, device=True)
    ap.add_argument("--chunk-size", type=int, help="queries per matrix product of the metrics")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--save-features", type=Path, help="also save the extracted features (.npz)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str]) -> int:
    """``imlnet evaluate``: print the metrics table and optionally write them as JSON."""
    ap = _parser()
    args = ap.parse_args(list(argv))
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {args.device}: no CUDA device is available here; use cpu")
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
