"""``imlnet visualize``: IRN reconstruction, per-unit attention maps and the retrieval grid of
drone images, through the one inference path (:mod:`imlnet.inference`).

    imlnet visualize drone/0001/image-01.jpeg --checkpoint runs/ckpt [--satellite sat.jpg]
        [--gallery test/gallery_satellite] [--k 5] [--out runs/visualize]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from imlnet.cliargs import add_common, resolve_device
from imlnet.errors import DatasetLayoutError
from imlnet.inference import embed, load_model, read_image
from imlnet.viz import (
    attention_figure,
    reconstruction_figure,
    retrieval_grid,
    save_figure,
    to_numpy_image,
)


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
