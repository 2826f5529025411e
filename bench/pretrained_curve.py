"""R@1 and AP against training minutes: where the CPU is spent decides what a small budget learns.

Each design is the demo's recipe (``configs/demo.yaml``, trained with Lightning exactly as
``imlnet demo`` trains it) with a few keys changed; every design trains for the same budget of
wall-clock minutes on the same benchmark, and at each mark the test views are evaluated
(drone->satellite R@1 and AP, satellite->drone AP; official protocol). The clock counts
everything training spends, the frozen-feature cache included, and stops during evaluations.
Learning rates are constant after the one-epoch warm-up (``scheduler: none``), so that the
curves compare designs and not schedule lengths.

    python bench/pretrained_curve.py --data runs/demo/data --minutes 4.5 --every 1.5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ablation import quiet_trainer
from imlnet.demo import recipe_run
from imlnet.evaluation import evaluate_views
from imlnet.inference import embed, view_domain
from imlnet.io import write_json

REPO = Path(__file__).resolve().parents[1]
_LIVE = ["--model.cache_frozen", "false", "--data.augment", "true"]
#: design -> overrides of the demo's recipe (``imlnet fit`` arguments)
DESIGNS: dict[str, list[str]] = {
    "resnet18_scratch": [  # the previous demo's recipe: ResNet-18 from scratch, 64 px
        "--model.model.init_args.backbone", "resnet18",
        "--model.model.init_args.pretrained", "false",
        "--model.model.init_args.last_stages", "dilated",
        "--model.model.init_args.freeze_units", "0",
        "--model.objective.init_args.crop_rows", "null",
        "--data.image_size", "64", "--data.batch_size", "32", "--data.sample_num", "1",
        *_LIVE,
    ],
    "lite0_finetune": ["--model.model.init_args.freeze_units", "0", *_LIVE],
    "lite0_freeze1": ["--model.model.init_args.freeze_units", "1", *_LIVE],
    "lite0_freeze2": ["--model.model.init_args.freeze_units", "2", *_LIVE],
    "lite0_freeze3": ["--model.model.init_args.freeze_units", "3", *_LIVE],
    "demo": [],  # frozen U1-U3 cached once, U4 + heads trained
}  # fmt: skip


class TimedCurve(Callback):
    """Evaluate at every ``every`` training minutes; stop at ``minutes``."""

    def __init__(self, minutes: float, every: float, dm) -> None:
        self.budget, self.every, self.dm = minutes * 60, every * 60, dm
        self.train_s, self.next_mark, self.points = 0.0, every * 60, []
        self._t = 0.0

    def on_fit_start(self, trainer, module) -> None:
        self._t = time.perf_counter()  # the cache is built in the module's on_fit_start

    def on_train_start(self, trainer, module) -> None:
        self.train_s += time.perf_counter() - self._t
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.train_s += time.perf_counter() - self._t
        if self.train_s >= self.next_mark or self.train_s >= self.budget:
            self.points.append(self.evaluate(module, trainer.global_step))
            print(json.dumps(self.points[-1]), flush=True)
            self.next_mark += self.every
            if self.train_s >= self.budget:
                trainer.should_stop = True
        self._t = time.perf_counter()

    @torch.no_grad()
    def evaluate(self, module, step: int) -> dict[str, Any]:
        model = module.model
        was = model.training
        model.eval()
        views = {}
        for view, loader in zip(self.dm.test_views, self.dm.test_dataloader(), strict=True):
            feats, labels = [], []
            for batch in loader:
                feats.append(embed(model, batch["image"], view_domain(view)))
                labels.append(batch["label"])
            views[view] = (torch.cat(feats), torch.cat(labels))
        model.train(was)
        res = evaluate_views(views)
        d2s, s2d = res["drone->satellite"], res["satellite->drone"]
        return {
            "min": round(self.train_s / 60, 2),
            "step": step,
            "d2s_R1": round(float(d2s["R@1"]), 2),
            "d2s_AP": round(float(d2s["AP"]), 2),
            "s2d_AP": round(float(s2d["AP"]), 2),
            "load": round(os.getloadavg()[0], 2),
        }


def run_design(name: str, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(args.seed, verbose=False)
    with tempfile.TemporaryDirectory(prefix="imlnet-curve-") as tmp:
        dm, module = recipe_run(
            args.data,
            size=128,
            seed=args.seed,
            export_dir=Path(tmp) / "export",
            extra=[*DESIGNS[name], "--model.scheduler", "none"],
        )
        dm.setup("test")
        curve = TimedCurve(args.minutes, args.every, dm)
        trainer = quiet_trainer(tmp, max_epochs=10_000, callbacks=[curve])
        trainer.fit(module, datamodule=dm)
    return {"design": name, "overrides": DESIGNS[name], "curve": curve.points}


def plot(results: list[dict[str, Any]], path: Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for res in results:
        mins = [0.0] + [p["min"] for p in res["curve"]]
        for ax, key in zip(axes, ("d2s_R1", "d2s_AP"), strict=True):
            ax.plot(mins, [0.0] + [p[key] for p in res["curve"]], marker="o", label=res["design"])
    for ax, title in zip(axes, ("drone->satellite R@1", "drone->satellite AP"), strict=True):
        ax.set_xlabel(f"training minutes ({threads} CPU thread{'s' if threads > 1 else ''})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/demo/data", help="the demo's benchmark (128 px)")
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    ap.add_argument("--minutes", type=float, default=4.5)
    ap.add_argument("--every", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrained_curve.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    ap.add_argument("--png", default=str(REPO / "docs" / "pretrained_curve.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.is_file() else []
    if args.plot_only:
        plot(results, Path(args.png), args.threads)
        return
    for name in args.designs:
        results = [r for r in results if r["design"] != name]
        results.append(run_design(name, args))
        write_json(out, {"settings": vars(args), "results": results})
        plot(results, Path(args.png), args.threads)
    for res in results:
        cells = " ".join(f"{p['min']}:{p['d2s_R1']}/{p['d2s_AP']}" for p in res["curve"])
        print(f"{res['design']}: {cells}")


if __name__ == "__main__":
    main()
