"""The ``imlnet`` command.

Each sub-command lives in the module that owns its work and exposes ``main(argv) -> int``; this
file only dispatches, importing the module lazily so that ``imlnet --help`` stays fast and so that
serving commands never import the trainer. ``fit``, ``validate`` and ``test`` go to LightningCLI.
Errors a user can cause (:class:`imlnet.errors.ImlnetError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from imlnet.errors import ImlnetError

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("imlnet.data.synthetic.cli", "generate the synthetic multi-domain benchmark"),
    "fit": ("imlnet.training", "train with a LightningCLI YAML config"),
    "validate": ("imlnet.training", "validate with a LightningCLI YAML config"),
    "test": ("imlnet.training", "test with a LightningCLI YAML config"),
    "evaluate": ("imlnet.evaluation.cli", "official University-1652 / SUES-200 retrieval metrics"),
    "tile": ("imlnet.geo.tiling", "cut a GeoTIFF into georeferenced gallery tiles"),
    "index": ("imlnet.geo.index", "embed gallery tiles into a FAISS index"),
    "localize": ("imlnet.geo.localize", "drone images -> top-k tiles with lat/lon"),
    "visualize": ("imlnet.visualize", "reconstructions, attention maps and retrieval grids"),
    "demo": ("imlnet.demo", "synthesise, train, evaluate and localise end to end"),
    "serve": ("imlnet.serve.cli", "a local web page: drop drone photos, see them on the map"),
    "export": ("imlnet.export", "write the descriptor network as an ONNX file"),
    "configs": ("imlnet.resources", "list, print or copy the packaged training recipes"),
}
LIGHTNING_COMMANDS = {"fit", "validate", "test"}


def _usage() -> str:
    lines = ["usage: imlnet <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `imlnet <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imlnet`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if args[0] in {"-V", "--version"}:
        from imlnet import __version__

        print(f"imlnet {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"imlnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        if name in LIGHTNING_COMMANDS:
            from imlnet.resources import resolve_config_args

            # sys.argv is left as it is (LightningCLI warns that it holds the arguments too):
            # DDP's launcher starts the other ranks by running sys.argv again
            module.cli_main([name, *resolve_config_args(rest)])
            return 0
        return int(module.main(rest) or 0)
    except ImlnetError as err:
        print(f"imlnet {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
