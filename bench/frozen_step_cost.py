"""Seconds per training step of the demo's model with parts switched off, cached or live.

EfficientNet-Lite0 (ImageNet), ``last_stages: dropped``, U1-U3 frozen, 128 px, 64 pairs, 510
classes, the demo's objective (DRCL + InfoNCE, id 0.1, one random unit's crops). ``cached``: the
frozen units' features are given (what ``cache_frozen`` does); ``live``: they are computed in the
step. The minimum of three timed steps after one warm-up step; compare rows within one run.

    python bench/frozen_step_cost.py
"""

from __future__ import annotations

import time

import torch

from imlnet.losses import IMLNetObjective
from imlnet.models import IMLNet
from imlnet.training import training_losses

B, SIZE = 64, 128


def model(**kw) -> IMLNet:
    base = {"backbone": "tf_efficientnet_lite0", "pretrained": "imagenet"}
    base.update(last_stages="dropped", freeze_units=3, muml_channels=128, **kw)
    return IMLNet(510, **base)


def objective(**kw) -> IMLNetObjective:
    return IMLNetObjective(crop_units="random", w_id=0.1, w_crop=0.1, w_infonce=1.0, **kw)


def step_seconds(net: IMLNet, obj: IMLNetObjective, cached: bool) -> float:
    gen = torch.Generator().manual_seed(0)
    d, s = (
        torch.randn(B, 3, SIZE, SIZE, generator=gen),
        torch.randn(B, 3, SIZE, SIZE, generator=gen),
    )
    labels = torch.randint(510, (B,), generator=gen)
    prefixes = (net.frozen_prefix(d), net.frozen_prefix(s)) if cached else None
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])
    times = []
    for _ in range(4):
        t = time.perf_counter()
        parts = training_losses(net, obj, d, s, labels, prefixes)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def main() -> None:
    torch.set_num_threads(2)
    rows = [
        ("full, cached, crop_rows 8", model(), objective(crop_rows=8), True),
        ("full, cached, crop_rows 16", model(), objective(crop_rows=16), True),
        ("no IRN, cached, crop_rows 8", model(irn=False), objective(crop_rows=8), True),
        ("no MUML, cached", model(muml=False), objective(), True),
        ("no IRN, no MUML, cached", model(irn=False, muml=False), objective(), True),
        ("full, live, crop_rows 8", model(), objective(crop_rows=8), False),
    ]
    for name, net, obj, cached in rows:
        print(f"{name}: {step_seconds(net, obj, cached):.2f} s/step", flush=True)


if __name__ == "__main__":
    main()
