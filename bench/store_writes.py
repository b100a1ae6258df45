"""Store benchmark: bytes written per bus-hour, batch size on the wire, sealing rate.

Usage: python bench/store_writes.py [--dir DIR] [--hours 1] [--buffer-s 5]

Feeds a simulated bus-hour of 1 Hz readings (the real pipeline on the
vehicle model, see ``cngmrv.sim.feed``) through the real recorder and store
(buffer, commit, seal, sign, head file, upload marks) and prints one JSON
object:

- ``disk_bytes_per_bus_hour``: bytes the kernel counted as written to storage
  by this process (``write_bytes`` in ``/proc/self/io``, page-granular, after
  fsync), divided by the simulated hours.  Goal: at most 4 MB.  ``DIR`` must
  be on a disk-backed filesystem: on tmpfs the kernel counts nothing and the
  figure is reported as null.
- ``batch_bytes``: the size on the wire of the 60-reading batches (mean and
  max).  Goal: under 8 KB.
- ``readings_per_s_sealed``: readings through buffer, commit and seal per
  wall-clock second, unpaced (each commit still fsyncs).

The buffer flushes every ``buffer_s`` readings here; at 1 Hz in a bus that is
the same number of commits as its wall-clock bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.recorder import Recorder, RecorderConfig
from cngmrv.agent.store import Sealed, Store
from cngmrv.signed import batch, keys
from cngmrv.sim import feed


def _write_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run(folder: Path, hours: float, buffer_s: float) -> dict[str, object]:
    keys.generate(folder / "keys")
    signer = keys.load_signer(folder / "keys" / keys.KEY_FILE)
    sizes: list[int] = []
    recorder = Recorder(
        folder / "store.sqlite",
        "bench-bus",
        signer,
        RecorderConfig(readings_per_batch=60, buffer_s=buffer_s, period_s=1.0),
        clock="synchronised",
    )

    def sealed(s: Sealed) -> None:
        if s.n_readings == 60:
            sizes.append(len(s.raw))
        # The ingest's acknowledgement is part of a bus-hour's writes too.
        recorder.store.mark_uploaded(s.seq)

    recorder.on_sealed = sealed
    # Readings first, so generating them is neither timed nor counted.
    boot = recorder.start()
    pipeline = Pipeline(PipelineConfig(), boot.epoch, "synchronised")
    rows = list(feed.readings(pipeline, hours * 3600.0, seed=1))
    before = _write_bytes()
    t0 = time.perf_counter()
    for r in rows:
        recorder.add([r])
    recorder.stop()
    wall = time.perf_counter() - t0
    recorder.close()
    after = _write_bytes()
    counted = None if before is None or after is None or after == before else after - before
    # Every byte must still verify: the figures are for a working store.
    pub = keys.load_public_key(folder / "keys" / keys.PUB_FILE)

    store = Store(folder / "store.sqlite", "bench-bus")
    report = batch.verify_set(((str(s), raw) for s, raw in store.batches()), pub)
    store.close()
    return {
        "hours": hours,
        "readings": len(rows),
        "buffer_s": buffer_s,
        "disk_bytes_per_bus_hour": None if counted is None else round(counted / hours),
        "disk_goal_bytes": 4_000_000,
        "batch_bytes": {
            "count": len(sizes),
            "mean": round(statistics.mean(sizes)) if sizes else None,
            "max": max(sizes) if sizes else None,
            "row_layout_mean": round(statistics.mean(len(batch.packb(r)) for r in rows) * 60 + 400),
        },
        "batch_goal_bytes": 8192,
        "readings_per_s_sealed": round(len(rows) / wall),
        "verified": report.passed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="folder on the filesystem to measure (default: system temp)")
    p.add_argument("--hours", type=float, default=1.0, help="simulated bus-hours (1)")
    p.add_argument(
        "--buffer-s", type=float, default=10.0, help="reading buffer window in seconds (10)"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="cngmrv-bench-") as tmp:
        out = run(Path(tmp), args.hours, args.buffer_s)
    if out["disk_bytes_per_bus_hour"] is None:
        print("bench/store_writes.py: the kernel counted no writes (tmpfs?); use --dir", file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
