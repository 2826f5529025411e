"""The training recipes that ship inside the package, found with :mod:`importlib.resources`.

The YAML files live in ``src/imlnet/configs/`` (the repository's ``configs/`` is a link to that
folder, so there is one copy: the files a researcher edits in a checkout are the ones the wheel
carries). Commands that read a recipe (the demo, the ablation bench) find it here, installed or
not; ``imlnet fit --config university1652.yaml`` finds a packaged recipe by name when no such
file exists in the working folder, and ``imlnet configs --copy DIR`` copies them out for editing.

    >>> from imlnet.resources import config_path
    >>> config_path("demo.yaml").name
    'demo.yaml'
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from imlnet.errors import ImlnetError

__all__ = ["config_names", "config_path", "main", "resolve_config_args"]

_PACKAGE = "imlnet"
_FOLDER = "configs"


def _root() -> Path:
    root = resources.files(_PACKAGE) / _FOLDER
    if not isinstance(root, Path) or not root.is_dir():
        raise ImlnetError(
            f"the packaged recipes ({_PACKAGE}/{_FOLDER}) are missing from this install "
            f"({root}); reinstall imlnet (pip install --force-reinstall imlnet)"
        )
    return root


def config_names() -> list[str]:
    """Every packaged recipe, as a path relative to the configs folder (``ablations/irn.yaml``)."""
    root = _root()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))


def config_path(name: str) -> Path:
    """The file of a packaged recipe: ``"demo.yaml"``, ``"ablations/drcl.yaml"`` ...

    ``.yaml`` may be left out; a leading ``configs/`` is accepted (the name as the docs write it).

    Raises:
        ImlnetError: no such recipe (the message lists them).
    """
    rel = str(name).removeprefix("configs/")
    if not rel.endswith((".yaml", ".yml")):
        rel += ".yaml"
    path = _root() / rel
    if ".." in Path(rel).parts or not path.is_file():
        raise ImlnetError(
            f"no packaged recipe {name!r}; the recipes are: {', '.join(config_names())}"
        )
    return path


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``--config NAME`` arguments with a packaged recipe's path where no file ``NAME`` exists.

    A file in the working folder always wins, so ``imlnet fit --config configs/demo.yaml`` in a
    checkout reads that file, and the same command from any other folder reads the packaged one.
    """
    out = list(args)
    for i, arg in enumerate(out):
        if i > 0 and out[i - 1] in ("--config", "-c"):
            value, prefix = arg, ""
        elif arg.startswith("--config="):
            value, prefix = arg.split("=", 1)[1], "--config="
        else:
            continue
        if Path(value).exists() or not value.endswith((".yaml", ".yml")):
            continue
        try:
            out[i] = prefix + str(config_path(value))
        except ImlnetError:
            continue  # left as it is: jsonargparse names the missing file
    return out


def main(argv: Sequence[str]) -> int:
    """``imlnet configs [--copy DIR] [--show NAME]``: list, print or copy the packaged recipes."""
    ap = argparse.ArgumentParser(
        prog="imlnet configs", description="list, print or copy the packaged training recipes"
    )
    ap.add_argument("--show", metavar="NAME", help="print one recipe (e.g. demo.yaml)")
    ap.add_argument("--copy", metavar="DIR", type=Path, help="copy every recipe into DIR")
    ap.add_argument("--overwrite", action="store_true", help="with --copy: replace files")
    args = ap.parse_args(list(argv))
    if args.show:
        print(config_path(args.show).read_text(encoding="utf-8"), end="")
        return 0
    if args.copy:
        root, names = _root(), config_names()
        clash = [n for n in names if (args.copy / n).exists()]
        if clash and not args.overwrite:
            raise ImlnetError(
                f"{args.copy / clash[0]} exists ({len(clash)} of the {len(names)} recipes do); "
                "pass --overwrite to replace them or copy into another folder"
            )
        for name in names:
            target = args.copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / name, target)
        print(f"copied {len(names)} recipes into {args.copy}")
        return 0
    root = _root()
    print(f"packaged recipes ({root}):")
    for name in config_names():
        print(f"  {name}")
    print("use one with `imlnet fit --config NAME` or copy them with `imlnet configs --copy DIR`")
    return 0
