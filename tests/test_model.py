"""IMLNet and IMLNetObjective: descriptors on the radius-r sphere, the baseline's size, parts and
gradients per switch, the objective against a plain recomputation, training, persistence."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision.models as tvm

from imlnet.errors import CheckpointError
from imlnet.losses import (
    IMLNetObjective,
    drcl_loss,
    id_loss,
    infonce_loss,
    plain_triplet_loss,
    reconstruction_loss,
)
from imlnet.models import IMLNet
from imlnet.training import training_losses


def small_model(num_classes: int = 3, **kw) -> IMLNet:
    """A resnet18 IML-Net with narrow heads, seeded (the defaults: IRN, MUML, GeM, shared)."""
    torch.manual_seed(0)
    kw = {"backbone": "resnet18", "muml_channels": 16, "descriptor_dim": 16, **kw}
    return IMLNet(num_classes, **kw)


@pytest.fixture(scope="module")
def batch():
    """Four drone / satellite pairs of 32 px, three classes (one seen twice)."""
    g = torch.Generator().manual_seed(4)
    return (
        torch.randn(4, 3, 32, 32, generator=g),
        torch.randn(4, 3, 32, 32, generator=g),
        torch.tensor([0, 1, 2, 1]),
    )


def _grads(model: IMLNet) -> dict[str, bool]:
    """Parameter name -> whether a non-zero gradient reached it."""
    return {
        n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()
    }


# --------------------------------------------------------------------------- the network
@pytest.mark.parametrize("radius", [0.5, 2.5])
def test_descriptors_lie_on_the_radius_r_sphere(radius):
    model = small_model(irn=False, muml=False, radius=radius, descriptor_dim=8).eval()
    g = torch.Generator().manual_seed(3)
    x, s = torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)
    with torch.no_grad():
        out = model(x)
        desc = torch.cat([out.descriptor, model.encode(s, "satellite")])
        torch.testing.assert_close(model.encode(x), out.descriptor)
    assert model.radius == radius and model.descriptor_dim == 8
    torch.testing.assert_close(desc.norm(dim=1), torch.full((12,), radius))
    embedding = out.embedding
    torch.testing.assert_close(out.descriptor, radius * embedding / embedding.norm(dim=1)[:, None])
    dist = torch.cdist(desc.double(), desc.double())
    assert float(dist.min()) >= 0.0 and float(dist.max()) <= 2 * radius + 1e-5
    # antipodal points: the largest distance there is, 2r
    torch.testing.assert_close(torch.cdist(desc, -desc).diagonal(), torch.full((12,), 2 * radius))
    # so DRCL is bounded by 2r + margin whatever the network does
    labels = torch.arange(6) % 3
    loss = drcl_loss(desc[:6], desc[6:], labels, margin=0.3)
    assert 0.0 <= float(loss) <= 2 * radius + 0.3


def test_all_switches_off_is_the_university1652_baseline():
    """ResNet-50 without fc + ClassBlock (Linear(2048,512), BN1d(512), Dropout, Linear(512,C))."""
    c = 7
    resnet = tvm.resnet50(weights=None)
    resnet_no_fc = sum(p.numel() for p in resnet.parameters()) - (2048 * 1000 + 1000)
    assert resnet_no_fc == 23_508_032  # torchvision's 25,557,032 minus fc
    class_block = (2048 * 512 + 512) + (512 + 512) + 0 + (512 * c + c)
    model = IMLNet(num_classes=c, backbone="resnet50", irn=False, muml=False, pool="avg")
    assert sum(p.numel() for p in model.parameters()) == resnet_no_fc + class_block
    assert model.irn is None and model.heads is None
    assert not list(model.pool.parameters())
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {
        "encoder",
        "bottleneck",
        "classifier",
    }
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.5
    # outside the encoder: exactly the ClassBlock's layers
    head = [m for n, m in model.named_modules() if n and not n.startswith("encoder")]
    leaves = [m for m in head if not list(m.children())]
    linear = [m for m in leaves if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(2048, 512), (512, c)]
    bn = [m for m in leaves if isinstance(m, torch.nn.BatchNorm1d)]
    assert [m.num_features for m in bn] == [512]
    assert [m.p for m in leaves if isinstance(m, torch.nn.Dropout)] == [0.5]
    # the full IML-Net (GeM p, IRN, heads) is larger, and uses the same encoder parameters
    full = IMLNet(num_classes=c, backbone="resnet50")
    assert sum(p.numel() for p in full.backbone_parameters()) == resnet_no_fc


def test_forward_shapes_of_the_full_model():
    model = small_model(5, descriptor_dim=32, muml_head="paper")
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    assert out.descriptor.shape == out.embedding.shape == (2, 32)
    assert out.logits.shape == (2, 5) and len(out.unit_logits) == 4
    assert all(u.shape == (2, 5) for u in out.unit_logits)
    assert [m.shape for m in out.unit_maps] == [
        (2, 16, 32, 48),
        (2, 16, 16, 24),
        (2, 16, 8, 12),
        (2, 16, 4, 6),
    ]
    # the default, pooled heads: every map on U4's grid (H/16), the same logits' shapes
    pooled = small_model(5, descriptor_dim=32)(x)
    assert [m.shape for m in pooled.unit_maps] == [(2, 16, 4, 6)] * 4
    assert [u.shape for u in pooled.unit_logits] == [(2, 5)] * 4
    assert out.reconstruction.shape == x.shape
    assert model(x, reconstruct=False).reconstruction is None
    with pytest.raises(ValueError, match="domain"):
        model(x, "street")


def test_switched_off_parts_do_not_exist():
    model = small_model(irn=False, muml=False)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.reconstruction is None and out.unit_logits == () and out.unit_maps == ()
    assert not any(n.startswith(("irn.", "heads.")) for n, _ in model.named_parameters())


def test_separate_encoders_per_domain():
    shared = small_model(irn=False, muml=False)
    split = small_model(irn=False, muml=False, share_weights=False).eval()
    encoder = sum(p.numel() for p in shared.encoder.parameters())
    assert sum(p.numel() for p in split.parameters()) == (
        sum(p.numel() for p in shared.parameters()) + encoder
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(split.encode(x, "drone"), split.encode(x, "satellite"))


# --------------------------------------------------------------------------- parts, gradients
SWITCHES = [
    # model switches, objective options, the parts besides "total"
    ({}, {}, {"id", "triplet", "rec", "id_crops"}),
    ({}, {"w_rec_satellite": 0.5}, {"id", "triplet", "rec", "rec_satellite", "id_crops"}),
    ({"share_weights": False}, {}, {"id", "triplet", "rec", "id_crops"}),
    ({}, {"triplet": "none"}, {"id", "rec", "id_crops"}),
    ({"irn": False}, {"triplet": "infonce"}, {"id", "triplet", "id_crops"}),
    ({"irn": False}, {"triplet": "plain"}, {"id", "triplet", "id_crops"}),
    ({"irn": False}, {"w_infonce": 1.5}, {"id", "triplet", "infonce", "id_crops"}),
    ({"muml": False}, {}, {"id", "triplet", "rec"}),
    ({"muml": False, "pool": "avg"}, {"triplet": "none"}, {"id", "rec"}),
    ({"irn": False, "muml": False}, {}, {"id", "triplet"}),
    ({"irn": False, "muml": False, "pool": "avg"}, {"triplet": "none"}, {"id"}),
]


@pytest.mark.parametrize(("model_kw", "loss_kw", "parts"), SWITCHES)
def test_parts_and_gradients_follow_the_switches(batch, model_kw, loss_kw, parts):
    model = small_model(**model_kw).train()
    irn, muml = model_kw.get("irn", True), model_kw.get("muml", True)
    share = model_kw.get("share_weights", True)
    assert (model.irn is None) == (not irn) and model.irn_enabled == irn
    assert (model.heads is None) == (not muml) and model.muml_enabled == muml
    prefixes = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ("irn" in prefixes) == irn and ("heads" in prefixes) == muml
    assert ("encoders" in prefixes) == (not share)

    weights = {"w_rec": 2.0, "w_drcl": 3.0, "w_id": 0.5, "w_crop": 0.25}
    objective = IMLNetObjective(**weights, **loss_kw)
    out = training_losses(model, objective, *batch)
    assert set(out) == parts | {"total"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.values())
    w = {
        "rec": 2.0,
        "rec_satellite": loss_kw.get("w_rec_satellite", 0.0),
        "triplet": 3.0,
        "id": 0.5,
        "id_crops": 0.25,
        "infonce": loss_kw.get("w_infonce", 0.0),
    }
    expected = sum(w[k] * float(out[k].detach()) for k in parts)
    assert float(out["total"].detach()) == pytest.approx(expected, rel=1e-5)

    out["total"].backward()
    missed = [n for n, ok in _grads(model).items() if not ok]
    assert not missed, missed
    # the objective's own parameters: InfoNCE's learned temperature, nothing otherwise
    learned = [n for n, p in objective.named_parameters() if p.grad is not None]
    uses_infonce = loss_kw.get("triplet") == "infonce" or loss_kw.get("w_infonce", 0) > 0
    assert learned == (["infonce.log_scale"] if uses_infonce else [])
    if not share:
        names = _grads(model)
        assert any(n.startswith("encoders.drone.") for n in names)
        assert any(n.startswith("encoders.satellite.") for n in names)
        enc = {p for e in model.encoders.values() for p in e.parameters()}
        assert set(model.backbone_parameters()) == enc


def test_retrieval_and_plain_forward_reach_only_the_parts_they_use(batch):
    drone, _, labels = batch
    model = small_model(share_weights=False).train()
    # Retrieval encoding does no IRN, MUML or classifier work, and only the drone encoder's.
    model.encode(drone, "drone").sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("irn.", "heads.", "classifier.", "encoders.satellite.")):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name
    model.zero_grad(set_to_none=True)
    out = model(drone, "drone", reconstruct=False)
    assert out.reconstruction is None
    id_loss(out.logits, labels).backward()
    grads = _grads(model)
    assert not any(ok for n, ok in grads.items() if n.startswith(("irn.", "heads.")))
    assert not any(ok for n, ok in grads.items() if n.startswith("encoders.satellite."))
    assert all(ok for n, ok in grads.items() if n.startswith(("encoders.drone.", "classifier.")))


# --------------------------------------------------------------------------- the objective
def naive_objective(model, objective, drone, sat, labels, units):
    """The documented objective, one forward pass per image set (eval mode: no batch effects)."""
    out = {d: model(x, d) for d, x in (("drone", drone), ("satellite", sat))}
    parts = {"id": 0.0, "id_crops": 0.0}
    for domain, x in (("drone", drone), ("satellite", sat)):
        o = out[domain]
        units_ce = sum(id_loss(u, labels) for u in o.unit_logits) / 4
        parts["id"] = parts["id"] + id_loss(o.logits, labels) + units_ce
        crops = model.muml_crops(x, labels, domain)
        terms = []
        for i in units:  # the crop found by unit i teaches the other units
            c = model(crops[f"unit{i + 1}"], domain, reconstruct=False)
            others = [id_loss(c.unit_logits[j], labels) for j in range(4) if j != i]
            terms.append(sum(others) / 3)
        # the combined crop teaches all units and the descriptor's classifier
        c = model(crops["combined"], domain, reconstruct=False)
        terms.append(id_loss(c.logits, labels) + sum(id_loss(u, labels) for u in c.unit_logits) / 4)
        parts["id_crops"] = parts["id_crops"] + sum(terms) / len(terms)
    if objective.triplet == "plain":
        a, b, loss = out["drone"].embedding, out["satellite"].embedding, plain_triplet_loss
    else:
        a, b, loss = out["drone"].descriptor, out["satellite"].descriptor, drcl_loss
    parts["triplet"] = loss(a, b, labels, objective.margin)
    nce = infonce_loss(a, b, labels, torch.tensor(1 / 0.07), 0.1)  # Sample4Geo: T 0.07, LS 0.1
    if objective.triplet == "infonce":
        parts["triplet"] = nce
    if objective.weights["infonce"] > 0:  # InfoNCE beside DRCL, on the same descriptors
        a, b = out["drone"].descriptor, out["satellite"].descriptor
        parts["infonce"] = infonce_loss(a, b, labels, torch.tensor(1 / 0.07), 0.1)
    parts["rec"] = ((out["drone"].reconstruction - sat) ** 2).mean()
    parts["rec_satellite"] = ((out["satellite"].reconstruction - sat) ** 2).mean()
    w = objective.weights
    parts["total"] = sum(w[k] * parts[k] for k in w if k in parts)
    return parts


@pytest.mark.parametrize("loss", ["drcl", "plain", "infonce", "drcl+infonce"])
def test_objective_equals_a_plain_recomputation(batch, loss):
    model = small_model().eval()  # eval: no dropout, fixed BN, so passes are comparable
    weights = {"w_rec": 0.5, "w_drcl": 2.0, "w_id": 0.7, "w_crop": 0.3, "w_rec_satellite": 0.1}
    triplet, _, beside = loss.partition("+")
    if beside:  # InfoNCE as an auxiliary beside DRCL
        weights["w_infonce"] = 0.4
    objective = IMLNetObjective(triplet=triplet, margin=0.3, **weights)
    with torch.no_grad():
        parts = training_losses(model, objective, *batch)
        expected = naive_objective(model, objective, *batch, [0, 1, 2, 3])
    assert set(parts) == set(expected)
    for key in parts:
        torch.testing.assert_close(parts[key], torch.as_tensor(expected[key]), msg=key)
    if loss != "drcl":
        return
    # One random unit's crop (plus the combined one): one of the four single-unit objectives.
    rand = IMLNetObjective(crop_units="random", seed=3)
    with torch.no_grad():
        value = training_losses(model, rand, *batch)["id_crops"]
        options = [naive_objective(model, objective, *batch, [i])["id_crops"] for i in range(4)]
    assert min(abs(float(value) - float(o)) for o in options) < 1e-5
    assert int(rand.calls) == 1


def test_satellite_autoencoding_target(batch):
    model = small_model(muml=False).eval()
    drone, sat, labels = batch
    with torch.no_grad():
        got = training_losses(model, IMLNetObjective(w_rec_satellite=1.0), drone, sat, labels)
        rec_s = model(sat, "satellite").reconstruction
    assert float(got["rec_satellite"]) == pytest.approx(float(reconstruction_loss(rec_s, sat)))
    # rec_turns=4: the drone reconstruction against the target's best turn
    with torch.no_grad():
        turned = training_losses(model, IMLNetObjective(rec_turns=4), drone, sat, labels)
        rec_d = model(drone, "drone").reconstruction
    assert float(turned["rec"]) == pytest.approx(float(reconstruction_loss(rec_d, sat, 4)))
    assert float(turned["rec"]) < float(got["rec"])
    with pytest.raises(ValueError, match="rec_turns"):
        IMLNetObjective(rec_turns=2)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize(("crop_units", "crops"), [("all", 20), ("random", 8)])
def test_forward_passes_per_objective_call(batch, share, crop_units, crops):
    """One pass of the images and one of the crops (4 units + combined, or 1 + 1, per image).

    With one encoder, the drone and satellite images go through together (batch norm then sees
    both domains at once, as its running statistics do), and so do the two domains' crops;
    with one encoder per domain, each domain has its own passes. CAMs need no extra pass.
    """
    model = small_model(irn=False, share_weights=share).train()
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    training_losses(model, IMLNetObjective(crop_units=crop_units), *batch)
    assert sizes == ([8, 2 * crops] if share else [4, 4, crops, crops])  # 4 pairs of images


def test_forward_train_returns_originals_and_crops(batch):
    model = small_model().eval()
    drone, sat, labels = batch
    with torch.no_grad():
        out = model.forward_train(drone, sat, labels, crop_units=(3, 1), reconstruct_satellite=True)
        crops = model.muml_crops(sat, labels, "satellite")
        again = model(torch.cat([crops["unit4"], crops["unit2"], crops["combined"]]), "satellite")
    assert out.crop_units == (3, 1) and out.drone_crops.logits.shape == (12, 3)
    assert out.drone.reconstruction.shape == sat.shape
    assert out.satellite.reconstruction is not None and out.drone_crops.reconstruction is None
    # the satellite crops are the crops of units 4 and 2, then the combined one, in that order
    torch.testing.assert_close(out.satellite_crops.logits, again.logits)
    with pytest.raises(ValueError, match="crop_units"):
        model.forward_train(drone, sat, labels, crop_units=(4,))
    with pytest.raises(ValueError, match="crop_units"):
        model.forward_train(drone, sat, labels, crop_units=(1, 1))
    plain = small_model(irn=False, muml=False).forward_train(drone, sat, labels)
    assert plain.drone_crops is None and plain.crop_units == ()
    assert plain.drone.reconstruction is None
    # the IRN decodes only the reconstructions in use: the B drone images, or all 2B
    rows: list[int] = []
    model.irn.register_forward_pre_hook(lambda m, a: rows.append(len(a[0].maps[3])))
    with torch.no_grad():
        model.forward_train(drone, sat, labels)
        model.forward_train(drone, sat, labels, reconstruct_satellite=True)
    assert rows == [4, 8]


def test_a_few_steps_reduce_every_loss_part():
    model = small_model(4, dropout=0.0).train()
    g = torch.Generator().manual_seed(0)
    drone, sat = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    objective = IMLNetObjective(w_rec_satellite=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history: list[dict[str, float]] = []
    for _ in range(8):
        opt.zero_grad()
        parts = training_losses(model, objective, drone, sat, labels)
        parts["total"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    assert set(history[0]) == {"id", "triplet", "rec", "rec_satellite", "id_crops", "total"}
    for k in history[0]:
        first = (history[0][k] + history[1][k]) / 2
        last = (history[-2][k] + history[-1][k]) / 2
        assert last < 0.9 * first, (k, [h[k] for h in history])


def test_bf16_autocast_on_cpu(batch):
    model = small_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = training_losses(model, IMLNetObjective(w_rec_satellite=0.5), *batch)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in parts.values())
    parts["total"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------- save / load
def test_save_and_load_give_identical_outputs(tmp_path, batch):
    drone, sat, _ = batch
    model = small_model(share_weights=False, radius=2.0).train()
    training_losses(
        model, IMLNetObjective(), *batch
    )  # move the batch-norm statistics off their initial values
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
    with pytest.raises(CheckpointError, match="missing"):
        IMLNet.from_pretrained(tmp_path / "nothing")
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
    with pytest.raises(CheckpointError, match="does not match") as err:
        IMLNet.from_pretrained(folder)
    assert str(folder / "model.safetensors") in str(err.value)
    (folder / "config.json").write_text(json.dumps({**config, "muml": True}))
    with pytest.raises(CheckpointError, match="does not match"):
        IMLNet.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "colour": "red"}))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        IMLNet.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        IMLNet.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "meta": [64]}))
    with pytest.raises(CheckpointError, match="meta"):
        IMLNet.from_pretrained(folder)


def test_meta_round_trips_and_old_configs_load(tmp_path):
    folder = small_model(irn=False, muml=False).save_pretrained(tmp_path / "m", {"image_size": 64})
    assert IMLNet.from_pretrained(folder).input_size() == 64
    config = json.loads((folder / "config.json").read_text())
    del config["meta"]  # written before models recorded how they were trained
    (folder / "config.json").write_text(json.dumps(config))
    loaded = IMLNet.from_pretrained(folder)
    assert loaded.meta == {} and loaded.input_size() == 256
    # written before muml_head existed: the heads were the paper's, at each unit's resolution
    folder = small_model(irn=False, muml_head="paper").save_pretrained(tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["muml_head"]
    (folder / "config.json").write_text(json.dumps(config))
    assert IMLNet.from_pretrained(folder).config["muml_head"] == "paper"


@pytest.mark.parametrize("turns", [2, 4])
def test_satellite_descriptors_pooled_over_turns(tmp_path, batch, turns):
    drone, sat, _ = batch
    plain = small_model(irn=False, muml=False, radius=2.0).eval()
    pooled = small_model(irn=False, muml=False, satellite_rotations=turns, radius=2.0).eval()
    pooled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        got = pooled.encode(sat, "satellite")
        step = 4 // turns
        total = sum(
            plain.encode(torch.rot90(sat, k * step, (2, 3)), "satellite") for k in range(turns)
        )
        assert torch.allclose(got, 2.0 * torch.nn.functional.normalize(total, dim=1), atol=1e-5)
        assert torch.allclose(got.norm(dim=1), torch.full((4,), 2.0), atol=1e-5)
        # invariant to the turns pooled over; a quarter turn changes a 2-turn descriptor
        half = pooled.encode(torch.rot90(sat, 2, (2, 3)), "satellite")
        assert torch.allclose(half, got, atol=1e-5)
        quarter = pooled.encode(torch.rot90(sat, 1, (2, 3)), "satellite")
        assert torch.allclose(quarter, got, atol=1e-5) == (turns == 4)
        # drone photos and training are not pooled
        assert torch.allclose(pooled.encode(drone, "drone"), plain.encode(drone, "drone"))
        assert torch.allclose(
            pooled(sat, "satellite").descriptor, plain(sat, "satellite").descriptor
        )
        loaded = IMLNet.from_pretrained(pooled.save_pretrained(tmp_path / "m"))
        assert loaded.satellite_rotations == turns
        assert torch.allclose(loaded.eval().encode(sat, "satellite"), got, atol=1e-6)
        with pytest.raises(ValueError, match="square"):
            pooled.encode(sat[..., :16], "satellite")
    with pytest.raises(ValueError, match="satellite_rotations"):
        small_model(satellite_rotations=3)


# --------------------------------------------------------------------------- arguments, imports
def test_invalid_arguments_are_rejected():
    bad = ({"radius": 0.0}, {"pool": "max"}, {"theta": 1.0}, {"crop_padding": -0.1})
    for kwargs in (*bad, {"muml_head": "wide"}):
        with pytest.raises(ValueError):
            small_model(irn=False, muml=False, **kwargs)
    with pytest.raises(ValueError, match="triplet"):
        IMLNetObjective(triplet="hard")
    with pytest.raises(ValueError, match="crop_units"):
        IMLNetObjective(crop_units="some")
