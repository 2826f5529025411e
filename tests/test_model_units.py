"""The four-unit encoder, the IRN's max-unpooling and shapes, ImageNet weights, the baseline size.

Everything runs on the CPU with random weights; no test downloads anything (torch.hub's folder
points into ``tmp_path`` wherever the cache is read).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from imlnet.errors import CheckpointError, WeightsNotFoundError
from imlnet.models import ARCHITECTURES, IMLNet, IRNDecoder, UnitBackbone
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


@pytest.fixture
def hub_dir(tmp_path):
    """torch.hub's folder inside tmp_path for one test, restored afterwards."""
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        yield tmp_path / "hub"
    finally:
        torch.hub.set_dir(old)


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
def test_unit_shapes_per_backbone(name):
    torch.manual_seed(0)
    net = UnitBackbone(name).eval()
    assert [f["num_chs"] for f in net.feature_info] == list(CHANNELS[name])
    assert [f["reduction"] for f in net.feature_info] == [2, 4, 8, 16]
    assert net.channels == list(CHANNELS[name])
    with torch.no_grad():
        units = net.forward_units(torch.randn(2, 3, 64, 64))
        u4 = net(torch.randn(1, 3, 64, 96))
    shapes = [tuple(m.shape) for m in units.maps]
    assert shapes == [(2, c, s, s) for c, s in zip(CHANNELS[name], (32, 16, 8, 4), strict=True)]
    assert tuple(units.pool_indices.shape) == (2, 64, 16, 16)
    assert tuple(units.pre_pool_size) == (32, 32)
    # last stride 1: U4 stays at H/16 (a stock ResNet would be at H/32), also for H != W
    assert tuple(u4.shape) == (1, CHANNELS[name][3], 4, 6)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck
def test_units_are_the_torchvision_stages_with_last_stride_one(name):
    """U1..U4 equal a plain run of the torchvision network's layers, layer4 without its stride."""
    torch.manual_seed(0)
    net = ARCHITECTURES[name][0](weights=None).eval()
    ours = UnitBackbone(name).eval()
    ours.load_state_dict(_backbone_state_from_torchvision(net.state_dict()))
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
    assert stock.shape[-1] == 2 and u4.shape[-1] == 4  # the stock stride would halve U4


# --------------------------------------------------------------------------- max-unpooling
def test_maxpool_then_unpool_puts_values_back_at_the_argmax():
    enc, dec = UnitBackbone("resnet18"), IRNDecoder([64, 64, 128, 512])
    # 3x3 windows, stride 2, padding 1 over a 4x4 map: windows rows/cols {0,1}, {1,2,3}
    x = torch.tensor(
        [
            [9.0, 0.0, 1.0, 2.0],
            [3.0, 4.0, 5.0, 11.0],
            [6.0, 15.0, 7.0, 8.0],
            [10.0, 12.0, 13.0, 14.0],
        ]
    )[None, None]
    pooled, idx = enc.maxpool(x)
    assert pooled[0, 0].tolist() == [[9.0, 11.0], [15.0, 15.0]]  # two windows share the 15
    assert idx[0, 0].tolist() == [[0, 7], [9, 9]]  # flat positions (0,0), (1,3), (2,1)
    up = dec.unpool(pooled, idx, output_size=x.shape[-2:])
    expected = torch.zeros(4, 4)
    expected[0, 0], expected[1, 3], expected[2, 1] = 9.0, 11.0, 15.0
    torch.testing.assert_close(up[0, 0], expected)

    # new values (what the decoder feeds) go to the recorded positions, zeros elsewhere
    x2 = torch.tensor(
        [
            [8.0, 1.0, 6.0, 2.0],
            [0.0, 3.0, 1.0, 2.0],
            [1.0, 2.0, 9.0, 0.0],
            [7.0, 0.0, 1.0, 4.0],
        ]
    )[None, None]
    _, idx2 = enc.maxpool(x2)
    assert idx2[0, 0].tolist() == [[0, 2], [12, 10]]
    up2 = dec.unpool(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), idx2, output_size=(4, 4))
    expected2 = torch.zeros(4, 4)
    expected2[0, 0], expected2[0, 2], expected2[3, 0], expected2[2, 2] = 1.0, 2.0, 3.0, 4.0
    torch.testing.assert_close(up2[0, 0], expected2)


