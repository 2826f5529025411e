"""Figures: IRN reconstructions, per-unit attention maps with their crop boxes, retrieval grids and
training curves; and ``imlnet visualize``.

Every figure function returns a matplotlib ``Figure`` (Agg backend, no screen needed) and
:func:`save_figure` writes it atomically as PNG.

    imlnet visualize drone/0001/image-01.jpeg --checkpoint runs/ckpt [--satellite sat.jpg]
        [--gallery test/gallery_satellite] [--k 5] [--out runs/visualize]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imlnet.cliargs import add_common, resolve_device
from imlnet.errors import DatasetLayoutError
from imlnet.inference import embed, load_model, read_image
from imlnet.io import atomic_path


def _plt():
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
    _plt().close(fig)
    return path


def reconstruction_figure(
    drones: torch.Tensor,
    satellites: torch.Tensor | None,
    recons: torch.Tensor,
    normalized: bool = True,
):
    """Rows: drone input, IRN reconstruction, target satellite image (left out when None).

    Inputs ``(B, 3, H, W)``.
    """
    plt = _plt()
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
    plt = _plt()
    from matplotlib.patches import Rectangle

    n = len(maps) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.6), squeeze=False)
    rgb = to_numpy_image(image, normalized)
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title(title, fontsize=8)
    for k, (m, box, name) in enumerate(zip(maps, boxes, names, strict=True), start=1):
        ax = axes[0, k]
        ax.imshow(rgb)
        ax.imshow(m.detach().float().cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        x1, y1, x2, y2 = (float(v) for v in box)  # pixel edges; imshow puts pixel centres on
        ax.add_patch(  # integers, so the edge of pixel 0 is at -0.5
            Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=2, ec="white")
        )
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
    plt = _plt()
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
    plt = _plt()
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="imlnet visualize",
        description="IRN reconstruction and per-unit attention maps of an image; with --gallery, "
        "the top-k retrieval grid of the query.",
    )
    ap.add_argument("images", nargs="+", help="drone images (queries)")
    ap.add_argument("--checkpoint", required=True, help="folder written by save_pretrained")
    ap.add_argument(
        "--satellite",
        help="the satellite image of the same place (reconstruction "
        "target shown beside the reconstruction)",
    )
    ap.add_argument(
        "--gallery",
        help="folder of satellite images, flat or <id>/<file>; with <id> folders, a query in a "
        "folder of the same id has its true match framed green",
    )
    ap.add_argument("--k", type=int, default=5, help="gallery images shown per query")
    ap.add_argument(
        "--label",
        type=int,
        default=None,
        help="class whose CAM to show (default: the model's prediction)",
    )
    ap.add_argument("--out", default="runs/visualize")
    add_common(ap, image_size=None, batch_size=32, device=True)
    return ap


def _note(message: str) -> None:
    print(f"imlnet visualize: note: {message}", file=sys.stderr)


def _thumbnail(path: Path) -> np.ndarray:
    """``(H, W, 3)`` float in [0, 1] of an image file, for display."""
    return np.asarray(read_image(path), dtype=np.float32) / 255.0


def _gallery_files(root: Path) -> tuple[list[Path], list[str | None]]:
    """Image files under ``root`` (sorted) and their id: the sub-folder (``<id>/<file>``), or
    None for a file directly in ``root``."""
    from imlnet.data.layout import IMAGE_EXTENSIONS, is_image_file, require_dir

    require_dir(root, "--gallery must be a folder of satellite images, flat or <id>/<file>.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        raise DatasetLayoutError(
            f"{root}: no gallery images ({'/'.join(sorted(IMAGE_EXTENSIONS))}) in it or its "
            "sub-folders; pass a folder of satellite images"
        )
    ids = [p.relative_to(root).parts[0] if p.parent != root else None for p in files]
    return files, ids


def _output_stems(paths: Sequence[Path]) -> list[str]:
    """File name stem of each query's figures: the image's stem, prefixed by its folder where
    stems repeat (University-1652 names the drone images of every building image-NN)."""
    counts = Counter(p.stem for p in paths)
    stems = [f"{p.parent.name}_{p.stem}" if counts[p.stem] > 1 else p.stem for p in paths]
    repeats = Counter(stems)  # the same folder name and stem in two places: number them
    return [f"{s}_{i}" if repeats[s] > 1 else s for i, s in enumerate(stems)]


def _retrieval(
    query: torch.Tensor,
    descriptor: torch.Tensor,
    gallery: np.ndarray,
    files: Sequence[Path],
    ids: Sequence[str | None],
    query_id: str,
    k: int,
    title: str,
):
    """Top-k grid of one query ``(3, H, W)`` (normalised) by cosine similarity of its
    descriptor ``(D,)`` to the gallery's ``(N, D)``; true matches marked when ids are known."""
    q = descriptor.detach().float().cpu().numpy()
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    scores = g @ (q / max(float(np.linalg.norm(q)), 1e-12))
    order = np.argsort(-scores, kind="stable")
    top = order[:k]
    correct = None
    if query_id in ids:
        correct = np.array([[ids[j] == query_id for j in top]])
        rank = next(r for r, j in enumerate(order) if ids[j] == query_id)
        title += f"\nbuilding {query_id}, true match #{rank + 1}"
    images = [_thumbnail(files[j]) for j in top]
    return retrieval_grid([to_numpy_image(query)], [images], correct, scores[top][None], [title])


