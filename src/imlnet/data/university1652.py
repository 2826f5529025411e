"""University-1652 (Zheng et al., ACM MM 2020): drone, satellite, ground views of 1,652 buildings.

Getting the data: the authors share it on request, for research only. Follow the instructions
at https://github.com/layumi/University1652-Baseline (a request form, then a download link),
unzip, and pass the folder that holds ``train/`` and ``test/`` (``University-Release/`` in the
archive) as ``root``. Nothing is downloaded by this package. The synthetic benchmark
(``imlnet synth``) writes the same layout.

Layout read (the street/google folders of the real release are ignored)::

    root/train/drone/<id>/image-01.jpeg ...      root/train/satellite/<id>/<id>.jpg
    root/test/query_drone/<id>/...               root/test/gallery_satellite/<id>/<id>.jpg
    root/test/query_satellite/<id>/<id>.jpg      root/test/gallery_drone/<id>/...

Training labels are class indices ``0..C-1`` over the building folders sorted by name; test
labels are ``int(<id>)``, as in the official evaluation. Galleries hold distractor buildings
that no query matches.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Literal

from imlnet.data.folders import PairedViewDataset, Transform, ViewDataset
from imlnet.data.images import BadImagePolicy
from imlnet.data.layout import list_class_images, list_subfolders, pair_buildings, require_dir
from imlnet.errors import DatasetLayoutError

TestView = Literal["query_drone", "gallery_satellite", "query_satellite", "gallery_drone"]
#: The four evaluation views, in the order the data module's test loaders use.
TEST_VIEWS: tuple[str, ...] = (
    "query_drone",
    "gallery_satellite",
    "query_satellite",
    "gallery_drone",
)

LAYOUT = """Expected layout:
  ROOT/train/drone/<id>/*.jpeg      ROOT/train/satellite/<id>/*.jpg
  ROOT/test/{query_drone,gallery_satellite,query_satellite,gallery_drone}/<id>/*
University-1652 is shared by its authors on request: see
https://github.com/layumi/University1652-Baseline, then pass the unzipped folder that holds
train/ and test/ (University-Release/) as the root. `imlnet synth ROOT` writes a synthetic
benchmark in this layout."""


def _layout_problem(root: Path, what: str) -> str:
    hint = ""
    nested = root / "University-Release"
    if (nested / "train").is_dir() or (nested / "test").is_dir():
        hint = f" Did you mean root={nested}?"
    return f"{what}{hint}\n{LAYOUT.replace('ROOT', str(root))}"


def _split_dir(root: Path, split: str) -> Path:
    require_dir(root, _layout_problem(root, "The University-1652 root folder is missing."))
    return require_dir(root / split, _layout_problem(root, f"The {split}/ split is missing."))


class University1652Train(PairedViewDataset):
    """The training split: (drone, satellite) pairs of the same building.

    One item per (building, repetition): ``len = n_buildings * sample_num``; see
    :class:`~imlnet.data.folders.PairedViewDataset` for the sampling. Items are
    ``{"drone": (3, H, W), "satellite": (3, H, W), "label": int64 class index,
    "building": str}``; without transforms the images are float in [0, 1] at their file size.

    Args:
        root: the folder holding ``train/`` and ``test/``.
        drone_transform: applied to each drone image (``build_transforms("drone", True)``).
        satellite_transform: applied to each satellite image.
        sample_num: repetitions of each building per epoch (satellite oversampling).
        on_bad_image: ``"raise"`` or ``"skip"`` unreadable images (see :attr:`skipped`).
        seed: seed of the drone choice and the augmentations; see :meth:`set_epoch`.

    Raises:
        DatasetLayoutError: a missing folder, an empty building folder, or a building with
            one view and not the other; the message names the path and what to do.
    """

    def __init__(
        self,
        root: str | PathLike[str],
        *,
        drone_transform: Transform | None = None,
        satellite_transform: Transform | None = None,
        sample_num: int = 1,
        on_bad_image: BadImagePolicy = "raise",
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
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
        """Check the layout; return building id -> image files for both views."""
        train = _split_dir(self.root, "train")
        roots = {}
        for view in ("drone", "satellite"):
            roots[view] = require_dir(
                train / view, _layout_problem(self.root, f"The training {view} folder is missing.")
            )
        dirs = {v: {b: r / b for b in list_subfolders(r)} for v, r in roots.items()}
        pair_buildings(
            dirs["drone"],
            dirs["satellite"],
            lambda b: roots["drone"] / b,
            lambda b: roots["satellite"] / b,
        )
        return list_class_images(dirs["drone"], "drone"), list_class_images(
            dirs["satellite"], "satellite"
        )


class University1652Test(ViewDataset):
    """One evaluation view of the test split (a query set or a gallery).

    Items are ``{"image": (3, H, W), "label": int64 = int(<id>), "path": str}``, classes sorted by
    folder name and files by name.

    Args:
        root: the folder holding ``train/`` and ``test/``.
        view: ``"query_drone"``, ``"gallery_satellite"``, ``"query_satellite"`` or
            ``"gallery_drone"``.
        transform: applied to each image (``build_transforms(<domain>, train=False)``).
        on_bad_image: ``"raise"`` or ``"skip"`` (a skipped image comes back with label -1, the
            protocol's junk label; :meth:`verify_images` removes bad files beforehand).

    Raises:
        ValueError: an unknown ``view``.
        DatasetLayoutError: a missing view folder, an empty building folder, or a folder name
            that is not an integer id.
    """

    def __init__(
        self,
        root: str | PathLike[str],
        view: TestView,
        *,
        transform: Transform | None = None,
        on_bad_image: BadImagePolicy = "raise",
    ) -> None:
        if view not in TEST_VIEWS:
            raise ValueError(f"view must be one of {TEST_VIEWS}, got {view!r}")
        self.root = Path(root)
        super().__init__(self._verify(view), view, transform=transform, on_bad_image=on_bad_image)

    def _verify(self, view: str) -> dict[str, list[Path]]:
        """Check the view's folder; return building id -> image files."""
        test = _split_dir(self.root, "test")
        folder = require_dir(
            test / view, _layout_problem(self.root, f"The test view folder {view}/ is missing.")
        )
        dirs = {b: folder / b for b in list_subfolders(folder)}
        if not dirs:
            raise DatasetLayoutError(
                f"{folder} has no building folders. "
                + _layout_problem(self.root, "Each view holds one folder per building id.")
            )
        return list_class_images(dirs, view)
