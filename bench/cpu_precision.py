"""The demo's model on a CPU: fp32 or bf16 frozen units, NCHW or channels-last, side by side.

EfficientNet-Lite0 (ImageNet), ``last_stages: dropped``, U1-U3 frozen, 128 px, 64 pairs, 1110
classes, the demo's objective (IRN with ``rec_turns 4``, MUML crops of 8 pairs, DRCL + InfoNCE).
Per setting: ``prefix`` = the frozen units' forward of 64 images (what building the cache
costs per 64 images), ``encode`` = retrieval descriptors of 64 images (evaluation, galleries),
``step`` = one training step from cached prefixes (forward, backward, AdamW). The settings run in
interleaved rounds, so a noisy machine slows them alike; the ratios to ``fp32`` are the result.

    python bench/cpu_precision.py --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from imlnet.losses import IMLNetObjective
from imlnet.models import IMLNet
from imlnet.models.imlnet import native_bf16
from imlnet.training import training_losses

B, SIZE, CLASSES = 64, 128, 1110
SETTINGS = {  # name: (frozen_precision, channels_last)
    "fp32": ("fp32", False),
    "fp32 channels-last": ("fp32", True),
    "bf16 frozen": ("bf16", False),
    "bf16 frozen, channels-last": ("bf16", True),
}


def build(precision: str, channels_last: bool):
    torch.manual_seed(0)
    net = IMLNet(
        CLASSES,
        backbone="tf_efficientnet_lite0",
        pretrained="imagenet",
        last_stages="dropped",
        freeze_units=3,
        muml_channels=128,
        satellite_rotations=4,
        frozen_precision=precision,
    )
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    obj = IMLNetObjective(
        crop_units="random", crop_rows=8, w_id=0.1, w_crop=0.1, w_infonce=1.0, rec_turns=4
    )
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(B, 3, SIZE, SIZE, generator=gen)
    s = torch.randn(B, 3, SIZE, SIZE, generator=gen)
    labels = torch.randint(CLASSES, (B,), generator=gen)
    prefixes = (net.frozen_prefix(d), net.frozen_prefix(s))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad])

    def prefix() -> None:
        net.frozen_prefix(d)

    def encode() -> None:
        net.eval()
        with torch.no_grad():
            net.encode(d, "drone")

    def step() -> None:
        net.train()
        parts = training_losses(net, obj, d, s, labels, prefixes)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()

    return {"prefix": prefix, "encode": encode, "step": step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="JSON of the medians")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"native bf16 on this CPU: {native_bf16('cpu')}; load {os.getloadavg()}", flush=True)
    runs = {name: build(*cfg) for name, cfg in SETTINGS.items()}
    for fns in runs.values():  # warm-up
        for fn in fns.values():
            fn()
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in f} for n, f in runs.items()}
    for _ in range(args.rounds):
        for name, fns in runs.items():
            for what, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name][what].append(time.perf_counter() - t)
    med = {n: {k: statistics.median(v) for k, v in w.items()} for n, w in times.items()}
    base = med["fp32"]
    print("| setting | prefix s (x fp32) | encode s (x fp32) | step s (x fp32) |")
    print("|---|---:|---:|---:|")
    for name, m in med.items():
        cells = [f"{m[k]:.3f} ({base[k] / m[k]:.2f}x)" for k in ("prefix", "encode", "step")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"load after: {os.getloadavg()}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"median_s": med, "rounds": args.rounds, "threads": args.threads}, handle)


if __name__ == "__main__":
    main()
