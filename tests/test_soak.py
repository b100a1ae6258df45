"""bench/soak.py for half a minute on a full bus, and its trend test on series with known answers.

The soak itself runs for an hour (``python bench/soak.py``); here the same
script runs the real agent process, bus, kit and ingest for 30 s, sampled
every 5 s, so the CSV, the plot and the JSON are checked end to end.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
COLUMNS = [
    "elapsed_s",
    "rss_mb",
    "open_fds",
    "store_bytes",
    "can_queue_depth",
    "batches_pending",
    "frames_received",
    "frames_dropped",
    "cpu_s",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_half_a_minute_at_full_load_samples_plots_and_drops_nothing(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--minutes", "0.5", "--sample-s", "5"]
        + ["--bitrate", "250000", "--same-python", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.stdout.strip(), f"no JSON (exit {r.returncode}): {r.stderr[-3000:]}"
    out = json.loads(r.stdout)
    # One at once, one every 5 s of the 30 s drive.
    assert out["samples"] >= 5, out
    with open(out["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
        assert rows and list(rows[0]) == COLUMNS
    assert len(rows) == out["samples"]
    elapsed = [float(row["elapsed_s"]) for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= 20
    # Sampled from a live agent: it read frames and its store exists.
    assert float(rows[-1]["frames_received"]) > float(rows[0]["frames_received"])
    assert all(float(row["store_bytes"]) > 0 and float(row["rss_mb"]) > 0 for row in rows)
    png = Path(out["png"])
    assert png.parent == tmp_path and png.read_bytes()[:8] == PNG_MAGIC
    assert out["frames"]["offered"] > 0
    assert out["frames"]["dropped"] == 0, out["frames"]
    assert set(out["trend"]) == {
        "rss_mb", "open_fds", "can_queue_depth", "batches_pending", "store_bytes",
    }  # fmt: skip
    assert out["trend"]["store_bytes"]["verdict"] == "reported"
    # The exit status says what the JSON says.
    assert r.returncode == (1 if out["failed"] else 0), r.stderr[-3000:]
    # The samples can be judged again later, with the same answer.
    again = subprocess.run(
        [sys.executable, str(SCRIPT), "--analyse", out["csv"], "--minutes", "0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert json.loads(again.stdout)["trend"] == out["trend"]


def test_trend_tells_a_leak_from_noise_and_from_warm_up() -> None:
    soak = _soak()
    rng = random.Random(9)
    minutes = [60.0 * i for i in range(61)]
    leak = [80 + 5 * t / 3600 + rng.gauss(0, 0.1) for t in minutes]
    noise = [80 + rng.gauss(0, 0.1) for _ in minutes]
    # 10 MB in the first 5 minutes, then nothing: the allocator settling.
    settling = [80 + 10 * min(t, 300) / 300 + rng.gauss(0, 0.1) for t in minutes]
    # A queue caught once, in the last sample, while a commit held the loop.
    queue = [0.0] * 60 + [1000.0]

    t = soak.trend(minutes, leak, 0.5, 3600.0)
    assert t["verdict"] == "rising", t
    assert 4.5 < t["slope_per_hour_after_warmup"] < 5.5, t
    assert soak.trend(minutes, noise, 0.5, 3600.0)["verdict"] == "flat"
    t = soak.trend(minutes, settling, 0.5, 3600.0)
    assert t["slope_per_hour"] > 2.0 and t["verdict"] == "flat", t
    t = soak.trend(minutes, queue, 100.0, 3600.0)
    assert t["verdict"] == "flat" and t["max"] == 1000.0, t
    # Samples after the run (the final seal and upload) are left out.
    t = soak.trend(minutes + [3700.0], noise + [500.0], 0.5, 3600.0)
    assert t["verdict"] == "flat" and t["max"] < 500 and abs(t["slope_per_hour"]) < 1, t
    assert soak.trend(minutes, leak, None, 3600.0)["verdict"] == "reported"
    # Two samples after warm-up are no trend.
    assert soak.trend([0.0, 3000.0, 3600.0], [1.0, 2.0, 3.0], 0.5, 3600.0)["verdict"] == "too short"
