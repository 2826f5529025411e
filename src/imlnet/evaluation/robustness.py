"""The University-WX weather protocol on any dataset in the University-1652 layout.

``imlnet evaluate ... --corrupt wx`` corrupts the *drone* images (``query_drone`` and
``gallery_drone``) on the fly with each condition of :mod:`imlnet.evaluation.corruption`, embeds
them (once per image and condition), reuses the clean satellite features, and reports each
condition, the mean over the conditions (University-WX papers report the mean over all ten,
``normal`` included) and the drop from the clean result. Nothing is written into the dataset;
``save_dir`` writes the corrupted images as PNG under ``<save_dir>/<condition>/<view>/<id>/``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from imlnet.evaluation.corruption import CONDITIONS, corrupt, parse_conditions
from imlnet.evaluation.features import evaluate_views, extract_features
from imlnet.evaluation.protocol import DIRECTIONS, METRICS, Protocol
from imlnet.inference import read_image

#: The views University-WX corrupts.
DRONE_VIEWS: tuple[str, ...] = ("query_drone", "gallery_drone")


class CorruptedView(torch.utils.data.Dataset):
    """A test view whose images are corrupted with one condition before ``transform``.

    Args:
        samples: ``(path, label)`` per image (a ViewDataset's ``samples``).
        condition: a name from :data:`~imlnet.evaluation.corruption.CONDITIONS`.
        root: dataset root; each image's corruption is seeded by its path relative to it.
        transform: PIL image -> ``(3, H, W)``, the model's evaluation transform.
        seed: the user's seed.
        save_dir: if given, the corrupted image is also written there (PNG, atomically).
        view: the view's folder name (used in ``save_dir`` paths).

    Items are ``{"image", "label", "path"}`` as the test datasets'.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        condition: str,
        root: str | Path,
        transform: Callable[[Image.Image], Tensor],
        *,
        seed: int = 0,
        save_dir: str | Path | None = None,
        view: str = "query_drone",
    ) -> None:
        self.samples, self.condition = list(samples), parse_conditions([condition])[0]
        self.root, self.transform, self.seed = Path(root), transform, int(seed)
        self.save_dir, self.view = (Path(save_dir) if save_dir else None), view

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, path: Path) -> str:
        """The image's identity for seeding: its path below the dataset root, POSIX style."""
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return Path(path).as_posix()

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        pixels = corrupt(np.asarray(read_image(path)), self.condition, self.key(path), self.seed)
        image = Image.fromarray(pixels)
        if self.save_dir is not None:
            from imlnet.io import atomic_path

            target = self.save_dir / self.condition / self.view / Path(path).parent.name
            with atomic_path(target / f"{Path(path).stem}.png") as tmp:
                image.save(tmp, format="PNG")
        return {"image": self.transform(image), "label": int(label), "path": str(path)}


