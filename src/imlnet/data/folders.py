"""What every folder dataset shares: listing and decoding images, and the two dataset shapes.

The benchmarks differ only in where their folders are (University-1652's ``train/drone/<id>``,
SUES-200's ``Training/<alt>/drone/<id>`` or raw ``drone_view_512/<id>/<alt>``), so each dataset
file only finds its folders and checks them (``_verify``); the item logic lives here once:

- :class:`PairedViewDataset`: training pairs, one item per (building, repetition): the building's
  satellite image with one of its drone images, chosen from ``(seed, epoch, index)``.
- :class:`ViewDataset`: one evaluation view (query or gallery), one item per image.

Images are decoded lazily (a real benchmark has tens of thousands); a file that cannot be decoded
raises :class:`~imlnet.errors.ImageReadError` or, with ``on_bad_image="skip"``, is reported and
left out. ``verify_images()`` decodes everything up front for a full check.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from imlnet.data.seeding import derive_seed
from imlnet.errors import DatasetLayoutError, ImageReadError

#: File suffixes read as images (compared lower-case, so ``.JPG`` counts).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})

BadImagePolicy = Literal["raise", "skip"]
Transform = Callable[[Tensor], Tensor]

_SKIP_HINT = (
    "Replace or delete the file, or pass on_bad_image='skip' (config: data.on_bad_image: skip) "
    "to leave unreadable images out."
)


def is_image_file(name: str) -> bool:
    """Whether ``name`` is an image the datasets read: a known suffix and not a hidden file.

    Hidden files are ignored because archives made on macOS carry ``._<name>.jpg`` metadata
    files that have an image suffix but are not images.
    """
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (the order ``ImageFolder`` uses)."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_file() and is_image_file(e.name)]
    return [folder / name for name in sorted(names)]


def list_subfolders(folder: Path) -> list[str]:
    """Names of the non-hidden sub-folders of ``folder``, sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def require_dir(path: Path, problem: str) -> Path:
    """Return ``path`` if it is a folder, else raise :class:`DatasetLayoutError` with ``problem``.

    ``problem`` is the rest of the message (what is expected there and how to get it); the
    message starts by naming the missing path.
    """
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DatasetLayoutError(f"{path} {state}. {problem}")
    return path


def list_class_images(dirs: Mapping[str, Path], what: str) -> dict[str, list[Path]]:
    """The image files of each class folder; an empty class folder is a layout error.

    Args:
        dirs: class id -> folder.
        what: what the folder holds, for the message (``"drone"``, ``"query_drone"``).

    Raises:
        DatasetLayoutError: naming the first folder with no image in it.
    """
    files = {}
    for cid, folder in dirs.items():
        images = list_images(folder)
        if not images:
            raise DatasetLayoutError(
                f"class folder {folder} ({what}, building {cid}) has no images "
                f"({'/'.join(sorted(IMAGE_EXTENSIONS))}). Add its images or remove the folder."
            )
        files[cid] = images
    return files


def pair_buildings(
    drone_dirs: Mapping[str, Path],
    satellite_dirs: Mapping[str, Path],
    expected_drone: Callable[[str], Path],
    expected_satellite: Callable[[str], Path],
) -> list[str]:
    """The sorted building ids of a training split, checking that both views have each one.

    Raises:
        DatasetLayoutError: a building with drone images but no satellite folder, or the
            reverse (the message names the folder that exists and the one that is missing).
    """
    no_satellite = sorted(set(drone_dirs) - set(satellite_dirs))
    if no_satellite:
        bid, more = no_satellite[0], _and_more(len(no_satellite))
        raise DatasetLayoutError(
            f"training building {bid} has drone images ({drone_dirs[bid]}) but no satellite "
            f"image folder ({expected_satellite(bid)}){more}. Training pairs each drone image "
            "with its building's satellite image: add the satellite image or remove the drone "
            "folder."
        )
    no_drone = sorted(set(satellite_dirs) - set(drone_dirs))
    if no_drone:
        bid, more = no_drone[0], _and_more(len(no_drone))
        raise DatasetLayoutError(
            f"training building {bid} has a satellite folder ({satellite_dirs[bid]}) but no drone "
            f"folder ({expected_drone(bid)}){more}. Add its drone images or remove the satellite "
            "folder."
        )
    if not drone_dirs:
        raise DatasetLayoutError("the training split has no buildings (no class folders).")
    return sorted(drone_dirs)


