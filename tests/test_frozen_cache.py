"""Frozen units computed once: ``frozen_prefix`` / ``forward(prefix=...)``, the float16
:class:`PrefixCache` (satellite images at four rotations), ``crop_rows``, ``last_stages="dropped"``
and ``IMLNetModule(cache_frozen=True)`` under Lightning."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from imlnet.data.datamodule import CrossViewDataModule
from imlnet.losses import IMLNetObjective
from imlnet.models import IMLNet
from imlnet.models.backbone import UnitBackbone, UnitFeatures, build_backbone
from imlnet.models.cache import PrefixCache, dihedral
from imlnet.models.outputs import IMLNetOutput
from imlnet.training import IMLNetModule, training_losses

TINY = {"muml_channels": 8, "descriptor_dim": 16}
#: (backbone, freeze_units): resnet18 with U1 frozen (no maxpool in the prefix) and with U1-U2
#: (the maxpool's indices in the prefix), EfficientNet-Lite0 with U1-U3 (no indices at all)
FROZEN = [("resnet18", 1), ("resnet18", 2), ("tf_efficientnet_lite0", 3)]
FROZEN_IDS = [f"{b}-freeze{k}" for b, k in FROZEN]


def tiny_model(backbone: str = "resnet18", num_classes: int = 3, **kw) -> IMLNet:
    """A seeded IML-Net with narrow heads and random weights (IRN and MUML on)."""
    torch.manual_seed(0)
    return IMLNet(num_classes, backbone=backbone, **{**TINY, **kw})


def images(n: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def outputs(out: IMLNetOutput) -> dict[str, torch.Tensor]:
    """The tensors of a forward pass by name (descriptor, logits, unit maps/logits, IRN)."""
    named = {"descriptor": out.descriptor, "embedding": out.embedding, "logits": out.logits}
    named |= {f"unit_map{i}": m for i, m in enumerate(out.unit_maps)}
    named |= {f"unit_logits{i}": m for i, m in enumerate(out.unit_logits)}
    if out.reconstruction is not None:
        named["reconstruction"] = out.reconstruction
    return named


def assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """``|actual - expected| <= tol * max|expected|`` (an error relative to the tensor's scale)."""
    assert actual.shape == expected.shape, what
    scale = float(expected.abs().max()) or 1.0
    err = float((actual.float() - expected.float()).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x scale {scale:.3g}"


def bn_modes(units) -> set[bool]:
    """The ``training`` flags of the batch norms in ``units`` (resnet's U2 and U4 are built as
    ``nn.ModuleList`` wrappers on each ``unit_modules()`` call: their own flag means nothing)."""
    return {m.training for u in units for m in u.modules() if isinstance(m, torch.nn.BatchNorm2d)}


def assert_same_features(a: UnitFeatures, b: UnitFeatures, tol: float | None = None) -> None:
    assert len(a.maps) == len(b.maps)
    for i, (x, y) in enumerate(zip(a.maps, b.maps, strict=True)):
        if tol is None:
            assert torch.equal(x, y), f"U{i + 1}"
        else:
            assert_near(x, y, tol, f"U{i + 1}")
    assert (a.pool_indices is None) == (b.pool_indices is None)
    if a.pool_indices is not None:
        assert torch.equal(a.pool_indices.long(), b.pool_indices.long())
        assert tuple(a.pre_pool_size) == tuple(b.pre_pool_size)


# --------------------------------------------------------------------------- the prefix
@pytest.mark.parametrize(("backbone", "freeze"), FROZEN, ids=FROZEN_IDS)
def test_forward_from_the_frozen_prefix_equals_the_forward_of_the_images(backbone, freeze):
    model = tiny_model(backbone, freeze_units=freeze).eval()
    x = images()
    with torch.no_grad():
        prefix = model.frozen_prefix(x)
        full = model(x)
        resumed = model(None, prefix=prefix)
    assert len(prefix.maps) == freeze
    # the maxpool (U2) holds indices: in the prefix when U2 is frozen, else computed after it
    assert (prefix.pool_indices is not None) == (backbone == "resnet18" and freeze >= 2)
    assert full.reconstruction is not None and len(full.unit_maps) == 4
    expected, got = outputs(full), outputs(resumed)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name  # the same operations on the same values
    # the prefix is the encoder's own first units (and its maxpool, when frozen)
    units = model.forward_units(x)
    pool = (units.pool_indices, units.pre_pool_size) if freeze >= 2 else (None, None)
    assert_same_features(prefix, UnitFeatures(units.maps[:freeze], *pool))


def test_frozen_prefix_needs_frozen_units():
    with pytest.raises(RuntimeError, match="freeze_units"):
        tiny_model().frozen_prefix(images(2))
    with pytest.raises(ValueError, match="cached prefix"):
        tiny_model(freeze_units=1).encoder.forward_units(None, start=1)


@pytest.mark.parametrize(
    ("backbone", "freeze", "share"),
    [("resnet18", 1, True), ("resnet18", 2, False), ("tf_efficientnet_lite0", 3, True)],
    ids=["resnet18-freeze1", "resnet18-freeze2-per-domain", "tf_efficientnet_lite0-freeze3"],
)
def test_prefix_cache_holds_every_rotation_in_half_precision(backbone, freeze, share):
    model = tiny_model(backbone, freeze_units=freeze, share_weights=share).eval()
    drone, sat = images(3, seed=2), images(2, seed=3)
    data = {
        **{(f"d{i}", "drone"): img for i, img in enumerate(drone)},
        **{(f"s{i}", "satellite"): img for i, img in enumerate(sat)},
    }
    items = [(f"d{i}", "drone", 0) for i in range(3)]
    items += [(f"s{i}", "satellite", r) for i in range(2) for r in range(4)]
    calls: list[tuple[str, str]] = []

    def load(key: str, domain: str) -> torch.Tensor:
        calls.append((key, domain))
        return data[(key, domain)]

    model.train()  # build switches to eval mode for the passes and back
    cache = PrefixCache.build(model, items, load, batch_size=3)
    assert model.training and bn_modes(model._frozen_modules()) == {False}
    assert len(cache) == 3 + 2 * 4
    assert all(m.dtype == torch.float16 and m.shape[0] == len(cache) for m in cache.maps)
    extra = 0 if cache.pool_indices is None else cache.pool_indices.nbytes
    assert cache.nbytes == sum(m.nbytes for m in cache.maps) + extra > 0
    # each image is loaded once per batch of passes that needs it, never once per rotation
    assert set(calls) == set(data) and len(calls) <= 3 + 2 * 2
    model.eval()
    with torch.no_grad():
        # the drone entries: that domain's encoder, within float16 rounding
        got = cache.get(["d2", "d0"], device="cpu")
        assert all(m.dtype == torch.float32 for m in got.maps)
        assert_same_features(got, model.frozen_prefix(drone[[2, 0]], "drone"), tol=1e-2)
        if got.pool_indices is not None:
            assert got.pool_indices.dtype == torch.int64
        full = model(drone[[2, 0]], "drone")
        resumed = model(None, "drone", prefix=got)
        for name, value in outputs(full).items():
            assert_near(outputs(resumed)[name], value, 1e-2, name)
        # the satellite entry at rotation r: the prefix of the image turned by r x 90 degrees
        for r in range(4):
            turned = torch.rot90(sat, r, (2, 3))
            got = cache.get(["s0", "s1"], [r, r])
            assert_same_features(got, model.frozen_prefix(turned, "satellite"), tol=1e-2)
            full = model(turned, "satellite")
            resumed = model(None, "satellite", prefix=got)
            for name, value in outputs(full).items():
                assert_near(outputs(resumed)[name], value, 1e-2, f"rotation {r}: {name}")
        # symmetries are taken modulo 8 (4-7 mirrored) and may differ per row
        mixed = cache.get(["s1", "s0", "s1"], [1, 10, -5])
        for row, (i, r) in enumerate([(1, 1), (0, 2), (1, 3)]):
            alone = cache.get([f"s{i}"], [r])
            for a, b in zip(mixed.maps, alone.maps, strict=True):
                assert torch.equal(a[row], b[0])
    if not share:  # one encoder per domain: the drone entries are not the satellite encoder's
        with torch.no_grad():
            other = model.frozen_prefix(drone[[0]], "satellite").maps[-1]
        assert not torch.allclose(cache.get(["d0"]).maps[-1], other, atol=1e-2)


def test_unknown_keys_and_rotations_are_named():
    model = tiny_model(freeze_units=1)
    data = {"a.jpg": images(1)[0]}
    cache = PrefixCache.build(model, [("a.jpg", "drone", 0)], lambda k, d: data[k])
    assert len(cache.get(["a.jpg"]).maps[0]) == 1
    with pytest.raises(KeyError, match=r"missing\.jpg"):
        cache.get(["a.jpg", "missing.jpg"])
    with pytest.raises(KeyError, match=r"a\.jpg.*not in the frozen-feature cache"):
        cache.get(["a.jpg"], [1])  # cached at rotation 0 only
    with pytest.raises(ValueError):  # one rotation per key
        cache.get(["a.jpg", "a.jpg"], [0])


# --------------------------------------------------------------------------- training
def _pair(n: int = 4, size: int = 32):
    return images(n, size, seed=5), images(n, size, seed=6), torch.tensor([0, 1, 2, 1][:n])


@pytest.mark.parametrize(("backbone", "freeze"), FROZEN, ids=FROZEN_IDS)
def test_training_losses_with_prefixes_equal_those_without(backbone, freeze):
    """In training mode (batch statistics in the trainable units, dropout off)."""
    model = tiny_model(backbone, freeze_units=freeze, dropout=0.0).train()
    drone, sat, labels = _pair()
    objective = IMLNetObjective(w_rec_satellite=0.5)
    prefixes = (model.frozen_prefix(drone, "drone"), model.frozen_prefix(sat, "satellite"))
    torch.manual_seed(7)
    plain = training_losses(model, objective, drone, sat, labels)
    torch.manual_seed(7)
    cached = training_losses(model, objective, drone, sat, labels, prefixes)
    assert cached.keys() == plain.keys() >= {"id", "triplet", "rec", "rec_satellite", "id_crops"}
    for name, value in plain.items():
        torch.testing.assert_close(cached[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.isfinite(cached["total"])


def test_forward_train_with_prefixes_of_separate_encoders():
    model = tiny_model(freeze_units=2, share_weights=False, dropout=0.0).train()
    drone, sat, labels = _pair()
    prefixes = (model.frozen_prefix(drone, "drone"), model.frozen_prefix(sat, "satellite"))
    a = model.forward_train(drone, sat, labels, reconstruct_satellite=True)
    b = model.forward_train(drone, sat, labels, reconstruct_satellite=True, prefixes=prefixes)
    for part in ("drone", "satellite", "drone_crops", "satellite_crops"):
        for name, value in outputs(getattr(a, part)).items():
            torch.testing.assert_close(
                outputs(getattr(b, part))[name], value, rtol=1e-5, atol=1e-6, msg=part + name
            )


@pytest.mark.parametrize(("backbone", "freeze"), [FROZEN[1], FROZEN[2]], ids=FROZEN_IDS[1:])
def test_frozen_units_stay_put_and_the_rest_trains_from_cached_prefixes(backbone, freeze):
    model = tiny_model(backbone, freeze_units=freeze).train()
    drone, sat, labels = _pair()
    data = {f"d{i}": x for i, x in enumerate(drone)} | {f"s{i}": x for i, x in enumerate(sat)}
    items = [(k, "drone" if k[0] == "d" else "satellite", 0) for k in data]
    cache = PrefixCache.build(model, items, lambda key, domain: data[key])
    prefixes = (cache.get([f"d{i}" for i in range(4)]), cache.get([f"s{i}" for i in range(4)]))
    units = model.encoder.unit_modules()
    before = [{k: v.clone() for k, v in u.state_dict().items()} for u in units]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    loss = training_losses(model, IMLNetObjective(), drone, sat, labels, prefixes)["total"]
    loss.backward()
    for i, unit in enumerate(units):
        frozen = i < freeze
        for name, p in unit.named_parameters():
            assert p.requires_grad is not frozen, (i, name)
            if frozen:
                assert p.grad is None, (i, name)
        if not frozen:  # the crops pass the whole encoder, the originals resume after U_k
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unit.parameters())
    # the MUML heads on frozen units still learn from the cached maps
    assert all(p.grad is not None for p in model.heads[0].parameters())
    opt.step()
    for i, (unit, old) in enumerate(zip(units, before, strict=True)):
        new = unit.state_dict()
        changed = [k for k in old if not torch.equal(old[k], new[k])]
        if i < freeze:  # weights and batch-norm statistics (eval mode) alike
            assert not changed, (i, changed)
        else:
            assert changed, i
    assert bn_modes(units[:freeze]) == {False} and bn_modes(units[freeze:]) == {True}


def test_crop_rows_takes_the_crops_of_the_first_pairs():
    model = tiny_model(irn=False).train()
    drone, sat, labels = _pair()
    units = (0, 1, 2, 3)
    out = model.forward_train(drone, sat, labels, crop_units=units, crop_rows=2)
    assert out.drone.logits.shape[0] == out.satellite.logits.shape[0] == 4
    assert out.drone_crops.logits.shape[0] == out.satellite_crops.logits.shape[0] == 5 * 2
    assert all(u.shape[0] == 10 for u in out.satellite_crops.unit_logits)
    # the crops of the first two pairs are those of those pairs alone (eval mode: no batch mix)
    model.eval()
    with torch.no_grad():
        some = model.forward_train(drone, sat, labels, crop_units=(2,), crop_rows=2)
        first = model.forward_train(drone[:2], sat[:2], labels[:2], crop_units=(2,))
    torch.testing.assert_close(some.satellite_crops.logits, first.satellite_crops.logits)
    model.train()
    objective = IMLNetObjective(crop_rows=2)
    parts = training_losses(model, objective, drone, sat, labels)
    assert torch.isfinite(parts["id_crops"]) and torch.isfinite(parts["total"])
    parts["total"].backward()
    full = model.forward_train(drone, sat, labels, crop_units=units, crop_rows=None)
    assert full.drone_crops.logits.shape[0] == full.satellite_crops.logits.shape[0] == 5 * 4
    many = model.forward_train(drone, sat, labels, crop_units=(1,), crop_rows=99)
    assert many.drone_crops.logits.shape[0] == 2 * 4  # at most the batch
    assert IMLNetObjective().crop_rows is None
    with pytest.raises(ValueError, match="crop_rows"):
        IMLNetObjective(crop_rows=0)


# --------------------------------------------------------------------------- last_stages
@pytest.mark.parametrize(
    ("backbone", "channels"),
    [("resnet18", [64, 64, 128, 256]), ("tf_efficientnet_lite0", [16, 24, 40, 112])],
)
def test_dropped_last_stages_end_u4_at_stride_16(backbone, channels):
    encoder = build_backbone(backbone, False, "dropped")
    assert encoder.channels == channels
    assert [int(f["reduction"]) for f in encoder.feature_info] == [2, 4, 8, 16]
    x = images(2, 64)
    with torch.no_grad():
        maps = encoder.forward_units(x).maps
        u4 = encoder.forward_features(x)
    assert [tuple(m.shape[1:]) for m in maps] == [
        (c, 64 // r, 64 // r) for c, r in zip(channels, (2, 4, 8, 16), strict=True)
    ]
    assert torch.equal(u4, maps[3])
    dilated = build_backbone(backbone, False, "dilated")
    n_dilated = sum(p.numel() for p in dilated.parameters())
    assert sum(p.numel() for p in encoder.parameters()) < n_dilated  # the stages are not built
    if isinstance(encoder, UnitBackbone):
        assert isinstance(encoder.layer4, torch.nn.Identity)
    # the whole model builds and takes an optimiser step
    model = tiny_model(backbone, last_stages="dropped", freeze_units=1).train()
    assert model.bottleneck[0].in_features == channels[3]
    assert model.config["last_stages"] == "dropped"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    drone, sat, labels = _pair(4, 64)
    parts = training_losses(model, IMLNetObjective(crop_units="random"), drone, sat, labels)
    parts["total"].backward()
    opt.step()
    assert torch.isfinite(parts["total"])
    with torch.no_grad():
        out = model.eval()(drone)
    assert out.reconstruction.shape == drone.shape and out.unit_maps[3].shape[-1] == 64 // 16


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
def test_invalid_last_stages_are_rejected(backbone):
    with pytest.raises(ValueError, match="last_stages"):
        build_backbone(backbone, False, "removed")
    with pytest.raises(ValueError, match="last_stages"):
        IMLNet(3, backbone=backbone, last_stages="removed", **TINY)


# --------------------------------------------------------------------------- Lightning
def _datamodule(root: Path, augment: bool) -> CrossViewDataModule:
    return CrossViewDataModule(
        root=str(root),
        dataset="synthetic",
        image_size=32,
        batch_size=3,
        eval_batch_size=16,
        augment=augment,
        seed=0,
    )


def _trainer(root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )


def _cached_module(model: IMLNet, tmp_path: Path, **kw) -> IMLNetModule:
    """A module that trains ``model`` from the frozen-feature cache (MUML crops of 2 pairs)."""
    return IMLNetModule(
        model,
        IMLNetObjective(crop_units="random", crop_rows=2),
        optimizer="adamw",
        lr=1e-3,
        export_dir=str(tmp_path / "export"),
        cache_frozen=True,
        **kw,
    )


def _training_files(dm: CrossViewDataModule) -> tuple[list[str], list[str]]:
    """The training set's drone and satellite files, as the cache keys them."""
    train = dm.train_set
    drones = [str(p) for b in train.classes for p in train.drone_files[b]]
    return drones, [str(p) for b in train.classes for p in train.satellite_files[b]]


@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # the frozen units
def test_module_caches_the_training_set_and_fits(synth: Path, tmp_path: Path):
    L.seed_everything(0, verbose=False)
    dm = _datamodule(synth, augment=False)
    model = IMLNet(dm.num_classes, backbone="resnet18", freeze_units=2, **TINY)
    module = IMLNetModule(
        model, IMLNetObjective(crop_units="random"), export_dir=str(tmp_path / "export")
    )
    assert module._cache is None  # cache_frozen is off by default
    module = _cached_module(model, tmp_path)
    frozen = {k: v.clone() for k, v in model.encoder.unit_modules()[0].state_dict().items()}
    rows: list[int] = []
    model.encoder.unit1.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    cache = module._cache
    assert isinstance(cache, PrefixCache)
    train = dm.train_set
    drones, sats = _training_files(dm)
    assert len(set(drones)) == len(drones) and len(set(sats)) == len(sats)
    expected = {(p, 0) for p in drones} | {(p, r) for p in sats for r in range(4)}
    assert set(cache.rows) == expected and len(cache) == len(drones) + 4 * len(sats)
    assert cache.pool_indices is not None and len(cache.maps) == 2
    # U1 ran over the training set once (drone, then satellite at 4 rotations), then only over
    # the MUML crops: 2 pairs x (1 random unit + combined) x 2 domains a step; the 3 + 3
    # originals of each step resumed from the cache
    assert rows == [len(drones), 4 * len(sats), 8, 8]
    # an entry is the frozen units' output of the image through the training set's transform
    item = train[0]
    with torch.no_grad():
        live = model.eval().frozen_prefix(item["drone"][None])
        turned = model.frozen_prefix(torch.rot90(item["satellite"], 3, (1, 2))[None])
    assert_same_features(cache.get([item["drone_path"]]), live, tol=1e-2)
    assert_same_features(cache.get([item["satellite_path"]], [3]), turned, tol=1e-2)
    # a step's satellite images are turned by a random multiple of 90 degrees, and their
    # prefixes are the cache's entries at those rotations
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    drone, sat, (pd, ps) = module._cached_inputs(batch)
    assert torch.equal(drone, batch["drone"])  # drone images as they are without cache_flips
    turns = [
        next(k for k in range(4) if torch.equal(torch.rot90(s, k, (1, 2)), t))
        for s, t in zip(batch["satellite"], sat, strict=True)
    ]
    torch.manual_seed(0)
    assert turns == torch.randint(4, (len(turns),)).tolist()
    with torch.no_grad():
        assert_same_features(ps, model.frozen_prefix(sat), tol=1e-2)
        assert_same_features(pd, model.frozen_prefix(batch["drone"]), tol=1e-2)
    after = model.encoder.unit_modules()[0].state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_dihedral_is_the_eight_symmetries_of_the_square():
    x = torch.arange(9.0).reshape(1, 3, 3)
    got = [dihedral(x, t) for t in range(8)]
    assert all(torch.equal(got[t], torch.rot90(x, t, (1, 2))) for t in range(4))
    assert all(torch.equal(got[4 + t], torch.rot90(x.flip(-1), t, (1, 2))) for t in range(4))
    assert len({tuple(g.flatten().tolist()) for g in got}) == 8  # all different
    assert torch.equal(dihedral(x, 12), got[4]) and torch.equal(dihedral(x, -1), got[7])


@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # the frozen units
def test_module_caches_mirrored_images_with_cache_flips(synth: Path, tmp_path: Path):
    L.seed_everything(0, verbose=False)
    dm = _datamodule(synth, augment=False)
    model = IMLNet(dm.num_classes, backbone="resnet18", freeze_units=1, **TINY)
    module = _cached_module(model, tmp_path, cache_flips=True)
    with pytest.raises(ValueError, match="set cache_frozen: true"):
        IMLNetModule(model, cache_flips=True)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    drones, sats = _training_files(dm)
    expected = {(p, t) for p in drones for t in (0, 4)} | {(p, t) for p in sats for t in range(8)}
    assert set(module._cache.rows) == expected
    # each pair's images take a drawn symmetry, and their prefixes are the cache's entries for it
    batch = next(iter(dm.train_dataloader()))
    seen_d, seen_s = set(), set()
    for seed in range(6):
        torch.manual_seed(seed)
        drone, sat, (pd, ps) = module._cached_inputs(batch)
        for orig, got, allowed, seen in (
            (batch["drone"], drone, (0, 4), seen_d),
            (batch["satellite"], sat, range(8), seen_s),
        ):
            for o, g in zip(orig, got, strict=True):
                seen.add(next(t for t in allowed if torch.equal(dihedral(o, t), g)))
        with torch.no_grad():
            assert_same_features(ps, model.eval().frozen_prefix(sat), tol=1e-2)
            assert_same_features(pd, model.frozen_prefix(drone), tol=1e-2)
    assert seen_d == {0, 4} and len(seen_s) >= 6  # mirrored drone images occur


@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # the frozen units
def test_module_in_channels_last_trains_from_the_cache_of_bf16_frozen_units(synth, tmp_path):
    # the demo's CPU settings: the cached prefixes reach the trained units in channels-last
    # layout, and they are the (bf16) frozen units' own output
    L.seed_everything(0, verbose=False)
    dm = _datamodule(synth, augment=False)
    model = IMLNet(
        dm.num_classes,
        backbone="tf_efficientnet_lite0",
        last_stages="dropped",
        freeze_units=3,
        frozen_precision="bf16",
        **TINY,
    )
    module = _cached_module(model, tmp_path, channels_last=True)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    batch = next(iter(dm.train_dataloader()))
    drone, _, (pd, ps) = module._cached_inputs(batch)
    maps = (*pd.maps, *ps.maps)
    assert all(m.dtype == torch.float32 for m in maps)
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps)
    with torch.no_grad():
        assert_same_features(pd, model.eval().frozen_prefix(drone), tol=1e-2)


@pytest.mark.parametrize(
    ("augment", "freeze", "message"),
    [(True, 2, "augment: false"), (False, 0, "freeze_units >= 1")],
    ids=["augmented-data", "nothing-frozen"],
)
def test_module_cache_refuses_what_it_cannot_hold(synth, tmp_path, augment, freeze, message):
    dm = _datamodule(synth, augment=augment)
    model = IMLNet(dm.num_classes, backbone="resnet18", freeze_units=freeze, **TINY)
    module = IMLNetModule(model, cache_frozen=True, export_dir=str(tmp_path / "export"))
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path).fit(module, datamodule=dm)
    assert module._cache is None


# --------------------------------------------------------------------------- frozen precision
@pytest.mark.parametrize(("backbone", "freeze"), FROZEN, ids=FROZEN_IDS)
def test_frozen_units_in_bf16_hand_on_float32_and_stay_close_to_fp32(backbone, freeze):
    fp32 = tiny_model(backbone, freeze_units=freeze).eval()
    bf16 = tiny_model(backbone, freeze_units=freeze, frozen_precision="bf16").eval()
    assert bf16.config["frozen_precision"] == "bf16" and fp32.config["frozen_precision"] == "fp32"
    x = images()
    with torch.no_grad():
        prefix = bf16.frozen_prefix(x)
        exact = fp32.frozen_prefix(x)
        assert all(m.dtype == torch.float32 for m in prefix.maps)
        # rounded to bf16 (8 bits of mantissa) on the way, never computed in fp32
        assert not all(torch.equal(a, b) for a, b in zip(prefix.maps, exact.maps, strict=True))
        for i, (a, b) in enumerate(zip(prefix.maps, exact.maps, strict=True)):
            assert_near(a, b, 0.05, f"U{i + 1}")
        # (the maxpool's arg-max may move where rounding changes which value is largest)
        assert (prefix.pool_indices is None) == (exact.pool_indices is None)
        # resuming from the bf16 prefix is the bf16 model's own forward (the unfrozen units in
        # fp32 either way), and its descriptors stay close to the fp32 model's
        full, resumed = bf16(x), bf16(None, prefix=prefix)
        for name, value in outputs(full).items():
            assert torch.equal(outputs(resumed)[name], value), name
        d16, d32 = bf16.encode(x), fp32.encode(x)
        assert d16.dtype == torch.float32
        assert float((d16 * d32).sum(1).min()) > 0.99  # cosine of the unit descriptors
        assert_near(bf16.encode(x, "satellite"), fp32.encode(x, "satellite"), 0.1, "satellite")


def test_frozen_precision_auto_follows_the_device_and_is_checked():
    from imlnet.models.imlnet import native_bf16

    auto = tiny_model(freeze_units=1, frozen_precision="auto")
    assert auto.frozen_bf16("cpu") == native_bf16("cpu")
    assert not tiny_model(frozen_precision="bf16").frozen_bf16("cpu")  # nothing frozen
    assert tiny_model(freeze_units=1, frozen_precision="bf16").frozen_bf16("cpu")
    with pytest.raises(ValueError, match="frozen_precision"):
        tiny_model(frozen_precision="half")
