"""IMLNet and IMLNetObjective: radius, baseline equivalence, gradients, training, persistence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from imlnet.errors import CheckpointError
from imlnet.losses import IMLNetObjective, drcl_loss, id_loss, reconstruction_loss
from imlnet.models import IMLNet
from imlnet.models.muml import crop_resize

SMALL = {"backbone": "resnet18", "muml_channels": 16, "descriptor_dim": 32}


def batch(seed: int, n: int = 4, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    drone = torch.randn(n, 3, size, size, generator=g)
    sat = torch.randn(n, 3, size, size, generator=g)
    return drone, sat, torch.arange(n) % 3


def test_descriptors_lie_on_the_radius_r_sphere() -> None:
    torch.manual_seed(0)
    model = IMLNet(3, radius=2.5, irn=False, muml=False, **SMALL).eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        out = model(x, "satellite")
        desc = model.encode(x, "satellite")
    torch.testing.assert_close(desc, out.descriptor)
    torch.testing.assert_close(desc.norm(dim=1), torch.full((6,), 2.5))
    torch.testing.assert_close(desc, 2.5 * out.embedding / out.embedding.norm(dim=1, keepdim=True))
    d = torch.cdist(desc, -desc)  # antipodal points: the largest distance there is, 2r
    assert float(d.min()) >= 0.0 and float(d.max()) <= 5.0 + 1e-4
    torch.testing.assert_close(d.diagonal(), torch.full((6,), 5.0))
    assert model.radius == 2.5 and model.descriptor_dim == 32


def test_all_switches_off_is_the_university1652_baseline() -> None:
    classes = 7
    resnet50 = 25_557_032  # torchvision resnet50 (ImageNet fc included)
    fc = 2048 * 1000 + 1000
    class_block = (2048 * 512 + 512) + 2 * 512 + (512 * classes + classes)
    model = IMLNet(classes, backbone="resnet50", pool="avg", irn=False, muml=False)
    assert sum(p.numel() for p in model.parameters()) == resnet50 - fc + class_block
    assert model.irn is None and model.heads is None
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.5
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"encoder", "bottleneck", "classifier"}


def test_forward_shapes_of_the_full_model() -> None:
    torch.manual_seed(0)
    model = IMLNet(5, **SMALL)
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
    assert out.reconstruction.shape == x.shape
    assert model(x, reconstruct=False).reconstruction is None
    with pytest.raises(ValueError, match="domain"):
        model(x, "street")


CASES = [
    # irn, muml, triplet, share_weights, expected parts
    (True, True, "drcl", False, {"id", "triplet", "rec", "id_crops", "total"}),
    (False, True, "plain", True, {"id", "triplet", "id_crops", "total"}),
    (True, False, "none", True, {"id", "rec", "total"}),
    (False, False, "drcl", True, {"id", "triplet", "total"}),
]


@pytest.mark.parametrize(("irn", "muml", "triplet", "share", "expected"), CASES)
def test_gradients_reach_exactly_the_active_parts(irn, muml, triplet, share, expected) -> None:
    torch.manual_seed(0)
    model = IMLNet(3, irn=irn, muml=muml, share_weights=share, **SMALL)
    parts = IMLNetObjective(triplet=triplet)(model, *batch(1))
    assert set(parts) == expected
    parts["total"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    prefixes = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert ("irn" in prefixes) == irn and ("heads" in prefixes) == muml
    assert ("encoders" in prefixes) == (not share)


def test_retrieval_encoding_does_no_irn_or_muml_work() -> None:
    torch.manual_seed(0)
    model = IMLNet(3, **SMALL)
    model.encode(batch(2)[0], "drone").sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("irn.", "heads.", "classifier.")):
            assert p.grad is None, name
        else:
            assert p.grad is not None, name


def test_separate_encoders_per_domain() -> None:
    torch.manual_seed(0)
    shared = IMLNet(3, irn=False, muml=False, **SMALL)
    split = IMLNet(3, irn=False, muml=False, share_weights=False, **SMALL).eval()
    encoder = sum(p.numel() for p in shared.encoder.parameters())
    assert sum(p.numel() for p in split.parameters()) == (
        sum(p.numel() for p in shared.parameters()) + encoder
    )
    x = batch(3)[0]
    with torch.no_grad():
        assert not torch.allclose(split.encode(x, "drone"), split.encode(x, "satellite"))


def test_a_few_steps_reduce_every_loss_part() -> None:
    torch.manual_seed(0)
    model = IMLNet(4, **SMALL)
    objective = IMLNetObjective()
    drone, sat, _ = batch(4)
    labels = torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        parts = objective(model, drone, sat, labels)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    first, last = history[0], history[-1]
    assert set(first) == {"id", "triplet", "rec", "id_crops", "total"}
    for key in first:
        assert last[key] < 0.9 * first[key], (key, first[key], last[key])


def expected_parts(model, objective, drone, sat, labels, units):
    """The documented objective, recomputed with one forward pass per crop set."""
    w = objective.weights
    out = {d: model(x, d) for d, x in (("drone", drone), ("satellite", sat))}
    parts = {"id": 0.0, "id_crops": 0.0}
    for domain, x in (("drone", drone), ("satellite", sat)):
        o = out[domain]
        units_ce = sum(id_loss(u, labels) for u in o.unit_logits) / 4
        parts["id"] = parts["id"] + id_loss(o.logits, labels) + units_ce
        crops = model.muml_crops(x, labels, domain)
        terms = []
        for i in units:
            c = model(crops[f"unit{i + 1}"], domain, reconstruct=False)
            others = [id_loss(c.unit_logits[j], labels) for j in range(4) if j != i]
            terms.append(sum(others) / 3)
        c = model(crops["combined"], domain, reconstruct=False)
        terms.append(id_loss(c.logits, labels) + sum(id_loss(u, labels) for u in c.unit_logits) / 4)
        parts["id_crops"] = parts["id_crops"] + sum(terms) / len(terms)
    parts["triplet"] = drcl_loss(out["drone"].descriptor, out["satellite"].descriptor, labels, 0.3)
    parts["rec"] = reconstruction_loss(out["drone"].reconstruction, sat)
    parts["rec_satellite"] = reconstruction_loss(out["satellite"].reconstruction, sat)
    parts["total"] = sum(w[k] * parts[k] for k in w)
    return parts


def test_objective_follows_the_mutual_learning_rule() -> None:
    torch.manual_seed(0)
    model = IMLNet(3, **SMALL).eval()  # eval: no dropout, fixed BN, so passes are comparable
    objective = IMLNetObjective(w_rec=0.5, w_drcl=2.0, w_id=0.7, w_crop=0.3, w_rec_satellite=0.1)
    drone, sat, labels = batch(5)
    with torch.no_grad():
        parts = objective(model, drone, sat, labels)
        expected = expected_parts(model, objective, drone, sat, labels, [0, 1, 2, 3])
    assert set(parts) == set(expected)
    for key in parts:
        torch.testing.assert_close(parts[key], torch.as_tensor(expected[key]), msg=key)
    rand = IMLNetObjective(crop_units="random", seed=3)
    with torch.no_grad():
        value = rand(model, drone, sat, labels)["id_crops"]
        options = [
            expected_parts(model, objective, drone, sat, labels, [i])["id_crops"] for i in range(4)
        ]
    assert min(abs(float(value) - float(o)) for o in options) < 1e-5
    assert int(rand.calls) == 1


def test_muml_crops_are_per_image_and_gradient_free() -> None:
    torch.manual_seed(0)
    model = IMLNet(3, **SMALL).eval()
    images = torch.randn(3, 3, 64, 64, requires_grad=True)
    labels = torch.tensor([2, 0, 1])
    crops = model.muml_crops(images, labels, "drone")
    assert crops["maps"].shape == (5, 3, 64, 64) and crops["boxes"].shape == (5, 3, 4)
    assert not any(v.requires_grad for v in crops.values())
    maps = crops["maps"]
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    for b in range(3):
        one = model.muml_crops(images[b : b + 1], labels[b : b + 1], "drone")
        torch.testing.assert_close(one["maps"][:, 0], maps[:, b], atol=1e-5, rtol=0)
        torch.testing.assert_close(one["boxes"][:, 0], crops["boxes"][:, b])
        for k, name in enumerate(("unit1", "unit2", "unit3", "unit4", "combined")):
            ref = crop_resize(images[b : b + 1].detach(), crops["boxes"][k, b : b + 1])
            torch.testing.assert_close(crops[name][b : b + 1], ref)
    with pytest.raises(RuntimeError, match="muml=True"):
        IMLNet(3, muml=False, irn=False, **SMALL).muml_crops(images, labels)


def test_bf16_autocast_on_cpu() -> None:
    torch.manual_seed(0)
    model = IMLNet(3, **SMALL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = IMLNetObjective(w_rec_satellite=0.5)(model, *batch(6))
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in parts.values())
    parts["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_save_and_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = IMLNet(3, radius=3.0, share_weights=False, **SMALL)
    IMLNetObjective()(model, *batch(7))  # move BN statistics away from their initial values
    model.eval()
    out = model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    x = batch(8)[0]
    for path in (out, out / "model.safetensors"):
        loaded = IMLNet.from_pretrained(path)
        assert not loaded.training and loaded.config == {**model.config, "pretrained": False}
        with torch.no_grad():
            for domain in ("drone", "satellite"):
                assert torch.equal(loaded.encode(x, domain), model.encode(x, domain))


def test_bad_checkpoints_raise_checkpoint_error(tmp_path) -> None:
    torch.manual_seed(0)
    model = IMLNet(3, irn=False, **SMALL)
    good = model.save_pretrained(tmp_path / "good")
    with pytest.raises(CheckpointError, match="missing"):
        IMLNet.from_pretrained(tmp_path / "nothing")
    corrupt = model.save_pretrained(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        IMLNet.from_pretrained(corrupt)
    other = model.save_pretrained(tmp_path / "other")
    config = json.loads((good / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_classes": 4}))
    with pytest.raises(CheckpointError, match="does not match"):
        IMLNet.from_pretrained(other)
    (other / "config.json").write_text(json.dumps({**config, "colour": "red"}))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        IMLNet.from_pretrained(other)
    (other / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        IMLNet.from_pretrained(other)


def test_invalid_arguments_are_rejected() -> None:
    for kwargs in ({"radius": 0.0}, {"pool": "max"}, {"theta": 1.0}, {"crop_padding": -0.1}):
        with pytest.raises(ValueError):
            IMLNet(3, irn=False, muml=False, **SMALL, **kwargs)
    with pytest.raises(ValueError):
        IMLNetObjective(triplet="hard")


def test_models_import_without_lightning() -> None:
    code = (
        "import sys; import imlnet.models, imlnet.losses; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
