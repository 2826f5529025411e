"""The web app of ``imlnet serve``: the page, its static files and the JSON API under it.

FastAPI (Starlette) because it is the kept standard of Python's web ecosystem for a JSON API
beside static files, with uvicorn as its server; the localisation is
:class:`imlnet.serve.jobs.Service`, which calls what ``imlnet localize`` calls.

API (every error is ``{"error": "<one line>"}`` with a 4xx/5xx status):

- ``GET  /api/info``: the gallery (tiles, bounds), the model, the base maps, the limits.
- ``POST /api/jobs`` (multipart: ``files`` one or more photos, optional ``attitude`` CSV;
  query ``k``, ``verify``, ``sequence``, ``wait``): 202 with the job's status, or with
  ``wait=true`` 200 with its answer once done (a ground station's one call).
- ``GET  /api/jobs/{id}``: state, progress (``done`` of ``total``) and, when done, per photo
  its top-k tiles (scores, footprints), verification (inliers, confidence, aim point, camera
  position, match figure) and estimate; flights as tracks; download links.
- ``GET  /api/jobs/{id}/files/{name}``: ``results.geojson``, ``results.csv``, ``hits.csv``,
  ``fixes.csv`` ... (the files ``imlnet localize`` writes).
- ``GET  /api/jobs/{id}/thumbs/{n}.jpg``, ``/matches/{n}.jpg``, ``GET /api/tiles/{tile_id}``
  (the tile image), ``GET /api/basemaps/{n}.png``.

Nothing a client sends becomes a path: uploads are saved under names reduced to
``[A-Za-z0-9._-]`` in a new job folder, and every other URL names a job id, a tile id or a
number that is looked up, never joined to a folder.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from imlnet import __version__
from imlnet.serve.jobs import DOWNLOADS, Options, Service
from imlnet.serve.media import UploadError, base_maps

STATIC = resources.files("imlnet") / "serve" / "static"


class _InMemoryParser(MultiPartParser):
    """Starlette's multipart parser keeping every file in memory (the body is capped before
    it is parsed), so nothing of an upload is written outside the work folder."""

    spool_max_size = 1 << 40


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def create_app(service: Service) -> FastAPI:
    """The app serving ``service``'s gallery and model (see the module docstring)."""
    app = FastAPI(title="imlnet", version=__version__, docs_url="/api/docs", redoc_url=None)
    app.state.service = service
    maps = base_maps(service.index.metadata, service.work)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, err: UploadError) -> JSONResponse:
        extra = {"Retry-After": "2"} if err.status == 503 else {}
        return _error(err.status, str(err), **extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        text = err.detail if isinstance(err.detail, str) else "request refused"
        return _error(err.status_code, text)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        rows = service.index.metadata
        lats = [float(r["lat"]) for r in rows]
        lons = [float(r["lon"]) for r in rows]
        model = service.loaded
        limits = service.limits
        return {
            "version": __version__,
            "tiles": len(rows),
            "bounds": [[min(lats), min(lons)], [max(lats), max(lons)]] if rows else None,
            "basemaps": [
                {"url": f"/api/basemaps/{i}.png", "bounds": m.bounds, "source": Path(m.source).name}
                for i, m in enumerate(maps)
            ],
            "model": {
                "source": str(model.source or ""),
                "backbone": (getattr(model.model, "config", {}) or {}).get("backbone"),
                "image_size": model.image_size,
                "runtime": "onnxruntime" if str(model.source).endswith(".onnx") else "torch",
            },
            "defaults": {"k": 5, "verify": 5},
            "limits": {
                "max_upload_mb": limits.max_upload_mb,
                "max_megapixels": limits.max_pixels / 1e6,
                "max_files": limits.max_files,
                "queue_size": limits.queue_size,
            },
        }

    @app.get("/api/basemaps/{n}.png", include_in_schema=False)
    async def basemap(n: int) -> FileResponse:
        if not 0 <= n < len(maps):
            raise UploadError(404, f"no base map {n}; GET /api/info lists them")
        return FileResponse(str(maps[n].png), media_type="image/png")

    @app.get("/api/tiles/{tile_id}")
    async def tile(tile_id: str) -> Response:
        row = service.tiles.get(tile_id)
        if row is None:
            raise UploadError(404, f"unknown tile id {tile_id!r}; tile ids are in a job's hits")
        path = Path(str(row.get("path") or ""))
        if path.is_file():
            return FileResponse(str(path))
        # a gallery built in one pass from its raster: the window, read from the raster
        data = await asyncio.to_thread(_window_png, row)
        if data is None:
            raise UploadError(
                404, f"tile {tile_id!r}: neither its image nor its raster is readable"
            )
        return Response(data, media_type="image/png")

    @app.post("/api/jobs")
    async def submit(
        request: Request,
        k: int = 5,
        verify: int = 5,
        sequence: bool = False,
        wait: bool = False,
    ) -> JSONResponse:
        photos, attitude = await _read_upload(request, service.limits.max_upload_mb)
        job = await asyncio.to_thread(
            service.submit, photos, Options(k=k, verify=verify, sequence=sequence), attitude
        )
        if wait:  # polled, not waited on in a thread: waiting clients hold no worker thread
            while not job.finished.is_set():
                await asyncio.sleep(0.05)
            status = 200 if job.state == "done" else 422
            return JSONResponse(job.status(), status_code=status)
        return JSONResponse(
            job.status(), status_code=202, headers={"Location": f"/api/jobs/{job.id}"}
        )

    def _job(job_id: str):
        job = service.job(job_id)
        if job is None:
            raise UploadError(404, f"unknown job {job_id!r} (finished jobs are kept a while)")
        return job

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: str) -> dict[str, Any]:
        return _job(job_id).status()

    @app.get("/api/jobs/{job_id}/files/{name}")
    async def job_file(job_id: str, name: str) -> FileResponse:
        job = _job(job_id)
        path = job.folder / "out" / name
        if name not in DOWNLOADS or not path.is_file():
            raise UploadError(404, f"job {job_id} has no file {name!r}")
        return FileResponse(str(path), media_type=DOWNLOADS[name], filename=name)

    @app.get("/api/jobs/{job_id}/{kind}/{n}.jpg", include_in_schema=False)
    async def job_picture(job_id: str, kind: str, n: int) -> FileResponse:
        job = _job(job_id)
        path = job.folder / kind / f"{n}.jpg"
        if kind not in ("thumbs", "matches") or not path.is_file():
            raise UploadError(404, f"job {job_id} has no {kind} picture {n}")
        return FileResponse(str(path), media_type="image/jpeg")

    return app


