"""The whole model: training reduces every loss part, gradients reach exactly the parts in use,
and save_pretrained / from_pretrained round-trips or fails with a message naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from imlnet.errors import CheckpointError
from imlnet.losses import IMLNetObjective, id_loss
from imlnet.models import IMLNet


def small_model(**kw) -> IMLNet:
    torch.manual_seed(0)
    kw = {"backbone": "resnet18", "muml_channels": 16, "descriptor_dim": 16, **kw}
    return IMLNet(4, **kw)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(4, 3, 32, 32, generator=g),
        torch.randn(4, 3, 32, 32, generator=g),
        torch.tensor([0, 1, 2, 3]),
    )


# --------------------------------------------------------------------------- training
def test_a_few_steps_reduce_every_loss_part(batch):
    model = small_model(dropout=0.0).train()
    objective = IMLNetObjective(w_rec_satellite=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history: list[dict[str, float]] = []
    for _ in range(8):
        opt.zero_grad()
        parts = objective(model, *batch)
        parts["total"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    assert set(history[0]) == {"id", "triplet", "rec", "rec_satellite", "id_crops", "total"}
    for k in history[0]:
        first = (history[0][k] + history[1][k]) / 2
        last = (history[-2][k] + history[-1][k]) / 2
        assert last < 0.9 * first, (k, [h[k] for h in history])


# --------------------------------------------------------------------------- gradients
def _grads(model: IMLNet) -> dict[str, bool]:
    """Parameter name -> whether a non-zero gradient reached it."""
    return {
        n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()
    }


@pytest.mark.parametrize(
    ("model_kw", "loss_kw"),
    [
        ({"share_weights": False}, {}),
        ({"irn": False}, {"triplet": "plain"}),
        ({"muml": False, "pool": "avg"}, {}),
        ({"irn": False, "muml": False, "pool": "avg"}, {"triplet": "none"}),
    ],
)
def test_gradients_reach_every_parameter_in_use(batch, model_kw, loss_kw):
    model = small_model(**model_kw).train()
    assert (model.irn is None) == (model_kw.get("irn") is False)
    assert (model.heads is None) == (model_kw.get("muml") is False)
    assert model.irn_enabled == (model.irn is not None)
    assert model.muml_enabled == (model.heads is not None)
    IMLNetObjective(**loss_kw)(model, *batch)["total"].backward()
    missed = [n for n, ok in _grads(model).items() if not ok]
    assert not missed, missed
    if model_kw.get("share_weights") is False:
        names = _grads(model)
        assert any(n.startswith("encoders.drone.") for n in names)
        assert any(n.startswith("encoders.satellite.") for n in names)
        enc = {p for e in model.encoders.values() for p in e.parameters()}
        assert set(model.backbone_parameters()) == enc


def test_no_gradient_reaches_parts_not_used(batch):
    drone, _, labels = batch
    model = small_model(share_weights=False).train()
    out = model(drone, "drone", reconstruct=False)
    assert out.reconstruction is None
    id_loss(out.logits, labels).backward()
    grads = _grads(model)
    assert not any(ok for n, ok in grads.items() if n.startswith(("irn.", "heads.")))
    assert not any(ok for n, ok in grads.items() if n.startswith("encoders.satellite."))
    assert all(ok for n, ok in grads.items() if n.startswith(("encoders.drone.", "classifier.")))


def test_switched_off_parts_do_not_exist():
    model = small_model(irn=False, muml=False)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.reconstruction is None and out.unit_logits == () and out.unit_maps == ()
    assert not any(n.startswith(("irn.", "heads.")) for n, _ in model.named_parameters())


# --------------------------------------------------------------------------- save / load
def test_save_and_load_give_identical_descriptors(tmp_path, batch):
    drone, sat, _ = batch
    model = small_model(share_weights=False, radius=2.0).train()
    IMLNetObjective()(model, *batch)  # move the batch-norm statistics off their initial values
    model.eval()
    folder = model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    for source in (folder, folder / "model.safetensors"):
        loaded = IMLNet.from_pretrained(source)
        assert not loaded.training
        assert loaded.config == {**model.config, "pretrained": False}
        assert loaded.radius == 2.0 and loaded.descriptor_dim == 16
        with torch.no_grad():
            for x, domain in ((drone, "drone"), (sat, "satellite")):
                assert torch.equal(loaded.encode(x, domain), model.encode(x, domain))
                a, b = loaded(x, domain), model(x, domain)
                assert torch.equal(a.reconstruction, b.reconstruction)
                pairs = zip(a.unit_logits, b.unit_logits, strict=True)
                assert all(torch.equal(u, v) for u, v in pairs)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        IMLNet.from_pretrained(tmp_path)
    folder = small_model(irn=False, muml=False).save_pretrained(tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError) as err:
        IMLNet.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_are_named(tmp_path, damage):
    folder = small_model(irn=False, muml=False).save_pretrained(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        IMLNet.from_pretrained(folder)
    assert str(weights) in str(err.value)


def test_config_that_does_not_match_the_weights(tmp_path):
    folder = small_model(irn=False, muml=False).save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_classes": 9}))
    with pytest.raises(CheckpointError) as err:
        IMLNet.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(err.value)
    (folder / "config.json").write_text(json.dumps({**config, "muml": True}))
    with pytest.raises(CheckpointError, match="does not match"):
        IMLNet.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        IMLNet.from_pretrained(folder)
