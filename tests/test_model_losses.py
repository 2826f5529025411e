"""Losses against explicit triplet loops and hand-computed values; the objective's parts, weights,
switches and mutual-learning rule against a plain re-computation; the DRCL radius; bf16."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from imlnet.losses import (
    IMLNetObjective,
    batch_hard_triplet,
    drcl_loss,
    id_loss,
    reconstruction_loss,
)
from imlnet.models import IMLNet


def naive_batch_hard(anchors, a_labels, refs, r_labels, margin) -> float:
    """Mean over anchors (with a positive and a negative) of the worst explicit triplet.

    relu(max_p d(a,p) - min_n d(a,n) + m) = max over all (p, n) of relu(d(a,p) - d(a,n) + m).
    """
    losses = []
    for a in range(len(anchors)):
        pos = [p for p in range(len(refs)) if r_labels[p] == a_labels[a]]
        neg = [n for n in range(len(refs)) if r_labels[n] != a_labels[a]]
        if not pos or not neg:
            continue
        worst = 0.0
        for p, n in itertools.product(pos, neg):
            d_ap = math.dist(anchors[a].tolist(), refs[p].tolist())
            d_an = math.dist(anchors[a].tolist(), refs[n].tolist())
            worst = max(worst, d_ap - d_an + margin)
        losses.append(worst)
    return sum(losses) / len(losses) if losses else 0.0


def hardest(anchors, a_labels, refs, r_labels):
    """Per anchor: (index of the farthest positive, index of the nearest negative), by loop."""
    out = []
    for a in range(len(anchors)):
        d = [math.dist(anchors[a].tolist(), r.tolist()) for r in refs]
        pos = [p for p in range(len(refs)) if r_labels[p] == a_labels[a]]
        neg = [n for n in range(len(refs)) if r_labels[n] != a_labels[a]]
        out.append((max(pos, key=lambda i: d[i]), min(neg, key=lambda i: d[i])))
    return out


# --------------------------------------------------------------------------- batch-hard triplet
def test_batch_hard_triplet_hand_computed_2d():
    anchors = torch.tensor([[0.0, 0.0], [4.0, 3.0], [10.0, 10.0]])
    a_labels = torch.tensor([0, 1, 2])  # class 2 has no positive reference: left out
    refs = torch.tensor([[3.0, 4.0], [0.0, 1.0], [4.0, 0.0], [4.0, -3.0]])
    r_labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: positives at 5 and 1 -> 5; negatives at 4 and 5 -> 4; 5 - 4 + 0.3 = 1.3
    # anchor 1: positives at 3 and 6 -> 6; negatives at sqrt(2) and sqrt(20) -> sqrt(2)
    expected = (1.3 + (6 - math.sqrt(2) + 0.3)) / 2
    got = batch_hard_triplet(anchors, a_labels, refs, r_labels, margin=0.3)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(got) == pytest.approx(naive_batch_hard(anchors, a_labels, refs, r_labels, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_batch_hard_triplet_matches_the_explicit_triplet_loop(dtype):
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        anchors = torch.randn(9, 4, generator=g)
        refs = torch.randn(7, 4, generator=g)
        a_labels = torch.randint(0, 3, (9,), generator=g)
        r_labels = torch.randint(0, 3, (7,), generator=g)
        margin = 0.1 * trial
        got = batch_hard_triplet(anchors.to(dtype), a_labels, refs.to(dtype), r_labels, margin)
        assert got.dtype == torch.float32
        a, r = anchors.to(dtype).double(), refs.to(dtype).double()  # what the loss sees
        ref = naive_batch_hard(a, a_labels, r, r_labels, margin)
        assert float(got) == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_batch_hard_triplet_trains_only_the_hardest_pair():
    """Gradients reach each active anchor's farthest positive and nearest negative, no others."""
    g = torch.Generator().manual_seed(1)
    anchors = torch.randn(5, 3, generator=g)
    refs = torch.randn(8, 3, generator=g, requires_grad=True)
    a_labels = torch.tensor([0, 1, 2, 0, 1])
    r_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    batch_hard_triplet(anchors, a_labels, refs, r_labels, margin=10.0).backward()  # all active
    used = {i for pair in hardest(anchors, a_labels, refs.detach(), r_labels) for i in pair}
    touched = {i for i in range(8) if refs.grad[i].abs().sum() > 0}
    assert touched == used


