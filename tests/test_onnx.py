"""``imlnet export --onnx``: parity with the torch model, and ``--onnx`` for index and localize."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import imlnet
from imlnet.cli import main as cli_main
from imlnet.errors import CheckpointError, DeviceError, ImlnetError
from imlnet.export import export_onnx
from imlnet.geo.gallery import GalleryIndex
from imlnet.models.imlnet import IMLNet
from test_geo_index import make_tiles

pytest.importorskip("onnxruntime", reason="the ONNX extra is part of imlnet[dev]")

SIZE = 64


def save(tmp_path: Path, backbone: str = "resnet18", **kw) -> Path:
    torch.manual_seed(0)
    model = IMLNet(5, backbone=backbone, irn=False, muml=False, descriptor_dim=32, **kw)
    return model.save_pretrained(tmp_path / f"model-{backbone}", {"image_size": SIZE})


def images(synth: Path, view: str) -> list[Path]:
    return sorted((synth / "test" / view).rglob("*.*"))


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
def test_exported_descriptors_and_rankings_match_torch(
    tmp_path: Path, synth: Path, backbone: str
) -> None:
    folder = save(tmp_path, backbone, **({"last_stages": "dropped"} if "lite" in backbone else {}))
    path = export_onnx(folder, tmp_path / "m.onnx")
    torch_model, onnx_model = imlnet.load_model(folder, "cpu"), imlnet.load_model(path)
    assert onnx_model.image_size == SIZE and onnx_model.dim == 32
    assert onnx_model.weights_hash == torch_model.weights_hash  # galleries interchangeable
    drone, sat = images(synth, "query_drone"), images(synth, "gallery_satellite")
    assert len(drone) >= 9 and len(sat) >= 4
    for views, domain in ((drone, "drone"), (sat, "satellite")):
        # batches of 5 and a last smaller one: the batch axis is dynamic
        a = imlnet.embed(torch_model, views, domain, batch_size=5)
        b = imlnet.embed(onnx_model, views, domain, batch_size=5)
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4
    q = imlnet.embed(torch_model, drone, "drone", flip=False)
    g = imlnet.embed(torch_model, sat, "satellite", flip=False)
    qo = imlnet.embed(onnx_model, drone, "drone", flip=False)
    go = imlnet.embed(onnx_model, sat, "satellite", flip=False)
    k = min(10, len(sat))
    assert torch.equal((q @ g.T).topk(k).indices, (qo @ go.T).topk(k).indices)
    meta = onnx_model.model.meta
    assert meta["format"] == "imlnet-onnx/1" and meta["version"] == imlnet.__version__
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["config"]["backbone"]


def test_flip_inside_the_graph_is_the_official_feature(tmp_path: Path) -> None:
    folder = save(tmp_path)
    export_onnx(folder, tmp_path / "flip.onnx", flip=True)
    onnx_model = imlnet.load_model(tmp_path / "flip.onnx")
    x = torch.rand(3, 3, SIZE, SIZE)
    want = imlnet.embed(imlnet.load_model(folder, "cpu"), x, "drone", flip=True)
    got = onnx_model.model.encode(x, "drone")
    assert (got - want).abs().max() <= 1e-4
    assert onnx_model.model.flip and onnx_model.weights_hash.endswith("+flip")


def test_index_and_localize_with_onnx_give_the_checkpoint_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = save(tmp_path)
    onnx_file = tmp_path / "m.onnx"
    assert cli_main(["export", str(folder), "--onnx", str(onnx_file)]) == 0
    assert str(onnx_file) in capsys.readouterr().out
    tiles = make_tiles(tmp_path, "map")
    galleries = {}
    for how, arg in (("ckpt", ["--checkpoint", str(folder)]), ("onnx", ["--onnx", str(onnx_file)])):
        out = tmp_path / f"gallery-{how}"
        assert cli_main(["index", str(tiles.root), "--out", str(out), "--quiet", *arg]) == 0
        galleries[how] = GalleryIndex.load(out)
    a, b = galleries["ckpt"], galleries["onnx"]
    assert (
        a.metadata == b.metadata
        and a.manifest()["checkpoint_hash"] == (b.manifest()["checkpoint_hash"])
    )
    va = a._index.reconstruct_n(0, a.count)
    vb = b._index.reconstruct_n(0, b.count)
    assert np.abs(va - vb).max() <= 1e-4
    queries = [str(tiles.image_path(row)) for row in tiles.rows[:6]]
    hits = {}
    for how, arg in (("ckpt", ["--checkpoint", str(folder)]), ("onnx", ["--onnx", str(onnx_file)])):
        out = tmp_path / f"out-{how}"
        # each model searches the gallery the other one built: the same weights
        other = tmp_path / f"gallery-{'onnx' if how == 'ckpt' else 'ckpt'}"
        argv = ["localize", *queries, "--index", str(other), "--quiet", "--k", "10"]
        assert cli_main([*argv, *arg, "--out-dir", str(out)]) == 0
        with open(out / "hits.csv", newline="") as handle:
            hits[how] = list(csv.DictReader(handle))
    assert [r["tile_id"] for r in hits["ckpt"]] == [r["tile_id"] for r in hits["onnx"]]
    assert np.allclose(
        [float(r["score"]) for r in hits["ckpt"]], [float(r["score"]) for r in hits["onnx"]],
        atol=1e-4,
    )  # fmt: skip


def test_onnx_errors_are_one_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = save(tmp_path)
    path = export_onnx(folder, tmp_path / "m.onnx")
    with pytest.raises(DeviceError, match=r"an \.onnx model runs on the CPU with onnxruntime here"):
        imlnet.load_model(path, "cuda")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=str(broken)) as caught:
        imlnet.load_model(broken)
    assert "cannot load the ONNX model" in str(caught.value)
    code = cli_main(["localize", str(broken), "--index", str(tmp_path), "--onnx", str(broken)])
    err = capsys.readouterr().err
    assert code == 2 and str(broken) in err and len(err.strip().splitlines()) == 1
    assert cli_main(["export", str(folder), "--onnx", str(tmp_path / "m.pt")]) == 2
    assert "the file name must end in .onnx" in capsys.readouterr().err
    argv = ["evaluate", "--checkpoint", str(path), "--data", str(tmp_path)]
    assert cli_main([*argv, "--satellite-rotations", "4", "--quiet"]) == 2
    assert "pooling is fixed at export" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ImlnetError, match=r"pip install 'imlnet\[onnx\]'"):
        imlnet.load_model(path)


@pytest.mark.parametrize(
    "kw", [{"share_weights": False}, {"satellite_rotations": 4}], ids=["two-encoders", "turns"]
)
def test_two_encoders_are_exported_one_domain_at_a_time(tmp_path: Path, kw: dict) -> None:
    # one encoder per domain, or one whose satellite descriptors pool over the turns (inside
    # the satellite graph): the domains' graphs differ
    folder = save(tmp_path, **kw)
    with pytest.raises(ImlnetError) as caught:
        export_onnx(folder, tmp_path / "both.onnx")
    assert "export each with --domain drone (queries) and --domain satellite" in str(caught.value)
    export_onnx(folder, tmp_path / "sat.onnx", domain="satellite")
    sat = imlnet.load_model(tmp_path / "sat.onnx")
    x = torch.rand(2, 3, SIZE, SIZE)
    want = imlnet.load_model(folder, "cpu").model.encode(x, "satellite")
    assert (sat.model.encode(x, "satellite") - want).abs().max() <= 1e-4
    with pytest.raises(ImlnetError, match="images only; export the drone encoder"):
        sat.model.encode(x, "drone")
    meta = json.loads(json.dumps(sat.model.meta))
    assert meta["domains"] == ["satellite"]


def test_a_model_with_bf16_frozen_units_exports_an_fp32_graph(tmp_path: Path) -> None:
    # the graph has no autocast in it: it gives the fp32 model's descriptors, whatever the
    # model computes its frozen units in, and the model keeps its setting
    folder = save(tmp_path, freeze_units=2, frozen_precision="bf16")
    loaded = imlnet.load_model(folder, "cpu")
    assert loaded.model.frozen_precision == "bf16"
    export_onnx(loaded, tmp_path / "m.onnx")
    assert loaded.model.frozen_precision == "bf16"
    x = torch.rand(3, 3, SIZE, SIZE)
    got = imlnet.load_model(tmp_path / "m.onnx").model.encode(x, "drone")
    with torch.no_grad():
        bf16 = loaded.model.encode(x, "drone")
        loaded.model.frozen_precision = "fp32"
        fp32 = loaded.model.encode(x, "drone")
    assert (got - fp32).abs().max() <= 1e-4
    assert (bf16 - fp32).abs().max() > 1e-4  # (so the check above could fail)
