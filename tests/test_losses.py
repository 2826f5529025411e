"""Losses against explicit triplet loops and hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from imlnet.losses import (
    batch_hard_mine,
    batch_hard_triplet,
    drcl_loss,
    id_loss,
    plain_triplet_loss,
    reconstruction_loss,
)


def dist(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def naive_batch_hard(anchors, a_lab, refs, r_lab, margin: float):
    """Per anchor: the explicit triplet (a, p, n) of largest hinge; loss = mean over anchors."""
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
            value = dist(a[i], r[p]) - dist(a[i], r[n]) + margin
            if value > best:
                best, arg = value, (p, n)
        losses.append(max(best, 0.0))
        chosen.append(arg)
    return sum(losses) / len(losses), chosen


def test_hand_computed_2d_example() -> None:
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


def test_drcl_is_both_directions_averaged_and_plain_is_the_same_loss() -> None:
    g = torch.Generator().manual_seed(1)
    drone = torch.randn(6, 5, generator=g)
    sat = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 2, 3, 4])
    d2s, _ = naive_batch_hard(drone, labels, sat, labels, 0.3)
    s2d, _ = naive_batch_hard(sat, labels, drone, labels, 0.3)
    expected = torch.tensor((d2s + s2d) / 2, dtype=torch.float32)
    torch.testing.assert_close(drcl_loss(drone, sat, labels, 0.3), expected)
    torch.testing.assert_close(plain_triplet_loss(drone, sat, labels, 0.3), expected)


def test_degenerate_batches_give_finite_gradients() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    same = torch.zeros(4, dtype=torch.long)
    loss = batch_hard_triplet(x, same, x, same, 0.3)  # one class: no negatives at all
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    y = torch.randn(3, 3)
    y.requires_grad_(True)
    labels = torch.tensor([0, 1, 2])
    loss = batch_hard_triplet(y, labels, y.detach().clone(), labels, 0.3)  # d_ap = 0 exactly
    loss.backward()
    assert torch.isfinite(y.grad).all()


def test_reconstruction_and_id_losses_by_hand() -> None:
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [3.0, 1.0]]]])
    torch.testing.assert_close(reconstruction_loss(pred, target), torch.tensor((4.0 + 9.0) / 4))
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    p0 = math.exp(2.0) / (math.exp(2.0) + 1.0 + math.exp(-1.0))
    expected = (-math.log(p0) + math.log(3.0)) / 2
    torch.testing.assert_close(id_loss(logits, labels), torch.tensor(expected))
    assert id_loss(logits.bfloat16(), labels).dtype == torch.float32
