"""Gallery index: exact search, save/load round trip per index type, append, every load error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from rasterio.transform import from_origin
from torchvision.transforms.functional import pil_to_tensor

from imlnet import inference
from imlnet.cli import main as cli_main
from imlnet.errors import CheckpointError, GeoError, ImageReadError
from imlnet.geo.index import GalleryIndex, build_index, checkpoint_hash
from imlnet.geo.tiling import tile_geotiff
from imlnet.inference import LoadedModel

TYPES = ("flat", "ivf", "hnsw")
PARAMS = {"flat": {}, "ivf": {"nlist": 8, "nprobe": 3}, "hnsw": {"M": 16, "efSearch": 64}}


def vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def meta(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "path": f"/t/{i}.jpg",
            "lat": 47.0 + i * 1e-4,
            "lon": 9.0,
            "crs": "EPSG:32632",
            "source": "map.tif",
            "tile_id": f"t{i}",
        }
        for i in range(start, start + n)
    ]


def small_index(index_type: str, n: int = 400, **kw) -> GalleryIndex:
    index = GalleryIndex(16, index_type=index_type, params=PARAMS[index_type], **kw)
    index.add(vectors(n), meta(n))
    return index


class ProjEncoder:
    """Deterministic encoder: a fixed random projection of 8x8-pooled, mean-centred pixels."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        self.weight = torch.randn(3 * 64, dim, generator=torch.Generator().manual_seed(seed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = F.adaptive_avg_pool2d(x, 8).flatten(1)
        return (f - f.mean(1, keepdim=True)) @ self.weight


