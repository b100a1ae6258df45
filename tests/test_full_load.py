"""bench/full_load.py, briefly: the agent in its own process, a bare python-can loop beside it.

The real benchmark runs ten minutes per bit rate; this runs a few seconds at
one, in this interpreter rather than the agent-only environment, and checks
the figures add up: nothing lost on a bus the agent keeps up with, the bare
loop's sequence check clean, and the totals beside the unloaded run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "full_load.py"


def test_short_full_load_run_reports_every_figure() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH), "--seconds", "8", "--bitrates", "250000", "--same-python"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Exit 1 only when a case misses an acceptance bound; this interpreter's
    # environment holds the test extras, so its RSS may.
    assert r.returncode in (0, 1), r.stderr[-3000:]
    out = json.loads(r.stdout)
    [case] = out["cases"]
    for key in (
        "bitrate", "load_pct", "offered", "received", "dropped",
        "cpu_pct_one_core", "peak_rss_mb", "bare_cpu_pct_one_core",
    ):  # fmt: skip
        assert key in case, key
    assert case["bitrate"] == 250_000 and case["load_pct"] == 100.0
    assert case["busy_share"] > 0.99
    assert case["offered"] > 7 * 1900
    assert case["received"] == case["offered"]
    assert case["dropped"] == 0 and set(case["dropped_where"].values()) == {0}
    assert case["bare"]["received"] == case["offered"]
    assert case["bare"]["seq_missing"] == 0 and case["bare"]["seq_backwards"] == 0
    assert case["bare"]["seq_seen"] > 0.9 * case["offered"]
    assert case["pacing"]["drive_overrun"] < 0.5
    assert out["no_load"]["how"] == "process" and out["no_load"]["readings"] >= 8
    assert 0 < case["cpu_pct_one_core"] < 100 and 0 < case["bare_cpu_pct_one_core"] < 100
    assert case["peak_rss_mb"] > 10
    assert case["batches"]["signed"] == case["batches"]["verified"] >= 1
    assert case["readings"] >= 8
    assert set(case["totals_vs_no_load"]) == {"diesel_l", "gas_kg", "distance_km"}
    assert all(abs(v) <= 1e-3 for v in case["totals_vs_no_load"].values()), case
