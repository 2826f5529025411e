"""Descriptor network speed: torch eager against onnxruntime, side by side, on the CPU.

For each model (the demo's: EfficientNet-Lite0 at 128 px; ResNet-50 at 256 px), the descriptor
network (what ``imlnet export --onnx`` writes: image -> descriptor, no mirror sum) runs in torch
eager mode (``inference_mode``) and in onnxruntime, at batch 1 and 16, with 1 and 2 threads.
The two runtimes alternate call by call within each round (which goes first alternates per
round), so machine noise falls on both alike; the table gives the median latency per call
(p50), the p95 and images per second at the median, and the onnxruntime / torch speed-up.

    python bench/onnx_speed.py [--model runs/demo/model] [--rounds 5] [--calls 4]

Weights are random when no model folder is given (speed does not depend on them); the ONNX
files are written to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imlnet.export import export_onnx
from imlnet.inference import LoadedModel, eval_transform
from imlnet.io import write_json
from imlnet.models.imlnet import IMLNet
from imlnet.runtime import OnnxDescriptor

REPO = Path(__file__).resolve().parents[1]


def demo_model(folder: str | None) -> tuple[str, IMLNet, int]:
    if folder and Path(folder, "config.json").is_file():
        model = IMLNet.from_pretrained(folder)
        return "demo (Lite0, its weights)", model, model.input_size(128)
    import yaml

    from imlnet.resources import config_path

    recipe = yaml.safe_load(config_path("demo.yaml").read_text())["model"]["model"]["init_args"]
    init = {**recipe, "pretrained": False}
    return "demo (Lite0, random weights)", IMLNet(510, **init), 128


def resnet50() -> tuple[str, IMLNet, int]:
    return "ResNet-50", IMLNet(701, backbone="resnet50", pretrained=False), 256


def measure(torch_model: IMLNet, runtime: OnnxDescriptor, size: int, batch: int, args) -> dict:
    x = torch.rand(batch, 3, size, size)
    runs = {
        "torch": lambda: torch_model.encode(x, "drone"),
        "onnxruntime": lambda: runtime.encode(x, "drone"),
    }
    for fn in runs.values():  # warm-up (allocations, kernels, onnxruntime's arena)
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.rounds):
        for _ in range(args.calls):
            for name in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, values in times.items():
        p50, p95 = np.percentile(values, [50, 95])
        out[name] = {
            "p50_ms": round(1000 * p50, 2),
            "p95_ms": round(1000 * p95, 2),
            "images_per_s": round(batch / p50, 1),
            "calls": len(values),
        }
    out["speedup_onnxruntime"] = round(out["torch"]["p50_ms"] / out["onnxruntime"]["p50_ms"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "runs" / "demo" / "model"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=4, help="calls per runtime and round")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "onnx_speed.json"))
    args = ap.parse_args()
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, size in (demo_model(args.model), resnet50()):
            model.eval()
            loaded = LoadedModel(model, size, eval_transform(size))
            onnx_file = export_onnx(loaded, Path(tmp) / "m.onnx", image_size=size)
            for threads in args.threads:
                torch.set_num_threads(threads)
                runtime = OnnxDescriptor(onnx_file, threads=threads)
                for batch in args.batches:
                    with torch.inference_mode():
                        result = measure(model, runtime, size, batch, args)
                    row = {"model": name, "size": size, "threads": threads, "batch": batch}
                    rows.append({**row, **result})
                    t, o = result["torch"], result["onnxruntime"]
                    print(
                        f"{name:<28} {size:>4}px threads {threads} batch {batch:>2}: torch "
                        f"p50 {t['p50_ms']:8.1f} ms ({t['images_per_s']:6.1f} img/s), "
                        f"onnxruntime p50 {o['p50_ms']:8.1f} ms ({o['images_per_s']:6.1f} "
                        f"img/s): x{result['speedup_onnxruntime']}",
                        flush=True,
                    )
    report = {
        "command": "python bench/onnx_speed.py",
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "rows": rows,
    }
    write_json(args.out, report)
    print(f"load average {report['load_average_before']} -> {report['load_average_after']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
