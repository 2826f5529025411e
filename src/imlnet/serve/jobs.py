"""The localisation behind ``imlnet serve``: a bounded queue of jobs, one worker, the same code
path as ``imlnet localize``.

A job is one upload (one or more drone photos, optionally an attitude CSV): its files are
checked and saved into ``<work>/jobs/<id>/`` and it waits for the one worker thread (the model
uses the CPU's cores; two jobs at once would only share them). The worker runs
:func:`imlnet.geo.localize.localize` photo by photo (so the page can show progress), then
:func:`imlnet.geo.localize.write_outputs` and :func:`imlnet.geo.fixes_io.finish` (verification,
camera pose, flights), which write the files ``imlnet localize`` writes, into the job's folder.
At most ``queue_size`` jobs wait or run; one more is refused (HTTP 503) at once rather than
queued without bound, so memory stays bounded however many requests arrive.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imlnet.errors import ImlnetError
from imlnet.geo import fixes_io
from imlnet.geo.gallery import GalleryIndex
from imlnet.geo.localize import localize, write_outputs
from imlnet.geo.tables import parse_footprint
from imlnet.geo.verify import Verifier, VerifyConfig
from imlnet.inference import LoadedModel
from imlnet.serve.media import UploadError, check_image, match_figure, safe_name, thumbnail

log = logging.getLogger("imlnet.serve")

#: the files of a job a client may download (the ones ``imlnet localize`` writes)
DOWNLOADS = {
    "results.geojson": "application/geo+json",
    "results.csv": "text/csv",
    "hits.csv": "text/csv",
    "fixes.csv": "text/csv",
    "candidates.csv": "text/csv",
    "summary.json": "application/json",
    "metrics.json": "application/json",
}


@dataclass
class Limits:
    """What one request may hold and how many jobs may wait."""

    max_upload_mb: float = 64.0  # the whole request body
    max_pixels: int = 50_000_000  # per photo (a 100-megapixel image is refused)
    max_files: int = 200  # photos per job
    queue_size: int = 8  # jobs waiting or running; one more gets HTTP 503
    keep_jobs: int = 64  # finished jobs kept (records and folders); older ones are deleted


@dataclass
class Options:
    """Per-job options (the ``imlnet localize`` flags of the same names)."""

    k: int = 5
    verify: int = 5
    sequence: bool = False

    def check(self) -> None:
        if not 1 <= self.k <= 50:
            raise UploadError(422, f"k must be between 1 and 50, got {self.k}")
        if not 0 <= self.verify <= min(self.k, 20):
            raise UploadError(422, f"verify must be between 0 and k (<= 20), got {self.verify}")


@dataclass
class Job:
    """One upload's localisation; ``state`` is queued, running, done or failed."""

    id: str
    folder: Path
    images: list[Path]
    names: list[str]
    options: Options
    attitude: Path | None = None
    state: str = "queued"
    phase: str = "queued"
    done: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    seconds: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def total(self) -> int:
        return len(self.images)

    def status(self) -> dict[str, Any]:
        """What ``GET /api/jobs/<id>`` answers."""
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
        }
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 3)
        if self.error:
            out["error"] = self.error
        if self.result is not None:
            out.update(self.result)
        return out


