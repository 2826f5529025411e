"""Model cost: time of one training step per configuration, side by side, and where it goes.

For each configuration (University-1652 baseline, ablation rows, full IML-Net) it builds the model
with random weights (no download) and times one training step as the trainer runs it
(:func:`imlnet.training.training_losses`: forward of the originals, MUML crops and their pass,
reconstruction, every loss part, and the backward pass; no optimiser step). The configurations
are timed in *interleaved rounds* (round k times every configuration once, in turn), so a change
of machine load hits all of them alike; the table gives the median step time and the median over
rounds of each configuration's ratio to the baseline of the same round. The load average is
printed before and after. ``--profile`` adds a per-part breakdown of one full IML-Net step
(:mod:`step_profile`).

    python bench/model_speed.py --backbone resnet18 --size 64 --batch 16 --classes 40 \\
        --muml-channels 128 --configs baseline imlnet imlnet-random --rounds 5
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
    "infonce": ({"irn": False, "muml": False}, {"triplet": "infonce"}),
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


def clock(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn``."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


class Case:
    """One configuration: its model, objective, batch and step function."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        model_kw, loss_kw = CONFIGS[name]
        self.name, self.device = name, device
        torch.manual_seed(0)
        extra: dict[str, Any] = {}
        if args.muml_channels:
            extra["muml_channels"] = args.muml_channels
        if args.muml_head:
            extra["muml_head"] = args.muml_head
        self.model = IMLNet(args.classes, backbone=args.backbone, **model_kw, **extra).to(device)
        self.objective = IMLNetObjective(**loss_kw).to(device)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt).train()
        g = torch.Generator().manual_seed(0)
        shape = (args.batch, 3, args.size, args.size)
        self.drone = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
        self.sat = torch.randn(shape, generator=g).to(device).contiguous(memory_format=fmt)
        self.labels = (torch.arange(args.batch) % max(1, args.batch // 2)).to(device)
        self.amp = args.precision == "bf16"
        self.times: list[float] = []

    def step(self) -> None:
        self.model.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            parts = training_losses(self.model, self.objective, self.drone, self.sat, self.labels)
        parts["total"].backward()

    def encode_ms_per_image(self, repeats: int) -> float:
        self.model.eval()
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            self.model.encode(self.drone, "drone")
            times = [
                clock(lambda: self.model.encode(self.drone, "drone"), self.device)
                for _ in range(repeats)
            ]
        self.model.train()
        return 1000 * statistics.median(times) / self.drone.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["baseline", "imlnet", "imlnet-random"])
    ap.add_argument("--backbone", default="resnet50", choices=sorted(ARCHITECTURES))
    ap.add_argument("--size", type=int, default=256, help="image side (divisible by 32)")
    ap.add_argument("--batch", type=int, default=8, help="drone/satellite pairs per step")
    ap.add_argument("--classes", type=int, default=701, help="701 = University-1652 train")
    ap.add_argument("--muml-channels", type=int, default=None, help="C' (default: the model's)")
    ap.add_argument("--muml-head", default=None, help="the model's muml_head (default: its own)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--profile", action="store_true", help="per-part profile of the full step")
    ap.add_argument("--profile-repeats", type=int, default=3, help="timed runs of each part")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "model_speed.json"))
    args = ap.parse_args()
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    if "baseline" not in args.configs:
        args.configs.insert(0, "baseline")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    cases = [Case(name, args, device) for name in args.configs]
    for _ in range(args.warmup):
        for case in cases:
            case.step()
    ratios: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(args.rounds):
        for case in cases:
            case.times.append(clock(case.step, device))
        base = cases[0].times[-1]
        for case in cases:
            ratios[case.name].append(case.times[-1] / base)
    load_after = os.getloadavg()
    rows = []
    for case in cases:
        m = case.model
        rows.append(
            {
                "config": case.name,
                "params_total": count(m),
                "params_encoder": sum(p.numel() for p in m.backbone_parameters()),
                "params_irn": count(m.irn),
                "params_muml": count(m.heads),
                "train_step_s": round(statistics.median(case.times), 3),
                "train_step_s_all": [round(t, 3) for t in case.times],
                "ratio_to_baseline": round(statistics.median(ratios[case.name]), 2),
                "ratio_all": [round(r, 2) for r in ratios[case.name]],
                "encode_ms_per_image": round(case.encode_ms_per_image(3), 2),
            }
        )
    profile = None
    if args.profile:
        from step_profile import profile_step, profile_table

        full = next((c for c in cases if c.name == "imlnet"), None) or Case("imlnet", args, device)
        profile = profile_step(
            full.model, full.objective, full.drone, full.sat, full.labels, args.profile_repeats
        )
    machine = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    settings = {
        k: getattr(args, k)
        for k in ("backbone", "size", "batch", "classes", "muml_channels", "rounds", "warmup")
    }
    settings.update(precision=args.precision, channels_last=args.channels_last)
    settings.update(muml_head=args.muml_head)
    write_json(
        args.out, {"machine": machine, "settings": settings, "rows": rows, "profile": profile}
    )
    print(f"{machine}\n{settings}")
    print(f"load average before {load_before}, after {load_after}")
    print("| config | params | IRN | MUML | step s (median) | x baseline (median of rounds) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['config']} | {r['params_total']:,} | {r['params_irn']:,} | "
            f"{r['params_muml']:,} | {r['train_step_s']} | {r['ratio_to_baseline']} |"
        )
    if profile is not None:
        print(profile_table(profile))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
