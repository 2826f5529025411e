"""Errors a user can cause, each with a message that names the file and what to do.

They subclass the built-in type a caller would expect (``ValueError``, ``FileNotFoundError``) so
that generic handlers keep working, and :class:`ImlnetError` so that the command line can print
the message alone, without a traceback from deep inside a library.
"""

from __future__ import annotations


class ImlnetError(Exception):
    """Base class of every error imlnet raises for bad input."""


class DatasetLayoutError(ImlnetError, ValueError):
    """A dataset folder does not have the expected layout (missing folder, empty class, ...)."""


class ImageReadError(ImlnetError, OSError):
    """An image file cannot be decoded."""


class CheckpointError(ImlnetError, ValueError):
    """A checkpoint or weights file is missing, corrupt, or belongs to another model."""


class WeightsNotFoundError(ImlnetError, FileNotFoundError):
    """Pretrained weights were asked for but are not on disk (nothing is downloaded)."""


class GeoError(ImlnetError, ValueError):
    """A raster, tile set or index cannot be used (no georeference, wrong bands, mismatch)."""


class DeviceError(ImlnetError, ValueError):
    """The requested device does not exist here (e.g. ``--device cuda`` without a GPU)."""
