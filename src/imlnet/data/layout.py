"""Where a folder dataset's images are: listing image files and class folders, checking the layout.

The benchmarks differ only in where their folders are; these helpers find and check them and
raise :class:`~imlnet.errors.DatasetLayoutError` naming the folder and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from imlnet.errors import DatasetLayoutError

#: File suffixes read as images (compared lower-case, so ``.JPG`` counts).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png"})


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
