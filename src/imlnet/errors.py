"""Errors a user can cause, each with a message that names the file and what to do.

They subclass the built-in type a caller would expect (``ValueError``, ``FileNotFoundError``) so
that generic handlers keep working, and :class:`ImlnetError` so that the command line can print
the message alone, without a traceback from deep inside a library.
"""

from __future__ import annotations


class ImlnetError(Exception):
    """Base class of every error imlnet raises for bad input.

    Raised in a DataLoader worker process (an image decoded by a dataset, in ``imlnet fit``,
    ``evaluate``, ``index``, ...), the error reaches the main process rebuilt by torch from its
    class and a message that starts ``Caught <class> in DataLoader worker process N.`` and
    carries the worker's whole traceback. The constructor recognises that message and keeps
    only the original one, so that the command line still prints one line.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _unwrap_worker_message(message: str, cls: type) -> str:
    """The original message inside torch's worker re-raise text, else ``message`` itself.

    torch (``torch._utils.ExceptionWrapper.reraise``) builds ``"Caught {name} {where}.\n
    Original {traceback}"``; the traceback's last entry is ``"{module}.{qualname}: {message}"``.
    """
    if not message.startswith(f"Caught {cls.__name__} in DataLoader worker process"):
        return message
    marker = f"{cls.__module__}.{cls.__qualname__}: "
    at = message.rfind(marker)
    if at < 0:
        return message
    return message[at + len(marker) :].strip()


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


class ConfigError(ImlnetError, ValueError):
    """Settings that cannot work together (e.g. a frozen-feature cache with nothing frozen)."""
