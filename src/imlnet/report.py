"""The demo's report: its figures (PNG) and ``report.md`` with every table and figure.

The figures come from :mod:`imlnet.viz` (reconstructions, attention, retrieval, curves), the
evaluation's per-condition and weather charts from :mod:`imlnet.evaluation.multidomain`, and
the localisation maps from ``imlnet localize`` (:mod:`imlnet.geo.mapping`); this module only
picks the samples, lays the report out and writes it atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from imlnet.io import atomic_write

#: Report sections: figure key -> title.
FIGURE_TITLES = {
    "curves": "Training curves",
    "reconstruction": "IRN: drone input, reconstruction, satellite target (at its turn nearest "
    "the reconstruction)",
    "attention_drone": "MUML: per-unit attention maps and crop boxes (drone)",
    "attention_satellite": "MUML: per-unit attention maps and crop boxes (satellite)",
    "retrieval": "Retrieval: drone queries and their top-5 satellite images (green = true match)",
}


def _training_batch(data: Path, image_size: int, n: int = 4) -> dict[str, torch.Tensor]:
    """The first drone image and the satellite image of ``n`` training buildings, normalised."""
    from imlnet.data.layout import list_images, list_subfolders
    from imlnet.inference import eval_transform, read_image

    transform = eval_transform(image_size)
    buildings = list_subfolders(data / "train" / "satellite")[:n]
    drone, satellite = [], []
    for b in buildings:
        drone.append(transform(read_image(list_images(data / "train" / "drone" / b)[0])))
        satellite.append(transform(read_image(list_images(data / "train" / "satellite" / b)[0])))
    labels = torch.arange(len(buildings))  # class indices: training buildings sorted by name
    return {"drone": torch.stack(drone), "satellite": torch.stack(satellite), "label": labels}


def demo_figures(
    out: Path,
    data: Path,
    model: Any,
    views: Mapping[str, Any],
    *,
    image_size: int | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Draw the demo's model figures into ``out/figures``; return key -> path relative to out.

    ``image_size`` is the side the model was trained at (None: the model's saved
    ``meta["image_size"]``, else 256); the reconstruction and attention figures feed it images
    of that size (at another size the IRN decodes a map of a size it never saw).
    """
    from imlnet import viz

    figs: dict[str, str] = {}
    fig_dir = out / "figures"
    size = image_size or model.input_size()
    batch = _training_batch(data, size)

    def save(key: str, fig) -> None:
        figs[key] = str(viz.save_figure(fig, fig_dir / f"{key}.png").relative_to(out))

    with torch.no_grad():
        output = model(batch["drone"], "drone")
    if output.reconstruction is not None:
        # each target at its turn nearest the reconstruction (what rec_turns=4 scores)
        target = viz.nearest_turns(batch["satellite"], output.reconstruction)
        save(
            "reconstruction",
            viz.reconstruction_figure(batch["drone"], target, output.reconstruction),
        )
    if model.config.get("muml"):
        for name in ("drone", "satellite"):
            image, label = batch[name][:1], batch["label"][:1]
            with torch.no_grad():
                maps, boxes = model.attention(image, label, name)
            names = ["unit 1", "unit 2", "unit 3", "unit 4", "combined"]
            save(
                f"attention_{name}",
                viz.attention_figure(image[0], list(maps[:, 0]), boxes[:, 0], names),
            )
    save(
        "retrieval",
        viz.retrieval_figure(
            views["query_drone"], views["gallery_satellite"], data, n_queries=4, k=5, seed=seed
        ),
    )
    metrics_csv = out / "logs" / "metrics.csv"
    if metrics_csv.exists():
        save("curves", viz.curves_figure(metrics_csv))
    return figs


def _localisation_section(out: Path, loc: Mapping[str, Any]) -> list[str]:
    from imlnet.geo.fixes_io import format_metrics

    titles = {
        "retrieval": "Single views, retrieval alone (`--verify 0`)",
        "verified": "Single views, with geometric verification (`--verify 5`)",
        "flights": "Flights, verification + sequence fusion (`--verify 5 --sequence`)",
    }
    lines = ["## Localisation over a georeferenced world", ""]
    for name, title in titles.items():
        m = loc.get(name)
        if not m:
            continue
        lines += [f"### {title}", "", format_metrics(m), "", f"Wall time {m['wall_s']} s."]
        map_png = out / m["dir"] / "map.png"
        if map_png.is_file():
            rel = map_png.relative_to(out)
            lines += ["", f"![map: {title}]({rel})"]
        lines.append("")
    return lines


def write_demo_report(
    out: Path,
    metrics: Mapping[str, Any],
    figures: Mapping[str, str],
    tables: Mapping[str, str],
) -> Path:
    """Write ``out/report.md``: the run, retrieval, per-condition, weather, localisation."""
    cfg, t, tr = metrics["config"], metrics["timings_s"], metrics["training"]
    lines = [
        "# imlnet demo report",
        "",
        f"Synthetic benchmark: {cfg['locations']} locations x {cfg['views']} drone views at "
        f"{cfg['image_size']} px ({tr['train_buildings']} training buildings; test locations from "
        f"other cities). IML-Net ({metrics['model_params'] / 1e6:.1f} M parameters; recipe "
        f"configs/demo.yaml), {tr['epochs']} epochs = {tr['steps']} steps on the CPU. Total "
        f"{t['total_s'] / 60:.1f} min (synthesis {t['synth_s']:.0f} s, training "
        f"{t['train_s']:.0f} s, evaluation {t['eval_s']:.0f} s, other city "
        f"{t.get('other_city_s', 0):.0f} s, localisation "
        f"{t['localise_s']:.0f} s, report {t['report_s']:.0f} s).",
        "",
        "## Retrieval (official University-1652 protocol, %, last model: no selection on test)",
        "",
        tables["retrieval"],
        "",
        f"Chance R@1 for drone -> satellite: {metrics['chance_R@1_drone->satellite']:.1f} %.",
        "",
    ]
    if "other_city" in tables:
        oc = metrics.get("other_city") or {}
        lines += ["## A city of another seed, another season and weather mix", ""]
        lines += [oc.get("description", ""), "", tables["other_city"], ""]
    if "breakdown" in tables:
        lines += ["## Per condition (drone queries by their own condition)", ""]
        lines += [tables["breakdown"], "", "![per condition](evaluation/breakdown.png)", ""]
    if "corruption" in tables:
        lines += ["## University-WX weather corruptions of the drone images", ""]
        lines += [tables["corruption"], "", "![weather](evaluation/corruption.png)", ""]
    lines += _localisation_section(out, metrics["localisation"])
    for key, title in FIGURE_TITLES.items():
        if key in figures:
            lines += [f"## {title}", "", f"![{title}]({figures[key]})", ""]
    lines += ["## Timings (s)", "", "```", json.dumps(t, indent=2), "```", ""]
    path = out / "report.md"
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(lines))
    return path
