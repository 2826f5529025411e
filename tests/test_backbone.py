"""The four-unit split of torchvision ResNets, last stride 1, and weight loading (never online)."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from imlnet.errors import CheckpointError, WeightsNotFoundError
from imlnet.models.backbone import ARCHITECTURES, UnitBackbone, build_backbone, cache_path

EXPECTED_CHANNELS = {
    "resnet18": [64, 64, 128, 512],
    "resnet34": [64, 64, 128, 512],
    "resnet50": [64, 256, 512, 2048],
    "resnet101": [64, 256, 512, 2048],
    "resnext50_32x4d": [64, 256, 512, 2048],
    "wide_resnet50_2": [64, 256, 512, 2048],
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_unit_shapes_and_last_stride(name: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(name).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        units = net.forward_units(x)
        last = net.forward_features(x)
    chs = EXPECTED_CHANNELS[name]
    assert net.channels == chs
    assert [f["reduction"] for f in net.feature_info] == [2, 4, 8, 16]
    # U4 at H/16 (not H/32): the last stride is 1.
    for m, c, r in zip(units.maps, chs, (2, 4, 8, 16), strict=True):
        assert m.shape == (1, c, 64 // r, 96 // r)
    assert units.pool_indices.shape == (1, 64, 16, 24)
    assert tuple(units.pre_pool_size) == (32, 48)
    torch.testing.assert_close(last, units.maps[3])
    block = net.layer4[0]
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)


def _resnet18_file(tmp_path, seed: int = 3):
    torch.manual_seed(seed)
    ref = tvm.resnet18(weights=None).eval()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_local_pth_weights_give_torchvision_features(tmp_path) -> None:
    ref, path = _resnet18_file(tmp_path)
    net = UnitBackbone("resnet18", pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        units = net.forward_units(x)
        stem = ref.relu(ref.bn1(ref.conv1(x)))
        l1 = ref.layer1(ref.maxpool(stem))
        l2 = ref.layer2(l1)
        l4 = ref.layer4(ref.layer3(l2))
    torch.testing.assert_close(units.maps[0], stem)
    torch.testing.assert_close(units.maps[1], l1)
    torch.testing.assert_close(units.maps[2], l2)
    # Same weights, last stride 1: twice the resolution of torchvision's layer4 output.
    assert units.maps[3].shape[-2:] == (4, 4) and l4.shape[-2:] == (2, 2)
    assert units.maps[3].shape[1] == l4.shape[1] == 512


def test_safetensors_weights_load(tmp_path) -> None:
    ref, _ = _resnet18_file(tmp_path)
    path = tmp_path / "r18.safetensors"
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    save_file(state, str(path))
    net = UnitBackbone("resnet18", pretrained=str(path))
    torch.testing.assert_close(net.unit1[0].weight, ref.conv1.weight)
    torch.testing.assert_close(net.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)


def test_pretrained_true_reads_cache_and_never_downloads(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cache_path("resnet18") == expected
    with pytest.raises(WeightsNotFoundError) as err:
        UnitBackbone("resnet18", pretrained=True)
    message = str(err.value)
    assert str(expected) in message
    assert tvm.ResNet18_Weights.IMAGENET1K_V1.url in message
    ref, path = _resnet18_file(tmp_path)
    expected.parent.mkdir(parents=True)
    path.rename(expected)
    net = UnitBackbone("resnet18", pretrained=True)
    torch.testing.assert_close(net.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)


def test_bad_weights_files_raise_clear_errors(tmp_path) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"nothere\.pth"):
        UnitBackbone("resnet18", pretrained=str(tmp_path / "nothere.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        UnitBackbone("resnet18", pretrained=str(garbage))
    _, r18 = _resnet18_file(tmp_path)
    with pytest.raises(CheckpointError, match=r"r18\.pth.* 0 unexpected"):  # r18 into r34: missing
        UnitBackbone("resnet34", pretrained=str(r18))
    r34 = tmp_path / "r34.pth"
    torch.save(tvm.resnet34(weights=None).state_dict(), r34)
    with pytest.raises(CheckpointError, match=r"0 weights missing .* unexpected"):  # r34 into r18
        UnitBackbone("resnet18", pretrained=str(r34))
    with pytest.raises(ValueError, match="backbone must be one of"):
        UnitBackbone("vgg16")