def corrupted_features(
    model: Any,
    datasets: Mapping[str, Any],
    conditions: Sequence[str],
    root: str | Path,
    transform: Callable[[Image.Image], Tensor],
    *,
    seed: int = 0,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    save_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    """condition -> drone view -> ``(features (N, D), labels (N,))`` of the corrupted images.

    ``normal`` is skipped (it is the clean features). Only the views of
    :data:`DRONE_VIEWS` present in ``datasets`` (view -> a dataset with ``samples``) are done.
    """
    out: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    for condition in parse_conditions(conditions):
        if condition == "normal":
            continue
        out[condition] = {}
        for view in DRONE_VIEWS:
            if view not in datasets:
                continue
            ds = CorruptedView(datasets[view].samples, condition, root, transform, seed=seed,
                               save_dir=save_dir, view=view)  # fmt: skip
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
            out[condition][view] = extract_features(
                model, loader, domain="drone", device=device, progress=progress
            )
    return out


def robustness(
    clean: Mapping[str, tuple[Any, Any]],
    corrupted: Mapping[str, Mapping[str, tuple[Any, Any]]],
    conditions: Sequence[str],
    *,
    protocol: Protocol = "official",
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Metrics per condition, their mean and the drop from clean, per direction.

    Args:
        clean: view -> ``(features, labels)`` of the four clean test views.
        corrupted: condition -> drone view -> ``(features, labels)`` (from
            :func:`corrupted_features`); satellite views come from ``clean``.
        conditions: the conditions to report (``normal`` = the clean result).

    Returns:
        ``{"clean": {direction: metrics}, "conditions": {condition: {direction: metrics}},
        "summary": {direction: {"mean R@1", "mean AP", "drop R@1", "drop AP"}}}``; the mean is
        over ``conditions``, the drop is clean minus mean (points).
    """
    base = evaluate_views(clean, protocol, device=device)
    per: dict[str, dict[str, dict[str, float]]] = {}
    for condition in parse_conditions(conditions):
        if condition == "normal":
            per[condition] = base
            continue
        views = {**clean, **corrupted[condition]}
        per[condition] = evaluate_views(views, protocol, device=device)
    summary = {}
    for direction, _, _ in DIRECTIONS:
        rows = [per[c][direction] for c in per if direction in per[c]]
        if not rows or direction not in base:
            continue
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("R@1", "AP")}
        summary[direction] = {
            "mean R@1": mean["R@1"],
            "mean AP": mean["AP"],
            "drop R@1": base[direction]["R@1"] - mean["R@1"],
            "drop AP": base[direction]["AP"] - mean["AP"],
        }
    return {"clean": base, "conditions": per, "summary": summary}


def format_robustness(result: Mapping[str, Any]) -> str:
    """Markdown: one row per condition and direction, then the robustness summary."""
    head = "| condition | direction | " + " | ".join(METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 2) + "|"]
    rows = [("clean", result["clean"]), *result["conditions"].items()]
    for condition, directions in rows:
        for direction, m in directions.items():
            cells = " | ".join(f"{m[k]:.2f}" for k in METRICS)
            lines.append(f"| {condition} | {direction} | {cells} |")
    n = len(result["conditions"])
    lines += ["", f"Robustness (mean over {n} conditions; drop = clean - mean, in points):", ""]
    lines += ["| direction | mean R@1 | mean AP | drop R@1 | drop AP |", "|---|---|---|---|---|"]
    for direction, s in result["summary"].items():
        lines.append(
            f"| {direction} | {s['mean R@1']:.2f} | {s['mean AP']:.2f} | "
            f"{s['drop R@1']:.2f} | {s['drop AP']:.2f} |"
        )
    return "\n".join(lines)


def robustness_figure(result: Mapping[str, Any]) -> Any:
    """Bar chart of R@1 and AP per condition (drone->satellite and satellite->drone)."""
    from imlnet.viz import pyplot

    plt = pyplot()
    names = ["clean", *result["conditions"]]
    rows = [result["clean"], *result["conditions"].values()]
    directions = [d for d, _, _ in DIRECTIONS if d in result["clean"]]
    fig, axes = plt.subplots(1, len(directions), figsize=(5.5 * len(directions), 3.4),
                             squeeze=False)  # fmt: skip
    xs = np.arange(len(names))
    for ax, direction in zip(axes[0], directions, strict=True):
        for j, (key, colour) in enumerate((("R@1", "#2166ac"), ("AP", "#92c5de"))):
            ys = [r[direction][key] for r in rows]
            ax.bar(xs + (j - 0.5) * 0.4, ys, 0.4, label=key, color=colour)
        mean = result["summary"].get(direction, {}).get("mean R@1")
        if mean is not None:
            ax.axhline(mean, color="#b2182b", lw=1, ls="--", label=f"mean R@1 {mean:.1f}")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_title(direction, fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def conditions_figure(
    image: np.ndarray, key: str = "example", seed: int = 0, conditions: Sequence[str] = CONDITIONS
) -> Any:
    """One ``(H, W, 3)`` uint8 image under each condition, in a grid of five columns."""
    from imlnet.viz import pyplot

    plt = pyplot()
    names = parse_conditions(conditions)
    rows = -(-len(names) // 5)
    fig, axes = plt.subplots(rows, 5, figsize=(12.5, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, condition in zip(axes.flat, names, strict=False):
        ax.imshow(corrupt(image, condition, key, seed))
        ax.set_title(condition, fontsize=10)
    fig.tight_layout()
    return fig


def corruption_report(
    model: Any,
    datasets: Mapping[str, Any],
    root: str | Path,
    transform: Callable[[Image.Image], Tensor],
    *,
    clean: Mapping[str, tuple[Any, Any]],
    conditions: str | Sequence[str] = "wx",
    seed: int = 0,
    protocol: Protocol = "official",
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    save_corrupted: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The weather protocol end to end: corrupted features, metrics, summary, JSON and PNG.

    Args:
        model: the model (``encode(x, "drone")``), in eval mode.
        datasets: view -> test dataset (with ``samples``) of at least the drone views.
        root: the dataset root (corruption seeds use paths relative to it).
        transform: the model's evaluation transform (``LoadedModel.transform``).
        clean: view -> ``(features, labels)`` of the four clean views (already extracted).
        conditions: ``"wx"`` or names (see :func:`~imlnet.evaluation.corruption.parse_conditions`).
        seed: corruption seed.
        out: folder for ``corruption.json`` and ``corruption.png`` (None: nothing written).
        save_corrupted: also write every corrupted image there.

    Returns:
        :func:`robustness`'s dictionary plus ``"table"`` (Markdown) and ``"files"``.
    """
    from imlnet.io import write_json
    from imlnet.viz import save_figure

    names = parse_conditions(conditions)
    feats = corrupted_features(
        model, datasets, names, root, transform, seed=seed, batch_size=batch_size,
        workers=workers, device=device, save_dir=save_corrupted, progress=progress,
    )  # fmt: skip
    result = robustness(clean, feats, names, protocol=protocol)
    report = {**result, "table": format_robustness(result), "files": []}
    if out is not None:
        out = Path(out)
        write_json(out / "corruption.json", {"protocol": protocol, "seed": seed, **result,
                                             "source": "University-WX conditions"})  # fmt: skip
        save_figure(robustness_figure(result), out / "corruption.png")
        report["files"] = [str(out / "corruption.json"), str(out / "corruption.png")]
    return report


__all__ = [
    "CONDITIONS",
    "DRONE_VIEWS",
    "CorruptedView",
    "conditions_figure",
    "corruption_report",
    "robustness",
]
