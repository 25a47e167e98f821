"""Build the docs site, serve it on 127.0.0.1 and screenshot its pages in headless Chromium.

The site as a reader sees it: `mkdocs build --strict`, then a PNG of each page asked for (the home page
and the results page by default).

    python scripts/docs_screenshot.py                          # PNGs into site-screenshots/
    python scripts/docs_screenshot.py --page serving/ --out /tmp/shots

Prints one JSON line: the build time and each screenshot's path and size. Needs Debian's `chromium`
(`apt-get install -y chromium`); exit 2 when it is missing or the build fails.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAGES = ["", "results/"]  # the home page, one benchmark page
# no sandbox as root, no network chatter, a fresh profile per run
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
                  "--virtual-time-budget=5000"]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # the base class names it `format`
        pass


def build(site: Path) -> float:
    """Build the site into `site`; the seconds it took."""
    start = time.perf_counter()
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about its successor
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"docs_screenshot: error: mkdocs build --strict failed:\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - start, 2)


def screenshot(chromium: str, url: str, png: Path, profile: Path, width: int, height: int) -> None:
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                           f"--screenshot={png}", url], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png.exists():
        raise SystemExit(f"docs_screenshot: error: chromium could not screenshot {url}:\n{proc.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--page", action="append", help="a page's path in the site, e.g. results/ (repeatable; "
                        "default: the home page and results/)")
    parser.add_argument("--out", type=Path, default=Path("site-screenshots"), help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("docs_screenshot: error: no chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        build_s = build(site)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(site)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        shots = []
        try:
            for i, page in enumerate(args.page or DEFAULT_PAGES):
                png = args.out / f"{page.strip('/').replace('/', '-') or 'home'}.png"
                screenshot(chromium, f"http://127.0.0.1:{server.server_port}/{page}", png, Path(tmp) / f"profile{i}",
                           args.width, args.height)
                shots.append({"page": page or "/", "png": str(png), "bytes": png.stat().st_size})
        finally:
            server.shutdown()
            server.server_close()
    print(json.dumps({"mkdocs_build_s": build_s, "screenshots": shots}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
