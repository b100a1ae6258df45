"""`cngmrv report` over a fleet database: from the ingest's per-batch sums vs from the bytes.

Loads the same signed batches (60 one-second readings each) through the real
ingest into SQLite and into PostgreSQL (a throwaway cluster, as the tests
start it, unless --pg-url is given), then times the fleet report on both
databases three ways: from the sums gathered in this process, from the sums
gathered in ``--procs`` processes (what a fleet of
``monitored.PARALLEL_MIN_DEVICES`` devices or more gets), and recomputed from
the bytes; and checks that all six agree.  Prints one JSON object.

    python bench/fleet_report.py --devices 100 --batches 100
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cngmrv.office import monitored, mrv, report
from cngmrv.office.fleetdb import IngestDB
from cngmrv.office.ingest import Ingest, register_device
from cngmrv.signed import batch, keys

DAY0 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()


def _reading(t0: float, i: int) -> dict[str, Any]:
    return {
        "t0": t0,
        "dur": 1.0,
        "epoch": 1,
        "clock": "synchronised",
        "diesel_l": 0.0011 + (i % 7) * 1e-5,
        "gas_kg": 0.0009 + (i % 5) * 1e-5,
        "distance_km": 0.008 + (i % 3) * 1e-4,
        "cov": {"diesel_l": 1.0, "gas_kg": 1.0, "distance_km": 1.0},
        "mode_s": {"diesel": 0.0, "dual": 1.0, "fault": 0.0},
        "tank_kg": 80.0 - i * 0.0009,
    }


def _batches(work: Path, devices: int, per_device: int) -> tuple[dict[str, bytes], list[bytes]]:
    pubs, out = {}, []
    for d in range(devices):
        dev = f"bus-{d:05d}"
        kdir = work / "keys" / dev
        keys.generate(kdir)
        signer = keys.load_signer(kdir / keys.KEY_FILE)
        pubs[dev] = (kdir / keys.PUB_FILE).read_bytes()
        prev = batch.ZERO_HASH
        for seq in range(per_device):
            rs = [_reading(DAY0 + (seq * 60 + i) + d * 7, seq * 60 + i) for i in range(60)]
            raw = batch.build(signer, dev, seq, prev, {"readings": rs})
            prev = batch.chain_id(raw)
            out.append(raw)
    return pubs, out


def _load(target: str | Path, pubs: dict[str, bytes], raws: list[bytes]) -> float:
    db = IngestDB(target)
    ingest = Ingest(db)
    for dev, pem in pubs.items():
        register_device(db, dev, pem)
    t = time.perf_counter()
    for raw in raws:
        status, body = ingest.accept(raw)
        assert status == 201, body
    db.close()
    return time.perf_counter() - t


def _timed(target: str | Path, recompute: bool, procs: int = 1) -> tuple[float, dict[str, Any]]:
    """The report's seconds and data; the kept sums gathered in ``procs`` processes."""
    chosen = monitored.processes_for
    monitored.processes_for = lambda devices: procs  # type: ignore[assignment]
    try:
        t = time.perf_counter()
        rep = report.build(target, mrv.load(), recompute=recompute)
        took = time.perf_counter() - t
    finally:
        monitored.processes_for = chosen  # type: ignore[assignment]
    return took, {k: v for k, v in rep.data.items() if k not in ("generated_at", "source")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--batches", type=int, default=100, help="per device")
    ap.add_argument("--pg-url", help="an empty PostgreSQL database (default: a throwaway cluster)")
    ap.add_argument(
        "--procs", type=int, default=os.cpu_count() or 2, help="processes for the parallel way"
    )
    args = ap.parse_args()
    cluster = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pg_url = args.pg_url
        if pg_url is None:
            from cngmrv.sim import pg_cluster  # the tests' throwaway cluster

            why = pg_cluster.unavailable()
            if why:
                print(json.dumps({"error": why}))
                return 1
            cluster = pg_cluster.Cluster()
            pg_url = cluster.new_database()
        try:
            pubs, raws = _batches(work, args.devices, args.batches)
            out: dict[str, Any] = {
                "devices": args.devices,
                "batches": len(raws),
                "readings": 60 * len(raws),
            }
            results = []
            for name, target in (("sqlite", work / "ingest.sqlite"), ("postgresql", pg_url)):
                out[f"{name}_ingest_per_s"] = round(len(raws) / _load(target, pubs, raws), 1)
                for how, recompute, procs in (
                    ("sums", False, 1),
                    ("sums_parallel", False, args.procs),
                    ("recompute", True, 1),
                ):
                    seconds, data = _timed(target, recompute, procs)
                    out[f"{name}_report_{how}_s"] = round(seconds, 3)
                    results.append(data)
            out["procs"] = args.procs
            out["load_avg"] = round(os.getloadavg()[0], 2)
            out["all_agree"] = all(r == results[0] for r in results)
        finally:
            if cluster is not None:
                cluster.destroy()
    print(json.dumps(out))
    return 0 if out["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
