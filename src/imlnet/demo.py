"""``imlnet demo``: the whole pipeline, end to end, on a CPU, in minutes.

1. Synthesise the multi-domain benchmark (University-1652 layout; train and test locations from
   different cities). A second run with the same options reuses it.
2. Train IML-Net on it with the recipe of ``configs/demo.yaml`` (IRN, MUML and DRCL on).
3. Evaluate both directions with the official University-1652 protocol, per season, weather,
   altitude and pitch, and under the ten University-WX weather corruptions.
4. Synthesise a georeferenced world with single views and flights, tile and index it, and
   localise every view the way a user would (``imlnet tile / index / localize``): retrieval
   alone, with geometric verification, and flights fused into tracks; a map of each run.
5. Write ``OUT/metrics.json`` and ``OUT/report.md`` (:mod:`imlnet.report`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from imlnet.cliargs import add_common
from imlnet.errors import ImlnetError
from imlnet.io import write_json

#: University-WX conditions the demo evaluates: the six single ones (not "normal", which is the
#: clean test, nor the three combinations), 23 s each at 128 px on 2 cores; `--corrupt wx` runs all
DEMO_CONDITIONS = "fog,rain,snow,dark,overexposure,wind"
#: The demo's training recipe (also ``bench/ablation.py``'s and ``imlnet fit --config``'s),
#: packaged (:mod:`imlnet.resources`): ``configs/demo.yaml`` in a checkout.
DEMO_CONFIG = "demo.yaml"


def recipe_run(
    data: str | Path,
    *,
    size: int,
    seed: int,
    export_dir: str | Path,
    batch_size: int | None = None,
    sample_num: int | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    crop_units: str | None = None,
    overlays: Sequence[str | Path] = (),
    extra: Sequence[str] = (),
):
    """The data module and the module ``imlnet fit --config configs/demo.yaml`` would train.

    The recipe is read from :data:`DEMO_CONFIG` through the training CLI's own parser, so the
    demo, ``bench/ablation.py`` and ``imlnet fit`` train the same thing.

    Args:
        data: the synthetic benchmark's folder.
        size, seed: the data module's image size and seed (``seed`` also seeds the weights and
            the objective's draw of MUML crop units, so seeds differ in every random choice).
        export_dir: where the trained model is exported.
        batch_size, sample_num, backbone, pretrained, crop_units: override the recipe's (None
            keeps it); ``pretrained`` is ``"false"``, ``"imagenet"`` or a weights file.
        overlays: more config files on top (``configs/ablations/<row>.yaml``).
        extra: more ``--key value`` arguments of ``imlnet fit``, applied last.

    Returns:
        ``(CrossViewDataModule, IMLNetModule)`` on the synthetic benchmark at ``data``.
    """
    from imlnet.training import cli_main

    args = [a for c in (_recipe_file(), *overlays) for a in ("--config", str(c))]
    args += ["--seed_everything", str(seed), "--trainer.logger", "false"]
    args += ["--data.root", str(data), "--data.dataset", "synthetic"]
    args += ["--data.image_size", str(size), "--data.seed", str(seed)]
    args += ["--model.objective.init_args.seed", str(seed)]
    args += ["--model.export_dir", str(export_dir)]
    for key, value in (
        ("--data.batch_size", batch_size),
        ("--data.sample_num", sample_num),
        ("--model.model.init_args.backbone", backbone),
        ("--model.model.init_args.pretrained", pretrained),
        ("--model.objective.init_args.crop_units", crop_units),
    ):
        if value is not None:
            args += [key, str(value)]
    cli = cli_main([*args, *extra], run=False)
    return cli.datamodule, cli.model


def recipe_trainer() -> dict:
    """The ``trainer`` section of the recipe (``max_epochs``, ``gradient_clip_val`` ...)."""
    import yaml

    with open(_recipe_file(), encoding="utf-8") as handle:
        return dict((yaml.safe_load(handle) or {}).get("trainer") or {})


def _recipe_file() -> Path:
    from imlnet.resources import config_path

    return config_path(DEMO_CONFIG)


def _log(msg: str) -> None:
    print(f"[imlnet demo] {msg}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imlnet demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo", help="output folder")
    ap.add_argument("--data", default=None, help="benchmark folder (default: OUT/data, reused)")
    ap.add_argument("--locations", type=int, default=1200, help="train+test locations")
    ap.add_argument("--train-fraction", type=float, default=0.925)
    ap.add_argument("--views", type=int, default=4, help="drone views per location")
    ap.add_argument(
        "--anywhere",
        type=float,
        default=0.0,
        help="share of the benchmark's (and the other city's) locations centred on an arbitrary "
        "ground point instead of a landmark (imlnet synth --anywhere)",
    )
    add_common(ap, image_size=128, workers=True)
    ap.set_defaults(workers=None)  # the generator picks one rendering process per core
    ap.add_argument("--epochs", type=int, default=None, help="default: configs/demo.yaml")
    ap.add_argument(
        "--crop-units",
        choices=("all", "random"),
        default=None,
        help="MUML crops per batch: of all four units (the paper) or of one random unit "
        "(default: configs/demo.yaml)",
    )
    ap.add_argument("--world-size-m", type=float, default=1000.0)
    ap.add_argument("--world-views", type=int, default=24, help="single views over the world")
    ap.add_argument("--flights", type=int, default=2, help="flights over the world")
    ap.add_argument(
        "--corrupt",
        default=DEMO_CONDITIONS,
        help="University-WX conditions ('wx': all ten; '' to skip); default: the six single ones",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run (a minute or two) that checks the pipeline, not the method",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.locations, args.views, args.epochs, args.train_fraction = 24, 3, 1, 0.5
        args.world_size_m, args.world_views, args.flights = 600.0, 3, 1
        args.corrupt = "fog,dark"
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    data = _synthesise(args, out)
    timings["synth_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model, train_info = _train(args, out, data)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = _evaluate(args, out, data, model)
    timings["eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    other_city = _other_city(args, out, model)
    evaluation["tables"]["other_city"] = other_city.pop("table")
    timings["other_city_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _log("4/5 localising single views and flights over a georeferenced world")
    localisation = _localise(args, out)
    timings["localise_s"] = time.perf_counter() - t

    from imlnet import report

    t = time.perf_counter()
    _log("5/5 writing the report")
    figures = report.demo_figures(
        out, data, model, evaluation["views"], image_size=args.image_size, seed=args.seed
    )
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all
    metrics = {
        "retrieval": evaluation["results"],
        "chance_R@1_drone->satellite": evaluation["chance"],
        "breakdown": evaluation["breakdown"],
        "corruption": evaluation["corruption"],
        "other_city": other_city,
        "localisation": localisation,
        "training": train_info,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "config": vars(args),
        "model_params": sum(p.numel() for p in model.parameters()),
    }
    write_json(out / "metrics.json", metrics)
    report.write_demo_report(out, metrics, figures, evaluation["tables"])
    _log(f"done in {timings['total_s'] / 60:.1f} min: {out / 'report.md'}, {out / 'metrics.json'}")
    _log(
        "see the world's drone views located on a map: imlnet serve --index "
        f"{out / 'index'} --checkpoint {out / 'model'}  (then open http://127.0.0.1:8765/ and "
        f"drop photos from {out / 'world' / 'drone'})"
    )
    return 0


def _synthesise(args: argparse.Namespace, out: Path) -> Path:
    from imlnet.data.synthetic.config import SynthConfig
    from imlnet.data.synthetic.generate import generate

    data = Path(args.data) if args.data else out / "data"
    cfg = SynthConfig(
        locations=args.locations,
        views=args.views,
        size=args.image_size,
        seed=args.seed,
        train_fraction=args.train_fraction,
        anywhere=args.anywhere,
    )
    _log(f"1/5 benchmark: {args.locations} locations x {args.views} views at {args.image_size} px")
    generate(cfg, data, progress=True, workers=args.workers)
    return data


def _train(args: argparse.Namespace, out: Path, data: Path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    dm, module = recipe_run(
        data,
        size=args.image_size,
        seed=args.seed,
        export_dir=out / "model",
        crop_units=args.crop_units,
    )
    trainer_cfg = recipe_trainer()
    epochs = args.epochs or int(trainer_cfg.get("max_epochs") or 1)
    _log(f"2/5 training IML-Net ({epochs} epochs, recipe {DEMO_CONFIG}) on the CPU")
    L.seed_everything(args.seed, workers=True, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        default_root_dir=str(out),
        logger=CSVLogger(str(out), name="logs", version=""),
        check_val_every_n_epoch=max(1, epochs // 2),  # two points of the curve (each ~20 s)
        log_every_n_steps=5,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
    )
    t = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t
    # The demo validates on its test set (for the curves), so the model it reports on is the
    # last one, not the one that scored best there: no selection on the test set.
    module.model.save_pretrained(out / "model", meta={"image_size": args.image_size})
    info = {
        "epochs": epochs,
        "steps": int(trainer.global_step),
        "train_buildings": int(dm.num_classes),
        "seconds": round(seconds, 1),
    }
    return module.model.eval(), info


def _evaluate(args: argparse.Namespace, out: Path, data: Path, model) -> dict:
    from imlnet.evaluation import evaluate_views, format_table
    from imlnet.evaluation.multidomain import multi_domain_report

    _log("3/5 evaluating: official protocol, per condition, under University-WX weather")
    rep = multi_domain_report(
        model,
        data,
        image_size=args.image_size,
        by=("season", "weather", "altitude", "pitch"),
        corrupt=args.corrupt or None,
        seed=args.seed,
        out=out / "evaluation",
        workers=0,
    )
    views = rep["views"]
    results = evaluate_views(views)
    print(format_table(results))
    n_gallery = len(views["gallery_satellite"][1])
    tables = {"retrieval": format_table(results)}
    for key in ("breakdown", "corruption"):
        if rep[key] is not None:
            tables[key] = rep[key]["table"]
            print(rep[key]["table"])
    return {
        "views": views,
        "results": results,
        "chance": 100.0 / max(1, n_gallery),
        "breakdown": rep["breakdown"] and rep["breakdown"].get("results"),
        "corruption": rep["corruption"]
        and {k: rep["corruption"][k] for k in ("clean", "conditions", "summary")},
        "tables": tables,
    }


#: the other city's season and weather mix: more winter, fog, night and snow than the benchmark
OTHER_SEASONS = {"spring": 0.15, "summer": 0.15, "autumn": 0.2, "winter": 0.5}
OTHER_WEATHER = {"clear": 0.3, "haze": 0.1, "fog": 0.2, "rain": 0.1, "snow": 0.1, "night": 0.2}


def other_city_config(args: argparse.Namespace):
    """The other city's benchmark: as many test places as the demo's, of seed ``seed + 1000``,
    in :data:`OTHER_SEASONS` and :data:`OTHER_WEATHER`, landmarks or anywhere as the demo's."""
    from imlnet.data.synthetic.config import SynthConfig

    n_test = max(2, round(args.locations * (1 - args.train_fraction)))
    return SynthConfig(
        locations=n_test + 2,
        views=args.views,
        size=args.image_size,
        seed=args.seed + 1000,
        train_fraction=2 / (n_test + 2),  # two training places (unused): the test is the point
        anywhere=args.anywhere,
        seasons=dict(OTHER_SEASONS),
        weather=dict(OTHER_WEATHER),
    )


