"""Gallery at scale: ivfpq build/save/load (with and without mmap), recall against flat, bad
options and too-small first batches refused, read-only mmapped galleries, sampled training."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from imlnet.errors import GeoError
from imlnet.geo.gallery import (
    DEFAULT_PARAMS,
    MANIFEST_FILE,
    GalleryIndex,
    check_params,
    new_faiss_index,
    training_sample,
)

DIM = 64


def clustered(n: int, seed: int, centres: int = 200, noise: float = 0.7) -> np.ndarray:
    """``n`` unit vectors: one of ``centres`` fixed random centres plus Gaussian noise of
    expected norm ``noise`` (the centres do not depend on ``seed``, the points do)."""
    c = np.random.default_rng(1234).standard_normal((centres, DIM)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = c[rng.integers(0, centres, n)] + rng.standard_normal((n, DIM)).astype(np.float32) * (
        noise / np.sqrt(DIM)
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def meta(n: int) -> list[dict]:
    return [
        {"path": f"/t/{i}.jpg", "lat": 47.0, "lon": 9.0, "crs": "EPSG:32632", "source": "m.tif"}
        for i in range(n)
    ]


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(20_000, seed=0), clustered(200, seed=1)  # queries are not in the gallery


@pytest.fixture(scope="module")
def ivfpq(data) -> GalleryIndex:
    gallery, _ = data
    # 128 lists and 10000 training vectors keep the PQ training (16 x 256 centroids) ~2 s
    params = {"m": 16, "nlist": 128, "train_size": 10_000}
    index = GalleryIndex(DIM, index_type="ivfpq", params=params)
    index.add(gallery, meta(len(gallery)))
    return index


def test_ivfpq_defaults_and_save_load_with_and_without_mmap(tmp_path: Path, data, ivfpq) -> None:
    _, queries = data
    # defaults: nlist 4 sqrt(20000) = 566 clipped to 20000 / 39 = 512; train_size 64 per list
    # = 32768 < 256 per PQ centroid = 65536
    empty, params = new_faiss_index("ivfpq", DIM, {}, n_train=20_000)
    assert params == {"nlist": 512, "m": 64, "nbits": 8, "nprobe": 16, "train_size": 65536}
    assert isinstance(empty, faiss.IndexIVFPQ) and not empty.is_trained and empty.nlist == 512
    assert ivfpq.params == {"nlist": 128, "m": 16, "nbits": 8, "nprobe": 16, "train_size": 10_000}
    raw = ivfpq._index
    assert isinstance(raw, faiss.IndexIVFPQ) and raw.pq.M == 16 and raw.pq.nbits == 8
    assert raw.metric_type == faiss.METRIC_INNER_PRODUCT and raw.nprobe == 16
    folder = ivfpq.save(tmp_path / "g")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["index_type"] == "ivfpq" and manifest["index_params"] == ivfpq.params
    scores, ids = ivfpq.search(queries, 10)
    for mmap in (False, True):
        loaded = GalleryIndex.load(folder, mmap=mmap)
        assert loaded.read_only is mmap and loaded.count == 20_000
        assert isinstance(loaded._index, faiss.IndexIVFPQ) and loaded._index.nprobe == 16
        s, i = loaded.search(queries, 10)
        np.testing.assert_array_equal(i, ids)
        np.testing.assert_array_equal(s, scores)
        loaded.set_search_params(nprobe=64)
        np.testing.assert_array_equal(loaded.search(queries, 10)[1], ivfpq_with(ivfpq, 64, queries))


def ivfpq_with(index: GalleryIndex, nprobe: int, queries: np.ndarray) -> np.ndarray:
    old = index.params["nprobe"]
    index.set_search_params(nprobe=nprobe)
    try:
        return index.search(queries, 10)[1]
    finally:
        index.set_search_params(nprobe=old)


def test_ivfpq_recall_against_flat(data, ivfpq) -> None:
    gallery, queries = data
    flat = GalleryIndex(DIM)
    flat.add(gallery, meta(len(gallery)))
    exact = flat.search(queries, 10)[1]
    recalls = {
        nprobe: recall_at_10(ivfpq_with(ivfpq, nprobe, queries), exact) for nprobe in (1, 16)
    }
    # 16 bytes per 64-d vector: the PQ ranking, not the lists probed, limits recall on this data
    # (0.59 at nprobe 16); the bound leaves room for other FAISS builds
    assert recalls[16] >= 0.5, recalls
    assert recalls[1] <= recalls[16], recalls
    # more bits per vector (32 x 6 instead of 16 x 8): better ranking (0.69)
    params = {"m": 32, "nbits": 6, "nlist": 64, "nprobe": 16, "train_size": 5000}
    fine = GalleryIndex(DIM, index_type="ivfpq", params=params)
    fine.add(gallery, meta(len(gallery)))
    assert recall_at_10(fine.search(queries, 10)[1], exact) >= recalls[16] + 0.05, recalls


@pytest.mark.parametrize(
    ("index_type", "params", "message"),
    [
        ("ivfpq", {"m": 48}, "m=48 .*must divide the descriptor dim 64; .*e.g. 8, 16, 32, 64"),
        ("ivfpq", {"nbits": 17}, "nbits=17 .*at most 16"),
        ("ivfpq", {"nprobe": 0}, "option nprobe must be a positive integer, got 0"),
        ("ivfpq", {"m": 8.0}, "option m must be a positive integer, got 8.0"),
        ("ivf", {"train_size": True}, "option train_size must be a positive integer"),
        ("ivfpq", {"M": 16}, r"unknown ivfpq option\(s\) \['M'\]; the options are"),
        ("ivfpq-flat", {}, "index type must be one of flat, ivf, ivfpq, hnsw"),
    ],
)
def test_bad_options_refused_at_creation(index_type: str, params: dict, message: str) -> None:
    with pytest.raises(GeoError, match=message):
        GalleryIndex(DIM, index_type=index_type, params=params)  # type: ignore[arg-type]
    with pytest.raises(GeoError, match=message):
        check_params(index_type, DIM, params)


def test_too_few_vectors_to_train(data) -> None:
    gallery, _ = data
    index = GalleryIndex(DIM, index_type="ivfpq", params={"m": 16, "train_size": 10_000})
    with pytest.raises(GeoError, match=r"nbits=8 .*needs at least 9984 .*got 5000; .*lower nbits"):
        index.add(gallery[:5000], meta(5000))
    assert index.count == 0 and index._index is None  # nothing half-built
    small = GalleryIndex(DIM, index_type="ivfpq", params={"m": 16, "nbits": 4, "nlist": 8})
    small.add(gallery[:5000], meta(5000))  # 39 x 16 codebook points and 8 lists: enough
    assert small.count == 5000 and small.params["train_size"] == 4096  # 256 x 16 > 64 x 8
    with pytest.raises(GeoError, match="nlist=600 needs at least 600 descriptors"):
        GalleryIndex(DIM, index_type="ivf", params={"nlist": 600}).add(gallery[:500], meta(500))
    match = r"train_size=1000 is below the 19968 .*nlist=512 and nbits=8 .*raise train_size"
    with pytest.raises(GeoError, match=match):
        GalleryIndex(DIM, index_type="ivfpq", params={"m": 16, "train_size": 1000}).add(
            gallery, meta(len(gallery))
        )
    with pytest.raises(GeoError, match=r"train_size=100 is below the 624 .*nlist=16"):
        new_faiss_index("ivf", DIM, {"nlist": 16, "train_size": 100}, n_train=5000)


def test_mmapped_gallery_is_read_only(tmp_path: Path, data, ivfpq) -> None:
    gallery, queries = data
    folder = ivfpq.save(tmp_path / "g")
    mapped = GalleryIndex.load(folder, mmap=True)
    with pytest.raises(GeoError, match=r"loaded with mmap=True and is read-only.*mmap=False"):
        mapped.add(gallery[:3], meta(3))  # refused before FAISS, which would abort the process
    assert mapped.count == 20_000 and len(mapped.metadata) == 20_000
    ids = mapped.search(queries, 10)[1]
    again = GalleryIndex.load(mapped.save(tmp_path / "copy"))  # saving elsewhere is fine
    np.testing.assert_array_equal(again.search(queries, 10)[1], ids)
    again.add(gallery[:3], meta(3))  # a normal load can be appended to
    assert again.count == 20_003
    mapped.save(folder)  # over the very file it maps: the mapping outlives the swap
    np.testing.assert_array_equal(mapped.search(queries, 10)[1], ids)
    np.testing.assert_array_equal(GalleryIndex.load(folder, mmap=True).search(queries, 10)[1], ids)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["index_params"]["m"] = 24
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(GeoError, match=r"manifest.json: ivfpq option m=24 .*fix index_params"):
        GalleryIndex.load(folder, mmap=True)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_mmap_load_other_types(tmp_path: Path, data, index_type: str) -> None:
    gallery, queries = data
    params = {"ivf": {"nlist": 32, "nprobe": 4}, "hnsw": {"M": 8}}.get(index_type, {})
    index = GalleryIndex(DIM, index_type=index_type, params=params)  # type: ignore[arg-type]
    index.add(gallery[:4000], meta(4000))
    folder = index.save(tmp_path / index_type)
    scores, ids = index.search(queries, 10)
    mapped = GalleryIndex.load(folder, mmap=True)
    s, i = mapped.search(queries, 10)
    np.testing.assert_array_equal(i, ids)
    np.testing.assert_array_equal(s, scores)
    with pytest.raises(GeoError, match="read-only"):
        mapped.add(gallery[:1], meta(1))


def test_ivf_trains_on_a_fixed_sample(data) -> None:
    gallery, queries = data
    sample = training_sample(gallery, 1000)
    assert sample.shape == (1000, DIM)
    np.testing.assert_array_equal(sample, training_sample(gallery, 1000))  # fixed seed
    assert {r.tobytes() for r in sample} <= {r.tobytes() for r in gallery}
    head = gallery[:10]
    assert training_sample(head, 1000) is head  # a batch within train_size is used whole
    index = GalleryIndex(DIM, index_type="ivf", params={"nlist": 16, "train_size": 624})
    index.add(gallery[:5000], meta(5000))
    assert index.params == {"nlist": 16, "nprobe": 16, "train_size": 624}
    # the same lists as FAISS trained by hand on the same sample of the first batch
    ref = faiss.index_factory(DIM, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ref.train(training_sample(gallery[:5000], 624))
    np.testing.assert_allclose(
        index._index.quantizer.reconstruct_n(0, 16), ref.quantizer.reconstruct_n(0, 16), atol=1e-5
    )
    index.add(gallery[5000:6000], meta(1000))  # later batches go into those lists
    assert index.count == 6000
    flat = GalleryIndex(DIM)
    flat.add(gallery[:6000], meta(6000))
    exact = flat.search(queries, 10)[1]
    assert index.search(queries, 10)[1].tolist() == exact.tolist()  # nprobe 16 = all lists
    default = GalleryIndex(DIM, index_type="ivf")
    default.add(gallery[:2000], meta(2000))
    # nlist 4 sqrt(2000) = 179 clipped to 2000 / 39 = 51; sample 64 per list, capped by the batch
    assert default.params["nlist"] == 51 and default.params["train_size"] == 64 * 51
    assert DEFAULT_PARAMS["ivf"]["train_size"] is None
