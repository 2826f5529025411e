"""Frozen-feature probe: how far ImageNet features of a depth go with a small trained head.

EfficientNet-Lite0 (ImageNet weights) runs once over the benchmark's training and test images;
its features at one depth are kept in memory (float16), and only a head on top is trained with
symmetric InfoNCE (learned temperature), batches of ``--batch`` pairs, AdamW with a cosine
schedule. Drone features are flipped at random, satellite features rotated by a multiple of 90
degrees. Every 100 steps: drone->satellite R@1 and AP on the test views (official protocol,
flip-summed features). It answers, in minutes, which depth to freeze and cache (the demo's
design; docs/benchmarks.md, "A model that works").

Depths (``--level``): ``u3`` (blocks.2, 40 ch, stride 8), ``blocks4`` (blocks.4, 112 ch, the
last stride-16 stage: U4 with ``last_stages: dropped``), ``blocks6`` (blocks.6 dilated to stride
16, 320 ch: U4 with ``last_stages: dilated``). Heads (``--head``): ``lin`` (GeM + linear + BN),
``conv`` (two 3x3 conv-BN-ReLU at 256 ch, GeM, linear + BN), ``ft34`` (on ``u3``: Lite0's own
blocks.3-4, fine-tuned from ImageNet, then ``conv``).

    python bench/frozen_probe.py --data runs/demo/data --level blocks4 --head conv
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imlnet.evaluation import evaluate_retrieval
from imlnet.models.backbone import build_backbone
from imlnet.models.pooling import GeM
from recipe_probe import load_view, normalise

VIEWS = {
    "tr_d": "train/drone",
    "tr_s": "train/satellite",
    "qd": "test/query_drone",
    "gs": "test/gallery_satellite",
}


@torch.no_grad()
def features(root: Path, size: int, level: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per view: float16 features at ``level`` and the labels."""
    stages = "dilated" if level == "blocks6" else "dropped"
    net = build_backbone("tf_efficientnet_lite0", "imagenet", stages).eval()
    stop = 3 if level == "u3" else 4
    out = {}
    for key, folder in VIEWS.items():
        _, x, labels = load_view(root / folder, size)
        maps = [net.forward_units(normalise(x[i : i + 128]), stop=stop).maps[-1] for i in
                range(0, len(x), 128)]  # fmt: skip
        out[key] = (torch.cat(maps).half(), labels)
    return out


def conv_head(c: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c, 256, 3, padding=1),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        GeM(),
        nn.Linear(256, 512),
        nn.BatchNorm1d(512),
    ]


def head(kind: str, channels: int) -> nn.Module:
    if kind == "lin":
        return nn.Sequential(GeM(), nn.Linear(channels, 512), nn.BatchNorm1d(512))
    if kind == "conv":
        return nn.Sequential(*conv_head(channels))
    net = build_backbone("tf_efficientnet_lite0", "imagenet", "dropped")
    return nn.Sequential(copy.deepcopy(net.units[3]), *conv_head(net.channels[3]))


@torch.no_grad()
def embed(h: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h.eval()
    out = []
    for i in range(0, len(x), 512):
        b = x[i : i + 512].float()
        out.append(F.normalize(h(b) + h(b.flip(3)), dim=1))
    h.train()
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/demo/data")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--level", choices=("u3", "blocks4", "blocks6"), default="blocks4")
    ap.add_argument("--head", choices=("lin", "conv", "ft34"), default="conv")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.head == "ft34" and a.level != "u3":
        ap.error("--head ft34 trains blocks.3-4 on top of --level u3")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    feats = features(Path(a.data), a.size, a.level)
    print(f"features in {time.perf_counter() - t0:.0f} s", flush=True)
    ids = sorted(set(feats["tr_s"][1].tolist()))
    index = {v: i for i, v in enumerate(ids)}
    drone_lab = torch.tensor([index[int(v)] for v in feats["tr_d"][1]])
    per_place = [torch.nonzero(drone_lab == i).flatten() for i in range(len(ids))]
    channels = feats["tr_d"][0].shape[1]
    hd, hs = head(a.head, channels), head(a.head, channels)
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*hd.parameters(), *hs.parameters(), scale], lr=a.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    train_s = 0.0
    for step in range(a.steps + 1):
        if step % 100 == 0:
            r = evaluate_retrieval(
                embed(hd, feats["qd"][0]), feats["qd"][1], embed(hs, feats["gs"][0]), feats["gs"][1]
            )
            point = {"step": step, "train_s": round(train_s, 1), "R1": round(r["R@1"], 2)}
            print(json.dumps({**point, "AP": round(r["AP"], 2)}), flush=True)
        if step == a.steps:
            break
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        places = torch.randperm(len(ids), generator=gen)[: a.batch]
        pick = torch.stack(
            [per_place[i][torch.randint(len(per_place[i]), (1,), generator=gen)] for i in places]
        ).flatten()
        xd, xs = feats["tr_d"][0][pick].float(), feats["tr_s"][0][places].float()
        flip = torch.rand(len(places), generator=gen) < 0.5
        xd = torch.where(flip[:, None, None, None], xd.flip(3), xd)
        xs = torch.rot90(xs, int(torch.randint(4, (1,), generator=gen)), (2, 3))
        logits = scale.exp() * F.normalize(hd(xd), dim=1) @ F.normalize(hs(xs), dim=1).T
        target = torch.arange(len(places))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t


if __name__ == "__main__":
    main()
