"""The crash harness: at least 200 SIGKILLs during start-up, acquisition, sealing and upload.

Each kill hits a real process running the real recorder, store, sealing and
uploader (``python tests/crash_harness.py child``), restarted on the same work
folder, with a real ingest server on 127.0.0.1.  ``bench/crash.py`` runs the
same harness for longer.  ``CNGMRV_CRASH_KILLS`` overrides the count.
"""

from __future__ import annotations

import os
from pathlib import Path

import crash_harness as crash

from cngmrv.sim import ecu, feed

KILLS = int(os.environ.get("CNGMRV_CRASH_KILLS", "200"))


def test_feed_uses_the_simulated_ecus_schedule() -> None:
    assert feed.TICK_S == ecu.TICK_S
    assert set(feed.SCHEDULE) <= set(ecu.SCHEDULE)


def test_sigkill_at_random_moments_loses_nothing_committed(tmp_path: Path) -> None:
    r = crash.run(tmp_path, kills=KILLS, seed=7)
    # Every phase was hit (the harness reports what it interrupted).
    assert set(r["phases"]) == {"startup", "acquisition", "sealing", "upload"}, r["phases"]
    assert r["integrity_check"] == "ok"
    assert r["batch_seqs_contiguous"] and r["reading_seqs_contiguous"], r
    assert r["unsealed_after_drain"] == [0, 0]
    # Every start that got an epoch signed a BOOT event for it, and epochs never repeat.
    epochs = r["boot_epochs"]
    assert epochs == list(range(1, len(epochs) + 1))
    assert set(r["booted_runs"]) <= set(epochs)
    assert r["unclean_stops"] == len(epochs) - 1  # every start but the first followed a kill
    assert r["chain_verified"], r["findings"]
    assert r["ingest_identical"] and r["ingest_batches"] == r["batches"] > KILLS
    # At most the buffer window per kill, and never a reading that was not produced.
    assert 0 <= r["lost_per_kill_min"] <= r["lost_per_kill_max"] <= r["buffer_readings"]
    assert r["readings"] == r["readings_emitted"] - r["lost_total"]
