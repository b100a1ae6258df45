"""Several simulated buses sharing one ingest server: ``cngmrv sim --fleet N``.

Each bus is the full single-bus harness (:func:`cngmrv.sim.harness.run_bus`:
its own virtual CAN channel, pty kit, store and key) in its own process, so
the buses run in parallel on separate cores; they upload to one reference
ingest server in this process, whose database is then a fleet that
``cngmrv report`` reads.  Bus ``i`` (1-based) is device ``sim-bus-00i`` with
drive-cycle seed ``seed + i - 1``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from cngmrv.office.ingest import IngestServer, register_device
from cngmrv.sim.harness import SimOptions, ensure_key, run_bus, run_folder


def device_id(i: int) -> str:
    return f"sim-bus-{i:03d}"


def run_fleet(
    opts: SimOptions, buses: int, unplug: dict[int, tuple[tuple[float, float], ...]]
) -> dict[str, Any]:
    """Run ``buses`` buses for ``opts.duration`` simulated seconds; returns the summary."""
    with run_folder(opts, "cngmrv-fleet-") as workdir:
        return _run_in(opts, workdir, buses, unplug)


def _run_in(
    opts: SimOptions,
    workdir: Path,
    buses: int,
    unplug: dict[int, tuple[tuple[float, float], ...]],
) -> dict[str, Any]:
    ingest_db = workdir / "ingest.sqlite"
    server = IngestServer(ingest_db).start()
    wall0 = time.monotonic()
    per_bus = []
    for i in range(1, buses + 1):
        bus_dir = workdir / device_id(i)
        bus_dir.mkdir(parents=True, exist_ok=True)
        register_device(server.db, device_id(i), ensure_key(bus_dir))
        per_bus.append(
            replace(
                opts,
                workdir=bus_dir,
                device_id=device_id(i),
                seed=opts.seed + i - 1,
                kit_unplugged=unplug.get(i, ()),
            )
        )
    try:
        # spawn, not fork: this process already runs the ingest server's threads.
        ctx = multiprocessing.get_context("spawn")
        workers = min(buses, os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(run_bus, o, o.workdir, server.url, ingest_db) for o in per_bus]
            summaries = [f.result() for f in futures]
    finally:
        server.stop()
    return {
        "fleet": buses,
        "sim_seconds": opts.duration,
        "wall_seconds": round(time.monotonic() - wall0, 3),
        "workdir": str(workdir) if opts.workdir else None,
        "ingest_db": str(ingest_db) if opts.workdir else None,
        "buses": summaries,
    }


def command(
    opts: SimOptions, buses: int, unplug: dict[int, tuple[tuple[float, float], ...]], as_json: bool
) -> int:
    summary = run_fleet(opts, buses, unplug)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"simulated {buses} buses x {opts.duration:.0f} s in {summary['wall_seconds']:.1f} s wall"
        )
        for s in summary["buses"]:
            t = s["truth"]
            print(
                f"{s['device_id']}: {s['batches_verified']}/{s['batches_signed']} batches verified;"
                f" gas {s['gas_kg']:.3f} kg (truth {t['gas_kg']:.3f}), diesel "
                f"{s['diesel_l']:.3f} L (truth {t['diesel_l']:.3f}), "
                f"{s['distance_km']:.3f} km (truth {t['distance_km']:.3f})"
            )
        if summary["ingest_db"]:
            print(f"fleet ingest database: {summary['ingest_db']}")
    ok = all(
        s["batches_signed"] > 0 and s["batches_verified"] == s["batches_signed"]
        for s in summary["buses"]
    )
    if not ok:
        print("cngmrv sim: not every batch was uploaded and verified", file=sys.stderr)
    return 0 if ok else 1
