"""The two dataset shapes every folder dataset shares (listing: layout.py; decoding: images.py).

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

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from imlnet.data.images import BadImagePolicy, BadImages
from imlnet.data.seeding import derive_seed
from imlnet.errors import DatasetLayoutError, ImageReadError

Transform = Callable[[Tensor], Tensor]
#: an unreadable image whose header claims more pixels gets a 256 x 256 placeholder (a header
#: of a truncated file can claim up to PIL's bomb limit, 179 M pixels: 2 GB of zeros)
_PLACEHOLDER_MAX_PIXELS = 4096 * 4096


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
        self._bad = BadImages(on_bad_image)

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

    def _first_readable(self, files: list[Path], what: str, building: str) -> tuple[Tensor, Path]:
        for path in files:
            image = self._bad.read(path)
            if image is not None:
                return image, path
        raise ImageReadError(
            f"training building {building} has no readable {what} image "
            f"(all of {[str(p) for p in files]} failed to decode). Replace the files: a "
            "training building needs at least one drone and one satellite image."
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index``: the two images, the class index and the building id.

        Returns:
            ``{"drone": (3, H, W), "satellite": (3, H, W), "label": int64 scalar,
            "building": str, "drone_path": str, "satellite_path": str}`` (the paths key a
            cache of frozen-unit features, :class:`imlnet.models.cache.PrefixCache`).
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        b, rep = index % len(self.classes), index // len(self.classes)
        bid = self.classes[b]
        drone, drone_path = self._first_readable(
            self._order(self.drone_files[bid], b, rep, 0), "drone", bid
        )
        satellite, satellite_path = self._first_readable(
            self._order(self.satellite_files[bid], b, rep, 1), "satellite", bid
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, index, 2))
            if self.drone_transform is not None:
                drone = self.drone_transform(drone)
            if self.satellite_transform is not None:
                satellite = self.satellite_transform(satellite)
        return {
            "drone": drone,
            "satellite": satellite,
            "label": _as_label(b),
            "building": bid,
            "drone_path": str(drone_path),
            "satellite_path": str(satellite_path),
        }

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
        self._bad = BadImages(on_bad_image)
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    size = img.size
        except Exception:  # any failure: fall back to the default size
            pass
        if size[0] * size[1] > _PLACEHOLDER_MAX_PIXELS:  # a damaged file's huge header
            size = (256, 256)
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
