"""How much of the image MUML's crop boxes keep: a trained model's boxes on training views.

For each unit's CAM and the combined map, the share of boxes that are the whole image and the
mean box area (share of the image), over the first drone and satellite view of N training
places, at the model's size and at half of it; then, over all five maps of the drone views at
the model's size, the share of pixels above each threshold theta and the boxes it would give.

    python bench/muml_boxes.py runs/demo/model runs/demo/data [N]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from imlnet.inference import load_model
from imlnet.models.muml import CROP_NAMES, mask_boxes
from imlnet.report import _training_batch


def area(boxes: torch.Tensor, side: int) -> torch.Tensor:
    """Share of a ``side`` x ``side`` image that each ``(..., 4)`` box covers."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / side**2


def main() -> None:
    torch.set_num_threads(2)
    model = load_model(sys.argv[1], device="cpu").model
    data, n = Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 64
    size = model.input_size()
    drone_maps = None  # the drone views' maps at the model's size, for the thresholds below
    for side in (size, size // 2):
        batch = _training_batch(data, side, n)
        for domain in ("drone", "satellite"):
            with torch.no_grad():
                maps, boxes = model.attention(batch[domain], batch["label"], domain)  # (5, B, 4)
            if side == size and domain == "drone":
                drone_maps = maps.reshape(-1, size, size)
            share = area(boxes, side)
            full = (share > 0.999).float().mean(1)
            cells = ", ".join(
                f"{name} {100 * f:.0f} % whole ({100 * a:.0f} % area)"
                for name, f, a in zip(
                    CROP_NAMES, full.tolist(), share.mean(1).tolist(), strict=True
                )
            )
            print(f"{side} px, {domain}, {len(batch['label'])} places: {cells}")
    assert drone_maps is not None
    for theta in (0.5, 0.7, 0.8, 0.9):
        share = area(mask_boxes(drone_maps, theta, model.crop_padding), size)
        print(
            f"theta {theta}: {100 * float((drone_maps > theta).float().mean()):.0f} % of pixels "
            f"above, boxes {100 * float(share.mean()):.0f} % of the image, "
            f"{100 * float((share > 0.999).float().mean()):.0f} % whole"
        )


if __name__ == "__main__":
    main()
