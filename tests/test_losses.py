"""The loss functions against explicit triplet loops and hand-computed values.

The objective that combines them (parts, weights, switches, the mutual-learning rule) is tested
with the model in test_model.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from imlnet.losses import (
    IMLNetObjective,
    batch_hard_mine,
    batch_hard_triplet,
    drcl_loss,
    id_loss,
    plain_triplet_loss,
    reconstruction_loss,
    to_sphere,
)
from imlnet.losses.infonce import InfoNCE, infonce_loss
from imlnet.models import IMLNetOutput, TrainOutput


def naive_batch_hard(anchors, a_lab, refs, r_lab, margin: float):
    """Per anchor: the explicit triplet (a, p, n) of largest hinge; loss = mean over anchors.

    relu(max_p d(a,p) - min_n d(a,n) + m) = max over all (p, n) of relu(d(a,p) - d(a,n) + m).
    Anchors without a positive or a negative are left out (``None`` in ``chosen``).
    """
    a, r = anchors.double().tolist(), refs.double().tolist()
    a_lab, r_lab = a_lab.tolist(), r_lab.tolist()
    losses, chosen = [], []
    for i in range(len(a)):
        pos = [j for j in range(len(r)) if r_lab[j] == a_lab[i]]
        neg = [j for j in range(len(r)) if r_lab[j] != a_lab[i]]
        if not pos or not neg:
            chosen.append(None)
            continue
        best, arg = -math.inf, None
        for p, n in itertools.product(pos, neg):
            value = math.dist(a[i], r[p]) - math.dist(a[i], r[n]) + margin
            if value > best:
                best, arg = value, (p, n)
        losses.append(max(best, 0.0))
        chosen.append(arg)
    return (sum(losses) / len(losses) if losses else 0.0), chosen


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
def test_hand_computed_2d_examples() -> None:
    anchors = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    a_lab = torch.tensor([0, 1])
    refs = torch.tensor([[0.0, 1.0], [0.0, -2.0], [3.0, 4.0], [1.0, 0.0]])
    r_lab = torch.tensor([0, 0, 1, 2])
    mined = batch_hard_mine(anchors, a_lab, refs, r_lab)
    # anchor 0: positives at 1 and 2 -> hardest r1 (2); negatives at 5 and 1 -> hardest r3 (1)
    # anchor 1: positive r2 at 4; negatives at sqrt(10), sqrt(13), 2 -> hardest r3 (2)
    assert mined.positive.tolist() == [1, 2] and mined.negative.tolist() == [3, 3]
    torch.testing.assert_close(mined.d_ap, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(mined.d_an, torch.tensor([1.0, 2.0]))
    # hinges: 2 - 1 + 0.5 = 1.5 and 4 - 2 + 0.5 = 2.5 -> mean 2.0
    loss = batch_hard_triplet(anchors, a_lab, refs, r_lab, margin=0.5)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    # With a margin of 0 and the positive nearer than every negative, nothing is learned.
    near = batch_hard_triplet(torch.tensor([[0.0, 0.1]]), torch.tensor([0]), refs[:1], r_lab[:1], 0)
    assert float(near) == 0.0

    anchors = torch.tensor([[0.0, 0.0], [4.0, 3.0], [10.0, 10.0]])
    a_labels = torch.tensor([0, 1, 2])  # class 2 has no positive reference: left out
    refs = torch.tensor([[3.0, 4.0], [0.0, 1.0], [4.0, 0.0], [4.0, -3.0]])
    r_labels = torch.tensor([0, 0, 1, 1])
    # anchor 0: positives at 5 and 1 -> 5; negatives at 4 and 5 -> 4; 5 - 4 + 0.3 = 1.3
    # anchor 1: positives at 3 and 6 -> 6; negatives at sqrt(2) and sqrt(20) -> sqrt(2)
    expected = (1.3 + (6 - math.sqrt(2) + 0.3)) / 2
    got = batch_hard_triplet(anchors, a_labels, refs, r_labels, margin=0.3)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    naive, _ = naive_batch_hard(anchors, a_labels, refs, r_labels, 0.3)
    assert float(got) == pytest.approx(naive)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batch_hard_matches_explicit_triplets(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(9, 4, generator=g).to(dtype)
    refs = torch.randn(7, 4, generator=g).to(dtype)
    a_lab = torch.tensor([0, 1, 2, 0, 1, 3, 2, 0, 5])  # class 5 has no positive reference
    r_lab = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    for margin in (0.0, 0.3, 2.0):
        expected, chosen = naive_batch_hard(anchors, a_lab, refs, r_lab, margin)
        loss = batch_hard_triplet(anchors, a_lab, refs, r_lab, margin)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64))
    mined = batch_hard_mine(anchors, a_lab, refs, r_lab)
    assert mined.valid.tolist() == [c is not None for c in chosen]
    for i, c in enumerate(chosen):
        if c is not None:
            assert (int(mined.positive[i]), int(mined.negative[i])) == c
    # Random labels (some anchors without a positive or a negative), several margins.
    for trial in range(5):
        anchors = torch.randn(9, 4, generator=g)
        refs = torch.randn(7, 4, generator=g)
        a_labels = torch.randint(0, 3, (9,), generator=g)
        r_labels = torch.randint(0, 3, (7,), generator=g)
        margin = 0.1 * trial
        got = batch_hard_triplet(anchors.to(dtype), a_labels, refs.to(dtype), r_labels, margin)
        assert got.dtype == torch.float32
        a, r = anchors.to(dtype).double(), refs.to(dtype).double()  # what the loss sees
        ref, _ = naive_batch_hard(a, a_labels, r, r_labels, margin)
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


def test_degenerate_batches_give_zero_or_finite_gradients() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    same = torch.zeros(4, dtype=torch.long)
    loss = batch_hard_triplet(x, same, x, same, 0.3)  # one class: no valid anchor at all
    loss.backward()  # no error: the graph exists
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    y = torch.randn(3, 3)
    y.requires_grad_(True)
    labels = torch.tensor([0, 1, 2])
    loss = batch_hard_triplet(y, labels, y.detach().clone(), labels, 0.3)  # d_ap = 0 exactly
    loss.backward()
    assert torch.isfinite(y.grad).all()


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


def test_drcl_is_both_directions_averaged_and_plain_is_the_same_loss():
    g = torch.Generator().manual_seed(2)
    drone, sat = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 4])
    d2s, _ = naive_batch_hard(drone, labels, sat, labels, 0.3)
    s2d, _ = naive_batch_hard(sat, labels, drone, labels, 0.3)
    expected = torch.tensor((d2s + s2d) / 2, dtype=torch.float32)
    torch.testing.assert_close(drcl_loss(drone, sat, labels, 0.3), expected)
    torch.testing.assert_close(plain_triplet_loss(drone, sat, labels, 0.3), expected)
    # the hardest negatives of the two directions are not the same pairs here
    assert hardest(drone, labels, sat, labels) != hardest(sat, labels, drone, labels)


# --------------------------------------------------------------------------- id and IRN losses
def test_reconstruction_and_id_losses_by_hand() -> None:
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [3.0, 1.0]]]])
    torch.testing.assert_close(reconstruction_loss(pred, target), torch.tensor((4.0 + 9.0) / 4))
    # rec_turns=4: per image the least error over the target's four turns. Image 0 is its
    # target turned once (error 0 at that turn), image 1 is off by 1 everywhere at every turn
    target = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    pred = torch.stack([torch.rot90(target[0], 3, (1, 2)), torch.ones(3, 4, 4) * 100])
    per_turn = [((pred[1] - torch.rot90(target[1], k, (1, 2))) ** 2).mean() for k in range(4)]
    torch.testing.assert_close(reconstruction_loss(pred, target, 4), min(per_turn) / 2)
    assert float(reconstruction_loss(pred, target)) > float(reconstruction_loss(pred, target, 4))
    with pytest.raises(ValueError, match="turns"):
        reconstruction_loss(pred, target, 2)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    p0 = math.exp(2.0) / (math.exp(2.0) + 1.0 + math.exp(-1.0))
    expected = (-math.log(p0) + math.log(3.0)) / 2
    torch.testing.assert_close(id_loss(logits, labels), torch.tensor(expected))
    assert id_loss(logits.bfloat16(), labels).dtype == torch.float32


# --------------------------------------------------------------------------- sphere, objective
def test_to_sphere_puts_rows_on_the_radius_r_sphere_in_the_input_dtype() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    torch.testing.assert_close(to_sphere(x, 2.0), torch.tensor([[1.2, 1.6], [0.0, -2.0]]))
    assert to_sphere(x.bfloat16(), 1.0).dtype == torch.bfloat16


def _output(g: torch.Generator, n: int, classes: int, units: bool, rec: bool) -> IMLNetOutput:
    emb = torch.randn(n, 6, generator=g)
    return IMLNetOutput(
        descriptor=to_sphere(emb, 1.0),
        embedding=emb,
        logits=torch.randn(n, classes, generator=g),
        unit_logits=tuple(torch.randn(n, classes, generator=g) for _ in range(4)) if units else (),
        reconstruction=torch.randn(n, 3, 4, 4, generator=g) if rec else None,
    )


@pytest.mark.parametrize("units", [(0, 1, 2, 3), (2,)])
def test_objective_is_a_function_of_outputs_and_labels(units) -> None:
    """No model: the parts of a hand-made TrainOutput, recomputed from the loss functions."""
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([0, 1, 2, 1])
    sat = torch.randn(4, 3, 4, 4, generator=g)
    out = TrainOutput(
        drone=_output(g, 4, 3, True, True),
        satellite=_output(g, 4, 3, True, True),
        crop_units=units,
        drone_crops=_output(g, 4 * (len(units) + 1), 3, True, False),
        satellite_crops=_output(g, 4 * (len(units) + 1), 3, True, False),
    )
    objective = IMLNetObjective(w_rec=0.5, w_drcl=2.0, w_id=0.7, w_crop=0.3, w_rec_satellite=0.1)
    parts = objective(out, sat, labels)
    d, s = out.drone, out.satellite

    def ce_units(o, rows):
        return sum(id_loss(u[rows], labels) for u in o.unit_logits) / 4

    everything = slice(None)
    crops = 0.0
    for c in (out.drone_crops, out.satellite_crops):
        terms = []
        for k, i in enumerate(units):
            rows = slice(4 * k, 4 * k + 4)
            terms.append(
                sum(id_loss(c.unit_logits[j][rows], labels) for j in range(4) if j != i) / 3
            )
        rows = slice(4 * len(units), 4 * len(units) + 4)
        terms.append(id_loss(c.logits[rows], labels) + ce_units(c, rows))
        crops = crops + sum(terms) / len(terms)
    expected = {
        "id": id_loss(d.logits, labels)
        + ce_units(d, everything)
        + id_loss(s.logits, labels)
        + ce_units(s, everything),
        "triplet": drcl_loss(d.descriptor, s.descriptor, labels, 0.3),
        "rec": ((d.reconstruction - sat) ** 2).mean(),
        "rec_satellite": ((s.reconstruction - sat) ** 2).mean(),
        "id_crops": crops,
    }
    weights = {"id": 0.7, "triplet": 2.0, "rec": 0.5, "rec_satellite": 0.1, "id_crops": 0.3}
    expected["total"] = sum(weights[k] * v for k, v in expected.items())
    assert set(parts) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(parts[key], torch.as_tensor(value, dtype=torch.float32))
    # without crops, reconstructions or unit logits the parts are simply absent
    bare = TrainOutput(_output(g, 4, 3, False, False), _output(g, 4, 3, False, False))
    assert set(IMLNetObjective(triplet="none")(bare, sat, labels)) == {"id", "total"}
    assert int(objective.calls) == 1


# --------------------------------------------------------------------------- InfoNCE
def naive_infonce(drone, sat, labels, scale: float, smoothing: float = 0.0) -> float:
    """Symmetric InfoNCE by loops: per anchor, the mean over its building's references p of the
    cross-entropy of p against the anchor's negatives (other positives left out)."""

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    d = [unit(v) for v in drone.double().tolist()]
    s = [unit(v) for v in sat.double().tolist()]
    lab = labels.tolist()
    n = len(lab)

    def direction(a, b) -> float:
        total = 0.0
        for i in range(n):
            score = [scale * sum(x * y for x, y in zip(a[i], b[j], strict=True)) for j in range(n)]
            pos = [j for j in range(n) if lab[j] == lab[i]]
            neg = [j for j in range(n) if lab[j] != lab[i]]
            row = 0.0
            for p in pos:
                group = [p, *neg]
                log_z = math.log(sum(math.exp(score[j]) for j in group))
                for j in group:
                    target = (1 - smoothing) * (j == p) + smoothing / len(group)
                    row -= target * (score[j] - log_z)
            total += row / len(pos)
        return total / n

    return 0.5 * (direction(d, s) + direction(s, d))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_infonce_matches_a_plain_recomputation(dtype) -> None:
    g = torch.Generator().manual_seed(11)
    drone, sat = torch.randn(6, 5, generator=g).to(dtype), torch.randn(6, 5, generator=g).to(dtype)
    for labels in (torch.arange(6), torch.tensor([0, 1, 0, 2, 1, 0])):  # unique, then duplicates
        for scale, smoothing in ((1 / 0.07, 0.0), (3.0, 0.1)):
            got = infonce_loss(drone, sat, labels, torch.tensor(scale), smoothing)
            assert got.dtype == torch.float32
            want = naive_infonce(drone.double(), sat.double(), labels, scale, smoothing)
            assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_infonce_with_unique_labels_is_sample4geo_and_duplicates_are_not_negatives() -> None:
    g = torch.Generator().manual_seed(12)
    drone, sat = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    scale = torch.tensor(10.0)
    d, s = torch.nn.functional.normalize(drone), torch.nn.functional.normalize(sat)
    logits = scale * d @ s.T
    eye = torch.arange(5)
    ce = torch.nn.functional.cross_entropy
    sample4geo = 0.5 * (ce(logits, eye) + ce(logits.T, eye))
    torch.testing.assert_close(infonce_loss(drone, sat, eye, scale), sample4geo)
    # Building 0 twice: satellite 1 is a positive of drone 0, not a negative, so raising
    # their similarity lowers the loss (the diagonal-only loss would push them apart).
    labels = torch.tensor([0, 0, 1, 2, 3])
    sat1 = sat.clone().requires_grad_(True)
    infonce_loss(drone, sat1, labels, scale).backward()
    assert float((-sat1.grad[1] * d[0]).sum()) > 0  # gradient descent moves it towards drone 0
    sat2 = sat.clone().requires_grad_(True)
    sample4geo_loss = 0.5 * (
        ce(scale * d @ torch.nn.functional.normalize(sat2).T, eye)
        + ce(scale * torch.nn.functional.normalize(sat2) @ d.T, eye)
    )
    sample4geo_loss.backward()
    assert not torch.allclose(sat1.grad[1], sat2.grad[1])


