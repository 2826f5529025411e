"""Ablation on the synthetic benchmark: baseline, +IRN, +MUML, +DRCL, full IML-Net, over seeds.

Each row is one of ``configs/ablations/*.yaml`` on top of the demo's training recipe
(``configs/demo.yaml``: EfficientNet-Lite0 with ImageNet weights, U1-U3 frozen and cached,
AdamW, cosine schedule). Every
(row, seed) run trains on the same generated benchmark with Lightning, then ``trainer.test``
evaluates both directions with the official University-1652 protocol. The seed drives the weight
initialisation, the data order and the augmentations; the data are the same for every run.

Results are written after each run to ``--out`` (JSON), so an interrupted sweep keeps what it
finished and ``--resume`` skips those runs. The table gives mean +/- sample standard deviation
over the seeds, and the min-max range.

The benchmark is the demo's (1200 locations, 92.5 % for training: 1110 training places, 90
test places and 32 distractors, 4 views, 128 px; ``--data runs/demo/data`` reuses a demo's). Each
run's step cost (the fit's seconds over its steps) and the load average around it are recorded,
so the rows' costs can be compared within one sweep. The frozen units' features are computed
once per sweep and shared by the runs (the first run's fit time includes building them).

    python bench/ablation.py --data runs/demo/data            # 7 rows x 3 seeds
    python bench/ablation.py --rows baseline full --seeds 0 --epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from imlnet.data.synthetic.generate import SynthConfig, generate
from imlnet.demo import DEMO_CONFIG, recipe_run, recipe_trainer
from imlnet.io import write_json
from imlnet.resources import config_path

REPO = Path(__file__).resolve().parents[1]
ROWS = ("baseline", "irn", "muml", "drcl", "full", "infonce", "full_plus_infonce", "paper_heads")
#: the rows a sweep runs unless told (paper_heads is a cost/accuracy check of one switch)
DEFAULT_ROWS = ROWS[:-1]
#: (metric key of trainer.test, column title)
COLUMNS = (
    ("test/R@1", "d->s R@1"),
    ("test/AP", "d->s AP"),
    ("test/s2d_R@1", "s->d R@1"),
    ("test/s2d_AP", "s->d AP"),
)


def row_config(row: str) -> Path:
    """``configs/ablations/<row>.yaml``: the row's switches, laid over the demo's recipe."""
    return config_path(f"ablations/{row}.yaml")


#: frozen-unit caches by (backbone, frozen units, image size): every row and seed freezes the
#: same ImageNet units on the same images, so the features are computed once per sweep
CACHES: dict[tuple, Any] = {}


def quiet_trainer(root: str, **kwargs: Any) -> L.Trainer:
    """A CPU trainer with the recipe's gradient clipping, no logs, checkpoints or validation."""
    return L.Trainer(
        accelerator="cpu",
        gradient_clip_val=recipe_trainer().get("gradient_clip_val"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=root,
        **kwargs,
    )


def run_one(row: str, seed: int, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one row with one seed, test it; metrics and timings."""
    L.seed_everything(seed, verbose=False)
    with tempfile.TemporaryDirectory(prefix="imlnet-ablation-") as tmp:
        dm, module = recipe_run(
            data,
            size=args.size,
            batch_size=args.batch_size,
            sample_num=args.sample_num,
            seed=seed,
            backbone=args.backbone,
            crop_units=args.crop_units,
            export_dir=Path(tmp) / "export",
            overlays=[row_config(row)],
        )
        key = (
            module.model.config["backbone"],
            module.model.freeze_units,
            args.size,
            bool(module.hparams.get("cache_flips")),
        )
        if module.hparams.cache_frozen:
            module.use_cache(CACHES.get(key))
        trainer = quiet_trainer(tmp, max_epochs=args.epochs)
        load = os.getloadavg()[0]
        t = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        train_s = time.perf_counter() - t
        if module.frozen_cache is not None:
            CACHES[key] = module.frozen_cache
        trainer.test(module, datamodule=dm, verbose=False)
    metrics = {key: round(float(trainer.callback_metrics[key]), 3) for key, _ in COLUMNS}
    steps = int(trainer.global_step)
    return {
        "row": row,
        "seed": seed,
        "train_s": round(train_s, 1),
        "steps": steps,
        "step_s": round(train_s / max(1, steps), 3),
        "load": [round(load, 2), round(os.getloadavg()[0], 2)],
        **metrics,
    }


def summarize(runs: list[dict[str, Any]], rows: list[str]) -> list[dict[str, Any]]:
    """Per row: mean, sample std and min/max of each metric over its seeds."""
    table = []
    for row in rows:
        done = [r for r in runs if r["row"] == row]
        if not done:
            continue
        entry: dict[str, Any] = {"row": row, "seeds": [r["seed"] for r in done]}
        for key, _ in (*COLUMNS, ("train_s", ""), ("step_s", "")):
            values = [r[key] for r in done]
            entry[key] = {
                "mean": round(statistics.fmean(values), 2),
                "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        table.append(entry)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    head = "| row | " + " | ".join(title for _, title in COLUMNS) + " | train s | s/step | x base |"
    lines = [head, "|---" + "|---:" * (len(COLUMNS) + 3) + "|"]
    base = next((e["step_s"]["mean"] for e in table if e["row"] == "baseline"), None)
    for entry in table:
        cells = [
            f"{entry[k]['mean']:.1f} ± {entry[k]['std']:.1f} ({entry[k]['min']:.1f}-"
            f"{entry[k]['max']:.1f})"
            for k, _ in COLUMNS
        ]
        step = entry["step_s"]["mean"]
        ratio = f"{step / base:.2f}" if base else "-"
        lines.append(
            f"| {entry['row']} | " + " | ".join(cells) + f" | {entry['train_s']['mean']:.0f} "
            f"| {step:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", default="runs/demo/data", help="benchmark (made if absent)")
    ap.add_argument("--locations", type=int, default=1200)
    ap.add_argument("--train-fraction", type=float, default=0.925)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--size", type=int, default=128, help="image side, also the model input")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--sample-num", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--backbone", default=None, help="default: the recipe's")
    ap.add_argument("--crop-units", choices=("all", "random"), default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--resume", action="store_true", help="skip the runs already in --out")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ablation.json"))
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="only merge the runs of sweeps run side by side (e.g. rows split over two "
        "processes of --threads 1) into --out and print the table",
    )
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        runs = [r for part in parts for r in part["runs"]]
        rows = [r for r in ROWS if any(run["row"] == r for run in runs)]
        table = summarize(runs, rows)
        write_json(Path(args.out), {**parts[0], "runs": runs, "table": table, "merged": args.merge})
        print(markdown(table))
        return
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not (data / "metadata.json").is_file():
        cfg = SynthConfig(
            locations=args.locations,
            views=args.views,
            size=args.size,
            seed=0,
            train_fraction=args.train_fraction,
        )
        generate(cfg, data, overwrite=True, progress=True)
    settings = {
        k: getattr(args, k)
        for k in (
            "locations",
            "train_fraction",
            "views",
            "size",
            "epochs",
            "batch_size",
            "sample_num",
            "backbone",
        )
    }
    recipe = yaml.safe_load(config_path(DEMO_CONFIG).read_text())["model"]
    settings.update(crop_units=args.crop_units, recipe=recipe, data=str(data))
    out = Path(args.out)
    runs: list[dict[str, Any]] = []
    if args.resume and out.is_file():
        runs = json.loads(out.read_text())["runs"]
    machine = f"cpu ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"
    for seed in args.seeds:  # seeds outermost: a cut-short sweep still has every row
        for row in args.rows:
            if any(r["row"] == row and r["seed"] == seed for r in runs):
                continue
            runs.append(run_one(row, seed, data, args))
            print(json.dumps(runs[-1]), flush=True)
            table = summarize(runs, args.rows)
            write_json(
                out, {"machine": machine, "settings": settings, "runs": runs, "table": table}
            )
    print(markdown(summarize(runs, args.rows)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
