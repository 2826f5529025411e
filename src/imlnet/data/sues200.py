"""SUES-200 (Zhu et al., IEEE TCSVT 2023): 200 places seen by a drone at 150/200/250/300 m.

Getting the data: the authors share it for academic research on request (e-mail, see
https://github.com/Reza-Zhu/SUES-200-Benchmark). Nothing is downloaded by this package.
Results are reported per altitude: one dataset object (and one training run) per altitude.

Two layouts are read; ``root`` is the folder that holds either one:

1. The split layout that the benchmark's ``script/split_datasets.py`` writes (also accepted one
   level down in ``root/Dataset/``, where its README moves it)::

       root/Training/<alt>/drone/<id>/*.jpg        root/Training/<alt>/satellite/<id>/0.png
       root/Testing/<alt>/{query_drone,gallery_drone,query_satellite,gallery_satellite}/<id>/*

2. The raw release (``SUES-200-512x512``)::

       root/satellite-view/<id>/0.png
       root/drone_view_512/<id>/<alt>/0.jpg ... 49.jpg     (or drone-view/<alt>/<id>/*.jpg)

   split here as the official script does: the 120 training places of the benchmark's
   ``script/indexs.yaml`` (:data:`OFFICIAL_TRAIN_IDS`) train, the other 80 are queries, and the
   galleries hold all 200 places (the 120 training places are distractors).

Labels: class indices over the training places sorted by name; ``int(<id>)`` in the test views.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path

from imlnet.data.folders import PairedViewDataset, Transform, ViewDataset
from imlnet.data.images import BadImagePolicy
from imlnet.data.layout import list_class_images, list_subfolders, pair_buildings, require_dir
from imlnet.data.university1652 import TEST_VIEWS, TestView
from imlnet.errors import DatasetLayoutError

#: The flight altitudes in metres.
ALTITUDES: tuple[int, ...] = (150, 200, 250, 300)

#: The 120 training places of the official split (``script/indexs.yaml`` of SUES-200-Benchmark).
OFFICIAL_TRAIN_IDS = frozenset({
    1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13, 15, 16, 20, 21, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33,
    34, 36, 37, 39, 43, 44, 45, 51, 55, 56, 57, 58, 60, 64, 66, 67, 69, 70, 73, 74, 76, 77, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90, 91, 94, 96, 97, 100, 101, 102, 103, 104, 105, 106, 113,
    116, 118, 119, 120, 123, 125, 126, 127, 129, 132, 134, 137, 139, 141, 142, 145, 146, 147, 148,
    149, 151, 152, 155, 156, 157, 158, 159, 160, 163, 166, 167, 168, 169, 171, 174, 179, 180, 182,
    183, 184, 185, 186, 187, 191, 192, 193, 196, 197, 198, 199, 200,
})  # fmt: skip

#: Names of the drone folder in the raw release, in the order they are looked for.
RAW_DRONE_FOLDERS = ("drone_view_512", "drone-view", "drone_view")

LAYOUT = """Expected one of:
  ROOT/Training/<alt>/{drone,satellite}/<id>/*
  ROOT/Testing/<alt>/{query_drone,gallery_drone,query_satellite,gallery_satellite}/<id>/*
(written by script/split_datasets.py of SUES-200-Benchmark), or the raw release:
  ROOT/satellite-view/<id>/0.png   ROOT/drone_view_512/<id>/<alt>/*.jpg
SUES-200 is shared by its authors for academic research on request: see
https://github.com/Reza-Zhu/SUES-200-Benchmark."""


def check_altitude(altitude: int) -> int:
    """Validate a flight altitude (metres)."""
    if altitude not in ALTITUDES:
        raise ValueError(f"SUES-200 altitude must be one of {ALTITUDES} (metres), got {altitude!r}")
    return int(altitude)


def _problem(root: Path, what: str) -> str:
    return f"{what}\n{LAYOUT.replace('ROOT', str(root))}"


def _is_official_train(bid: str) -> bool:
    return bid.isdigit() and int(bid) in OFFICIAL_TRAIN_IDS


class _Layout:
    """Where the folders of one altitude are, in either layout."""

    def __init__(self, root: Path, altitude: int) -> None:
        require_dir(root, _problem(root, "The SUES-200 root folder is missing."))
        self.root, self.altitude = root, altitude
        base = root if (root / "Training").is_dir() or (root / "Testing").is_dir() else None
        if base is None and ((root / "Dataset" / "Training").is_dir()):
            base = root / "Dataset"
        self.split_base = base
        self.raw_drone: Path | None = None
        self.alt_major = False
        if base is None:
            if not (root / "satellite-view").is_dir():
                raise DatasetLayoutError(
                    _problem(
                        root,
                        f"{root} holds neither Training/ and Testing/ nor the raw "
                        "release's satellite-view/.",
                    )
                )
            drone = next((root / n for n in RAW_DRONE_FOLDERS if (root / n).is_dir()), None)
            if drone is None:
                raise DatasetLayoutError(
                    _problem(
                        root,
                        f"{root / RAW_DRONE_FOLDERS[0]} does not exist: the raw "
                        "release needs a drone folder beside satellite-view/.",
                    )
                )
            self.raw_drone, self.alt_major = drone, (drone / str(altitude)).is_dir()

    # -- raw release -------------------------------------------------------------------------
    def drone_dir(self, bid: str) -> Path:
        assert self.raw_drone is not None  # only called for the raw layout
        alt = str(self.altitude)
        return self.raw_drone / alt / bid if self.alt_major else self.raw_drone / bid / alt

    def satellite_dir(self, bid: str) -> Path:
        return self.root / "satellite-view" / bid

    def raw_dirs(self, domain: str) -> dict[str, Path]:
        """Every place with images of ``domain`` ("drone" at this altitude, or "satellite")."""
        if domain == "satellite":
            return {b: self.satellite_dir(b) for b in list_subfolders(self.root / "satellite-view")}
        assert self.raw_drone is not None
        if self.alt_major:
            folder = require_dir(
                self.raw_drone / str(self.altitude),
                _problem(self.root, f"No drone images at {self.altitude} m."),
            )
            return {b: folder / b for b in list_subfolders(folder)}
        ids = list_subfolders(self.raw_drone)
        return {b: self.drone_dir(b) for b in ids if self.drone_dir(b).is_dir()}

    # -- split layout ------------------------------------------------------------------------
    def split_dir(self, split: str, view: str) -> Path:
        assert self.split_base is not None
        folder = self.split_base / split
        require_dir(folder, _problem(self.root, f"The {split}/ split is missing."))
        folder = folder / str(self.altitude)
        missing = f"There is no {self.altitude} m folder in {split}/."
        require_dir(folder, _problem(self.root, missing))
        return require_dir(folder / view, _problem(self.root, f"The {view}/ folder is missing."))


def _dirs_in(folder: Path) -> dict[str, Path]:
    return {b: folder / b for b in list_subfolders(folder)}


def _require_some(dirs: dict[str, Path], where: str, root: Path) -> dict[str, Path]:
    if not dirs:
        raise DatasetLayoutError(_problem(root, f"No place folders found for {where}."))
    return dirs


class SUES200Train(PairedViewDataset):
    """The training split at one altitude: (drone, satellite) pairs of the same place.

    Same items, sampling and errors as :class:`~imlnet.data.university1652.University1652Train`.

    Args:
        root: the SUES-200 folder (either layout, see the module docstring).
        altitude: 150, 200, 250 or 300 (metres).
        drone_transform, satellite_transform, sample_num, on_bad_image, seed: as for
            :class:`~imlnet.data.folders.PairedViewDataset`.

    Raises:
        ValueError: an altitude outside :data:`ALTITUDES`.
        DatasetLayoutError: a missing folder, an empty place folder, or a place with one view
            and not the other.
    """

    def __init__(
        self,
        root: str | PathLike[str],
        altitude: int,
        *,
        drone_transform: Transform | None = None,
        satellite_transform: Transform | None = None,
        sample_num: int = 1,
        on_bad_image: BadImagePolicy = "raise",
        seed: int = 0,
    ) -> None:
        self.root, self.altitude = Path(root), check_altitude(altitude)
        drone, satellite = self._verify()
        super().__init__(
            drone,
            satellite,
            drone_transform=drone_transform,
            satellite_transform=satellite_transform,
            sample_num=sample_num,
            on_bad_image=on_bad_image,
            seed=seed,
        )

    def _verify(self) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
        layout = _Layout(self.root, self.altitude)
        if layout.split_base is not None:
            drone_root = layout.split_dir("Training", "drone")
            sat_root = layout.split_dir("Training", "satellite")
            drone, sat = _dirs_in(drone_root), _dirs_in(sat_root)
            expect_drone: Callable[[str], Path] = drone_root.joinpath
            expect_sat: Callable[[str], Path] = sat_root.joinpath
        else:
            drone = {b: d for b, d in layout.raw_dirs("drone").items() if _is_official_train(b)}
            sat = {b: d for b, d in layout.raw_dirs("satellite").items() if _is_official_train(b)}
            expect_drone, expect_sat = layout.drone_dir, layout.satellite_dir
        pair_buildings(drone, sat, expect_drone, expect_sat)
        return list_class_images(drone, "drone"), list_class_images(sat, "satellite")


class SUES200Test(ViewDataset):
    """One evaluation view at one altitude (a query set or a gallery).

    Same items and errors as :class:`~imlnet.data.university1652.University1652Test`.

    Args:
        root: the SUES-200 folder (either layout).
        altitude: 150, 200, 250 or 300 (metres).
        view: ``"query_drone"``, ``"gallery_satellite"``, ``"query_satellite"`` or
            ``"gallery_drone"``.
        transform, on_bad_image: as for :class:`~imlnet.data.folders.ViewDataset`.
    """

    def __init__(
        self,
        root: str | PathLike[str],
        altitude: int,
        view: TestView,
        *,
        transform: Transform | None = None,
        on_bad_image: BadImagePolicy = "raise",
    ) -> None:
        if view not in TEST_VIEWS:
            raise ValueError(f"view must be one of {TEST_VIEWS}, got {view!r}")
        self.root, self.altitude = Path(root), check_altitude(altitude)
        super().__init__(self._verify(view), view, transform=transform, on_bad_image=on_bad_image)

    def _verify(self, view: str) -> dict[str, list[Path]]:
        layout = _Layout(self.root, self.altitude)
        if layout.split_base is not None:
            dirs = _dirs_in(layout.split_dir("Testing", view))
        else:
            role, domain = view.split("_")
            dirs = layout.raw_dirs(domain)
            if role == "query":  # queries: the places outside the official training list
                dirs = {b: d for b, d in dirs.items() if not _is_official_train(b)}
        _require_some(dirs, f"{view} at {self.altitude} m", self.root)
        return list_class_images(dirs, view)