def main(argv: Sequence[str] | None = None) -> int:
    """``imlnet visualize IMAGES... --checkpoint CKPT``: figures per drone image into ``--out``.

    Per image: ``<stem>_reconstruction.png`` (drone, IRN reconstruction, ``--satellite``),
    ``<stem>_attention.png`` (CAM and crop box of each unit and of their sum, for ``--label`` or
    the predicted class) and, with ``--gallery``, ``<stem>_retrieval.png`` (top-k gallery
    images). A model without IRN or MUML skips the figure it cannot draw, with a note.

    Raises:
        ImageReadError: an image is missing or cannot be decoded (named).
        DatasetLayoutError: ``--gallery`` is not a folder or holds no image.
        CheckpointError: ``--checkpoint`` is not a model folder written by save_pretrained.
    """
    from imlnet.models.imlnet import CROP_NAMES

    ap = build_parser()
    args = ap.parse_args(argv)
    if args.k < 1 or args.batch_size < 1:
        ap.error("--k and --batch-size must be >= 1")
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        ap.error(f"--image-size must be a positive multiple of 32, got {args.image_size}")
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    queries = [Path(p) for p in args.images]
    drones = [read_image(p) for p in queries]  # every input is checked before the model loads
    satellite = read_image(Path(args.satellite)) if args.satellite else None
    files, ids = _gallery_files(Path(args.gallery)) if args.gallery else ([], [])
    loaded = load_model(args.checkpoint, device, image_size=args.image_size)
    model, transform = loaded.model, loaded.transform
    if args.label is not None and not 0 <= args.label < model.num_classes:
        ap.error(f"--label must be a class of the model, 0..{model.num_classes - 1}")
    if not (model.irn_enabled or model.muml_enabled or files):
        ap.error(
            f"{args.checkpoint}: the model has neither IRN nor MUML heads, so only a retrieval "
            "grid can be drawn: pass --gallery"
        )
    if not model.irn_enabled:
        _note("the model has no IRN (irn=False): no reconstruction figures")
    if not model.muml_enabled:
        _note(
            "the model has no MUML heads (muml=False): no attention figures (the CAMs are "
            "computed from the unit classifiers)"
        )
    gallery = None
    if files:  # the evaluation's features (image + mirror), so the grid ranks as it does
        gallery = embed(
            model,
            files,
            "satellite",
            transform=transform,
            batch_size=args.batch_size,
            device=device,
            progress=True,
        ).numpy()
    sat = transform(satellite)[None] if satellite is not None else None
    out = Path(args.out)
    for path, stem, image in zip(queries, _output_stems(queries), drones, strict=True):
        x = transform(image)[None].to(device)
        written = []
        with torch.no_grad():
            output = model(x, "drone")
            if output.reconstruction is not None:
                fig = reconstruction_figure(x.cpu(), sat, output.reconstruction.cpu())
                written.append(save_figure(fig, out / f"{stem}_reconstruction.png"))
            if model.muml_enabled:
                label = int(output.logits.argmax(1)) if args.label is None else args.label
                labels = torch.tensor([label], device=device)
                maps, boxes = model.attention(x, labels, "drone", output)
                fig = attention_figure(
                    x[0].cpu(),
                    list(maps[:, 0].cpu()),
                    boxes[:, 0].cpu(),
                    CROP_NAMES,
                    title=f"{path.name}, class {label}",
                )
                written.append(save_figure(fig, out / f"{stem}_attention.png"))
            if gallery is not None:
                fig = _retrieval(
                    x[0].cpu(),
                    embed(model, x, "drone")[0],
                    gallery,
                    files,
                    ids,
                    path.parent.name,
                    min(args.k, len(files)),
                    path.name,
                )
                written.append(save_figure(fig, out / f"{stem}_retrieval.png"))
        for figure_path in written:
            print(figure_path)
    return 0
