"""The fleet acceptance run at full length: 3 buses x 2 simulated days, one kit unplugged 1 h.

Runs ``cngmrv sim --fleet`` through the real ingest, makes the report from the
ingest database and prints JSON: the report's ER against the ER of the same
methodology applied to the simulator's ground truth, per bus and for the
fleet, which buses were flagged, and the wall time.  CI runs the same test
scaled down (tests/test_report_fleet.py); this is the long run.

    .venv/bin/python bench/fleet_acceptance.py [--days 2] [--buses 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cngmrv.office import mrv, report
from cngmrv.sim.fleet import run_fleet
from cngmrv.sim.harness import SimOptions


def truth_er(m: mrv.Methodology, bus: dict, fame: float, minus_unplugged: bool = False) -> float:
    t = bus["truth"]
    gas = t["gas_kg"] - (
        sum(u["truth_gas_kg"] for u in bus["kit_unplugged"]) if minus_unplugged else 0.0
    )
    q = mrv.Monitored.single(t["diesel_l"], gas, t["distance_km"], t["distance_km"], fame)
    return mrv.emissions(m, q, bus["device_id"]).er_kg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=float, default=2.0)
    ap.add_argument("--buses", type=int, default=3)
    ap.add_argument("--unplug-h", type=float, default=1.0, help="hours bus N's kit is unplugged")
    ap.add_argument("--workdir", help="keep the fleet here (default: a temporary folder)")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="cngmrv-bench-fleet-"))
    duration = args.days * 86400.0
    # Early, while the tank still holds gas: the simulator does not refuel (yet), so a
    # bus empties its tank after about 22 h and runs diesel-only from then on.
    start = min(duration * 0.2, 6 * 3600.0)
    unplug = {args.buses: ((start, start + args.unplug_h * 3600.0),)}
    opts = SimOptions(duration=duration, speedup=0.0, seed=11, workdir=workdir)
    wall0 = time.monotonic()
    fleet = run_fleet(opts, args.buses, unplug)
    sim_wall = time.monotonic() - wall0
    m = mrv.load()
    wall1 = time.monotonic()
    rep = report.build(workdir / "ingest.sqlite", m)
    report_wall = time.monotonic() - wall1
    html_path = workdir / "report.html"
    html_path.write_text(report.to_html(rep), encoding="utf-8")
    d = rep.data
    truth = {b["device_id"]: b for b in fleet["buses"]}
    # The blend the report found in force (the simulator runs on today's date).
    fame = {b["device_id"]: b["fame_share_vol"] or 0.0 for b in d["buses"]}
    fleet_truth = sum(truth_er(m, b, fame[b["device_id"]]) for b in fleet["buses"])
    out = {
        "buses": args.buses,
        "sim_days": args.days,
        "kit_unplugged": {f"sim-bus-{args.buses:03d}": unplug[args.buses]},
        "er_kg_co2": d["er_kg_co2"],
        "er_truth_kg_co2": fleet_truth,
        "er_error": d["er_kg_co2"] / fleet_truth - 1.0,
        "er_t_co2_rounded": d["er_t_co2_rounded"],
        "flagged": d["flagged"],
        "unplugged_truth_gas_kg": sum(
            u["truth_gas_kg"] for b in fleet["buses"] for u in b["kit_unplugged"]
        ),
        "per_bus": {
            b["device_id"]: {
                "er_kg_co2": b["er_kg_co2"],
                "er_truth_kg_co2": truth_er(m, truth[b["device_id"]], fame[b["device_id"]]),
                "er_error": b["er_kg_co2"]
                / truth_er(m, truth[b["device_id"]], fame[b["device_id"]])
                - 1.0,
                "er_error_vs_truth_less_unplugged_gas": b["er_kg_co2"]
                / truth_er(m, truth[b["device_id"]], fame[b["device_id"]], minus_unplugged=True)
                - 1.0,
                "coverage_gas": b["coverage_by_channel"]["gas_kg"],
                "flags": b["flags"],
                "batches": f"{b['batches']['first_seq']}..{b['batches']['last_seq']}",
            }
            for b in d["buses"]
        },
        "sim_wall_s": round(sim_wall, 1),
        "report_wall_s": round(report_wall, 1),
        "report_html": str(html_path),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
