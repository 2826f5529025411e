"""Recipe probe: R@1 / AP against training minutes for one training recipe, fast to iterate.

The real :class:`~imlnet.models.imlnet.IMLNet` and :class:`~imlnet.losses.IMLNetObjective`
(through :func:`imlnet.training.training_losses`, as ``imlnet fit`` calls them), but a plain loop
on images held in memory as uint8 tensors (decoded once), augmented on the batch (rotation,
translation, flip with ``grid_sample``), AdamW with linear warm-up and a cosine schedule over
``--steps``. Lightning's loop and per-image transforms cost little at this size, but the probe
keeps every second of a short budget for the steps and times only them: the ``min`` column is
training time, evaluation excluded. At every ``--eval-every`` minutes of training it evaluates
drone->satellite (R@1, AP) and satellite->drone (AP) on the test views, and drone->satellite R@1
on every fourth training drone view against all training satellite images (does the model learn
its own training places?).

    python bench/recipe_probe.py --data runs/demo/data --triplet infonce --irn 0 --muml 0 \\
        --w-id 0 --steps 400 --out bench/results/recipe_probe_baseline_infonce.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imlnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imlnet.evaluation import evaluate_retrieval
from imlnet.inference import read_image
from imlnet.io import write_json
from imlnet.losses import IMLNetObjective
from imlnet.models.imlnet import IMLNet
from imlnet.training import training_losses

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def load_view(folder: Path, size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every image of a University-1652-layout view folder as ``(ids, uint8 images, labels)``."""
    ids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for name in ids:
        for f in sorted((folder / name).iterdir()):
            im = read_image(f)
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1))
            labels.append(int(name))
    return ids, torch.stack(images), torch.tensor(labels)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator, rot_deg: float, shift: float) -> torch.Tensor:
    """Random rotation in [-rot_deg, rot_deg], translation up to ``shift`` of the side, flip."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(rot_deg)
    cos, sin = ang.cos(), ang.sin()
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * shift
    theta = torch.stack(
        [torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def embed(model: IMLNet, x: torch.Tensor, domain: str) -> torch.Tensor:
    model.eval()
    out = torch.cat(
        [model.encode(normalise(x[i : i + 256]), domain) for i in range(0, len(x), 256)]
    )
    model.train()
    return out


def colour_histogram(root: Path, size: int, bins: int = 6) -> None:
    """Drone->satellite retrieval by a joint RGB histogram of a centre square, no learning.

    Three crops (drone centre side / satellite centre side, in pixels of ``size``); the
    histogram's square root, L2-normalised, compared by cosine: how far colour alone goes.
    """
    _, qd, qdl = load_view(root / "test/query_drone", size)
    _, gs, gsl = load_view(root / "test/gallery_satellite", size)

    def hist(x: torch.Tensor, side: int) -> torch.Tensor:
        lo = (size - side) // 2
        q = (x[:, :, lo : lo + side, lo : lo + side].long() * bins // 256).clamp(max=bins - 1)
        idx = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
        h = torch.stack([torch.bincount(i.flatten(), minlength=bins**3) for i in idx])
        return F.normalize(h.float().sqrt(), dim=1)

    for d_side, s_side in (
        (size // 2, size * 3 // 8),
        (size * 3 // 8, size // 4),
        (size * 3 // 4, size // 2),
    ):
        r = evaluate_retrieval(hist(qd, d_side), qdl, hist(gs, s_side), gsl)
        print(
            f"drone centre {d_side} px, satellite centre {s_side} px: "
            f"R@1 {r['R@1']:.2f} AP {r['AP']:.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/demo/data", help="an `imlnet synth` benchmark")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=400, help="length of the cosine schedule")
    ap.add_argument("--triplet", default="drcl", choices=("drcl", "plain", "infonce", "none"))
    ap.add_argument("--irn", type=int, default=1)
    ap.add_argument("--muml", type=int, default=1)
    ap.add_argument("--w-id", type=float, default=0.1)
    ap.add_argument("--w-crop", type=float, default=0.1)
    ap.add_argument("--w-rec", type=float, default=1.0)
    ap.add_argument("--w-drcl", type=float, default=1.0)
    ap.add_argument("--w-infonce", type=float, default=0.0)
    ap.add_argument("--margin", type=float, default=0.3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    ap.add_argument("--sat-rot", type=float, default=180, help="satellite rotation, degrees")
    ap.add_argument("--drone-rot", type=float, default=0, help="drone rotation, degrees")
    ap.add_argument("--shift", type=float, default=0.05, help="translation, fraction of side")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--pretrained", default="false", help="false, imagenet or a weights file")
    ap.add_argument("--freeze-units", type=int, default=0)
    ap.add_argument("--backbone-lr-mult", type=float, default=1.0)
    ap.add_argument("--muml-channels", type=int, default=128)
    ap.add_argument("--crop-units", default="random", choices=("random", "all"))
    ap.add_argument("--eval-every", type=float, default=1.5, help="training minutes")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON of the curve")
    ap.add_argument(
        "--colour-histogram",
        action="store_true",
        help="only evaluate a colour histogram of the image centre (no learning) and exit",
    )
    a = ap.parse_args()
    if a.colour_histogram:
        colour_histogram(Path(a.data), a.size)
        return
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    root = Path(a.data)
    ids, drone, drone_lab = load_view(root / "train/drone", a.size)
    _, sat, sat_lab = load_view(root / "train/satellite", a.size)
    views = {
        v: load_view(root / "test" / v, a.size)[1:]
        for v in ("query_drone", "gallery_satellite", "query_satellite", "gallery_drone")
    }
    n = len(ids)
    index = {int(t): i for i, t in enumerate(ids)}
    drone_lab = torch.tensor([index[int(v)] for v in drone_lab])
    sat_lab = torch.tensor([index[int(v)] for v in sat_lab])
    per_place = [torch.nonzero(drone_lab == i).flatten() for i in range(n)]
    check = torch.arange(0, len(drone), 4)
    print(f"{n} training places, {len(drone)} drone views", flush=True)
    model = IMLNet(
        n,
        backbone=a.backbone,
        irn=bool(a.irn),
        muml=bool(a.muml),
        muml_channels=a.muml_channels,
        pretrained=False if a.pretrained == "false" else a.pretrained,
        freeze_units=a.freeze_units,
    )
    objective = IMLNetObjective(
        triplet=a.triplet,
        margin=a.margin,
        w_id=a.w_id,
        w_crop=a.w_crop,
        w_rec=a.w_rec,
        w_drcl=a.w_drcl,
        w_infonce=a.w_infonce,
        crop_units=a.crop_units,
        seed=a.seed,
    )
    backbone = {id(p) for p in model.backbone_parameters()}
    groups = [
        {
            "params": [p for p in model.parameters() if id(p) in backbone and p.requires_grad],
            "mult": a.backbone_lr_mult,
        },
        {
            "params": [p for p in model.parameters() if id(p) not in backbone]
            + list(objective.parameters()),
            "mult": 1.0,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(a.seed)
    train_s, last_eval, step, curve = 0.0, 0.0, 0, []
    while True:
        if train_s - last_eval >= a.eval_every * 60 or step >= a.steps:
            last_eval = train_s
            qd, qdl = views["query_drone"]
            gs, gsl = views["gallery_satellite"]
            qs, qsl = views["query_satellite"]
            gd, gdl = views["gallery_drone"]
            d2s = evaluate_retrieval(
                embed(model, qd, "drone"), qdl, embed(model, gs, "satellite"), gsl
            )
            s2d = evaluate_retrieval(
                embed(model, qs, "satellite"), qsl, embed(model, gd, "drone"), gdl
            )
            own = evaluate_retrieval(
                embed(model, drone[check], "drone"),
                drone_lab[check],
                embed(model, sat, "satellite"),
                sat_lab,
            )
            curve.append(
                {
                    "min": round(train_s / 60, 2),
                    "step": step,
                    "d2s_R1": round(d2s["R@1"], 2),
                    "d2s_AP": round(d2s["AP"], 2),
                    "s2d_AP": round(s2d["AP"], 2),
                    "train_R1": round(own["R@1"], 2),
                    "load": round(os.getloadavg()[0], 2),
                }
            )
            print(json.dumps(curve[-1]), flush=True)
            if step >= a.steps:
                break
        t = time.perf_counter()
        warm = step < a.warmup
        lr = a.lr * (
            (step + 1) / a.warmup if warm else 0.5 * (1 + math.cos(math.pi * step / a.steps))
        )
        for group in opt.param_groups:
            group["lr"] = lr * group["mult"]
        places = torch.randperm(n, generator=gen)[: a.batch]
        pick = torch.stack(
            [
                per_place[i][torch.randint(len(per_place[i]), (1,), generator=gen)]
                for i in places.tolist()
            ]
        ).flatten()
        d = augment(normalise(drone[pick]), gen, a.drone_rot, a.shift)
        s = augment(normalise(sat[places]), gen, a.sat_rot, a.shift)
        parts = training_losses(model, objective, d, s, places)
        opt.zero_grad(set_to_none=True)
        parts["total"].backward()
        opt.step()
        step += 1
        train_s += time.perf_counter() - t
        if step % 20 == 0:
            print(
                f"step {step} {train_s / 60:.2f} min "
                + " ".join(f"{k} {v.item():.3f}" for k, v in parts.items()),
                flush=True,
            )
    if a.out:
        write_json(Path(a.out), {"args": vars(a), "curve": curve})


if __name__ == "__main__":
    main()