class FakeModel:
    descriptor_dim, radius, config = 32, 1.0, {"backbone": "fake", "size": (64, 64)}

    def __init__(self) -> None:
        self.encoder = ProjEncoder()

    def input_size(self, default: int = 256) -> int:
        return 64  # the training size a saved model records

    def encode(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        assert domain == "satellite"  # gallery tiles are satellite views
        return self.encoder(x)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return pil_to_tensor(image.resize((64, 64))).float() / 255


def make_tiles(tmp_path: Path, name: str, seed: int = 0):
    blocks = np.random.default_rng(seed).integers(0, 255, (3, 48, 64), dtype=np.uint8)
    data = np.kron(blocks, np.ones((1, 8, 8), np.uint8))
    profile = dict(driver="GTiff", width=512, height=384, count=3, dtype="uint8")
    transform = from_origin(480_000 + 1000 * seed, 5_300_000, 0.5, 0.5)
    with rasterio.open(
        tmp_path / f"{name}.tif", "w", crs="EPSG:32632", transform=transform, **profile
    ) as ds:
        ds.write(data)
    return tile_geotiff(
        tmp_path / f"{name}.tif",
        tmp_path / name,
        tile_size_m=60,
        stride_m=60,
        out_px=64,
        progress=False,
    )


def test_flat_search_is_exact_cosine() -> None:
    index = small_index("flat", radius=3.0)
    queries = vectors(5, seed=1)
    scores, ids = index.search(queries * 7.0, 4)  # the scale of queries does not matter
    gallery = vectors(400)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(ids, np.argsort(-cos, axis=1)[:, :4])
    np.testing.assert_allclose(scores, np.sort(cos, axis=1)[:, ::-1][:, :4], atol=1e-5)
    rows = index.search_rows(queries[:1], 2)[0]
    assert [r["id"] for r in rows] == list(ids[0, :2]) and rows[0]["path"] == f"/t/{ids[0, 0]}.jpg"
    assert rows[0]["lat"] == pytest.approx(47.0 + ids[0, 0] * 1e-4)
    assert index.search(queries, 10_000)[1].shape == (5, 400)  # k is capped at the size


@pytest.mark.parametrize("index_type", TYPES)
def test_save_load_round_trip(tmp_path: Path, index_type: str) -> None:
    index = small_index(index_type, checkpoint_hash="abc", radius=2.0, model_config={"d": 16})
    queries = vectors(20, seed=2)
    before = index.search(queries, 5)
    index.save(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [
        "index.faiss",
        "manifest.json",
        "metadata.csv",
    ]
    loaded = GalleryIndex.load(tmp_path / "g", expect_checkpoint_hash="abc", expect_dim=16)
    after = loaded.search(queries, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    assert loaded.metadata == index.metadata and loaded.params == index.params
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["count"] == 400 and manifest["descriptor_dim"] == 16
    assert manifest["index_type"] == index_type and manifest["radius"] == 2.0
    assert manifest["checkpoint_hash"] == "abc" and manifest["model_config"] == {"d": 16}
    assert manifest["format_version"] == 1 and "created" in manifest
    # each vector finds itself first in every index type
    assert (loaded.search(vectors(400)[:50], 1)[1][:, 0] == np.arange(50)).all()


@pytest.mark.parametrize("index_type", TYPES)
def test_append(tmp_path: Path, index_type: str) -> None:
    index = small_index(index_type)
    index.save(tmp_path / "g")
    loaded = GalleryIndex.load(tmp_path / "g")
    extra = vectors(100, seed=5)
    loaded.add(extra, meta(100, start=400))
    loaded.save(tmp_path / "g")
    again = GalleryIndex.load(tmp_path / "g")
    assert again.count == len(again.metadata) == 500
    _, ids = again.search(extra, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(400, 500))
    assert again.metadata[450]["tile_id"] == "t450"
    if index_type == "flat":  # appending equals building in one go
        whole = GalleryIndex(16)
        whole.add(np.concatenate([vectors(400), extra]), meta(500))
        q = vectors(10, seed=9)
        np.testing.assert_array_equal(whole.search(q, 7)[1], again.search(q, 7)[1])


def test_load_errors(tmp_path: Path) -> None:
    small_index("flat", checkpoint_hash="a" * 64, checkpoint="/ckpt/one").save(tmp_path / "g")
    folder = tmp_path / "g"

    def copy(name: str) -> Path:
        dst = tmp_path / name
        dst.mkdir()
        for p in folder.iterdir():
            (dst / p.name).write_bytes(p.read_bytes())
        return dst

    for missing in ("index.faiss", "metadata.csv", "manifest.json"):
        broken = copy(f"missing-{missing}")
        (broken / missing).unlink()
        with pytest.raises(GeoError, match=rf"{missing}: missing"):
            GalleryIndex.load(broken)

    corrupt = copy("corrupt")
    (corrupt / "index.faiss").write_bytes(b"not a faiss index at all" * 10)
    with pytest.raises(GeoError, match=r"corrupt/index\.faiss: corrupt or not a FAISS index"):
        GalleryIndex.load(corrupt)
    truncated = copy("truncated")
    data = (truncated / "index.faiss").read_bytes()
    (truncated / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(GeoError, match=r"index\.faiss: corrupt"):
        GalleryIndex.load(truncated)

    short = copy("short")
    lines = (short / "metadata.csv").read_text().splitlines()
    (short / "metadata.csv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(
        GeoError,
        match=r"files disagree on the number of tiles \(manifest\.json 400, index\.faiss 400, "
        r"metadata\.csv 399",
    ):
        GalleryIndex.load(short)

    wrong_dim = copy("wrongdim")
    manifest = json.loads((wrong_dim / "manifest.json").read_text())
    (wrong_dim / "manifest.json").write_text(json.dumps({**manifest, "descriptor_dim": 8}))
    with pytest.raises(GeoError, match=r"has dim 16 but manifest\.json says 8"):
        GalleryIndex.load(wrong_dim)
    with pytest.raises(GeoError, match=r"16-d descriptors .* but the model in use makes 32-d"):
        GalleryIndex.load(folder, expect_dim=32)
    with pytest.raises(GeoError, match=r"built by /ckpt/one \(sha256 aaaaaaaaaaaa.*/ckpt/two has"):
        GalleryIndex.load(folder, expect_checkpoint_hash="b" * 64, checkpoint_name="/ckpt/two")

    not_ours = copy("notours")
    (not_ours / "manifest.json").write_text("{}")
    with pytest.raises(GeoError, match="not an imlnet gallery manifest"):
        GalleryIndex.load(not_ours)


def test_add_and_search_errors() -> None:
    index = GalleryIndex(16)
    with pytest.raises(GeoError, match="empty"):
        index.search(vectors(1), 3)
    with pytest.raises(GeoError, match="dim 8, the index has dim 16"):
        index.add(vectors(3, dim=8), meta(3))
    with pytest.raises(GeoError, match="3 descriptors but 2 metadata rows"):
        index.add(vectors(3), meta(2))
    with pytest.raises(GeoError, match="lacks lat"):
        index.add(vectors(1), [{"path": "x", "lon": 1, "crs": "c", "source": "s"}])
    bad = vectors(2)
    bad[1, 3] = np.nan
    with pytest.raises(GeoError, match="NaN"):
        index.add(bad, meta(2))
    with pytest.raises(GeoError, match="needs at least 8"):
        GalleryIndex(16, index_type="ivf", params={"nlist": 8}).add(vectors(5), meta(5))


def test_checkpoint_hash(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert checkpoint_hash(tmp_path / "ckpt") == expected
    assert checkpoint_hash(tmp_path / "ckpt" / "model.safetensors") == expected
    with pytest.raises(
        CheckpointError, match=r"nothere/model\.safetensors: checkpoint weights not found"
    ):
        checkpoint_hash(tmp_path / "nothere")


def test_build_index_from_tiles(tmp_path: Path) -> None:
    tiles = make_tiles(tmp_path, "a")
    encoder = ProjEncoder()
    index = build_index(encoder, tiles.root, transform=to_tensor, batch_size=7, progress=False)
    assert index.count == len(tiles) == 20 and index.dim == 32
    first = tiles.image_path(tiles.rows[3])
    assert index.metadata[3]["path"] == str(first) and index.metadata[3]["tile_id"]
    query = encoder(to_tensor(Image.open(first).convert("RGB"))[None])
    assert index.search(query, 1)[1][0, 0] == 3
    with pytest.raises(GeoError, match="already in the gallery"):
        build_index(encoder, tiles, transform=to_tensor, index=index, progress=False)
    (tiles.root / tiles.rows[0]["path"]).write_bytes(b"broken")
    with pytest.raises(ImageReadError, match=tiles.rows[0]["path"]):
        build_index(encoder, tiles, transform=to_tensor, progress=False)


def test_cli_index_build_append_and_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        inference,
        "load_model",
        lambda ckpt, device, **k: LoadedModel(FakeModel(), 64, to_tensor, Path(ckpt)),
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights-one")
    a, b = make_tiles(tmp_path, "a"), make_tiles(tmp_path, "b", seed=1)
    out = tmp_path / "gallery"
    common = ["--checkpoint", str(ckpt), "--out", str(out), "--quiet"]
    assert cli_main(["index", str(a.root), *common, "--type", "hnsw", "--hnsw-m", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint_hash"] == hashlib.sha256(b"weights-one").hexdigest()
    assert manifest["index_params"]["M"] == 8 and manifest["model_config"]["size"] == [64, 64]
    assert cli_main(["index", str(a.root), *common]) == 2  # exists: refuses without --append
    assert "a gallery exists; pass --append" in capsys.readouterr().err
    assert cli_main(["index", str(b.root), *common, "--append"]) == 0
    assert GalleryIndex.load(out).count == 40
    (ckpt / "model.safetensors").write_bytes(b"weights-two")
    assert cli_main(["index", str(b.root), *common, "--append"]) == 2
    err = capsys.readouterr().err
    assert (
        "built by" in err
        and "cannot be compared: use that checkpoint or rebuild the gallery" in err
    )


def test_search_params_trade_recall_for_speed(tmp_path: Path) -> None:
    queries = vectors(50, seed=3)
    exact = small_index("flat").search(queries, 10)[1]

    def recall(index: GalleryIndex) -> float:
        found = index.search(queries, 10)[1]
        return np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])

    ivf = small_index("ivf")
    ivf.set_search_params(nprobe=1)
    low = recall(ivf)
    ivf.set_search_params(nprobe=8)  # all lists: exact
    assert recall(ivf) == 1.0 > low
    ivf.save(tmp_path / "g")
    assert GalleryIndex.load(tmp_path / "g").params["nprobe"] == 8
    hnsw = small_index("hnsw")
    hnsw.set_search_params(efSearch=12, nprobe=5)  # nprobe does not apply to hnsw
    assert hnsw._index.hnsw.efSearch == 12 and "nprobe" not in hnsw.params