def _other_city(args: argparse.Namespace, out: Path, model) -> dict:
    """Retrieval on test places of a city of another seed, in another season and weather mix."""
    from imlnet.data.synthetic.generate import generate
    from imlnet.evaluation import evaluate_views, format_table
    from imlnet.evaluation.multidomain import multi_domain_report

    cfg = other_city_config(args)
    n_test = cfg.n_test
    data = out / "other_city"
    _log(f"3b/5 a city of seed {cfg.seed}, mostly winter, fog and night: {n_test} test places")
    generate(cfg, data, progress=False, workers=args.workers)  # reused by a second run
    rep = multi_domain_report(
        model, data, image_size=args.image_size, by=None, corrupt=None, seed=args.seed, workers=0
    )
    results = evaluate_views(rep["views"])
    table = format_table(results)
    print(table)
    desc = (
        f"{n_test} test places of a city of seed {cfg.seed} (the benchmark's test cities are of "
        f"seed {args.seed}), seasons {OTHER_SEASONS}, weather {OTHER_WEATHER}."
    )
    return {"results": results, "seed": cfg.seed, "description": desc, "table": table}


def _localise(args: argparse.Namespace, out: Path) -> dict:
    """World -> tiles -> gallery -> three localisation runs, through the users' commands."""
    from imlnet.data.synthetic.world import WorldConfig, generate_world
    from imlnet.geo import index, localize, tiling

    world = out / "world"
    # Drone views at 256 px, as a camera gives them: retrieval resizes them to the model's size,
    # verification matches them at full resolution against the orthophoto.
    cfg = WorldConfig(
        extent_m=args.world_size_m,
        views=args.world_views,
        flights=args.flights,
        size=256,
        seed=args.seed + 1,
        margin_m=min(250.0, args.world_size_m / 3),
    )
    generate_world(cfg, world, overwrite=True, progress=False)
    quiet = ["--quiet"]
    tile_args = [str(world / "world.tif"), str(out / "tiles"), "--tile-size-m", "180"]
    tile_args += ["--stride-m", "45", "--image-size", str(args.image_size), *quiet]
    _run(tiling.main, tile_args)
    model_args = ["--checkpoint", str(out / "model"), "--workers", "0", *quiet]
    _run(index.main, [str(out / "tiles"), "--out", str(out / "index"), "--overwrite", *model_args])
    truth = str(world / "truth.csv")
    common = ["--index", str(out / "index"), "--truth", truth, *model_args]
    runs = {
        "retrieval": [str(world / "drone"), "--verify", "0", "--no-map"],
        "verified": [str(world / "drone"), "--verify", "5"],
        "flights": [str(world / "flights"), "--verify", "5", "--sequence"],
    }
    summary: dict = {}
    for name, argv in runs.items():
        if name == "flights" and not args.flights:
            continue
        run_dir = out / "localise" / name
        t = time.perf_counter()
        _run(localize.main, [*argv, *common, "--out-dir", str(run_dir)])
        metrics_file = run_dir / "metrics.json"
        summary[name] = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        summary[name]["wall_s"] = round(time.perf_counter() - t, 1)
        summary[name]["dir"] = str(run_dir.relative_to(out))
    return summary


def _run(command, argv: list[str]) -> None:
    code = command(argv)
    if code:
        raise ImlnetError(f"the demo's step `{' '.join(argv[:2])}` failed (exit {code})")
