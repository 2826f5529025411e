"""The one inference path: view -> domain, the image reader, load_model, embed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imlnet.errors import CheckpointError, ImageReadError
from imlnet.inference import LoadedModel, embed, eval_transform, load_model, read_image, view_domain


def test_view_domain():
    for view in ("query_drone", "gallery_drone", "drone", "Drone"):
        assert view_domain(view) == "drone"
    for view in ("query_satellite", "gallery_satellite", "satellite"):
        assert view_domain(view) == "satellite"
    with pytest.raises(ValueError, match="query_street"):
        view_domain("query_street")


def _png(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_read_image_rgb_and_errors(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 9, np.uint8)).save(grey)
    image = read_image(grey)
    assert image.mode == "RGB" and image.size == (7, 5)
    with pytest.raises(ImageReadError, match=rf"{tmp_path / 'nope.png'}: image not found"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=rf"{bad}: cannot decode image .* JPEG or PNG"):
        read_image(bad)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png(tmp_path / "full.png", 1).read_bytes()[:200])
    with pytest.raises(ImageReadError, match=r"cut\.png: cannot decode"):
        read_image(truncated)


class LinearModel:
    """``encode``: a fixed linear map of the raw pixels (not flip-invariant), per domain."""

    def __init__(self, size: int = 8, dim: int = 5):
        g = torch.Generator().manual_seed(3)
        self.w = {d: torch.randn(3 * size * size, dim, generator=g) for d in ("drone", "satellite")}
        self.size = size

    def encode(self, x, domain):
        return x.flatten(1) @ self.w[domain]

    def input_size(self, default=256):
        return self.size


def test_embed_is_the_official_feature_for_every_input_kind(tmp_path):
    model = LinearModel()
    paths = [_png(tmp_path / f"{i}.png", i) for i in range(5)]
    x = torch.stack([eval_transform(8)(Image.open(p).convert("RGB")) for p in paths])
    for domain in ("drone", "satellite"):
        w = model.w[domain]
        want = F.normalize(x.flatten(1) @ w + x.flip(3).flatten(1) @ w, dim=1)
        from_paths = embed(model, paths, domain, batch_size=2)  # transform from input_size()
        from_pil = embed(model, [read_image(p) for p in paths], domain, transform=eval_transform(8))
        from_tensor = embed(model, x, f"query_{domain}", batch_size=3)
        loader = [{"image": x[:2], "label": torch.zeros(2)}, (x[2:], torch.zeros(3))]
        from_loader = embed(model, loader, domain)
        for got in (from_paths, from_pil, from_tensor, from_loader):
            assert got.dtype == torch.float32 and got.device.type == "cpu"
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        single = embed(model, x, domain, flip=False)
        torch.testing.assert_close(single, F.normalize(x.flatten(1) @ w, dim=1))
    # a plain callable is an encoder too
    torch.testing.assert_close(
        embed(lambda t: t.flatten(1) @ model.w["drone"], x, "drone"),
        embed(model, x, "drone"),
    )
    assert embed(model, [], "drone").shape == (0, 0)


def test_embed_errors(tmp_path):
    model = LinearModel()
    with pytest.raises(ImageReadError, match=r"missing\.png: image not found"):
        embed(model, [tmp_path / "missing.png"], "drone")
    with pytest.raises(CheckpointError, match=r"returned \(2,\) for 2 images"):
        embed(lambda t: t.sum((1, 2, 3)), torch.zeros(2, 3, 8, 8), "drone")
    with pytest.raises(ValueError, match="neither a drone nor a satellite"):
        embed(model, torch.zeros(1, 3, 8, 8), "street")


def test_load_model_roundtrip_and_errors(tmp_path):
    from imlnet.models.imlnet import IMLNet

    torch.manual_seed(0)
    net = IMLNet(num_classes=3, backbone="resnet18", muml=False, irn=False, descriptor_dim=16)
    net.save_pretrained(tmp_path / "m", meta={"image_size": 64})
    loaded = load_model(tmp_path / "m", "cpu")
    assert isinstance(loaded, LoadedModel) and loaded.image_size == 64
    assert not loaded.model.training
    image = Image.fromarray(np.zeros((40, 50, 3), np.uint8))
    assert loaded.transform(image).shape == (3, 64, 64)
    assert load_model(tmp_path / "m", "auto", image_size=32).image_size == 32
    feats = embed(loaded.model, torch.rand(2, 3, 64, 64), "drone")
    assert feats.shape == (2, 16)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2))
    with pytest.raises(CheckpointError, match="none is missing"):
        load_model(tmp_path / "none", "cpu")
