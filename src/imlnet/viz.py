"""Figures: IRN reconstructions, per-unit attention maps with their crop boxes, retrieval grids and
training curves (the ``imlnet visualize`` command is :mod:`imlnet.visualize`).

Every figure function returns a matplotlib ``Figure`` (Agg backend, no screen needed) and
:func:`save_figure` writes it atomically as PNG.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imlnet.io import atomic_path


def pyplot():
    """matplotlib's pyplot on the Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def to_numpy_image(x: torch.Tensor, normalized: bool = True) -> np.ndarray:
    """``(3, H, W)`` tensor (ImageNet-normalised, or in [0, 1]) -> ``(H, W, 3)`` float in [0, 1]."""
    from imlnet.data.transforms import denormalize

    x = x.detach().float().cpu()
    if normalized:
        x = denormalize(x)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def save_figure(fig, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    pyplot().close(fig)
    return path


def nearest_turns(targets: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """Each ``(B, 3, H, W)`` target turned by the multiple of 90 degrees nearest (least mean
    squared error) its reconstruction, the turn that ``rec_turns=4`` scores."""
    from imlnet.losses.reconstruction import turn_errors

    best = turn_errors(recons, targets).argmin(0).tolist()
    return torch.stack([torch.rot90(t, k, (-2, -1)) for t, k in zip(targets, best, strict=True)])


def reconstruction_figure(
    drones: torch.Tensor,
    satellites: torch.Tensor | None,
    recons: torch.Tensor,
    normalized: bool = True,
):
    """Rows: drone input, IRN reconstruction, target satellite image (left out when None).

    Inputs ``(B, 3, H, W)``.
    """
    plt = pyplot()
    b = drones.shape[0]
    rows = [(drones, "drone"), (recons, "IRN reconstruction")]
    if satellites is not None:
        rows.append((satellites, "satellite"))
    fig, axes = plt.subplots(len(rows), b, figsize=(2.2 * b, 2.2 * len(rows)), squeeze=False)
    for j in range(b):
        for i, (images, title) in enumerate(rows):
            axes[i, j].imshow(to_numpy_image(images[j], normalized))
            axes[i, j].set_axis_off()
            if j == 0:
                axes[i, j].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def attention_figure(
    image: torch.Tensor,
    maps: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    names: Sequence[str],
    normalized: bool = True,
    title: str = "input",
):
    """The image, then each attention map over it with its crop box.

    Args:
        image: ``(3, H, W)``.
        maps: attention maps ``(H, W)`` in [0, 1] (one per unit, then the combined one).
        boxes: ``(len(maps), 4)`` crop boxes ``(x1, y1, x2, y2)`` in pixels.
        names: a title per map.
        title: the title of the input image.
    """
    plt = pyplot()
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    outline = [patheffects.Stroke(linewidth=3.5, foreground="black"), patheffects.Normal()]
    height, width = int(image.shape[-2]), int(image.shape[-1])
    n = len(maps) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.6), squeeze=False)
    rgb = to_numpy_image(image, normalized)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title(title, fontsize=8)
    for k, (m, box, name) in enumerate(zip(maps, boxes, names, strict=True), start=1):
        ax = axes[0, k]
        ax.imshow(rgb)
        ax.imshow(m.detach().float().cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        # pixel edges; imshow puts pixel centres on integers, so the edge of pixel 0 is at
        # -0.5. A box reaching the image's border is drawn half a pixel inside it, so that all
        # four sides show (on the border a white side vanishes into the page); the black
        # outline keeps it visible on light ground.
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, y1 = max(x1 - 0.5, 0.0), max(y1 - 0.5, 0.0)
        x2, y2 = min(x2 - 0.5, width - 1.0), min(y2 - 0.5, height - 1.0)
        rect = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec="white")
        rect.set_path_effects(outline)
        ax.add_patch(rect)
        ax.set_title(name, fontsize=8)
    for ax in axes[0]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def retrieval_grid(
    queries: Sequence[np.ndarray],
    galleries: Sequence[Sequence[np.ndarray]],
    correct: np.ndarray | None,
    scores: np.ndarray | None = None,
    query_titles: Sequence[str] | None = None,
):
    """One row per query: the query then its top-k gallery images, true matches framed green.

    Args:
        queries: ``Q`` images ``(H, W, 3)`` in [0, 1].
        galleries: per query, ``k`` ranked gallery images.
        correct: ``(Q, k)`` bool, True where the gallery item is a true match (green, others
            red); None when the truth is unknown (grey frames).
        scores: optional ``(Q, k)`` similarity scores shown above each gallery image.
    """
    plt = pyplot()
    q = len(queries)
    k = max(len(g) for g in galleries)
    fig, axes = plt.subplots(q, k + 1, figsize=(1.9 * (k + 1), 2.0 * q), squeeze=False)
    for i in range(q):
        axes[i, 0].imshow(queries[i])
        axes[i, 0].set_title(query_titles[i] if query_titles else "query", fontsize=7)
        for j in range(k):
            ax = axes[i, j + 1]
            if j < len(galleries[i]):
                ax.imshow(galleries[i][j])
                colour = "#777777" if correct is None else "#1a9850" if correct[i, j] else "#d73027"
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(4)
                title = f"#{j + 1}" + (f"  {scores[i, j]:.2f}" if scores is not None else "")
                ax.set_title(title, fontsize=7, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
    fig.tight_layout()
    return fig


def retrieval_figure(
    query: tuple[torch.Tensor, torch.Tensor],
    gallery: tuple[torch.Tensor, torch.Tensor],
    root: str | os.PathLike[str],
    *,
    query_view: str = "query_drone",
    gallery_view: str = "gallery_satellite",
    n_queries: int = 4,
    k: int = 5,
    seed: int = 0,
):
    """Retrieval grid for random queries of a University-1652-layout test set.

    ``query`` and ``gallery`` are ``(features, labels)`` in the order of the datasets
    ``University1652Test(root, query_view)`` and ``(root, gallery_view)`` (what
    :func:`imlnet.evaluation.extract_features` returns for them).
    """
    from imlnet.data.university1652 import University1652Test

    qds, gds = University1652Test(root, query_view), University1652Test(root, gallery_view)
    qf, ql = query
    gf, gl = gallery
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ql), generator=gen)[:n_queries]
    scores, top = (qf[pick].float() @ gf.float().T).topk(min(k, len(gl)), dim=1)
    correct = (gl[top] == ql[pick][:, None]).cpu().numpy()

    def image(ds, i: int) -> np.ndarray:
        return to_numpy_image(ds[int(i)]["image"], normalized=False)

    return retrieval_grid(
        [image(qds, i) for i in pick],
        [[image(gds, j) for j in row] for row in top],
        correct,
        scores.cpu().numpy(),
        [f"query {int(ql[i]):04d}" for i in pick],
    )


def curves_figure(metrics_csv: str | os.PathLike[str]):
    """Training losses per epoch and validation metrics from a Lightning ``CSVLogger`` file."""
    plt = pyplot()
    with open(metrics_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        epoch = row.get("epoch")
        if not epoch:
            continue
        for key, value in row.items():
            if value and (
                (key.endswith("_epoch") and key.startswith("train/")) or key.startswith("val/")
            ):
                series.setdefault(key, []).append((float(epoch), float(value)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, pts in sorted(series.items()):
        xs, ys = zip(*pts, strict=True)
        if key.startswith("train/"):
            ax1.plot(
                xs, ys, marker="o", ms=3, label=key.removeprefix("train/").removesuffix("_epoch")
            )
        elif key in {"val/R@1", "val/AP", "val/R@5"}:
            ax2.plot(xs, ys, marker="o", ms=3, label=key.removeprefix("val/"))
    ax1.set_title("training losses (epoch means)", fontsize=9)
    ax1.set_xlabel("epoch")
    ax1.set_yscale("log")
    ax2.set_title("validation, drone -> satellite (%)", fontsize=9)
    ax2.set_xlabel("epoch")
    for ax in (ax1, ax2):
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
