"""A model's retrieval on a benchmark's test views, satellite descriptors of one pass and pooled
over the four turns by 90 degrees (official protocol, flip sum on both sides).

    python bench/turns_eval.py runs/demo/model runs/demo/data

``rot4`` sums, per satellite image, the flip-summed unit descriptors of the image at each turn
and normalises the sum (``IMLNet(satellite_rotations=4)`` sums the four descriptors first and
adds the flip sum after; the two differ only in where the normalisation falls).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from imlnet.evaluation import evaluate_views
from imlnet.inference import embed, load_model, read_image

VIEWS = ("query_drone", "gallery_satellite", "query_satellite", "gallery_drone")


def files(data: Path, view: str) -> tuple[list[str], torch.Tensor]:
    out, labels = [], []
    for folder in sorted((data / "test" / view).iterdir()):
        for f in sorted(folder.iterdir()):
            out.append(str(f))
            labels.append(int(folder.name))
    return out, torch.tensor(labels)


def main() -> None:
    model_dir, data = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(2)
    loaded = load_model(model_dir)
    loaded.model.satellite_rotations = 1  # the turns are summed here
    plain, turned = {}, {}
    for view in VIEWS:
        paths, labels = files(data, view)
        domain = "satellite" if "satellite" in view else "drone"
        plain[view] = (embed(loaded, paths, domain), labels)
        if domain == "satellite":
            x = torch.stack([loaded.transform(read_image(p)) for p in paths])
            total = sum(
                embed(loaded.model, torch.rot90(x, k, dims=(2, 3)), domain) for k in range(4)
            )
            turned[view] = (F.normalize(total, dim=1), labels)
    for name, views in (("plain", plain), ("rot4", {**plain, **turned})):
        res = evaluate_views(views)
        d, s = res["drone->satellite"], res["satellite->drone"]
        print(
            f"{name} d2s R1 {d['R@1']:.2f} AP {d['AP']:.2f}  s2d R1 {s['R@1']:.2f} AP {s['AP']:.2f}"
        )


if __name__ == "__main__":
    main()
