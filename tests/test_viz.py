"""``imlnet visualize`` through the real CLI on a tiny model and tiny images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imlnet.cli import main as cli_main
from imlnet.models.imlnet import IMLNet

IDS = ("0001", "0002", "0003")


def _jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two checkpoints (with and without IRN), drone images in building folders, galleries."""
    root = tmp_path_factory.mktemp("viz")
    for name, irn in (("ckpt", True), ("ckpt_noirn", False)):
        torch.manual_seed(0)
        model = IMLNet(
            num_classes=3, backbone="resnet18", muml_channels=16, descriptor_dim=32, irn=irn
        )
        model.save_pretrained(root / name)
    for i, bid in enumerate(IDS):
        _jpeg(root / "gallery" / bid / "x.jpeg", seed=i)
        _jpeg(root / "flat" / f"{bid}.jpeg", seed=i)
        _jpeg(root / "drone" / bid / "image-01.jpeg", seed=10 + i)
    return root


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def run(*args: str) -> int:
    return cli_main(["visualize", *args, "--image-size", "64", "--device", "cpu"])


def test_all_figures(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queries = [str(data / "drone" / bid / "image-01.jpeg") for bid in IDS[:2]]
    out = tmp_path / "out"
    argv = [*queries, "--checkpoint", str(data / "ckpt"), "--out", str(out), "--k", "2"]
    argv += ["--gallery", str(data / "gallery"), "--satellite", queries[0]]
    assert run(*argv) == 0
    printed = capsys.readouterr().out.split()
    # the two queries share the stem image-01: their building folder tells them apart
    names = [
        f"{b}_image-01_{kind}.png"
        for b in IDS[:2]
        for kind in ("reconstruction", "attention", "retrieval")
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert printed == [str(out / n) for n in names]
    for name in names:
        width, height = _png_size(out / name)
        assert 150 <= width <= 3000 and 150 <= height <= 3000, (name, width, height)
    # attention: input + 4 units + combined side by side; retrieval: query + top-2
    att_w, att_h = _png_size(out / names[1])
    assert att_w > 4 * att_h


def test_without_irn_and_flat_gallery(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    query = str(data / "drone" / "0001" / "image-01.jpeg")
    out = tmp_path / "out"
    argv = [query, "--checkpoint", str(data / "ckpt_noirn"), "--out", str(out)]
    assert run(*argv, "--gallery", str(data / "flat"), "--label", "1") == 0
    captured = capsys.readouterr()
    assert "no IRN" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "image-01_attention.png",
        "image-01_retrieval.png",
    ]
    for path in out.iterdir():
        _png_size(path)


def test_user_errors_exit_2_naming_the_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    ckpt = ["--checkpoint", str(data / "ckpt"), "--out", str(out)]
    missing = data / "drone" / "0001" / "nope.jpeg"
    assert run(str(missing), *ckpt) == 2
    err = capsys.readouterr().err
    assert err.startswith("imlnet visualize: error:") and f"{missing}: image not found" in err
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    assert run(str(bad), *ckpt) == 2
    assert f"{bad}: cannot decode image" in capsys.readouterr().err
    query = str(data / "drone" / "0001" / "image-01.jpeg")
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    assert run(query, "--checkpoint", str(empty), "--out", str(out)) == 2
    assert str(empty / "model.safetensors") in capsys.readouterr().err
    assert run(query, *ckpt, "--gallery", str(tmp_path / "nogallery")) == 2
    assert "nogallery does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_output_stems_are_unique():
    from imlnet.visualize import _output_stems

    paths = [Path("a/0001/image-01.jpeg"), Path("b/0001/image-01.jpeg"), Path("c/0002/x.jpeg")]
    assert _output_stems(paths) == ["0001_image-01_0", "0001_image-01_1", "x"]


def test_nearest_turns_picks_each_targets_turn():
    from imlnet.viz import nearest_turns

    g = torch.Generator().manual_seed(0)
    targets = torch.randn(3, 3, 8, 8, generator=g)
    recons = torch.stack([torch.rot90(targets[i], k, (1, 2)) for i, k in enumerate((0, 3, 2))])
    recons = recons + 0.01 * torch.randn(recons.shape, generator=g)
    got = nearest_turns(targets, recons)
    for i, k in enumerate((0, 3, 2)):
        assert torch.equal(got[i], torch.rot90(targets[i], k, (1, 2)))


def test_attention_boxes_are_drawn_inside_the_image_with_all_four_sides():
    # a box over the whole image (what a flat map gives) and a small one: both rectangles lie
    # within the image's pixels, so none of their sides falls on the page around it
    from matplotlib.patches import Rectangle

    from imlnet.viz import attention_figure

    image = torch.zeros(3, 16, 20)
    maps = [torch.rand(16, 20), torch.rand(16, 20)]
    boxes = torch.tensor([[0.0, 0.0, 20.0, 16.0], [4.0, 2.0, 10.0, 8.0]])
    fig = attention_figure(image, maps, boxes, ["whole", "small"], normalized=False)
    rects = [[p for p in ax.patches if isinstance(p, Rectangle)] for ax in fig.axes[1:]]
    assert [len(r) for r in rects] == [1, 1]
    whole, small = rects[0][0], rects[1][0]
    x, y = whole.get_xy()
    assert (x, y) == (0.0, 0.0) and x + whole.get_width() == 19.0
    assert y + whole.get_height() == 15.0  # pixel centres 0..19 x 0..15: inside the image
    assert small.get_xy() == (3.5, 1.5) and small.get_width() == 6.0  # pixel edges, unchanged
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("given, saved", [(48, None), (None, 64)])
def test_demo_figures_feed_the_model_images_of_its_training_size(
    synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given, saved
) -> None:
    """The demo's reconstruction and attention figures: images at the size the model trained
    at (the size given, else the saved one), not a fixed default; an in-memory model has no
    saved size."""
    from imlnet import report, viz

    torch.manual_seed(0)
    model = IMLNet(num_classes=4, backbone="resnet18", muml_channels=16, descriptor_dim=32)
    model.eval()
    if saved:
        model.meta["image_size"] = saved
    sizes: list[int] = []
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda x, *a, **k: sizes.append(x.shape[-1]) or forward(x, *a, **k)
    )
    monkeypatch.setattr(viz, "retrieval_figure", lambda *a, **k: viz.pyplot().figure())
    views = {"query_drone": None, "gallery_satellite": None}  # for the (stubbed) retrieval figure
    figs = report.demo_figures(tmp_path, synth, model, views, image_size=given)
    assert {"reconstruction", "attention_drone", "attention_satellite"} <= set(figs)
    assert sizes and set(sizes) == {given or saved}
