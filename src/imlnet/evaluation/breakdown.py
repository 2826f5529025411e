"""Metrics per condition: season, weather, altitude, pitch (``imlnet evaluate --by ...``).

The features of every image are extracted once; a group's metrics are
:func:`~imlnet.evaluation.protocol.evaluate_retrieval` on a subset of them:

- ``drone->satellite``: the drone *queries* of one group against the full satellite gallery (the
  metrics of those queries within the whole evaluation; their mean over groups, weighted by the
  group sizes, is the overall result);
- ``satellite->drone (gallery: group)``: every satellite query against the drone gallery
  restricted to one group (a second variant: "how well is a building found among the drone
  views taken in fog"); its numbers are not parts of the overall result.

Where the conditions come from: the synthetic benchmark's ``metadata.json`` (per drone view:
``season``, ``weather``, ``altitude_m``, ``pitch_deg``, ``yaw_deg``, ``distance_m``; per
location the target's ``kind``, landmark or ground point, ``imlnet synth --anywhere``), and for
SUES-200 the altitude of each setting (150/200/250/300 m). Continuous fields are binned: by a
step (``altitude=25`` -> 25 m bins aligned on multiples of 25, spanning the data) or by explicit
edges (``pitch=35,40,45,50``: the intervals between them; values outside get their own
``<35`` / ``>=50`` groups). A group without any image is reported with ``n = 0`` and no metrics.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imlnet.errors import DatasetLayoutError, ImlnetError
from imlnet.evaluation.protocol import METRICS, ArrayLike, Protocol, evaluate_retrieval


class UnknownFieldError(ImlnetError, ValueError):
    """A ``--by`` field or ``--bins`` specification that the evaluation does not know."""


@dataclass(frozen=True)
class Field:
    """A condition recorded per drone image.

    Attributes:
        key: its key in the synthetic ``metadata.json`` view records.
        step: default bin width of a continuous field (None: categorical).
        unit: unit shown in bin labels.
        order: preferred order of categorical values (others follow alphabetically).
    """

    key: str
    step: float | None = None
    unit: str = ""
    order: tuple[str, ...] = ()


FIELDS: dict[str, Field] = {
    "season": Field("season", order=("spring", "summer", "autumn", "winter")),
    "weather": Field("weather", order=("clear", "haze", "fog", "rain", "snow", "night")),
    "altitude": Field("altitude_m", 25.0, " m"),
    "pitch": Field("pitch_deg", 5.0, "°"),
    "yaw": Field("yaw_deg", 45.0, "°"),
    "distance": Field("distance_m", 25.0, " m"),
    # the location's kind (imlnet synth --anywhere), given to each of its views
    "target": Field("target", order=("landmark", "point")),
}
D2S, S2D = "drone->satellite", "satellite->drone (gallery: group)"


def parse_fields(spec: str | Sequence[str]) -> list[str]:
    """``"season,weather"`` -> ``["season", "weather"]``.

    Raises:
        UnknownFieldError: a name is not in :data:`FIELDS` (the message lists them).
    """
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in FIELDS]
    if unknown or not names:
        raise UnknownFieldError(
            f"unknown --by field(s) {unknown or spec!r}; choose from {', '.join(FIELDS)}"
        )
    return list(dict.fromkeys(names))


def parse_bins(specs: Sequence[str] | None) -> dict[str, float | list[float]]:
    """``["altitude=30", "pitch=35,40,45"]`` -> ``{"altitude": 30.0, "pitch": [35, 40, 45]}``.

    Raises:
        UnknownFieldError: not ``FIELD=STEP`` or ``FIELD=E1,E2,...`` of a continuous field.
    """
    out: dict[str, float | list[float]] = {}
    for spec in specs or ():
        name, _, value = spec.partition("=")
        field = FIELDS.get(name.strip())
        try:
            numbers = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            numbers = []
        if field is None or field.step is None or not numbers:
            continuous = [n for n, f in FIELDS.items() if f.step is not None]
            raise UnknownFieldError(
                f"--bins {spec!r}: expected FIELD=STEP or FIELD=EDGE1,EDGE2,... with FIELD one "
                f"of {', '.join(continuous)} (e.g. altitude=25 or pitch=35,40,45,50)"
            )
        if len(numbers) == 1:
            if numbers[0] <= 0:
                raise UnknownFieldError(f"--bins {spec!r}: the step must be positive")
            out[name.strip()] = numbers[0]
        else:
            out[name.strip()] = sorted(numbers)
    return out


def _with_target(view: dict[str, Any], location: Mapping[str, Any]) -> dict[str, Any]:
    """A view record with its location's target kind (``target``: landmark or point) when the
    location describes its target (metadata before ``--anywhere`` existed: landmarks)."""
    target = location.get("target")
    if not isinstance(target, Mapping):
        return view
    return {**view, "target": target.get("kind", "landmark")}


def view_conditions(
    root: str | Path, paths: Sequence[str | Path], *, altitude: int | None = None
) -> list[dict[str, Any]]:
    """The recorded conditions of drone images, in the order of ``paths``.

    Args:
        root: the dataset root; its ``metadata.json`` (the synthetic benchmark's) is read when
            ``altitude`` is None.
        paths: drone image files ``.../<building id>/<file>``.
        altitude: SUES-200: the setting's altitude, recorded as ``altitude_m`` of every image.

    Raises:
        DatasetLayoutError: no ``metadata.json``, or an image it does not describe.
    """
    if altitude is not None:
        return [{"altitude_m": float(altitude)} for _ in paths]
    file = Path(root) / "metadata.json"
    if not file.is_file():
        raise DatasetLayoutError(
            f"{file} not found: --by needs the per-view conditions the synthetic benchmark "
            "records there (imlnet synth writes it), or --dataset sues200 for its altitudes"
        )
    try:
        locations = json.loads(file.read_text(encoding="utf-8"))["locations"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetLayoutError(
            f"{file}: not a synthetic benchmark metadata file ({err})"
        ) from err
    table = {
        (bid, view["file"]): _with_target(view, loc)
        for bid, loc in locations.items()
        for view in loc.get("views", ())
    }
    out = []
    for p in paths:
        p = Path(p)
        record = table.get((p.parent.name, p.name))
        if record is None:
            raise DatasetLayoutError(
                f"{file} does not describe {p}; was the dataset regenerated without it?"
            )
        out.append(record)
    return out


def group_values(
    records: Sequence[Mapping[str, Any]], name: str, bins: float | list[float] | None = None
) -> tuple[list[str], list[str]]:
    """Each record's group label for field ``name``, and all labels in display order.

    Raises:
        UnknownFieldError: an unknown field.
        DatasetLayoutError: a record lacks the field.
    """
    field = FIELDS.get(name)
    if field is None:
        parse_fields([name])  # raises
        raise AssertionError  # unreachable
    missing = sum(field.key not in r for r in records)
    if missing:
        raise DatasetLayoutError(
            f"{missing} of {len(records)} images have no {field.key!r} recorded; --by {name} "
            "needs it for every drone image"
        )
    values = [r[field.key] for r in records]
    if field.step is None:
        seen = sorted({str(v) for v in values})
        order = [v for v in field.order if v in seen] + [v for v in seen if v not in field.order]
        return [str(v) for v in values], order
    x = np.asarray(values, dtype=np.float64)
    if isinstance(bins, list):
        edges = list(bins)
    else:
        step = float(bins or field.step)
        lo = math.floor(x.min() / step) * step if len(x) else 0.0
        hi = math.ceil(x.max() / step) * step if len(x) else step
        hi = hi + step if hi <= x.max() else hi  # the top value falls in a half-open bin
        edges = list(np.arange(lo, hi + step / 2, step))
    labels = [f"{_num(a)}-{_num(b)}{field.unit}" for a, b in itertools.pairwise(edges)]
    order = list(labels)
    below, above = f"<{_num(edges[0])}{field.unit}", f">={_num(edges[-1])}{field.unit}"
    index = np.searchsorted(np.asarray(edges), x, side="right") - 1
    out = []
    for i in index:
        out.append(below if i < 0 else above if i >= len(labels) else labels[i])
    order = ([below] if below in out else []) + order + ([above] if above in out else [])
    return out, order


def _num(v: float) -> str:
    return f"{v:g}"


def breakdown(
    views: Mapping[str, tuple[ArrayLike, ArrayLike]],
    conditions: Mapping[str, Sequence[Mapping[str, Any]]],
    fields: Sequence[str],
    *,
    bins: Mapping[str, float | list[float]] | None = None,
    protocol: Protocol = "official",
    device: str | None = None,
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Metrics per group: field -> direction -> group -> ``{"n", "R@1", ..., "AP"}``.

    Args:
        views: view -> ``(features (N, D), labels (N,))`` of the four test views (a direction
            runs when its views are present).
        conditions: ``"query_drone"`` and/or ``"gallery_drone"`` -> one record per image, in the
            features' order (see :func:`view_conditions`).
        fields: names from :data:`FIELDS`.
        bins: per continuous field, a step or explicit edges (see :func:`parse_bins`).
        protocol, device: as for :func:`~imlnet.evaluation.protocol.evaluate_retrieval`.

    Returns:
        ``n`` is the number of queries (drone->satellite) or of drone gallery images
        (satellite->drone) in the group; the metrics are None for an empty group.
    """
    bins = dict(bins or {})
    plan = (
        (D2S, "query_drone", "gallery_satellite", True),
        (S2D, "query_satellite", "gallery_drone", False),
    )
    result: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for name in parse_fields(fields):
        result[name] = {}
        for direction, query, gallery, by_query in plan:
            drone = query if by_query else gallery
            if query not in views or gallery not in views or drone not in conditions:
                continue
            labels, order = group_values(conditions[drone], name, bins.get(name))
            qf, ql = (np.asarray(a) for a in views[query])
            gf, gl = (np.asarray(a) for a in views[gallery])
            if len(labels) != len(ql if by_query else gl):
                raise DatasetLayoutError(
                    f"{drone}: {len(labels)} condition records for {len(ql if by_query else gl)}"
                    " images; pass one record per image, in the features' order"
                )
            table: dict[str, dict[str, Any]] = {}
            member = np.asarray(labels, dtype=object)
            for group in order:
                mask = member == group
                n = int(mask.sum())
                metrics: dict[str, Any] = dict.fromkeys(METRICS)
                if n:
                    args = (
                        (qf[mask], ql[mask], gf, gl) if by_query else (qf, ql, gf[mask], gl[mask])
                    )
                    metrics = evaluate_retrieval(*args, protocol, device=device)
                table[group] = {"n": n, **metrics}
            result[name][direction] = table
    return result


def format_breakdown(result: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> str:
    """Markdown tables, one per field and direction; empty groups show ``-``."""
    blocks = []
    for name, directions in result.items():
        for direction, groups in directions.items():
            head = f"| {name} | n | " + " | ".join(METRICS) + " |"
            lines = [f"{direction}, by {name}", "", head, "|---" * (len(METRICS) + 2) + "|"]
            for group, row in groups.items():
                cells = " | ".join("-" if row[k] is None else f"{row[k]:.2f}" for k in METRICS)
                lines.append(f"| {group} | {row['n']} | {cells} |")
            blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def breakdown_figure(result: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> Any:
    """Bar chart: one panel per field, R@1 and AP per group and direction (matplotlib Figure)."""
    from imlnet.viz import pyplot

    plt = pyplot()
    names = [n for n in result if result[n]]
    cols = min(2, max(1, len(names)))
    rows = -(-max(1, len(names)) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][len(names) :]:
        ax.set_axis_off()
    series = [(d, k) for d in (D2S, S2D) for k in ("R@1", "AP")]
    colours = {(D2S, "R@1"): "#2166ac", (D2S, "AP"): "#92c5de", (S2D, "R@1"): "#b2182b",
               (S2D, "AP"): "#f4a582"}  # fmt: skip
    for ax, name in zip(axes[0], names, strict=False):
        groups = list(next(iter(result[name].values())))
        present = [s for s in series if s[0] in result[name]]
        width = 0.8 / max(1, len(present))
        for j, (direction, key) in enumerate(present):
            rows = result[name][direction]
            ys = [rows.get(g, {}).get(key) or 0.0 for g in groups]
            xs = np.arange(len(groups)) + (j - (len(present) - 1) / 2) * width
            short = "d->s" if direction == D2S else "s->d"
            ax.bar(xs, ys, width, label=f"{short} {key}", color=colours[(direction, key)])
        ax.set_xticks(np.arange(len(groups)))
        counts = result[name].get(D2S) or next(iter(result[name].values()))
        ax.set_xticklabels([f"{g}\n(n={counts[g]['n']})" for g in groups], fontsize=7)
        ax.set_title(f"by {name}", fontsize=9)
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def breakdown_report(
    views: Mapping[str, tuple[ArrayLike, ArrayLike]],
    conditions: Mapping[str, Sequence[Mapping[str, Any]]],
    fields: Sequence[str],
    *,
    bins: Mapping[str, float | list[float]] | None = None,
    protocol: Protocol = "official",
    out: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """:func:`breakdown`, its Markdown table and, with ``out``, ``breakdown.json`` and
    ``breakdown.png`` written there (atomically).

    Returns:
        ``{"results": <breakdown>, "order": {field: [groups in display order]}, "table": str,
        "files": [paths written]}``.
    """
    from imlnet.io import write_json
    from imlnet.viz import save_figure

    results = breakdown(views, conditions, fields, bins=bins, protocol=protocol, device=device)
    # JSON sorts keys: the display order of the groups is kept beside them
    order = {name: list(next(iter(d.values()), {})) for name, d in results.items()}
    report: dict[str, Any] = {
        "results": results,
        "order": order,
        "table": format_breakdown(results),
        "files": [],
    }
    if out is not None:
        out = Path(out)
        write_json(out / "breakdown.json", {"protocol": protocol, "bins": dict(bins or {}),
                                            "results": results, "order": order})  # fmt: skip
        save_figure(breakdown_figure(results), out / "breakdown.png")
        report["files"] = [str(out / "breakdown.json"), str(out / "breakdown.png")]
    return report
