"""Where the time of one IML-Net training step goes, part by part (used by ``model_speed.py``).

One real :func:`imlnet.training.training_losses` step is run first with forward pre-hooks that
record how many images each module sees (the encoder's passes, the unit heads, the IRN). Then
each part is timed on its own, at those batch sizes, as forward + backward from detached inputs
(a random upstream gradient): encoder, descriptor head and classifier, unit heads, IRN, the
crops' passes, each loss; CAMs + boxes and crop resampling run without gradients, as in the
step. Medians over ``repeats``. The parts' sum is printed beside the measured whole step: the
difference is what the parts leave out (Python overhead, concatenation, splitting).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from imlnet.losses import (
    IMLNetObjective,
    classifier_loss,
    drcl_loss,
    mutual_crop_loss,
    reconstruction_loss,
)
from imlnet.models import IMLNet
from imlnet.models.muml import crop_resize, unit_attention
from imlnet.training import training_losses


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _rows_seen(model: IMLNet, objective: IMLNetObjective, *batch: torch.Tensor) -> dict:
    """Batch sizes that the encoder (per pass), the first unit head and the IRN see in a step."""
    seen: dict[str, list[int]] = {"encoder": [], "heads": [], "irn": []}
    enc = model.encoder if model.encoder is not None else model.encoders["drone"]
    hooks = [enc.unit1.register_forward_pre_hook(lambda m, a: seen["encoder"].append(len(a[0])))]
    if model.heads is not None:
        hooks.append(
            model.heads[0].register_forward_pre_hook(lambda m, a: seen["heads"].append(len(a[0])))
        )
    if model.irn is not None:
        hooks.append(
            model.irn.register_forward_pre_hook(lambda m, a: seen["irn"].append(len(a[0].maps[3])))
        )
    training_losses(model, objective, *batch)
    for h in hooks:
        h.remove()
    return seen


def _fwd_bwd(forward: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(forward ms, backward ms) of ``forward`` whose outputs get a random upstream gradient."""

    def outputs() -> list[torch.Tensor]:
        out = forward()
        flat = out if isinstance(out, (list, tuple)) else [out]
        return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]

    grads = [torch.randn_like(t) for t in outputs()]

    def both() -> None:
        outs = outputs()
        torch.autograd.backward(outs, grads)

    fwd = _median_ms(outputs, repeats)
    return fwd, max(0.0, _median_ms(both, repeats) - fwd)