def _and_more(n: int) -> str:
    return f" (and {n - 1} more buildings like it)" if n > 1 else ""


def read_image(path: str | os.PathLike[str]) -> Tensor:
    """Decode an image file as RGB.

    Returns:
        ``(3, H, W)`` float32 in [0, 1].

    Raises:
        ImageReadError: naming the file, when it is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # forces the full decode, so truncation is caught here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}. {_SKIP_HINT}") from err
    array = np.array(rgb, dtype=np.uint8)  # (H, W, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def check_policy(on_bad_image: str) -> BadImagePolicy:
    """Validate ``on_bad_image``."""
    if on_bad_image not in ("raise", "skip"):
        raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
    return on_bad_image  # type: ignore[return-value]


class _BadImages:
    """The per-dataset record of unreadable files (``skipped``) and the policy for them."""

    def __init__(self, on_bad_image: str) -> None:
        self.on_bad_image = check_policy(on_bad_image)
        self.skipped: list[str] = []
        self._bad: set[str] = set()

    def is_bad(self, path: Path) -> bool:
        return str(path) in self._bad

    def mark(self, path: Path, err: Exception, *, warn: bool = True) -> None:
        if str(path) in self._bad:
            return
        self._bad.add(str(path))
        self.skipped.append(str(path))
        if warn:
            warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=3)

    def read(self, path: Path) -> Tensor | None:
        """The image, or None when it is unreadable and the policy is ``"skip"``."""
        if self.is_bad(path):
            return None
        try:
            return read_image(path)
        except ImageReadError as err:
            if self.on_bad_image == "raise":
                raise
            self.mark(path, err)
            return None

    def scan(self, paths: Sequence[Path], progress: bool, desc: str) -> list[str]:
        """Decode every file; return the unreadable ones (recorded as skipped with ``skip``)."""
        bad = []
        for path in tqdm(paths, desc=desc, unit="image", disable=not progress):
            try:
                read_image(path)
            except ImageReadError as err:
                bad.append(str(path))
                if self.on_bad_image == "skip":
                    self.mark(path, err, warn=False)
        return bad


def _as_label(value: int) -> Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _show(ax: Any, image: Tensor, title: str | None) -> None:
    """Draw a ``(3, H, W)`` image; normalised input (values outside [0, 1]) is denormalised."""
    from imlnet.data.transforms import denormalize

    img = image.detach().float().cpu()
    if img.min() < 0 or img.max() > 1:
        img = denormalize(img)
    ax.imshow(img.permute(1, 2, 0).numpy())
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)


class PairedViewDataset(Dataset):
    """Training pairs: a building's satellite image and one of its drone images.

    There are ``n_buildings * sample_num`` items: item ``i`` is building ``i % n_buildings``,
    repetition ``i // n_buildings``. This is the satellite oversampling of the official
    University-1652 code (``sample_num``): each satellite image is seen ``sample_num`` times per
    epoch, each time with a drone image of its building. The drone image of repetition ``r`` is
    entry ``r`` of a permutation of the building's drone images drawn from
    ``(seed, epoch, building)``, so the repetitions of one epoch use different drone images
    (while there are enough), the choice is the same for the same ``(seed, epoch, index)`` in
    any process or worker, and it changes with :meth:`set_epoch`. The random augmentations of an
    item are drawn from a generator seeded with ``(seed, epoch, index)`` too, so an item is
    reproducible whatever the number of workers or the point a run was resumed from.

    Args:
        drone_files: building id -> its drone image files (non-empty lists).
        satellite_files: building id -> its satellite image files (same ids).
        drone_transform: applied to the drone image ``(3, H, W)`` float in [0, 1].
        satellite_transform: applied to the satellite image, likewise.
        sample_num: repetitions of each building per epoch (>= 1).
        on_bad_image: ``"raise"`` an :class:`ImageReadError` for an unreadable image, or
            ``"skip"`` it (warn, record it in :attr:`skipped`, use another drone image of the
            building). A building with no readable satellite (or drone) image raises either way.
        seed: seed of the drone choice and of the augmentations.
    """

    def __init__(
        self,
        drone_files: Mapping[str, list[Path]],
        satellite_files: Mapping[str, list[Path]],
        *,
        drone_transform: Transform | None = None,
        satellite_transform: Transform | None = None,
        sample_num: int = 1,
        on_bad_image: BadImagePolicy = "raise",
        seed: int = 0,
    ) -> None:
        if int(sample_num) < 1:
            raise ValueError(f"sample_num must be >= 1, got {sample_num}")
        self.classes: list[str] = sorted(drone_files)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.drone_files = {c: list(drone_files[c]) for c in self.classes}
        self.satellite_files = {c: list(satellite_files[c]) for c in self.classes}
        self.drone_transform = drone_transform
        self.satellite_transform = satellite_transform
        self.sample_num = int(sample_num)
        self.seed = int(seed)
        self.epoch = 0
        self._bad = _BadImages(on_bad_image)

    @property
    def on_bad_image(self) -> BadImagePolicy:
        return self._bad.on_bad_image

    @property
    def skipped(self) -> list[str]:
        """Files left out as unreadable so far (in this process; workers keep their own)."""
        return self._bad.skipped

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose drone choices and augmentations the items use."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.classes) * self.sample_num

    def _order(self, files: list[Path], building: int, repetition: int, stream: int) -> list[Path]:
        """``files`` in the order to try them: the chosen one first, then the fallbacks."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, building, stream))
        perm = torch.randperm(len(files), generator=gen).tolist()
        start = repetition % len(files)
        return [files[perm[(start + k) % len(files)]] for k in range(len(files))]

    def _first_readable(self, files: list[Path], what: str, building: str) -> Tensor:
        for path in files:
            image = self._bad.read(path)
            if image is not None:
                return image
        raise ImageReadError(
            f"training building {building} has no readable {what} image "
            f"(all of {[str(p) for p in files]} failed to decode). Replace the files: a "
            "training building needs at least one drone and one satellite image."
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index``: the two images, the class index and the building id.

        Returns:
            ``{"drone": (3, H, W), "satellite": (3, H, W), "label": int64 scalar,
            "building": str}``.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        b, rep = index % len(self.classes), index // len(self.classes)
        bid = self.classes[b]
        drone = self._first_readable(self._order(self.drone_files[bid], b, rep, 0), "drone", bid)
        satellite = self._first_readable(
            self._order(self.satellite_files[bid], b, rep, 1), "satellite", bid
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, index, 2))
            if self.drone_transform is not None:
                drone = self.drone_transform(drone)
            if self.satellite_transform is not None:
                satellite = self.satellite_transform(satellite)
        return {"drone": drone, "satellite": satellite, "label": _as_label(b), "building": bid}

    def verify_images(self, *, progress: bool = True) -> list[str]:
        """Decode every image; return the unreadable files.

        With ``on_bad_image="skip"`` they are also recorded in :attr:`skipped` and never tried
        again. Nothing is raised: this is the full check that construction skips for speed.
        """
        paths = [p for c in self.classes for p in self.satellite_files[c] + self.drone_files[c]]
        return self._bad.scan(paths, progress, "checking training images")

    def plot(self, sample: Mapping[str, Any], *, suptitle: str | None = None) -> Any:
        """A matplotlib Figure with the drone and satellite images of ``sample``."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 3.4), layout="constrained")
        axes = fig.subplots(1, 2)
        name = f"building {sample.get('building', '?')}"
        _show(axes[0], sample["drone"], f"drone, {name}")
        _show(axes[1], sample["satellite"], f"satellite, label {int(sample['label'])}")
        if suptitle:
            fig.suptitle(suptitle)
        return fig


class ViewDataset(Dataset):
    """One evaluation view (query or gallery): every image of every class folder, in order.

    The label of an image is ``int(<folder name>)``, exactly what the official University-1652
    evaluation uses, so the folder names must be integers. Order: classes sorted by name, then
    files sorted by name (the order of torchvision's ``ImageFolder`` in the official code).

    An unreadable image with ``on_bad_image="skip"`` is returned as a black image with label
    ``-1``, which the official protocol treats as junk (left out of a gallery's ranking); a
    skipped query counts as a query with no match. Call :meth:`verify_images` first to drop bad
    files from the view entirely.

    Args:
        class_files: class id (folder name) -> its image files.
        view: the view's name, for messages and :attr:`view`.
        transform: applied to each ``(3, H, W)`` float image in [0, 1].
        on_bad_image: ``"raise"`` or ``"skip"``, as above.
    """

    def __init__(
        self,
        class_files: Mapping[str, list[Path]],
        view: str,
        *,
        transform: Transform | None = None,
        on_bad_image: BadImagePolicy = "raise",
    ) -> None:
        self.view = view
        self.transform = transform
        self._bad = _BadImages(on_bad_image)
        self.classes: list[str] = sorted(class_files)
        self.samples: list[tuple[Path, int]] = []
        for cid in self.classes:
            try:
                label = int(cid)
            except ValueError:
                folder = class_files[cid][0].parent if class_files[cid] else cid
                raise DatasetLayoutError(
                    f"class folder {folder} of view {view}: folder names must be integer "
                    "building ids (like 0839), because the evaluation uses int(folder name) "
                    "as the label. Rename the folder."
                ) from None
            self.samples.extend((path, label) for path in class_files[cid])

    @property
    def on_bad_image(self) -> BadImagePolicy:
        return self._bad.on_bad_image

    @property
    def skipped(self) -> list[str]:
        """Files found unreadable so far (in this process; workers keep their own)."""
        return self._bad.skipped

    @property
    def labels(self) -> Tensor:
        """``(N,)`` int64 labels of all items, without loading any image."""
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def _placeholder(self, path: Path) -> Tensor:
        size = (256, 256)
        try:  # the header is often readable when the pixel data is not
            with Image.open(path) as img:
                size = img.size
        except Exception:  # any failure: fall back to the default size
            pass
        return torch.zeros(3, size[1], size[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index``.

        Returns:
            ``{"image": (3, H, W), "label": int64 scalar, "path": str}``.
        """
        path, label = self.samples[index]
        image = self._bad.read(path)
        if image is None:
            image, label = self._placeholder(path), -1
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": _as_label(label), "path": str(path)}

    def verify_images(self, *, progress: bool = True) -> list[str]:
        """Decode every image; return the unreadable files.

        With ``on_bad_image="skip"`` they are also recorded in :attr:`skipped` and removed from
        the view, so the evaluation never sees them. Nothing is raised.
        """
        bad = self._bad.scan([p for p, _ in self.samples], progress, f"checking {self.view}")
        if bad and self.on_bad_image == "skip":
            drop = set(bad)
            self.samples = [(p, lab) for p, lab in self.samples if str(p) not in drop]
        return bad

    def plot(self, sample: Mapping[str, Any], *, suptitle: str | None = None) -> Any:
        """A matplotlib Figure with the image of ``sample``, its label and file name."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.4, 3.6), layout="constrained")
        ax = fig.subplots(1, 1)
        name = Path(str(sample.get("path", ""))).name
        _show(ax, sample["image"], f"{self.view}, label {int(sample['label'])}\n{name}")
        if suptitle:
            fig.suptitle(suptitle)
        return fig
