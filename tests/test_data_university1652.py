"""University-1652 datasets on tiny folders written by the tests (32 px JPEG/PNG files)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imlnet.data.university1652 import TEST_VIEWS, University1652Test, University1652Train
from imlnet.errors import DatasetLayoutError, ImageReadError

TRAIN_IDS = ("0839", "0003", "0120", "0042")  # deliberately not sorted
QUERY_IDS = ("0200", "0201")
DISTRACTOR_IDS = ("0300",)


def write_image(path: Path, seed: int, size: int = 32) -> Path:
    """A random RGB image; the format follows the suffix (.jpg/.jpeg/.png, any case)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_university(
    root: Path,
    train_ids: tuple[str, ...] = TRAIN_IDS,
    query_ids: tuple[str, ...] = QUERY_IDS,
    distractor_ids: tuple[str, ...] = DISTRACTOR_IDS,
    n_drone: int = 3,
) -> Path:
    """The University-1652 layout: drone ``image-NN.jpeg``, satellite ``<id>.jpg``."""
    seed = 0
    for bid in train_ids:
        write_image(root / "train" / "satellite" / bid / f"{bid}.jpg", seed := seed + 1)
        for k in range(n_drone):
            write_image(
                root / "train" / "drone" / bid / f"image-{k + 1:02d}.jpeg", seed := seed + 1
            )
    for view in TEST_VIEWS:
        ids = query_ids if view.startswith("query") else query_ids + distractor_ids
        for bid in ids:
            if view.endswith("satellite"):
                write_image(root / "test" / view / bid / f"{bid}.jpg", seed := seed + 1)
            else:
                for k in range(2):
                    path = root / "test" / view / bid / f"image-{k + 1:02d}.jpeg"
                    write_image(path, seed := seed + 1)
    return root


def corrupt(path: Path) -> Path:
    """Overwrite an image with bytes that are no image."""
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return path


@pytest.fixture(scope="module")
def uni(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_university(tmp_path_factory.mktemp("u1652"))


def test_train_items_labels_and_classes(uni: Path) -> None:
    ds = University1652Train(uni)
    assert ds.classes == sorted(TRAIN_IDS)
    assert ds.class_to_idx == {b: i for i, b in enumerate(sorted(TRAIN_IDS))}
    assert len(ds) == len(TRAIN_IDS)
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {
            "drone",
            "satellite",
            "label",
            "building",
            "drone_path",
            "satellite_path",
        }
        assert item["label"].dtype == torch.int64 and item["label"].ndim == 0
        assert ds.classes[int(item["label"])] == item["building"]
        for key in ("drone", "satellite"):
            x = item[key]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.std()) > 0.1
    # the satellite image is the building's own file
    bid = ds[0]["building"]
    sat = np.asarray(Image.open(uni / "train" / "satellite" / bid / f"{bid}.jpg"), np.float32)
    assert torch.allclose(ds[0]["satellite"], torch.from_numpy(sat / 255).permute(2, 0, 1))


def _drone_choice(ds: University1652Train, index: int) -> int:
    """Which of the building's drone files item ``index`` used (matched by pixels)."""
    item = ds[index]
    for k, path in enumerate(ds.drone_files[item["building"]]):
        pixels = torch.from_numpy(np.asarray(Image.open(path), np.float32) / 255)
        if torch.allclose(item["drone"], pixels.permute(2, 0, 1)):
            return k
    raise AssertionError("drone image not found among the building's files")


def test_sample_num_repeats_each_building_with_distinct_drone_images(uni: Path) -> None:
    ds = University1652Train(uni, sample_num=3)
    n = len(TRAIN_IDS)
    assert len(ds) == 3 * n
    buildings = [ds[i]["building"] for i in range(len(ds))]
    assert all(buildings.count(b) == 3 for b in TRAIN_IDS)
    for b in range(n):  # the 3 repetitions of a building use its 3 drone images once each
        assert sorted(_drone_choice(ds, b + r * n) for r in range(3)) == [0, 1, 2]
    with pytest.raises(IndexError):
        ds[3 * n]
    with pytest.raises(ValueError, match="sample_num"):
        University1652Train(uni, sample_num=0)


