"""A real headless browser (Debian's chromium) for the report tests: load a page, collect its console
messages, take a screenshot. `make test` installs chromium where apt can; without it these tests skip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not exe:
        pytest.skip("no chromium on PATH (make test installs Debian's chromium where apt is available)")
    return exe


def load(page: Path, screenshot: Path, width: int = 1200, height: int = 1800) -> list[str]:
    """Open `page` headless, save a screenshot, return every console message it logged (errors included)."""
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=1",
                           f"--window-size={width},{height}", f"--screenshot={screenshot}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.exists(), proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def non_blank(png: Path) -> float:
    """The share of the screenshot's pixels that are not the background colour."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    pixels = list(img.getdata())
    background = max(set(pixels[:: max(1, len(pixels) // 5000)]), key=pixels.count)
    return sum(1 for p in pixels[::7] if p != background) / len(pixels[::7])
