"""The IRN decoder: max-unpooling puts values back at the encoder's arg-max, output shapes."""

from __future__ import annotations

import pytest
import torch

from imlnet.models.backbone import UnitBackbone
from imlnet.models.irn import IRNDecoder


def test_unpooling_puts_each_value_back_at_its_argmax() -> None:
    # 4x4 plane whose 3x3/2 (pad 1) pooling windows have their maxima in the four corners.
    plane = torch.tensor(
        [
            [9.0, 1.0, 2.0, 8.0],
            [1.0, 0.5, 0.2, 1.0],
            [2.0, 0.1, 0.3, 0.4],
            [7.0, 1.0, 0.6, 6.0],
        ]
    )[None, None]
    net = UnitBackbone("resnet18")
    pooled, indices = net.maxpool(plane)
    assert pooled.flatten().tolist() == [9.0, 8.0, 7.0, 6.0]
    assert indices.flatten().tolist() == [0, 3, 12, 15]
    dec = IRNDecoder(net.channels)
    values = torch.tensor([[10.0, 20.0], [30.0, 40.0]])[None, None]
    out = dec.unpool(values, indices, output_size=plane.shape[-2:])
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[0, 3], expected[3, 0], expected[3, 3] = 10.0, 20.0, 30.0, 40.0
    torch.testing.assert_close(out[0, 0], expected)


def test_unpooling_of_real_stem_features_restores_the_maxima() -> None:
    torch.manual_seed(0)
    net = UnitBackbone("resnet18").eval()
    with torch.no_grad():
        units = net.forward_units(torch.randn(2, 3, 64, 64))
        pooled, _ = net.maxpool(units.maps[0])
        dec = IRNDecoder(net.channels)
        back = dec.unpool(pooled, units.pool_indices, output_size=units.pre_pool_size)
    u1 = units.maps[0]
    hit = back != 0
    # Where a value came back it is the stem's value there (the window maximum) ...
    torch.testing.assert_close(back[hit], u1[hit])
    # ... and every pooled maximum came back (positive maxima: ReLU output of random input).
    flat = back.flatten(2)
    for b in range(2):
        for c in range(0, 64, 7):
            idx = units.pool_indices[b, c].flatten()
            torch.testing.assert_close(flat[b, c, idx], pooled[b, c].flatten())
    assert int(hit.sum()) <= pooled.numel()


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_reconstruction_shape(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = UnitBackbone("resnet18")
    dec = IRNDecoder(net.channels)
    x = torch.randn(2, 3, *size)
    rec = dec(net.forward_units(x))
    assert rec.shape == x.shape
    rec.square().mean().backward()
    assert all(p.grad is not None for p in dec.parameters())
    # The loss shapes the whole encoder (through U4, the descriptor's map).
    assert all(p.grad is not None for p in net.parameters())