def test_drone_choice_is_a_function_of_seed_epoch_index(uni: Path) -> None:
    a, b = University1652Train(uni, seed=7), University1652Train(uni, seed=7)
    choices = {}
    for epoch in range(6):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        picks = [_drone_choice(a, i) for i in range(len(a))]
        assert picks == [_drone_choice(b, i) for i in range(len(b))]
        choices[epoch] = picks
    assert len({tuple(p) for p in choices.values()}) > 1  # changes across epochs
    a.set_epoch(2)
    assert [_drone_choice(a, i) for i in range(len(a))] == choices[2]  # and comes back
    other = University1652Train(uni, seed=8)
    picks8 = []
    for epoch in range(6):
        other.set_epoch(epoch)
        picks8.append([_drone_choice(other, i) for i in range(len(other))])
    assert picks8 != list(choices.values())


def test_augmentations_are_seeded_per_item(uni: Path) -> None:
    def noisy(x: torch.Tensor) -> torch.Tensor:  # a random transform using torch's generator
        return x + torch.rand(())

    a = University1652Train(uni, drone_transform=noisy, satellite_transform=noisy, seed=1)
    b = University1652Train(uni, drone_transform=noisy, satellite_transform=noisy, seed=1)
    torch.manual_seed(123)
    first = a[1]
    torch.manual_seed(999)  # the global state does not matter, and is left alone
    state = torch.get_rng_state()
    assert torch.equal(first["drone"], b[1]["drone"])
    assert torch.equal(torch.get_rng_state(), state)
    a.set_epoch(1)
    assert not torch.equal(first["satellite"], a[1]["satellite"])


def test_test_views_labels_paths_and_distractors(uni: Path) -> None:
    sizes = {"query_drone": 4, "gallery_satellite": 3, "query_satellite": 2, "gallery_drone": 6}
    for view, size in sizes.items():
        ds = University1652Test(uni, view)
        assert len(ds) == size
        labels = [int(ds[i]["label"]) for i in range(len(ds))]
        assert labels == sorted(labels) and set(labels) <= {200, 201, 300}
        assert torch.equal(ds.labels, torch.tensor(labels))
        item = ds[0]
        assert item["label"].dtype == torch.int64 and item["image"].shape == (3, 32, 32)
        assert Path(item["path"]).parent.name == "0200" and Path(item["path"]).exists()
    assert 300 in University1652Test(uni, "gallery_satellite").labels.tolist()
    assert 300 not in University1652Test(uni, "query_drone").labels.tolist()
    with pytest.raises(ValueError, match="query_drone"):
        University1652Test(uni, "street")  # type: ignore[arg-type]


def test_file_names_extensions_and_hidden_files(tmp_path: Path) -> None:
    root = make_university(tmp_path, train_ids=("0001", "0002"), n_drone=2)
    write_image(root / "train" / "drone" / "0001" / "IMAGE-09.PNG", 5)  # upper case counts
    (root / "train" / "drone" / "0001" / "notes.txt").write_text("not an image")
    (root / "train" / "drone" / "0001" / "._image-01.jpeg").write_bytes(b"macOS metadata")
    (root / "train" / "street" / "0001").mkdir(parents=True)  # other views are ignored
    ds = University1652Train(root)
    assert [p.name for p in ds.drone_files["0001"]] == [
        "IMAGE-09.PNG",
        "image-01.jpeg",
        "image-02.jpeg",
    ]


# -- layout errors --------------------------------------------------------------------------
def test_missing_root_split_and_view_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetLayoutError, match="University1652-Baseline") as err:
        University1652Train(missing)
    assert str(missing) in str(err.value) and "train/drone" in str(err.value)
    root = make_university(tmp_path / "u")
    (root / "test" / "gallery_drone").rename(root / "test" / "gallery_drone_old")
    with pytest.raises(DatasetLayoutError, match="gallery_drone") as err:
        University1652Test(root, "gallery_drone")
    assert str(root / "test" / "gallery_drone") in str(err.value)
    (root / "train" / "satellite").rename(root / "train" / "sat")
    with pytest.raises(DatasetLayoutError) as err:
        University1652Train(root)
    assert str(root / "train" / "satellite") in str(err.value)


def test_nested_release_folder_is_suggested(tmp_path: Path) -> None:
    make_university(tmp_path / "University-Release")
    with pytest.raises(DatasetLayoutError, match="Did you mean root="):
        University1652Train(tmp_path)


