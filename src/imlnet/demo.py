"""``imlnet demo``: the whole pipeline, end to end, on a CPU, in minutes.

1. Generate a small synthetic multi-domain benchmark (University-1652 layout).
2. Train IML-Net on it (ResNet-18 from scratch at 64 px; every part of the method switched on).
3. Evaluate both directions with the official University-1652 protocol.
4. Generate a georeferenced synthetic world, tile it into a gallery, index it with FAISS and
   localise drone views over it, with the error in metres.
5. Write ``OUT/metrics.json`` and ``OUT/report.md`` with reconstructions, per-unit attention maps
   and their crop boxes, a retrieval grid and the training curves.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from imlnet.errors import ImlnetError
from imlnet.io import atomic_write, write_json

#: The demo's training recipe (also ``bench/ablation.py``'s and ``imlnet fit --config``'s).
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def recipe_run(
    data: str | Path,
    *,
    size: int,
    batch_size: int,
    sample_num: int,
    seed: int,
    backbone: str,
    crop_units: str,
    export_dir: str | Path,
    overlays: Sequence[str | Path] = (),
):
    """The data module and the module ``imlnet fit --config configs/demo.yaml`` would train.

    The recipe is read from :data:`DEMO_CONFIG` through the training CLI's own parser, so the
    demo, ``bench/ablation.py`` and ``imlnet fit`` train the same thing.

    Args:
        data: the synthetic benchmark's folder.
        size, batch_size, sample_num, seed: the data module's image size, batch, drone views
            per building and seed (``seed`` also seeds the weights).
        backbone: the encoder; crop_units: ``"all"`` or ``"random"`` MUML crops.
        export_dir: where the trained model is exported.
        overlays: more config files on top (``configs/ablations/<row>.yaml``).

    Returns:
        ``(CrossViewDataModule, IMLNetModule)`` on the synthetic benchmark at ``data``.
    """
    from imlnet.training import cli_main

    if not DEMO_CONFIG.is_file():
        raise ImlnetError(
            f"{DEMO_CONFIG} is missing: the demo's recipe lives in the repository's configs/ "
            "folder; run the demo from a checkout of imlnet (an editable install)"
        )
    args = [a for c in (DEMO_CONFIG, *overlays) for a in ("--config", str(c))]
    args += ["--seed_everything", str(seed), "--trainer.logger", "false"]
    args += ["--data.root", str(data), "--data.dataset", "synthetic"]
    args += ["--data.image_size", str(size), "--data.batch_size", str(batch_size)]
    args += ["--data.sample_num", str(sample_num), "--data.seed", str(seed)]
    args += ["--model.model.init_args.backbone", backbone]
    args += ["--model.objective.init_args.crop_units", crop_units]
    args += ["--model.export_dir", str(export_dir)]
    cli = cli_main(args, run=False)
    return cli.datamodule, cli.model


def _log(msg: str) -> None:
    print(f"[imlnet demo] {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imlnet demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo", help="output folder")
    ap.add_argument("--locations", type=int, default=80, help="synthetic train+test locations")
    ap.add_argument("--views", type=int, default=8, help="drone views per location")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument(
        "--crop-units",
        choices=("all", "random"),
        default="random",
        help="MUML crops per batch: of all four units (the paper) or of one random unit (about "
        "half the training time on a CPU)",
    )
    ap.add_argument("--world-size-m", type=float, default=800.0)
    ap.add_argument("--world-views", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run (a minute) that checks the pipeline, not the method",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.locations, args.views, args.size, args.epochs = 6, 4, 64, 1
        args.world_size_m, args.world_views = 600.0, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. data -------------------------------------------------------------------------------
    from imlnet.data.synthetic.generate import SynthConfig, generate

    t = time.perf_counter()
    data = out / "data"
    cfg = SynthConfig(locations=args.locations, views=args.views, size=args.size, seed=args.seed)
    _log(f"1/5 synthesising {args.locations} locations x {args.views} views at {args.size} px")
    generate(cfg, data, overwrite=True, progress=True)
    timings["synth_s"] = time.perf_counter() - t

    # 2. training ---------------------------------------------------------------------------
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    t = time.perf_counter()
    _log(f"2/5 training IML-Net ({args.backbone}, {args.epochs} epochs) on the CPU")
    L.seed_everything(args.seed, workers=True, verbose=False)
    dm, module = recipe_run(
        data,
        size=args.size,
        batch_size=args.batch_size,
        sample_num=4,
        seed=args.seed,
        backbone=args.backbone,
        crop_units=args.crop_units,
        export_dir=out / "model",
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        default_root_dir=str(out),
        logger=CSVLogger(str(out), name="logs", version=""),
        check_val_every_n_epoch=max(1, args.epochs // 6),
        log_every_n_steps=5,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
    )
    trainer.fit(module, datamodule=dm)
    # The demo validates on its test set (for the curves), so the model it reports on is the
    # last one, not the one that scored best there: no selection on the test set.
    module.model.save_pretrained(out / "model", meta={"image_size": args.size})
    timings["train_s"] = time.perf_counter() - t

    # 3. evaluation -------------------------------------------------------------------------
    from imlnet.data.transforms import build_transforms
    from imlnet.data.university1652 import University1652Test
    from imlnet.evaluation import evaluate_views, extract_features, format_table
    from imlnet.inference import view_domain
    from imlnet.models.imlnet import IMLNet

    t = time.perf_counter()
    _log("3/5 evaluating (official University-1652 protocol)")
    model = IMLNet.from_pretrained(out / "model").eval()
    views = {}
    for view in ("query_drone", "gallery_satellite", "query_satellite", "gallery_drone"):
        domain = view_domain(view)
        ds = University1652Test(data, view, transform=build_transforms(domain, False, args.size))
        loader = torch.utils.data.DataLoader(ds, batch_size=64)
        views[view] = extract_features(
            lambda x, d=domain: model.encode(x, d), loader, progress=False
        )
    results = evaluate_views(views)
    print(format_table(results))
    timings["eval_s"] = time.perf_counter() - t

    # 4. localisation -----------------------------------------------------------------------
    t = time.perf_counter()
    _log("4/5 localising drone views over a georeferenced synthetic world")
    loc_summary, loc_results = _localise(args, out, model)
    timings["localise_s"] = time.perf_counter() - t

    # 5. report -----------------------------------------------------------------------------
    t = time.perf_counter()
    _log("5/5 writing the report")
    figures = _figures(out, data, model, dm, views, args)
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all
    n_gallery = len(views["gallery_satellite"][1])
    metrics = {
        "retrieval": results,
        "chance_R@1_drone->satellite": 100.0 / max(1, n_gallery),
        "localisation": loc_summary,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "config": {k: v for k, v in vars(args).items()},
        "model_params": sum(p.numel() for p in model.parameters()),
    }
    write_json(out / "metrics.json", metrics)
    _write_report(out, metrics, figures, loc_results)
    _log(f"done in {timings['total_s'] / 60:.1f} min: {out / 'report.md'}, {out / 'metrics.json'}")
    return 0


def _localise(args: argparse.Namespace, out: Path, model) -> tuple[dict, list]:
    from imlnet.data.synthetic.world import WorldConfig, generate_world
    from imlnet.data.transforms import build_transforms
    from imlnet.geo.index import build_index, checkpoint_hash
    from imlnet.geo.localize import localize, read_truth, summarize, write_outputs
    from imlnet.geo.tiling import tile_geotiff

    world = generate_world(
        WorldConfig(
            extent_m=args.world_size_m,
            gsd_m=0.5,
            views=args.world_views,
            size=args.size,
            seed=args.seed + 1,
            margin_m=min(250.0, args.world_size_m / 3),
        ),
        out / "world",
        overwrite=True,
        progress=False,
    )
    tiles = tile_geotiff(
        world / "world.tif",
        out / "tiles",
        tile_size_m=180.0,
        stride_m=45.0,
        out_px=args.size,
        progress=False,
    )
    index = build_index(
        lambda x: model.encode(x, "satellite"),
        tiles,
        transform=build_transforms("satellite", False, args.size),
        checkpoint_hash=checkpoint_hash(out / "model"),
        checkpoint=str(out / "model"),
        radius=float(model.radius),
        model_config=model.config,
        progress=False,
    )
    index.save(out / "index")
    truth = read_truth(world / "truth.csv")
    images = sorted((world / "drone").glob("*.jpeg"))
    results = localize(
        lambda x: model.encode(x, "drone"),
        index,
        images,
        transform=build_transforms("drone", False, args.size),
        k=5,
        truth=truth,
        truth_base=world,
        progress=False,
    )
    write_outputs(results, out / "localise")
    summary = summarize(results)
    summary["tiles"] = index.count
    return summary, results


def _figures(out: Path, data: Path, model, dm, views, args) -> dict[str, str]:
    from imlnet import viz

    figs: dict[str, str] = {}
    fig_dir = out / "figures"
    dm.setup("fit")
    batch = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=4, shuffle=False)))
    with torch.no_grad():
        output = model(batch["drone"], "drone")
    if output.reconstruction is not None:
        fig = viz.reconstruction_figure(batch["drone"], batch["satellite"], output.reconstruction)
        figs["reconstruction"] = str(
            viz.save_figure(fig, fig_dir / "reconstruction.png").relative_to(out)
        )
    if model.config.get("muml"):
        for name, image, label in (
            ("drone", batch["drone"][:1], batch["label"][:1]),
            ("satellite", batch["satellite"][:1], batch["label"][:1]),
        ):
            with torch.no_grad():
                maps, boxes = model.attention(image, label, name)
            fig = viz.attention_figure(
                image[0],
                list(maps[:, 0]),
                boxes[:, 0],
                ["unit 1", "unit 2", "unit 3", "unit 4", "combined"],
            )
            figs[f"attention_{name}"] = str(
                viz.save_figure(fig, fig_dir / f"attention_{name}.png").relative_to(out)
            )
    fig = viz.retrieval_figure(
        views["query_drone"], views["gallery_satellite"], data, n_queries=4, k=5, seed=args.seed
    )
    figs["retrieval"] = str(viz.save_figure(fig, fig_dir / "retrieval.png").relative_to(out))
    metrics_csv = out / "logs" / "metrics.csv"
    if metrics_csv.exists():
        figs["curves"] = str(
            viz.save_figure(viz.curves_figure(metrics_csv), fig_dir / "curves.png").relative_to(out)
        )
    return figs


def _write_report(out: Path, metrics: dict, figures: dict[str, str], loc_results) -> None:
    from imlnet.evaluation import format_table

    t = metrics["timings_s"]
    lines = [
        "# imlnet demo report",
        "",
        f"Synthetic benchmark: {metrics['config']['locations']} locations x "
        f"{metrics['config']['views']} drone views at {metrics['config']['size']} px; "
        f"IML-Net with a {metrics['config']['backbone']} backbone "
        f"({metrics['model_params'] / 1e6:.1f} M parameters), {metrics['config']['epochs']} "
        f"epochs on the CPU. Total {t['total_s'] / 60:.1f} min (synthesis {t['synth_s']:.0f} s, "
        f"training {t['train_s']:.0f} s, evaluation {t['eval_s']:.0f} s, localisation "
        f"{t['localise_s']:.0f} s).",
        "",
        "## Retrieval (official University-1652 protocol, %)",
        "",
        format_table(metrics["retrieval"]),
        "",
        f"Chance R@1 for drone -> satellite: {metrics['chance_R@1_drone->satellite']:.1f} %.",
        "",
        "## Localisation over a georeferenced world",
        "",
        "```",
        json.dumps(metrics["localisation"], indent=2),
        "```",
        "",
    ]
    titles = {
        "curves": "Training curves",
        "reconstruction": "IRN: drone input, reconstruction, satellite target",
        "attention_drone": "MUML: per-unit attention maps and crop boxes (drone)",
        "attention_satellite": "MUML: per-unit attention maps and crop boxes (satellite)",
        "retrieval": "Retrieval: drone queries and their top-5 satellite images "
        "(green = true match)",
    }
    for key, title in titles.items():
        if key in figures:
            lines += [f"## {title}", "", f"![{title}]({figures[key]})", ""]
    with atomic_write(out / "report.md", "w") as handle:
        handle.write("\n".join(lines))
