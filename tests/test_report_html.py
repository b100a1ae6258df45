"""The HTML report opens in a real headless Chromium, and its plots are really drawn."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image
from mrv_helpers import fossil_co2
from test_report import _ingest_fleet, reading, three_days

from cngmrv.office import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Colours that only the plots use (the page's own CSS uses none of them).
PLOT_COLOURS = {
    "line and bar series (matplotlib tab:blue)": (0x1F, 0x77, 0xB4),
    "line and bar series (matplotlib tab:orange)": (0xFF, 0x7F, 0x0E),
    "coverage heat map, full": (0x27, 0xAE, 0x60),
    "coverage heat map, gap": (0xC0, 0x39, 0x2B),
    "ER bar, bus not flagged": (0x2E, 0x86, 0xC1),
    "ER bar, bus flagged": (0xE6, 0x7E, 0x22),
}


def _screenshot(page: Path, png: Path, profile: Path) -> None:
    assert CHROMIUM
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={png}",
        "--window-size=1280,4200", "--hide-scrollbars", page.as_uri(),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert png.is_file(), f"chromium wrote no screenshot (exit {r.returncode}): {r.stderr[-2000:]}"


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)"
)
def test_html_report_renders_with_its_plots(tmp_path: Path) -> None:
    bus3 = three_days(n_per_day=120)
    for r in bus3[120:180]:  # the first hour of day 2 without kit data
        r.update(reading(r["t0"], gas_cov=0.0))
    db = _ingest_fleet(
        tmp_path,
        {
            "bus-1": three_days(n_per_day=120),
            "bus-2": three_days(n_per_day=120, gas_kg=0.08, diesel_l=0.07),
            "bus-3": bus3,
        },
    )
    page = tmp_path / "report.html"
    page.write_text(report.to_html(report.build(db, fossil_co2())), encoding="utf-8")
    png = tmp_path / "shot.png"
    _screenshot(page, png, tmp_path / "profile")
    img = image.imread(png)[:, :, :3]
    assert img.shape[1] == 1280 and img.std() > 0.05, "the page is blank"
    pixels = (img * 255).round().astype(int).reshape(-1, 3)
    for what, rgb in PLOT_COLOURS.items():
        near = np.abs(pixels - np.array(rgb)).max(axis=1) <= 6
        assert near.sum() >= 200, f"{what}: only {near.sum()} pixels of {rgb} in the screenshot"
    # The page is text, tables and four pictures: many distinct colours, not a flat fill.
    assert len(np.unique(pixels[::7], axis=0)) > 500
