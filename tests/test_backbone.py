"""The four-unit split of torchvision ResNets (last stride 1) and weight loading, never online.

Everything runs on the CPU with random weights; torch.hub's folder points into a temporary folder
wherever the cache is read, so no test downloads anything.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from imlnet.errors import CheckpointError, WeightsNotFoundError
from imlnet.models import ARCHITECTURES, IMLNet, UnitBackbone
from imlnet.models.backbone import cache_path

#: (C1, C2, C3, C4) of each architecture, from torchvision's definitions
CHANNELS = {
    "resnet18": (64, 64, 128, 512),
    "resnet34": (64, 64, 128, 512),
    "resnet50": (64, 256, 512, 2048),
    "resnet101": (64, 256, 512, 2048),
    "resnext50_32x4d": (64, 256, 512, 2048),
    "wide_resnet50_2": (64, 256, 512, 2048),
}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random torchvision state dicts saved once: {name: (path, state)} for three networks."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for seed, name in enumerate(("resnet18", "resnet34", "resnet50")):
        torch.manual_seed(seed)
        state = ARCHITECTURES[name][0](weights=None).state_dict()
        path = folder / f"{name}.pth"
        torch.save(state, path)
        out[name] = (path, state)
    return out


def _backbone_state_from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict to UnitBackbone's keys (conv1/bn1 live in unit1)."""
    out = {}
    for k, v in state.items():
        if k.startswith("fc."):
            continue
        k = k.replace("conv1.", "unit1.0.", 1) if k.startswith("conv1.") else k
        k = k.replace("bn1.", "unit1.1.", 1) if k.startswith("bn1.") else k
        out[k] = v
    return out


# --------------------------------------------------------------------------- unit split
def test_architectures_cover_the_six_names():
    assert set(ARCHITECTURES) == set(CHANNELS)


@pytest.mark.parametrize("name", sorted(CHANNELS))
def test_unit_shapes_and_last_stride(name):
    torch.manual_seed(0)
    net = UnitBackbone(name).eval()
    assert isinstance(net, UnitBackbone)
    chs = list(CHANNELS[name])
    assert net.channels == chs
    assert [f["num_chs"] for f in net.feature_info] == chs
    assert [f["reduction"] for f in net.feature_info] == [2, 4, 8, 16]
    x = torch.randn(1, 3, 64, 96)  # H != W
    with torch.no_grad():
        units = net.forward_units(x)
        last = net.forward_features(x)
        u4 = net(x)
    # U4 at H/16 (a stock ResNet would be at H/32): the last stride is 1.
    for m, c, r in zip(units.maps, chs, (2, 4, 8, 16), strict=True):
        assert m.shape == (1, c, 64 // r, 96 // r)
    assert units.pool_indices.shape == (1, 64, 16, 24)
    assert tuple(units.pre_pool_size) == (32, 48)
    torch.testing.assert_close(last, units.maps[3])
    torch.testing.assert_close(u4, units.maps[3])
    block = net.layer4[0]
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck
def test_units_are_the_torchvision_stages_with_last_stride_one(name, weight_files):
    """U1..U4 equal a plain run of the torchvision network's layers, layer4 without its stride.

    The weights reach the backbone from the saved torchvision file (``pretrained=path``).
    """
    path, state = weight_files[name]
    net = ARCHITECTURES[name][0](weights=None).eval()
    net.load_state_dict(state)
    ours = UnitBackbone(name, pretrained=str(path)).eval()
    ref = copy.deepcopy(net)
    block = ref.layer4[0]
    stride_conv = block.conv2 if name == "resnet50" else block.conv1  # where torchvision puts it
    assert stride_conv.stride == (2, 2)
    stride_conv.stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        u1 = ref.relu(ref.bn1(ref.conv1(x)))
        u2 = ref.layer1(ref.maxpool(u1))
        u3 = ref.layer2(u2)
        u4 = ref.layer4(ref.layer3(u3))
        got = ours.forward_units(x).maps
        stock = net.layer4(net.layer3(u3))
    for a, b in zip(got, (u1, u2, u3, u4), strict=True):
        torch.testing.assert_close(a, b)
    # The stock stride would halve U4: same weights, twice torchvision's layer4 resolution.
    assert stock.shape[-2:] == (2, 2) and u4.shape[-2:] == (4, 4)
    assert got[3].shape[1] == stock.shape[1] == CHANNELS[name][3]


# --------------------------------------------------------------------------- ImageNet weights
def test_pretrained_true_reads_the_cache_and_never_downloads(hub_dir, tmp_path):
    path = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    assert cache_path("resnet18") == path
    with pytest.raises(WeightsNotFoundError) as err:
        UnitBackbone("resnet18", pretrained=True)
    message = str(err.value)
    assert str(path) in message
    assert tvm.ResNet18_Weights.IMAGENET1K_V1.url in message  # where to get it
    assert "pretrained=false" in message  # says what else to do
    assert not path.exists()  # nothing downloaded

    # The cached file, a wrapped .pth ("state_dict", "module." prefixes) and a safetensors file
    # without fc all give the same weights.
    torch.manual_seed(1)
    net = tvm.resnet18(weights=None)
    expected = _backbone_state_from_torchvision(net.state_dict())
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    local = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, local)
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if "fc." not in k}, str(st))
    for pretrained in (True, str(local), st):
        got = UnitBackbone("resnet18", pretrained=pretrained).state_dict()
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(got[k], v), (pretrained, k)


def test_imlnet_passes_the_weights_to_both_encoders(weight_files):
    path, state = weight_files["resnet18"]
    model = IMLNet(4, backbone="resnet18", pretrained=str(path), share_weights=False)
    for domain in ("drone", "satellite"):
        assert torch.equal(model.encoders[domain].unit1[0].weight, state["conv1.weight"])


def test_bad_weights_files_raise_clear_errors(tmp_path, weight_files):
    with pytest.raises(WeightsNotFoundError, match=r"nothere\.pth"):
        UnitBackbone("resnet18", pretrained=str(tmp_path / "nothere.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        UnitBackbone("resnet18", pretrained=str(garbage))
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)  # a torch file, but no state dict
    with pytest.raises(CheckpointError, match=r"tensor\.pth"):
        UnitBackbone("resnet18", pretrained=str(tensor))
    with pytest.raises(ValueError, match="backbone must be one of"):
        UnitBackbone("vgg16")


@pytest.mark.parametrize(
    ("name", "other", "what"),
    [
        ("resnet34", "resnet18", r"resnet18\.pth.* 0 unexpected"),  # a smaller network: missing
        ("resnet18", "resnet34", r"0 weights missing .* unexpected"),  # extra blocks
        ("resnet18", "resnet50", "does not fit"),  # shapes differ
    ],
)
def test_weights_of_another_architecture_are_refused(name, other, what, weight_files):
    path, _ = weight_files[other]
    with pytest.raises(CheckpointError, match=what) as err:
        UnitBackbone(name, pretrained=str(path))
    assert str(path) in str(err.value)
    if name == "resnet34":
        assert "missing" in str(err.value)
