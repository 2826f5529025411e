"""``imlnet serve --index DIR --checkpoint DIR``: the local web page and its HTTP API.

    imlnet serve --index runs/demo/index --checkpoint runs/demo/model [--port 8765]

Binds to 127.0.0.1 unless ``--host`` says otherwise (``--host 0.0.0.0`` serves the network:
the API has no authentication, so only on a network you trust).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from imlnet.errors import ImlnetError

DEFAULT_PORT = 8765


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="imlnet serve", description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, required=True, help="gallery from `imlnet index`")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="model folder")
    which.add_argument("--onnx", type=Path, help="an .onnx file from `imlnet export`")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port ({DEFAULT_PORT})")
    ap.add_argument(
        "--work", type=Path, help="work folder for uploads and results (default: INDEX/../serve)"
    )
    ap.add_argument("--threads", type=int, help="CPU threads of the model (default: torch's)")
    ap.add_argument("--max-upload-mb", type=float, default=64.0, help="per request (64)")
    ap.add_argument("--max-megapixels", type=float, default=50.0, help="per photo (50)")
    ap.add_argument("--queue", type=int, default=8, help="jobs waiting or running (8)")
    return ap


def make_service(args: argparse.Namespace):
    """The :class:`~imlnet.serve.jobs.Service` of parsed ``imlnet serve`` arguments."""
    import torch

    from imlnet.geo.gallery import GalleryIndex
    from imlnet.inference import load_model
    from imlnet.serve.jobs import Limits, Service

    if args.threads:
        torch.set_num_threads(args.threads)
    model_file = args.checkpoint or args.onnx
    loaded = load_model(model_file, "cpu", threads=args.threads)
    index = GalleryIndex.load(
        args.index,
        expect_checkpoint_hash=loaded.weights_hash,
        expect_dim=loaded.dim,
        checkpoint_name=str(model_file),
    )
    limits = Limits(
        max_upload_mb=args.max_upload_mb,
        max_pixels=int(args.max_megapixels * 1e6),
        queue_size=max(1, args.queue),
    )
    work = args.work or Path(args.index).resolve().parent / "serve"
    return Service(loaded, index, work, limits)


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        import uvicorn

        from imlnet.serve.app import create_app
    except ImportError as err:
        raise ImlnetError(
            f"imlnet serve needs the web dependencies ({err.name} is missing): "
            "pip install 'imlnet[serve]'"
        ) from err
    service = make_service(args)
    app = create_app(service)
    print(
        f"imlnet serve: http://{args.host}:{args.port}/  ({service.index.count} tiles, model "
        f"{args.checkpoint or args.onnx}; work folder {service.work}; Ctrl+C stops)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        service.close()
    return 0
