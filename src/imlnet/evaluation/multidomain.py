"""One call for the demo and scripts: the breakdown and the weather protocol of a model on a
dataset in the University-1652 layout (the synthetic benchmark included).

    from imlnet.evaluation.multidomain import multi_domain_report
    rep = multi_domain_report(model, "data/synth", image_size=64, out="runs/demo/report")
    print(rep["breakdown"]["table"], rep["corruption"]["table"], sep="\\n\\n")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from imlnet.evaluation.breakdown import breakdown_report, view_conditions
from imlnet.evaluation.features import extract_features
from imlnet.evaluation.protocol import VIEWS, Protocol
from imlnet.evaluation.robustness import corruption_report
from imlnet.inference import eval_transform, view_domain


def multi_domain_report(
    model: Any,
    data: str | Path,
    *,
    image_size: int,
    by: Sequence[str] | None = ("season", "weather", "altitude", "pitch"),
    bins: Mapping[str, float | list[float]] | None = None,
    corrupt: str | Sequence[str] | None = "wx",
    seed: int = 0,
    views: Mapping[str, tuple[Any, Any]] | None = None,
    protocol: Protocol = "official",
    out: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics per condition and under the University-WX weather, from one feature pass.

    Args:
        model: an IMLNet in eval mode (or anything with ``encode(x, domain)``).
        data: the dataset root (``test/`` views; ``metadata.json`` for ``by``).
        image_size: the model's input size (``LoadedModel.image_size``).
        by: fields for :func:`~imlnet.evaluation.breakdown.breakdown_report` (None: skip).
        bins: bins of continuous fields (see :func:`~imlnet.evaluation.breakdown.parse_bins`).
        corrupt: ``"wx"``, condition names, or None to skip the weather protocol.
        seed: corruption seed.
        views: the clean ``(features, labels)`` of the four test views if already extracted (in
            the order of ``University1652Test``); extracted here otherwise.
        out: folder for ``breakdown.json/png`` and ``corruption.json/png`` (None: not written).

    Returns:
        ``{"views": clean features, "breakdown": report or None, "corruption": report or
        None}``; each report has ``"table"`` (Markdown) and ``"files"`` (written paths), the
        breakdown ``"results"``, the corruption ``"clean"``, ``"conditions"`` and ``"summary"``.
    """
    from imlnet.data.university1652 import University1652Test

    transform = eval_transform(image_size)
    datasets = {v: University1652Test(data, v, transform=transform) for v in VIEWS}
    if views is None:
        views = {
            v: extract_features(
                model,
                torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers),
                domain=view_domain(v),
                device=device,
                progress=progress,
            )
            for v, ds in datasets.items()
        }
    report: dict[str, Any] = {"views": views, "breakdown": None, "corruption": None}
    if by:
        conditions = {
            v: view_conditions(data, [p for p, _ in datasets[v].samples])
            for v in ("query_drone", "gallery_drone")
        }
        report["breakdown"] = breakdown_report(
            views, conditions, by, bins=bins, protocol=protocol, out=out
        )
    if corrupt:
        report["corruption"] = corruption_report(
            model, datasets, data, transform, clean=views, conditions=corrupt, seed=seed,
            protocol=protocol, batch_size=batch_size, workers=workers, device=device, out=out,
            progress=progress,
        )  # fmt: skip
    return report
