"""Acceptance: the kit link through a real pty, with corrupted bytes and an unplugged port.

The simulated kit damages 1 % of its bytes and its port disappears for 5 s
(the pty is closed; a new one appears later behind the same symlink, as a
re-enumerated USB adapter would).  The agent must decode every intact frame,
count every other one exactly as the simulator counted it, integrate the gas
of the intact data to within 0.5 %, and show the outage in its readings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from cngmrv.signed import batch
from cngmrv.signed.archive import open_readonly
from cngmrv.sim import harness
from cngmrv.sim.kit import KitFaults, LinkFaults

UNPLUG_AT, UNPLUG_FOR = 50.0, 5.0


def stored(workdir: Path) -> tuple[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
    """Readings and events as an auditor gets them: from the run's sealed batches."""
    db = open_readonly(workdir / "store.sqlite")
    try:
        raws = [bytes(b) for (b,) in db.execute("SELECT bytes FROM batches ORDER BY seq")]
    finally:
        db.close()
    readings: list[dict[str, Any]] = []
    events: list[tuple[str, dict[str, Any]]] = []
    for raw in raws:
        payload = batch.parse(raw).payload()
        readings.extend(payload["readings"])
        events.extend((e["kind"], e) for e in payload["events"])
    readings.sort(key=lambda r: r["t0"])
    return readings, events


@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    workdir = tmp_path_factory.mktemp("kit-acceptance")
    opts = harness.SimOptions(
        duration=150.0,
        speedup=0.0,
        seed=11,
        workdir=workdir,
        link=LinkFaults(corrupt_rate=0.01, seed=11),
        kit_unplugged=((UNPLUG_AT, UNPLUG_AT + UNPLUG_FOR),),
    )
    return harness.run(opts), workdir


def test_one_percent_of_the_bytes_were_corrupted(damaged_run: tuple[dict, Path]) -> None:
    kit = damaged_run[0]["kit"]
    assert 0.009 < kit["corrupted_bytes"] / kit["wire_bytes"] < 0.011
    assert kit["corrupted"] > 1000 and kit["glued"] > 0 and kit["unplugged"] > 0


def test_every_intact_frame_decodes_and_the_rest_are_counted_exactly(
    damaged_run: tuple[dict, Path],
) -> None:
    s = damaged_run[0]
    kit, link = s["kit"], s["agent"]["kit_link"]
    assert link["frames_ok"] == kit["intact"] == s["kit_frames_received"]
    # Every lost frame between the first and last good one shows as a seq gap:
    # corrupted, glued behind damage, and the ones sent while unplugged.
    assert link["dropped_frames"] == kit["lost_between_intact"]
    assert kit["lost_between_intact"] == kit["corrupted"] + kit["glued"] + kit["unplugged"]
    assert link["kit_restarts"] == link["unknown_types"] == link["version_errors"] == 0
    assert link["crc_errors"] + link["cobs_errors"] + link["length_errors"] >= kit["corrupted"] // 2
    assert (link["outages"], link["reconnects"]) == (1, 1)


def test_gas_total_matches_the_truth_over_the_intact_data(damaged_run: tuple[dict, Path]) -> None:
    s = damaged_run[0]
    truth = s["truth"]["gas_kg_over_intact_kit_data"]
    assert truth > 0.05
    assert abs(s["gas_kg"] - truth) / truth < 0.005, (s["gas_kg"], truth)
    # The loss is real: the whole-run truth is clearly more than what was measured.
    assert s["truth"]["gas_kg"] - truth > 0.01 * truth
    # Diesel and distance come over CAN and are untouched.
    for k in ("diesel_l", "distance_km"):
        assert abs(s[k] - s["truth"][k]) / s["truth"][k] < 0.01