class Service:
    """The model, the gallery and the job queue of one server.

    Args:
        loaded: the model (:func:`imlnet.load_model`: a folder or an ``.onnx`` file).
        index: the gallery, searched with that model's descriptors.
        work: the server's work folder (uploads, outputs, the base maps); nothing is written
            outside it.
        limits: request and queue limits.
    """

    def __init__(
        self, loaded: LoadedModel, index: GalleryIndex, work: Path, limits: Limits | None = None
    ) -> None:
        self.loaded, self.index, self.work = loaded, index, Path(work)
        self.limits = limits or Limits()
        self.tiles = {str(r.get("tile_id") or i): r for i, r in enumerate(index.metadata)}
        (self.work / "jobs").mkdir(parents=True, exist_ok=True)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.limits.queue_size)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imlnet-localize")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- intake ---------------------------------------------------------------------------
    def submit(
        self,
        photos: Sequence[tuple[str, bytes]],
        options: Options,
        attitude: bytes | None = None,
    ) -> Job:
        """Check an upload, save it into a new job folder and queue it.

        Raises:
            UploadError: 400 no photo or two with one name, 413/415/422 a photo that cannot be
                used (see :func:`~imlnet.serve.media.check_image`), 422 a bad option or
                attitude file, 503 the queue is full. Nothing is kept of a refused upload.
        """
        options.check()
        if not photos:
            raise UploadError(400, "no photo in the upload; send one or more files as 'files'")
        if len(photos) > self.limits.max_files:
            raise UploadError(
                413, f"{len(photos)} photos in one upload; at most {self.limits.max_files}"
            )
        names = [safe_name(name, i) for i, (name, _) in enumerate(photos)]
        for (name, data), safe in zip(photos, names, strict=True):
            check_image(data, name or safe, max_pixels=self.limits.max_pixels)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UploadError(400, f"two photos named {twice[0]}; give each photo its own name")
        if not self._slots.acquire(blocking=False):
            raise UploadError(
                503,
                f"busy: {self.limits.queue_size} jobs are waiting or running; retry in a few "
                "seconds",
            )
        job_id = uuid.uuid4().hex[:16]
        folder = self.work / "jobs" / job_id
        try:
            (folder / "photos").mkdir(parents=True)
            paths = []
            for safe, (_, data) in zip(names, photos, strict=True):
                (folder / "photos" / safe).write_bytes(data)
                paths.append(folder / "photos" / safe)
            att = None
            if attitude:
                att = folder / "attitude.csv"
                att.write_bytes(attitude)
                try:
                    fixes_io.make_plan(verify=options.verify, attitude=att)
                except ImlnetError as err:
                    raise UploadError(422, f"attitude CSV: {err}") from err
            job = Job(job_id, folder, paths, [n for n, _ in photos], options, att)
        except BaseException:
            self._slots.release()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            self.jobs[job_id] = job
            self._prune()
        self._pool.submit(self._run, job)
        return job

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def _prune(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished.is_set()]
        for old in finished[: max(len(finished) - self.limits.keep_jobs, 0)]:
            del self.jobs[old.id]
            shutil.rmtree(old.folder, ignore_errors=True)

    # -- the worker ----------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        start = time.perf_counter()
        try:
            job.state, job.phase = "running", "retrieval"
            results = []
            for i, image in enumerate(job.images):
                results += localize(
                    self.loaded, self.index, [str(image)], k=job.options.k, progress=False
                )
                job.done = i + 1
            job.phase = "verification"
            out = job.folder / "out"
            plan = fixes_io.make_plan(verify=job.options.verify, attitude=job.attitude)
            paths = write_outputs(results, out)
            fixes, _ = fixes_io.finish(
                plan,
                results,
                out,
                sequence=job.options.sequence,
                geojson=paths["geojson"],
                gallery=self.index.metadata,
                draw=False,
            )
            job.phase = "figures"
            job.result = self._describe(job, results, fixes)
            job.state, job.phase = "done", "done"
        except ImlnetError as err:
            job.state, job.phase, job.error = "failed", "failed", str(err)
        except Exception as err:  # a bug: logged whole, reported in one line
            log.exception("job %s failed", job.id)
            job.state, job.phase = "failed", "failed"
            job.error = f"internal error ({type(err).__name__}: {err}); see the server's log"
        finally:
            job.seconds = time.perf_counter() - start
            job.finished.set()
            self._slots.release()

    def _describe(self, job: Job, results: Sequence[Any], fixes: Sequence[Any]) -> dict:
        """The job's answer: per photo its tiles, verification, estimate; flights as tracks."""
        base = f"/api/jobs/{job.id}"
        thumbs = job.folder / "thumbs"
        reader = Verifier(VerifyConfig())  # map windows for the match figures (same windows)
        queries, tracks = [], {}
        try:
            for i, (r, f) in enumerate(zip(results, fixes, strict=True)):
                thumbnail(Path(r.image), thumbs / f"{i}.jpg")
                hits = [
                    {
                        "rank": n + 1,
                        "tile_id": str(h.get("tile_id") or ""),
                        "score": round(float(h["score"]), 4),
                        "lat": float(h["lat"]),
                        "lon": float(h["lon"]),
                        "footprint": _ring(h),
                    }
                    for n, h in enumerate(r.hits)
                ]
                v = f.verification
                verification = None
                if v is not None:
                    verification = {
                        "verified": bool(v.verified),
                        "inliers": int(v.inliers),
                        "confidence": round(float(v.confidence), 3),
                        "tile_id": v.tile_id,
                        "aim": [v.lat, v.lon] if v.verified else None,
                        "camera": list(f.camera) if f.camera else None,
                        "note": v.note,
                        "match": self._match(job, i, r, v, reader),
                    }
                estimate = {"lat": f.aim_lat, "lon": f.aim_lon, "kind": "retrieval"}
                if f.verified:
                    estimate["kind"] = "verified aim point"
                    estimate["confidence"] = round(float(v.confidence), 3)
                if f.track is not None:
                    tracks.setdefault(f.flight, []).append([f.track.lat, f.track.lon])
                    estimate.update(
                        lat=f.track.lat, lon=f.track.lon, kind=f"track ({f.track.kind})"
                    )
                queries.append(
                    {
                        "index": i,
                        "name": job.names[i],
                        "thumb": f"{base}/thumbs/{i}.jpg",
                        "hits": hits,
                        "retrieval": {"lat": r.lat, "lon": r.lon},
                        "verification": verification,
                        "estimate": estimate,
                    }
                )
        finally:
            reader.close()
        files = [n for n in DOWNLOADS if (job.folder / "out" / n).is_file()]
        return {
            "queries": queries,
            "tracks": tracks,
            "downloads": {n: f"{base}/files/{n}" for n in files},
        }

    def _match(self, job: Job, i: int, r: Any, v: Any, reader: Verifier) -> str | None:
        cand = next((c for c in v.candidates if c.verified and c.tile_id == v.tile_id), None)
        hit = next((h for h in r.hits if str(h.get("tile_id")) == v.tile_id), None)
        if cand is None or hit is None or cand.query_px is None:
            return None
        window = reader.maps.tile_window(hit)  # the window verification matched (no features)
        match_figure(
            Path(r.image),
            cand.query_px,
            window.grey,
            cand.map_px,
            job.folder / "matches" / f"{i}.jpg",
            max_query_px=reader.cfg.max_query_px,
        )
        return f"/api/jobs/{job.id}/matches/{i}.jpg"


def _ring(hit: dict[str, Any]) -> list[list[float]] | None:
    """The tile's footprint as ``[[lat, lon], ...]`` (what Leaflet draws), or None."""
    ring = parse_footprint(str(hit.get("footprint") or ""), where=f"tile {hit.get('tile_id')}")
    return [[lat, lon] for lon, lat in ring] if ring else None
