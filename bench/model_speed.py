"""Model cost: parameter counts and time of one training step / one retrieval batch.

For each configuration (University-1652 baseline, ablation rows, full IML-Net) it builds the model
with random weights (no download), then times one training step of ``IMLNetObjective``: forward of
the drone and satellite originals, MUML crops and their forward passes, reconstruction, all loss
parts, and the backward pass (no optimiser step), as the trainer runs it. It also times ``encode``
(descriptor only, eval mode, no gradients) of one batch of images. Medians over ``--repeats``
timed runs after ``--warmup`` untimed training steps (and one untimed encode); the training
throughput is reported as drone+satellite pairs per second (batch / median step time). Prints a
Markdown table and writes bench/results/model_speed.json.

    python bench/model_speed.py                                    # resnet50, 256 px, batch 8
    python bench/model_speed.py --size 128 --batch 4 --configs baseline imlnet
    python bench/model_speed.py --device cuda --precision bf16 --channels-last
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from imlnet.io import write_json
from imlnet.losses import IMLNetObjective
from imlnet.models import ARCHITECTURES, IMLNet
from imlnet.training import training_losses

#: name -> (model switches, objective switches)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "baseline": ({"irn": False, "muml": False, "pool": "avg"}, {"triplet": "none"}),
    "drcl": ({"irn": False, "muml": False}, {"triplet": "drcl"}),
    "irn": ({"irn": True, "muml": False}, {"triplet": "none"}),
    "muml": ({"irn": False, "muml": True}, {"triplet": "none"}),
    "imlnet": ({"irn": True, "muml": True}, {"triplet": "drcl"}),
    "imlnet-random": ({"irn": True, "muml": True}, {"triplet": "drcl", "crop_units": "random"}),
}


def count(module: torch.nn.Module | None) -> int:
    """Parameters of ``module`` (0 for None)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def bench_config(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model_kw, loss_kw = CONFIGS[name]
    torch.manual_seed(0)
    model = IMLNet(args.classes, backbone=args.backbone, **model_kw).to(device)
    objective = IMLNetObjective(**loss_kw).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    drone = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
    sat = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
    labels = (torch.arange(args.batch) % max(1, args.batch // 2)).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        with amp:
            parts = training_losses(model, objective, drone, sat, labels)
        parts["total"].backward()

    def encode() -> None:
        with torch.no_grad(), amp:
            model.encode(drone, "drone")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    train = timed(train_step, device, args.repeats, args.warmup)
    model.eval()
    enc = timed(encode, device, args.repeats)
    row = {
        "config": name,
        "params_total": count(model),
        "params_encoder": sum(p.numel() for p in model.backbone_parameters()),
        "params_irn": count(model.irn),
        "params_muml": count(model.heads),
        "train_step_s": round(statistics.median(train), 3),
        "train_step_s_all": [round(t, 3) for t in train],
        "images_per_train_step": 2 * args.batch,
        "train_pairs_per_s": round(args.batch / statistics.median(train), 3),
        "encode_ms_per_image": round(1000 * statistics.median(enc) / args.batch, 2),
    }
    if device.type == "cuda":
        row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["baseline", "imlnet"], choices=list(CONFIGS))
    ap.add_argument("--backbone", default="resnet50", choices=sorted(ARCHITECTURES))
    ap.add_argument("--size", type=int, default=256, help="image side (divisible by 32)")
    ap.add_argument("--batch", type=int, default=8, help="drone/satellite pairs per step")
    ap.add_argument("--classes", type=int, default=701, help="701 = University-1652 train")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [bench_config(name, args, device) for name in args.configs]
    machine = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    settings = {
        k: getattr(args, k) for k in ("backbone", "size", "batch", "classes", "repeats", "warmup")
    }
    settings.update(precision=args.precision, channels_last=args.channels_last)
    write_json(args.out, {"machine": machine, "settings": settings, "rows": rows})
    print(f"{machine} {settings}")
    print(
        "| config | params | encoder | IRN | MUML | train step s | train pairs/s | encode ms/img |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['config']} | {r['params_total']:,} | {r['params_encoder']:,} | "
            f"{r['params_irn']:,} | {r['params_muml']:,} | {r['train_step_s']} | "
            f"{r['train_pairs_per_s']} | "
            f"{r['encode_ms_per_image']} |"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