def test_no_valid_anchor_gives_zero_with_a_graph():
    x = torch.randn(3, 4, requires_grad=True)
    loss = batch_hard_triplet(x, torch.zeros(3, dtype=torch.long), x, torch.zeros(3).long(), 0.3)
    assert float(loss.detach()) == 0.0
    loss.backward()  # no error: the graph exists


# --------------------------------------------------------------------------- DRCL
def test_drcl_hand_computed_on_the_unit_circle():
    """Points at angles 0, 180 (drone) and 60, 270 (satellite); chord = 2 sin(angle / 2)."""

    def at(deg):
        return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]

    drone = torch.tensor([at(0), at(180)])
    sat = torch.tensor([at(60), at(270)])
    labels = torch.tensor([0, 1])
    # drone -> satellite: d0: ap 1, hardest an sqrt2 -> 0.5 - 0.414; d1: ap sqrt2, an sqrt3
    d2s = ((1 - math.sqrt(2) + 0.5) + (math.sqrt(2) - math.sqrt(3) + 0.5)) / 2
    # satellite -> drone: s0: ap 1, an sqrt3 -> 0 (relu); s1: ap sqrt2, an sqrt2 -> 0.5
    s2d = (0.0 + 0.5) / 2
    got = drcl_loss(drone, sat, labels, margin=0.5)
    assert float(got) == pytest.approx(0.5 * (d2s + s2d), rel=1e-6)
    # the two directions differ: both are in the loss
    assert d2s != pytest.approx(s2d)


def test_drcl_is_both_directions_of_the_explicit_loop():
    g = torch.Generator().manual_seed(2)
    drone, sat = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 4])
    expected = 0.5 * (
        naive_batch_hard(drone, labels, sat, labels, 0.3)
        + naive_batch_hard(sat, labels, drone, labels, 0.3)
    )
    assert float(drcl_loss(drone, sat, labels, 0.3)) == pytest.approx(expected, rel=1e-5)
    # the hardest negatives of the two directions are not the same pairs here
    assert hardest(drone, labels, sat, labels) != hardest(sat, labels, drone, labels)


@pytest.mark.parametrize("radius", [0.5, 1.0, 4.0])
def test_descriptors_lie_on_the_radius_r_sphere(radius):
    torch.manual_seed(0)
    model = IMLNet(3, backbone="resnet18", irn=False, muml=False, radius=radius, descriptor_dim=8)
    model.eval()
    g = torch.Generator().manual_seed(3)
    x, s = torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = model(x)
        desc = torch.cat([out.descriptor, model.encode(s, "satellite")])
    torch.testing.assert_close(desc.norm(dim=1), torch.full((12,), radius))
    torch.testing.assert_close(out.descriptor, radius * F.normalize(out.embedding, dim=1))
    torch.testing.assert_close(model.encode(x), out.descriptor)
    dist = torch.cdist(desc.double(), desc.double())
    assert float(dist.min()) >= 0.0 and float(dist.max()) <= 2 * radius + 1e-5
    # so DRCL is bounded by 2r + margin whatever the network does
    labels = torch.arange(6) % 3
    loss = drcl_loss(desc[:6], desc[6:], labels, margin=0.3)
    assert 0.0 <= float(loss) <= 2 * radius + 0.3


# --------------------------------------------------------------------------- the objective
@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(4)
    return (
        torch.randn(4, 3, 32, 32, generator=g),
        torch.randn(4, 3, 32, 32, generator=g),
        torch.tensor([0, 1, 2, 1]),
    )


def small_model(**kw) -> IMLNet:
    torch.manual_seed(0)
    kw = {"backbone": "resnet18", "muml_channels": 16, "descriptor_dim": 16, **kw}
    return IMLNet(3, **kw)


