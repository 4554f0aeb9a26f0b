"""Headless Chromium from Python, with no driver library: `--dump-dom` and `--screenshot`.

Used by the browser tests of the results page and the app and by the page benchmark. The
browser is Debian's `chromium` (or Chrome) found on PATH; none is ever downloaded.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
         "--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
         "--force-device-scale-factor=1")
CONSOLE = re.compile(r":CONSOLE[:(\d)]+\] (.*)")


def find_browser() -> str | None:
    """Path of the first of BROWSERS on PATH, None when there is none."""
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def console_lines(stderr: str) -> list[str]:
    """The page's console messages among the browser's log lines."""
    return [m.group(1) for m in CONSOLE.finditer(stderr)]


def run(browser: str, url: str, *args: str, budget_ms: int | None = 10000,
        timeout: float = 90) -> subprocess.CompletedProcess:
    """Open `url` headless with `args`; `budget_ms` of virtual time lets the page's timers and
    image loads finish before the DOM is dumped or the screenshot taken (None: real time, the
    DOM is dumped at the load event, as for timing)."""
    budget = [f"--virtual-time-budget={budget_ms}"] if budget_ms is not None else []
    cmd = [browser, *FLAGS, *budget, *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dump_dom(browser: str, url: str, **kw) -> subprocess.CompletedProcess:
    """The DOM after the page ran (stdout), the browser log with console lines (stderr)."""
    return run(browser, url, "--dump-dom", **kw)


def screenshot(browser: str, url: str, path: Path, size: tuple[int, int] = (1100, 900), **kw) -> Path:
    """A PNG of the page's first `size` (width, height) CSS pixels, written to `path`."""
    proc = run(browser, url, f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", **kw)
    if not Path(path).is_file():
        raise RuntimeError(f"{browser} wrote no screenshot of {url}: {proc.stderr[-1500:]}")
    return Path(path)