def test_infonce_temperature_learned_or_fixed() -> None:
    learned, fixed = InfoNCE(0.07), InfoNCE(0.5, learn_temperature=False)
    assert [n for n, _ in learned.named_parameters()] == ["log_scale"]
    assert not list(fixed.parameters()) and "log_scale" in fixed.state_dict()
    assert float(learned.scale) == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(fixed.scale) == pytest.approx(2.0, rel=1e-5)
    g = torch.Generator().manual_seed(13)
    drone = torch.randn(4, 3, generator=g, requires_grad=True)
    learned(drone, torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 3])).backward()
    assert learned.log_scale.grad is not None and drone.grad is not None
    with pytest.raises(ValueError, match="temperature"):
        InfoNCE(0.0)


def test_infonce_beside_drcl_is_validated() -> None:
    """``w_infonce`` adds InfoNCE beside a triplet loss; with ``triplet="infonce"`` it is refused
    (that would count the same loss twice), and a negative weight is refused."""
    assert IMLNetObjective(w_infonce=0.0).infonce is None  # no parameter unless it is used
    assert IMLNetObjective(w_infonce=0.5).infonce is not None
    with pytest.raises(ValueError, match="w_drcl to weight"):
        IMLNetObjective(triplet="infonce", w_infonce=1.0)
    with pytest.raises(ValueError, match="w_infonce must be >= 0"):
        IMLNetObjective(w_infonce=-1.0)