@pytest.mark.parametrize(
    ("model_kw", "loss_kw", "parts"),
    [
        ({}, {}, {"id", "triplet", "rec", "id_crops"}),
        ({}, {"w_rec_satellite": 0.5}, {"id", "triplet", "rec", "rec_satellite", "id_crops"}),
        ({}, {"triplet": "none"}, {"id", "rec", "id_crops"}),
        ({"irn": False}, {"triplet": "plain"}, {"id", "triplet", "id_crops"}),
        ({"muml": False}, {}, {"id", "triplet", "rec"}),
        ({"irn": False, "muml": False, "pool": "avg"}, {"triplet": "none"}, {"id"}),
    ],
)
def test_objective_parts_follow_the_switches(batch, model_kw, loss_kw, parts):
    model = small_model(**model_kw).eval()
    weights = {"w_rec": 2.0, "w_drcl": 3.0, "w_id": 0.5, "w_crop": 0.25}
    out = IMLNetObjective(**weights, **loss_kw)(model, *batch)
    assert set(out) == parts | {"total"}
    w = {
        "rec": 2.0,
        "rec_satellite": loss_kw.get("w_rec_satellite", 0.0),
        "triplet": 3.0,
        "id": 0.5,
        "id_crops": 0.25,
    }
    expected = sum(w[k] * float(out[k].detach()) for k in parts)
    assert float(out["total"].detach()) == pytest.approx(expected, rel=1e-5)
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.values())


def naive_objective(model, drone, sat, labels, margin, plain=False):
    """The objective's rules, one forward pass per image set (eval mode: no batch effects)."""
    ce = id_loss
    od, os_ = model(drone, "drone"), model(sat, "satellite")

    def id_part(o):
        return float(ce(o.logits, labels)) + sum(float(ce(u, labels)) for u in o.unit_logits) / 4

    parts = {"id": id_part(od) + id_part(os_)}
    a, b = (od.embedding, os_.embedding) if plain else (od.descriptor, os_.descriptor)
    parts["triplet"] = 0.5 * (
        naive_batch_hard(a.detach(), labels, b.detach(), labels, margin)
        + naive_batch_hard(b.detach(), labels, a.detach(), labels, margin)
    )
    parts["rec"] = float(((od.reconstruction - sat) ** 2).mean())
    teaches = {0: [1, 2, 3], 1: [0, 2, 3], 2: [0, 1, 3], 3: [0, 1, 2]}  # unit i -> the others
    crops_total = 0.0
    for images, domain in ((drone, "drone"), (sat, "satellite")):
        crops = model.muml_crops(images, labels, domain)
        terms = []
        for i, others in teaches.items():
            o = model(crops[f"unit{i + 1}"], domain)
            terms.append(sum(float(ce(o.unit_logits[j], labels)) for j in others) / 3)
        o = model(crops["combined"], domain)  # the combined crop teaches all and the descriptor
        terms.append(
            float(ce(o.logits, labels)) + sum(float(ce(u, labels)) for u in o.unit_logits) / 4
        )
        crops_total += sum(terms) / len(terms)
    parts["id_crops"] = crops_total
    return parts


@pytest.mark.parametrize("triplet", ["drcl", "plain"])
def test_objective_equals_a_plain_recomputation(batch, triplet):
    model = small_model().eval()
    with torch.no_grad():
        got = IMLNetObjective(triplet=triplet, margin=0.3)(model, *batch)
        ref = naive_objective(model, *batch, margin=0.3, plain=triplet == "plain")
    for k, v in ref.items():
        assert float(got[k]) == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_satellite_autoencoding_target(batch):
    model = small_model(muml=False).eval()
    drone, sat, labels = batch
    with torch.no_grad():
        got = IMLNetObjective(w_rec_satellite=1.0)(model, drone, sat, labels)
        rec_s = model(sat, "satellite").reconstruction
    assert float(got["rec_satellite"]) == pytest.approx(float(reconstruction_loss(rec_s, sat)))


@pytest.mark.parametrize(("crop_units", "crop_batch"), [("all", 20), ("random", 8)])
def test_crops_run_in_one_extra_pass_per_domain(batch, crop_units, crop_batch):
    """Two passes of the batch, then one of the crops per domain; CAMs need no extra pass."""
    model = small_model(irn=False).train()
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    IMLNetObjective(crop_units=crop_units)(model, *batch)
    assert sizes == [4, 4, crop_batch, crop_batch]  # 4 images; crops: 4 units + combined, or 1 + 1


def test_objective_rejects_bad_options():
    with pytest.raises(ValueError, match="triplet"):
        IMLNetObjective(triplet="hard")
    with pytest.raises(ValueError, match="crop_units"):
        IMLNetObjective(crop_units="some")


def test_bf16_autocast_on_cpu_runs_forward_and_backward(batch):
    model = small_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = IMLNetObjective(w_rec_satellite=0.5)(model, *batch)
    parts["total"].backward()
    assert all(torch.isfinite(v) for v in parts.values())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