def test_irn_unpools_with_the_encoders_indices():
    torch.manual_seed(0)
    enc = UnitBackbone("resnet18").eval()
    dec = IRNDecoder(enc.channels).eval()
    seen = {}
    dec.unpool.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        units = enc.forward_units(torch.randn(2, 3, 64, 64))
        dec(units)
    out = seen["out"]
    assert tuple(out.shape) == (2, 64, 32, 32)
    allowed = torch.zeros(2, 64, 32 * 32, dtype=torch.bool)
    allowed.scatter_(2, units.pool_indices.flatten(2), True)
    nonzero = out.flatten(2) != 0
    assert nonzero.any()
    assert not (nonzero & ~allowed).any()  # only the recorded arg-max positions hold values


@pytest.mark.parametrize("size", [(64, 64), (32, 96)])
def test_irn_output_shape(size):
    torch.manual_seed(0)
    enc = UnitBackbone("resnet18")
    dec = IRNDecoder(enc.channels)
    rec = dec(enc.forward_units(torch.randn(2, 3, *size)))
    assert tuple(rec.shape) == (2, 3, *size)
    assert (rec < 0).any()  # linear output: the normalised input space has negative values


# --------------------------------------------------------------------------- ImageNet weights
def test_pretrained_true_with_an_empty_cache_names_the_file(hub_dir):
    with pytest.raises(WeightsNotFoundError) as err:
        UnitBackbone("resnet18", pretrained=True)
    path = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    assert cache_path("resnet18") == path
    assert str(path) in str(err.value)
    assert "pretrained=false" in str(err.value)  # says what else to do
    assert not path.exists()  # nothing downloaded


def test_pretrained_from_cache_and_from_a_file_give_the_same_weights(hub_dir, tmp_path):
    torch.manual_seed(1)
    net = tvm.resnet18(weights=None)
    expected = _backbone_state_from_torchvision(net.state_dict())
    cached = cache_path("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(net.state_dict(), cached)
    local = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, local)
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if "fc." not in k}, str(st))
    for pretrained in (True, str(local), st):
        got = UnitBackbone("resnet18", pretrained=pretrained).state_dict()
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(got[k], v), (pretrained, k)


def test_imlnet_passes_the_weights_to_both_encoders(tmp_path):
    torch.manual_seed(2)
    net = tvm.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    model = IMLNet(4, backbone="resnet18", pretrained=str(path), share_weights=False)
    for domain in ("drone", "satellite"):
        w = model.encoders[domain].unit1[0].weight
        assert torch.equal(w, net.conv1.weight)


@pytest.mark.parametrize(
    ("other", "what"),
    [("resnet50", "does not fit"), ("resnet34", "unexpected")],  # shapes differ / extra blocks
)
def test_weights_of_another_architecture_are_refused(tmp_path, other, what):
    path = tmp_path / f"{other}.pth"
    torch.save(ARCHITECTURES[other][0](weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match=what) as err:
        UnitBackbone("resnet18", pretrained=str(path))
    assert str(path) in str(err.value)


def test_a_smaller_network_is_refused_as_missing_weights(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(tvm.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError, match="missing"):
        UnitBackbone("resnet34", pretrained=str(path))


def test_bad_weights_files(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"nope\.pth"):
        UnitBackbone("resnet18", pretrained=str(tmp_path / "nope.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pth"):
        UnitBackbone("resnet18", pretrained=str(junk))
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match=r"tensor\.pth"):
        UnitBackbone("resnet18", pretrained=str(tensor))
    with pytest.raises(ValueError, match="backbone must be one of"):
        UnitBackbone("vgg16")


# --------------------------------------------------------------------------- baseline size
def test_baseline_has_exactly_the_university1652_parameters():
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
