"""SUES-200 datasets: the split layout per altitude and the raw release with the official split."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from imlnet.data.sues200 import OFFICIAL_TRAIN_IDS, SUES200Test, SUES200Train
from imlnet.errors import DatasetLayoutError
from test_data_university1652 import write_image

TRAIN = ("0001", "0002", "0003")  # in the official training list
TEST = ("0008", "0012")  # not in it
ALTS = (150, 250)


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_split(root: Path, alts: tuple[int, ...] = ALTS, n_drone: int = 2) -> Path:
    """``Training/<alt>/{drone,satellite}/<id>`` and ``Testing/<alt>/<view>/<id>``.

    Drone images are ``<alt>-<k>.jpg`` so that a test can tell the altitude of an item.
    """
    for alt in alts:
        for view, ids in (("Training", TRAIN), ("Testing", None)):
            views = (
                ("drone", "satellite")
                if ids
                else ("query_drone", "gallery_drone", "query_satellite", "gallery_satellite")
            )
            for v in views:
                chosen = ids or (TEST if v.startswith("query") else TRAIN + TEST)
                for bid in chosen:
                    folder = root / view / str(alt) / v / bid
                    if v.endswith("satellite"):
                        write_image(folder / "0.png", _seed(bid))
                    else:
                        for k in range(n_drone):
                            write_image(folder / f"{alt}-{k}.jpg", _seed(bid, alt, k))
    return root


def make_raw(root: Path, alt_major: bool = False, alts: tuple[int, ...] = ALTS) -> Path:
    """The raw release: ``satellite-view/<id>/0.png``, ``drone_view_512/<id>/<alt>/<k>.jpg``."""
    for bid in TRAIN + TEST:
        write_image(root / "satellite-view" / bid / "0.png", _seed(bid))
        for alt in alts:
            if alt_major:
                folder = root / "drone-view" / str(alt) / bid
            else:
                folder = root / "drone_view_512" / bid / str(alt)
            for k in range(2):
                write_image(folder / f"{k}.jpg", _seed(bid, alt, k))
    return root


def _altitudes(ds: SUES200Train) -> set[str]:
    return {p.name.split("-")[0] for files in ds.drone_files.values() for p in files}


def test_official_split_has_120_training_places() -> None:
    assert len(OFFICIAL_TRAIN_IDS) == 120 and {1, 2, 3} <= OFFICIAL_TRAIN_IDS
    assert not {8, 12} & OFFICIAL_TRAIN_IDS and max(OFFICIAL_TRAIN_IDS) == 200


@pytest.mark.parametrize("alt", ALTS)
def test_split_layout_per_altitude(tmp_path: Path, alt: int) -> None:
    root = make_split(tmp_path)
    ds = SUES200Train(root, alt, sample_num=2)
    assert ds.classes == list(TRAIN) and len(ds) == 2 * len(TRAIN)
    assert _altitudes(ds) == {str(alt)}
    item = ds[4]
    assert item["building"] == TRAIN[1] and int(item["label"]) == 1
    assert item["drone"].shape == (3, 32, 32)
    sizes = {"query_drone": 4, "gallery_drone": 10, "query_satellite": 2, "gallery_satellite": 5}
    for view, size in sizes.items():
        test = SUES200Test(root, alt, view)
        assert len(test) == size
        assert all(f"{alt}-" in str(p) for p, _ in test.samples if "drone" in view)
    assert SUES200Test(root, alt, "gallery_satellite").labels.tolist() == [1, 2, 3, 8, 12]
    assert SUES200Test(root, alt, "query_satellite").labels.tolist() == [8, 12]


def test_split_layout_inside_dataset_folder(tmp_path: Path) -> None:
    make_split(tmp_path / "Dataset", alts=(200,))
    assert len(SUES200Train(tmp_path, 200)) == len(TRAIN)


@pytest.mark.parametrize("alt_major", [False, True])
def test_raw_release_uses_the_official_split(tmp_path: Path, alt_major: bool) -> None:
    root = make_raw(tmp_path, alt_major)
    ds = SUES200Train(root, 250)
    assert ds.classes == list(TRAIN)
    names = {p.parent.parts[-2:] for files in ds.drone_files.values() for p in files}
    expected = {("250", b) if alt_major else (b, "250") for b in TRAIN}
    assert names == expected
    assert SUES200Test(root, 250, "query_drone").labels.unique().tolist() == [8, 12]
    assert SUES200Test(root, 250, "query_satellite").labels.tolist() == [8, 12]
    gallery = SUES200Test(root, 250, "gallery_satellite")  # all places, training ones included
    assert gallery.labels.tolist() == [1, 2, 3, 8, 12]
    assert len(SUES200Test(root, 250, "gallery_drone")) == 2 * 5
    # the satellite image of a place is the same file for every altitude
    a, b = SUES200Train(root, 150)[0], SUES200Train(root, 250)[0]
    assert torch.equal(a["satellite"], b["satellite"]) and not torch.equal(a["drone"], b["drone"])


def test_altitude_must_be_one_of_four(tmp_path: Path) -> None:
    root = make_split(tmp_path)
    with pytest.raises(ValueError, match=r"\(150, 200, 250, 300\)"):
        SUES200Train(root, 100)
    with pytest.raises(ValueError, match="150"):
        SUES200Test(root, 175, "query_drone")


def test_layout_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="SUES-200-Benchmark") as err:
        SUES200Train(tmp_path / "missing", 150)
    assert str(tmp_path / "missing") in str(err.value)
    root = make_split(tmp_path / "s", alts=(150,))
    with pytest.raises(DatasetLayoutError, match="300 m") as err:
        SUES200Train(root, 300)
    assert str(root / "Training" / "300") in str(err.value)
    write_image(root / "Training" / "150" / "drone" / "0009" / "150-0.jpg", 1)
    with pytest.raises(DatasetLayoutError, match="0009") as err:
        SUES200Train(root, 150)
    assert str(root / "Training" / "150" / "satellite" / "0009") in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match="satellite-view"):
        SUES200Train(empty, 150)


def test_raw_release_missing_altitude_folder(tmp_path: Path) -> None:
    root = make_raw(tmp_path, alts=(150,))
    with pytest.raises(DatasetLayoutError) as err:
        SUES200Train(root, 200)
    assert str(root / "drone_view_512" / "0001" / "200") in str(err.value)
