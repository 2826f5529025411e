"""Retrieval among a model's own training places: drone views of the first N training places
against their satellite images (official protocol), to tell a model that does not fit its
training places from one that does not carry what it fits to new ones.

    python bench/train_places_eval.py runs/demo/model runs/demo/data 122
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from imlnet.evaluation import evaluate_views
from imlnet.inference import embed, load_model


def main() -> None:
    model_dir, data, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    loaded = load_model(model_dir)
    views = {}
    for view, domain in (("query_drone", "drone"), ("gallery_satellite", "satellite")):
        paths, labels = [], []
        for folder in sorted((data / "train" / domain).iterdir())[:n]:
            for f in sorted(folder.iterdir()):
                paths.append(str(f))
                labels.append(int(folder.name))
        views[view] = (embed(loaded, paths, domain), torch.tensor(labels))
    r = evaluate_views(views)["drone->satellite"]
    print(f"training places {n}: d2s R1 {r['R@1']:.2f} AP {r['AP']:.2f}")


if __name__ == "__main__":
    main()