def _window_png(row: dict[str, Any], side: int = 256) -> bytes | None:
    """A gallery row's window read from its source raster, as PNG (None: unreadable)."""
    import io

    import rasterio
    from PIL import Image
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    try:
        with rasterio.open(str(row["source"])) as ds:
            bands = [1, 2, 3] if ds.count >= 3 else [1, 1, 1]
            window = Window(*(int(row[k]) for k in ("col_off", "row_off", "width", "height")))
            data = ds.read(bands, window=window, out_shape=(3, side, side),
                           resampling=Resampling.bilinear)  # fmt: skip
    except (KeyError, ValueError, rasterio.errors.RasterioError):
        return None
    if data.dtype != "uint8":
        lo, hi = float(data.min()), float(data.max())
        data = ((data - lo) / max(hi - lo, 1e-9) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(data.transpose(1, 2, 0)).save(out, "PNG")
    return out.getvalue()


async def _read_upload(request: Request, max_mb: float) -> tuple[list[tuple[str, bytes]], Any]:
    """The photos (``files``) and the attitude CSV of a multipart request, the body capped.

    Raises:
        UploadError: 413 over the size limit, 415 not multipart, 400 a malformed body.
    """
    limit = int(max_mb * 1e6)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise UploadError(
            413, f"upload of {int(declared) / 1e6:.1f} MB, over the {max_mb:g} MB limit"
        )
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise UploadError(415, "send the photos as multipart/form-data, field 'files'")

    async def capped() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise UploadError(413, f"upload over the {max_mb:g} MB limit")
            yield chunk

    try:
        form = await _InMemoryParser(
            request.headers, capped(), max_files=10_000, max_fields=100
        ).parse()
    except MultiPartException as err:
        raise UploadError(400, f"malformed multipart body: {err}") from err
    photos, attitude = [], None
    for key, value in form.multi_items():
        if not isinstance(value, UploadFile):
            continue
        data = await value.read()
        if key == "attitude":
            attitude = data
        elif key == "files":
            photos.append((value.filename or "", data))
    return photos, attitude


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields its base URL (port 0: a free
    one). For tests, benchmarks and scripts; ``imlnet serve`` runs uvicorn in the foreground."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="imlnet-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