def profile_step(
    model: IMLNet,
    objective: IMLNetObjective,
    drone: torch.Tensor,
    satellite: torch.Tensor,
    labels: torch.Tensor,
    repeats: int = 3,
) -> dict[str, Any]:
    """Per-part milliseconds of one training step of ``model`` (train mode, float32, CPU/GPU).

    Returns:
        ``{"parts": {name: {"fwd_ms", "bwd_ms"}}, "sum_ms", "step_ms", "rows"}``.
    """
    model.train()
    seen = _rows_seen(model, objective, drone, satellite, labels)
    b, size = drone.shape[0], tuple(drone.shape[-2:])
    enc = model.encoder if model.encoder is not None else model.encoders["drone"]
    parts: dict[str, tuple[float, float]] = {}
    x = torch.cat([drone, satellite])
    rows_orig = seen["encoder"][0] if model.encoder is not None else b

    def encoder_on(images: torch.Tensor):
        return lambda: list(enc.forward_units(images).maps)

    parts["encoder (originals)"] = _fwd_bwd(encoder_on(x[:rows_orig]), repeats)
    with torch.no_grad():
        units = enc.forward_units(x[:rows_orig])
    u4 = units.maps[3].detach().requires_grad_(True)
    parts["descriptor head + classifier"] = _fwd_bwd(
        lambda: [*model.descriptor_head(u4), model.classifier(model.descriptor_head(u4)[1])],
        repeats,
    )
    maps = [m.detach().requires_grad_(True) for m in units.maps]
    if model.heads is not None:
        parts["unit heads (originals)"] = _fwd_bwd(
            lambda: [t for h, m in zip(model.heads, maps, strict=True) for t in h(m)], repeats
        )
    if model.irn is not None:
        n = seen["irn"][0]
        feats = type(units)(tuple(m[:n] for m in maps), units.pool_indices[:n], units.pre_pool_size)
        parts["IRN"] = _fwd_bwd(lambda: model.irn(feats), repeats)
    out = model(drone, "drone")
    if model.heads is not None:
        fmaps = [m.detach() for m in out.unit_maps]
        boxes = unit_attention(fmaps, model.heads, labels, size, model.theta, model.crop_padding)[1]
        parts["CAMs and boxes"] = (
            _median_ms(
                lambda: unit_attention(
                    fmaps, model.heads, labels, size, model.theta, model.crop_padding
                ),
                repeats,
            )
            * 2,  # two domains
            0.0,
        )
        with torch.no_grad():
            n_sets = seen["encoder"][-1] // (2 * b) if model.encoder is not None else 0
            n_sets = n_sets or seen["encoder"][-1] // b
            parts["crop resampling"] = (
                _median_ms(lambda: [crop_resize(drone, boxes[i]) for i in range(n_sets)], repeats)
                * 2,
                0.0,
            )
        rows_crops = sum(seen["encoder"][1 if model.encoder is not None else 2 :])
        crops = torch.randn(rows_crops, 3, *size)
        parts["crop pass: encoder"] = _fwd_bwd(encoder_on(crops), repeats)
        with torch.no_grad():
            cunits = enc.forward_units(crops)
        cmaps = [m.detach().requires_grad_(True) for m in cunits.maps]
        parts["crop pass: unit heads"] = _fwd_bwd(
            lambda: [t for h, m in zip(model.heads, cmaps, strict=True) for t in h(m)], repeats
        )
        cu4 = cmaps[3]
        parts["crop pass: descriptor head + classifier"] = _fwd_bwd(
            lambda: model.classifier(model.descriptor_head(cu4)[1]), repeats
        )
    # losses, from detached outputs
    o = model(drone, "drone")
    logits = o.logits.detach().requires_grad_(True)
    ulog = [u.detach().requires_grad_(True) for u in o.unit_logits]
    parts["loss: id"] = _fwd_bwd(lambda: classifier_loss(logits, ulog, labels) * 2, repeats)
    desc = o.descriptor.detach().requires_grad_(True)
    parts["loss: triplet (DRCL)"] = _fwd_bwd(
        lambda: drcl_loss(desc, desc.flip(0), labels, 0.3), repeats
    )
    if o.reconstruction is not None:
        rec = o.reconstruction.detach().requires_grad_(True)
        parts["loss: rec"] = _fwd_bwd(lambda: reconstruction_loss(rec, satellite), repeats)
    if model.heads is not None:
        units_used = objective.next_crop_units()
        k = len(units_used) + 1
        cl = torch.randn(k * b, model.num_classes, requires_grad=True)
        cul = [torch.randn(k * b, model.num_classes, requires_grad=True) for _ in range(4)]
        parts["loss: id_crops"] = _fwd_bwd(
            lambda: 2 * mutual_crop_loss(cl, cul, labels, units_used), repeats
        )

    def step() -> None:
        model.zero_grad(set_to_none=True)
        training_losses(model, objective, drone, satellite, labels)["total"].backward()

    step_ms = _median_ms(step, repeats)
    table = {k: {"fwd_ms": round(f, 1), "bwd_ms": round(w, 1)} for k, (f, w) in parts.items()}
    total = sum(f + w for f, w in parts.values())
    return {"parts": table, "sum_ms": round(total, 1), "step_ms": round(step_ms, 1), "rows": seen}


def profile_table(profile: dict[str, Any]) -> str:
    """Markdown: each part's forward, backward and share of the measured step."""
    step = profile["step_ms"]
    lines = ["| part | fwd ms | bwd ms | % of step |", "|---|---:|---:|---:|"]
    for name, p in profile["parts"].items():
        share = 100 * (p["fwd_ms"] + p["bwd_ms"]) / step
        lines.append(f"| {name} | {p['fwd_ms']} | {p['bwd_ms']} | {share:.0f} |")
    lines.append(f"| sum of parts | | | {100 * profile['sum_ms'] / step:.0f} |")
    lines.append(f"| measured step | {step} ms | | 100 |")
    lines.append(f"\nrows per module: {profile['rows']}")
    return "\n".join(lines)
