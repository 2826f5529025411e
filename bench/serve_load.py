"""``imlnet serve`` under load: latency per query, and 50 queries sent at once.

Serves the demo's world (``runs/demo``: its model, gallery and drone views; run ``make demo``
first) with uvicorn on 127.0.0.1, in this process, and sends real HTTP requests to it:

1. one query at a time (``wait=true``, one photo each), with and without verification:
   p50 / p95 latency per query, as a client sees it;
2. 50 queries at once (50 threads): how many are answered and how many refused with 503
   (the queue holds ``--queue`` jobs), none lost; latency of the answered ones; the peak
   resident memory before and after.

    python bench/serve_load.py [--demo runs/demo] [--rounds 20] [--screenshots docs]

``--screenshots DIR`` also opens the page in Debian's chromium (Playwright) and saves
``serve_single.png`` (the frames of flight f01 as single photos, the first verified one
selected: its tiles, its match figure) and ``serve_flight.png`` (the same frames as a flight,
fused into a track).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from imlnet.geo.gallery import GalleryIndex
from imlnet.inference import load_model
from imlnet.io import write_json
from imlnet.serve.app import create_app, running
from imlnet.serve.jobs import Limits, Service

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def query(url: str, photo: Path, **params) -> tuple[int, float]:
    files = [("files", (photo.name, photo.read_bytes(), "image/jpeg"))]
    start = time.perf_counter()
    r = httpx.post(f"{url}/api/jobs", params={**params, "wait": "true"}, files=files, timeout=600)
    return r.status_code, time.perf_counter() - start


def pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95 = np.percentile(values, [50, 95])
    return {
        "p50_ms": round(1000 * float(p50), 1),
        "p95_ms": round(1000 * float(p95), 1),
        "n": len(values),
    }


def screenshots(url: str, demo: Path, out: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("--screenshots needs Debian's chromium (apt-get install chromium)")
    saved = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 860})
        page.goto(url)
        page.wait_for_function(
            "document.querySelector('#gallery-info').textContent.includes('tiles')"
        )
        # single photos (the frames of flight f01, not fused): the first that verifies is shown
        frames = sorted((demo / "world" / "flights" / "f01").glob("*.jpeg"))
        page.set_input_files("#file-input", [str(f) for f in frames])
        page.wait_for_selector(".estimate-marker", timeout=300_000)
        # the first verified view, if any
        cards = page.query_selector_all("#results li")
        for i, text in enumerate(c.inner_text() for c in cards):
            if "verified:" in text:
                cards[i].click()
                break
        page.wait_for_timeout(800)
        page.screenshot(path=str(out / "serve_single.png"))
        saved.append(str(out / "serve_single.png"))
        page.reload()
        page.wait_for_function(
            "document.querySelector('#gallery-info').textContent.includes('tiles')"
        )
        page.check("#sequence")
        page.set_input_files("#file-input", [str(f) for f in frames])
        page.wait_for_function(
            "document.querySelectorAll('.estimate-marker').length >= 2", timeout=600_000
        )
        page.click("#match-close") if page.is_visible("#match-close") else None
        page.wait_for_timeout(800)
        page.screenshot(path=str(out / "serve_flight.png"))
        saved.append(str(out / "serve_flight.png"))
        browser.close()
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--demo", type=Path, default=REPO / "runs" / "demo")
    ap.add_argument("--rounds", type=int, default=20, help="sequential queries per setting")
    ap.add_argument("--burst", type=int, default=50, help="queries sent at once")
    ap.add_argument("--queue", type=int, default=8, help="the server's queue size")
    ap.add_argument("--screenshots", type=Path, help="save the page's screenshots here")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_load.json")
    args = ap.parse_args()
    loaded = load_model(args.demo / "model", "cpu")
    index = GalleryIndex.load(args.demo / "index", expect_checkpoint_hash=loaded.weights_hash)
    photos = sorted((args.demo / "world" / "drone").glob("*.jpeg"))
    report: dict = {
        "command": "python bench/serve_load.py",
        "tiles": index.count,
        "model": str(args.demo / "model"),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(v, 2) for v in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as work:
        service = Service(loaded, index, Path(work), Limits(queue_size=args.queue, keep_jobs=32))
        with running(create_app(service)) as url:
            query(url, photos[0], verify=0)  # warm-up
            for name, params in (("retrieval only (verify 0)", {"verify": 0}),
                                 ("with verification (verify 5)", {"verify": 5})):  # fmt: skip
                times = []
                for i in range(args.rounds):
                    code, seconds = query(url, photos[i % len(photos)], **params)
                    assert code == 200, code
                    times.append(seconds)
                report[name] = pcts(times)
                print(f"one at a time, {name}: {report[name]}", flush=True)
            rss_before = rss_mb()
            start = time.perf_counter()
            with ThreadPoolExecutor(args.burst) as pool:
                answers = list(
                    pool.map(lambda i: query(url, photos[i % len(photos)]), range(args.burst))
                )
            wall = time.perf_counter() - start
            codes = [c for c, _ in answers]
            report["burst"] = {
                "sent": args.burst,
                "answered_200": codes.count(200),
                "refused_503": codes.count(503),
                "other": len(codes) - codes.count(200) - codes.count(503),
                "queue_size": args.queue,
                "wall_s": round(wall, 2),
                "answered": pcts([s for c, s in answers if c == 200]),
                "refused": pcts([s for c, s in answers if c == 503]),
                "peak_rss_mb_before": round(rss_before, 1),
                "peak_rss_mb_after": round(rss_mb(), 1),
            }
            print(f"{args.burst} at once: {report['burst']}", flush=True)
            if args.screenshots:
                report["screenshots"] = screenshots(url, args.demo, args.screenshots)
        service.close()
    report["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    write_json(args.out, report)
    print(f"load average {report['load_average_before']} -> {report['load_average_after']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