def test_the_outage_appears_in_the_readings_and_events(damaged_run: tuple[dict, Path]) -> None:
    s, workdir = damaged_run
    readings, events = stored(workdir)
    assert len(readings) == s["readings"] >= 149
    down = [r for r in readings if "kit_down_s" in r]
    assert 3 <= len(down) <= 8
    assert UNPLUG_FOR <= sum(r["kit_down_s"] for r in down) <= UNPLUG_FOR + 1.0
    t_first = readings[0]["t0"]
    assert all(UNPLUG_AT - 1 <= r["t0"] - t_first <= UNPLUG_AT + UNPLUG_FOR + 1 for r in down)
    # Windows entirely inside the outage have no gas coverage and say so.
    inside = [r for r in down if r["kit_down_s"] == pytest.approx(r["dur"])]
    assert inside and all(r["cov"]["gas_kg"] == 0.0 and r["gas_kg"] == 0.0 for r in inside)
    # The gas channel's own gap ends at the first STATUS after the outage, in
    # the last flagged window or the one after it (the kit's HELLO reply may
    # come first and close the outage a few ms earlier).
    long_gaps = [r for r in readings if r.get("gaps", {}).get("gas_kg", [0, 0])[1] >= UNPLUG_FOR]
    assert len(long_gaps) == 1
    assert 0 <= long_gaps[0]["t0"] - down[-1]["t0"] <= 1.0
    kinds = [k for k, _ in events]
    assert kinds.count("KIT_LINK_DOWN") == kinds.count("KIT_LINK_UP") == 1
    up = next(e for k, e in events if k == "KIT_LINK_UP")
    assert UNPLUG_FOR <= up["down_s"] <= UNPLUG_FOR + 1.0
    hello = next(e for k, e in events if k == "KIT_HELLO")
    assert (hello["version"], hello["kit_id"], hello["injectors"]) == (2, 0x00C0FFEE, 6)


def test_clean_link_loses_nothing(tmp_path: Path) -> None:
    s = harness.run(harness.SimOptions(duration=30.0, speedup=0.0, seed=2, workdir=tmp_path))
    kit, link = s["kit"], s["agent"]["kit_link"]
    assert kit["intact"] == kit["frames"] == link["frames_ok"]
    assert link["dropped_frames"] == link["crc_errors"] == link["cobs_errors"] == 0
    readings, _ = stored(tmp_path)
    assert not any("kit_down_s" in r for r in readings)


def test_kit_faults_dpf_and_stuck_sensor_reach_the_readings(tmp_path: Path) -> None:
    opts = harness.SimOptions(
        duration=170.0,
        speedup=0.0,
        seed=5,
        workdir=tmp_path,
        # About 3 kg/h of gas: 100 s stuck is about 0.08 kg, over the 0.05 kg threshold.
        kit_faults=KitFaults(faults=((20.0, 10.0, 3),), stuck=((60.0, 100.0, "tank_bar"),)),
        dpf_regens=((40.0, 10.0),),
    )
    s = harness.run(opts)
    readings, events = stored(tmp_path)
    kinds = [k for k, _ in events]
    modes = [(e["mode"], e["reason"]) for k, e in events if k == "KIT_MODE"]
    # Fault (injector open circuit), back to dual, DPF regeneration, back to dual.
    assert modes == [(2, 3), (1, 0), (0, 2), (1, 0)]
    faults = [(e["code"], e["active"]) for k, e in events if k == "KIT_FAULT"]
    assert faults == [(3, 1), (3, 0)]
    assert sum(1 for r in readings if r.get("kit_faults") == 1 << 2) in range(9, 12)
    assert 9 <= sum(r["mode_s"]["fault"] for r in readings) <= 11
    assert 9 <= sum(r["mode_s"]["diesel"] for r in readings) <= 11
    assert "KIT_SENSOR_STUCK" in kinds and "KIT_SENSOR_RECOVERED" in kinds
    stuck = [r for r in readings if "tank_bar" in r.get("kit_suspect", [])]
    assert 20 <= len(stuck) <= 90
    t_first = readings[0]["t0"]
    assert all(60 <= r["t0"] - t_first <= 161 for r in stuck)
    # The gas still matches: the stuck sensor is the tank's, not the flow's.
    assert abs(s["gas_kg"] - s["truth"]["gas_kg"]) / s["truth"]["gas_kg"] < 0.01


def test_cli_options_and_counts(cli) -> None:  # type: ignore[no-untyped-def]
    r = cli("sim", "--duration", "40", "--speedup", "0", "--seed", "3", "--kit-noise", "1",
            "--kit-bursts", "2", "--kit-truncate", "1", "--kit-unplug-at", "10",
            "--kit-unplug-for", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "truth over intact kit data" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("kit link:"))
    lost, simulated = re.search(r"(\d+) lost by seq \(simulator: (\d+)\)", line).groups()  # type: ignore[union-attr]
    assert lost == simulated and int(lost) > 0
    assert "1 outages" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kit-noise", "101"], "--kit-noise must be a percentage"),
        (["--kit-unplug-for", "0"], "--kit-unplug-for must be > 0"),
        (["--kit-fault", "40:1:2"], "fault code must be 1..32"),
        (["--kit-stuck", "rpm:1:2"], "sensor must be tank_bar or gas_temp_c"),
        (["--dpf-regen", "5"], "expected AT:FOR"),
    ],
)
def test_cli_rejects_bad_fault_options(cli, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    r = cli("sim", "--duration", "1", *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
