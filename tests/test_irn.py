"""The IRN decoder: max-unpooling puts values back at the encoder's arg-max; output shapes."""

from __future__ import annotations

import pytest
import torch

from imlnet.models import IRNDecoder, UnitBackbone


@pytest.fixture(scope="module")
def encoded():
    """A resnet18 encoder and decoder (eval, no gradients) and the units of a 64 px batch."""
    torch.manual_seed(0)
    enc = UnitBackbone("resnet18").eval()
    dec = IRNDecoder(enc.channels).eval()
    with torch.no_grad():
        units = enc.forward_units(torch.randn(2, 3, 64, 64))
    return enc, dec, units


def _unpool_case(enc, dec, plane, pooled_values, indices, expected_at):
    """Pool ``plane`` (4x4), check the indices, unpool ``pooled_values`` and compare by hand."""
    pooled, idx = enc.maxpool(torch.tensor(plane)[None, None])
    assert idx[0, 0].tolist() == indices
    values = pooled if pooled_values is None else torch.tensor(pooled_values)[None, None]
    out = dec.unpool(values, idx, output_size=(4, 4))
    expected = torch.zeros(4, 4)
    for (y, x), v in expected_at.items():
        expected[y, x] = v
    torch.testing.assert_close(out[0, 0], expected)
    return pooled


def test_unpooling_puts_each_value_back_at_its_argmax(encoded):
    # 3x3 windows, stride 2, padding 1 over a 4x4 map: windows rows/cols {0,1} and {1,2,3}.
    enc, dec, _ = encoded
    # Maxima in the four corners; new values (what the decoder feeds) go to those positions.
    corners = [
        [9.0, 1.0, 2.0, 8.0],
        [1.0, 0.5, 0.2, 1.0],
        [2.0, 0.1, 0.3, 0.4],
        [7.0, 1.0, 0.6, 6.0],
    ]
    pooled = _unpool_case(
        enc,
        dec,
        corners,
        [[10.0, 20.0], [30.0, 40.0]],
        [[0, 3], [12, 15]],
        {(0, 0): 10.0, (0, 3): 20.0, (3, 0): 30.0, (3, 3): 40.0},
    )
    assert pooled.flatten().tolist() == [9.0, 8.0, 7.0, 6.0]
    # Two windows share the 15: unpooling the pooled values restores each maximum once.
    shared = [
        [9.0, 0.0, 1.0, 2.0],
        [3.0, 4.0, 5.0, 11.0],
        [6.0, 15.0, 7.0, 8.0],
        [10.0, 12.0, 13.0, 14.0],
    ]
    pooled = _unpool_case(
        enc, dec, shared, None, [[0, 7], [9, 9]], {(0, 0): 9.0, (1, 3): 11.0, (2, 1): 15.0}
    )
    assert pooled[0, 0].tolist() == [[9.0, 11.0], [15.0, 15.0]]
    # Maxima off the corners.
    inner = [[8.0, 1.0, 6.0, 2.0], [0.0, 3.0, 1.0, 2.0], [1.0, 2.0, 9.0, 0.0], [7.0, 0.0, 1.0, 4.0]]
    _unpool_case(
        enc,
        dec,
        inner,
        [[1.0, 2.0], [3.0, 4.0]],
        [[0, 2], [12, 10]],
        {(0, 0): 1.0, (0, 2): 2.0, (3, 0): 3.0, (2, 2): 4.0},
    )


def test_unpooling_of_real_stem_features_restores_the_maxima(encoded):
    enc, dec, units = encoded
    u1 = units.maps[0]
    with torch.no_grad():
        pooled, _ = enc.maxpool(u1)
        back = dec.unpool(pooled, units.pool_indices, output_size=units.pre_pool_size)
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


def test_irn_unpools_with_the_encoders_indices(encoded):
    _, dec, units = encoded
    seen = {}
    handle = dec.unpool.register_forward_hook(lambda m, i, o: seen.update(out=o))
    try:
        with torch.no_grad():
            dec(units)
    finally:
        handle.remove()
    out = seen["out"]
    assert tuple(out.shape) == (2, 64, 32, 32)
    allowed = torch.zeros(2, 64, 32 * 32, dtype=torch.bool)
    allowed.scatter_(2, units.pool_indices.flatten(2), True)
    nonzero = out.flatten(2) != 0
    assert nonzero.any()
    assert not (nonzero & ~allowed).any()  # only the recorded arg-max positions hold values


@pytest.mark.parametrize("size", [(64, 64), (32, 96)])
def test_reconstruction_shape_and_gradients(size):
    torch.manual_seed(0)
    net = UnitBackbone("resnet18")
    dec = IRNDecoder(net.channels)
    x = torch.randn(2, 3, *size)
    rec = dec(net.forward_units(x))
    assert rec.shape == x.shape
    assert (rec < 0).any()  # linear output: the normalised input space has negative values
    rec.square().mean().backward()
    assert all(p.grad is not None for p in dec.parameters())
    # The loss shapes the whole encoder (through U4, the descriptor's map).
    assert all(p.grad is not None for p in net.parameters())