def test_building_without_satellite_image(tmp_path: Path) -> None:
    root = make_university(tmp_path)
    write_image(root / "train" / "drone" / "0777" / "image-01.jpeg", 1)
    with pytest.raises(DatasetLayoutError, match="0777") as err:
        University1652Train(root)
    assert str(root / "train" / "satellite" / "0777") in str(err.value)


def test_satellite_without_drone_folder(tmp_path: Path) -> None:
    root = make_university(tmp_path)
    write_image(root / "train" / "satellite" / "0555" / "0555.jpg", 1)
    with pytest.raises(DatasetLayoutError, match="no drone folder") as err:
        University1652Train(root)
    assert str(root / "train" / "drone" / "0555") in str(err.value)


def test_empty_class_folder(tmp_path: Path) -> None:
    root = make_university(tmp_path)
    for f in (root / "train" / "drone" / "0042").iterdir():
        f.unlink()
    with pytest.raises(DatasetLayoutError, match="no images") as err:
        University1652Train(root)
    assert str(root / "train" / "drone" / "0042") in str(err.value)
    (root / "test" / "query_satellite" / "0999").mkdir()
    with pytest.raises(DatasetLayoutError, match="0999"):
        University1652Test(root, "query_satellite")


def test_test_folder_names_must_be_integers(tmp_path: Path) -> None:
    root = make_university(tmp_path)
    write_image(root / "test" / "gallery_satellite" / "tower" / "tower.jpg", 3)
    with pytest.raises(DatasetLayoutError, match="int"):
        University1652Test(root, "gallery_satellite")


# -- unreadable images ----------------------------------------------------------------------
def test_corrupt_drone_image_raise_or_skip(tmp_path: Path) -> None:
    root = make_university(tmp_path, train_ids=("0001",), n_drone=3)
    bad = corrupt(root / "train" / "drone" / "0001" / "image-02.jpeg")
    strict = University1652Train(root, sample_num=3)  # the 3 items use all 3 drone images
    with pytest.raises(ImageReadError, match="on_bad_image") as err:
        [strict[i] for i in range(3)]
    assert str(bad) in str(err.value)

    lenient = University1652Train(root, sample_num=3, on_bad_image="skip")
    with pytest.warns(UserWarning, match="image-02"):
        items = [lenient[i] for i in range(3)]
    assert lenient.skipped == [str(bad)]
    assert all(it["drone"].shape == (3, 32, 32) for it in items)
    assert lenient.verify_images(progress=False) == [str(bad)]
    assert strict.verify_images(progress=False) == [str(bad)]  # reports, never raises


def test_unreadable_satellite_raises_even_when_skipping(tmp_path: Path) -> None:
    root = make_university(tmp_path, train_ids=("0001", "0002"))
    bad = corrupt(root / "train" / "satellite" / "0002" / "0002.jpg")
    ds = University1652Train(root, on_bad_image="skip")
    ds[0]  # construction and other buildings are fine: the check is lazy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageReadError, match="no readable satellite") as err:
            ds[1]
    assert str(bad) in str(err.value)


def test_corrupt_test_image_raise_skip_and_verify(tmp_path: Path) -> None:
    root = make_university(tmp_path)
    bad = corrupt(root / "test" / "gallery_drone" / "0201" / "image-01.jpeg")
    strict = University1652Test(root, "gallery_drone")
    index = [p for p, _ in strict.samples].index(bad)
    with pytest.raises(ImageReadError, match="image-01"):
        strict[index]
    lenient = University1652Test(root, "gallery_drone", on_bad_image="skip")
    with pytest.warns(UserWarning):
        item = lenient[index]
    assert int(item["label"]) == -1 and item["image"].shape[0] == 3  # junk for the protocol
    assert lenient.skipped == [str(bad)]
    checked = University1652Test(root, "gallery_drone", on_bad_image="skip")
    assert checked.verify_images(progress=False) == [str(bad)]
    assert len(checked) == len(strict) - 1 and str(bad) not in [str(p) for p, _ in checked.samples]


def test_plot_returns_a_figure(uni: Path) -> None:
    from matplotlib.figure import Figure

    ds = University1652Train(uni)
    fig = ds.plot(ds[0], suptitle="pair")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    test = University1652Test(uni, "query_drone")
    normalised = dict(test[0], image=(test[0]["image"] - 0.45) / 0.22)
    assert isinstance(test.plot(normalised), Figure)
