"""The report's gathering of stored runs (cngmrv.office.monitored): its shortcuts, bit for bit.

A fleet's report adds stored rows without building a Run each
(:func:`monitored.combine_stored`) and, for a large fleet, in several processes:
both must give what :func:`monitored.combine` gives, to the last bit.  The
databases' both-ways agreement is in tests/test_fleetdb.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cngmrv.office import monitored
from cngmrv.office import report as rp

HOURS = [1_740_787_200 + 3600 * k for k in (0, 1, 23, 24, 25)]  # across a UTC midnight
OPTIONAL = {
    "lfc_first", "lfc_last", "lfc_first_diesel", "tank_first", "tank_first_gas", "tank_last",
    "tank_dmax_use", "tank_dmin_refill",
}  # fmt: skip


def bits(x: Any) -> Any:
    """``x`` with every float as its exact bits (``-0.0`` is not ``0.0``) and every
    dictionary in its order: equal only if equal to the last bit."""
    if isinstance(x, float):
        return ("float", x.hex())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return tuple((f.name, bits(getattr(x, f.name))) for f in dataclasses.fields(x))
    if isinstance(x, dict):
        return tuple((bits(k), bits(v)) for k, v in x.items())
    if isinstance(x, list | tuple):
        return tuple(bits(v) for v in x)
    if isinstance(x, set | frozenset):
        return tuple(sorted(x))
    return x


def _number() -> st.SearchStrategy[float]:
    return st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False),
        st.sampled_from([0.0, -0.0, 0.1, 1e-300, 5e-324]),
    )


@st.composite
def stored_rows(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Rows of one device as the ingest stores them, in batch sequence and run order."""
    rows = []
    for seq in range(draw(st.integers(1, 6))):
        values: dict[str, Any] = {
            "device_id": "bus-1",
            "seq": seq,
            "part": draw(st.integers(0, 2)),
            "hour": draw(st.sampled_from(HOURS)),
            "status": "ok",
            "sums_version": monitored.SUMS_VERSION,
            "epochs": draw(st.sampled_from(["", "1", "1,2", "3"])),
        }
        for c in monitored.COLUMNS:
            if c in values:
                continue
            if c in monitored._INTS:
                values[c] = draw(st.integers(0, 60))
            elif c in OPTIONAL:
                values[c] = draw(st.one_of(st.none(), _number()))
            else:
                values[c] = draw(_number())
        rows.append(tuple(values[c] for c in monitored.COLUMNS))
    return rows


def run_of(row: dict[str, Any], sha: str) -> monitored.Run:
    """The reference: the stored row back as its :class:`Run`, as the report built it before
    :func:`monitored.combine_stored` added rows without one."""
    run = monitored.Run(
        str(row["device_id"]), int(row["seq"]), int(row["part"]), int(row["hour"]), sha
    )
    s, c = run.sums, run.checks
    s.readings = int(row["readings"])
    s.dur_s, s.diesel_l, s.gas_kg = row["dur_s"], row["diesel_l"], row["gas_kg"]
    s.distance_km, s.distance_credited_km = row["distance_km"], row["distance_credited_km"]
    for ch in rp.CHANNELS:
        s.cov[ch] = row[f"cov_{ch}"]
        s.gaps[ch] = int(row[f"gaps_{ch}"])
        s.longest_gap_s[ch] = row[f"longest_{ch}"]
    for m in rp.MODES:
        s.mode_s[m] = row[f"mode_{m}"]
    s.unsynced_s, s.first_t0, s.last_t1 = row["unsynced_s"], row["first_t0"], row["last_t1"]
    s.seqs[run.seq] = sha
    if s.readings:
        # Stored at share 0: the same additions as the totals, so equal to them bit for bit.
        s.parts[0.0] = [s.diesel_l, s.gas_kg, s.distance_km, s.distance_credited_km]
    c.lfc_first, c.lfc_last, c.lfc_diesel_l = (
        row["lfc_first"],
        row["lfc_last"],
        row["lfc_rest_diesel"],
    )
    run.lfc_first_diesel = row["lfc_first_diesel"]
    c.inj_kg, c.inj_flow_kg, c.inj_n = row["inj_kg"], row["inj_flow_kg"], int(row["inj_n"])
    run.tank_first, run.tank_first_gas = row["tank_first"], row["tank_first_gas"]
    c.tank_prev, c.tank_used_kg, c.tank_flow_kg = (
        row["tank_last"],
        row["tank_used_kg"],
        row["tank_flow_kg"],
    )
    c.tank_refills, c.tank_n = int(row["tank_refills"]), int(row["tank_n"])
    run.tank_dmax_use, run.tank_dmin_refill = row["tank_dmax_use"], row["tank_dmin_refill"]
    run.epochs = {int(e) for e in str(row["epochs"] or "").split(",") if e}
    return run


def relabel(run: monitored.Run, fame_at: Callable[[float], float], breaks: Sequence[float]) -> bool:
    """Give a stored run (share 0) its blend; False when the blend may change inside it."""
    s = run.sums
    if not s.readings:
        return True
    if any(s.first_t0 < k < s.last_t1 for k in breaks):
        return False
    s.parts = {fame_at(s.first_t0): s.parts[0.0]}
    return True


@settings(max_examples=200, deadline=None)
@given(stored_rows(), st.sampled_from([0.0, 0.07, 0.4]), st.sampled_from([0.5, 2.0]))
def test_combining_a_stored_row_is_combining_its_run(
    rows: list[tuple[Any, ...]], fame: float, refill_kg: float
) -> None:
    by_run, by_row = rp.BusData("bus-1"), rp.BusData("bus-1")
    for v in rows:
        sha = f"{v[1]:064x}"
        run = run_of(dict(zip(monitored.COLUMNS, v, strict=True)), sha)
        assert relabel(run, lambda _t: fame, ())
        monitored.combine(by_run, run, refill_kg)
        monitored.combine_stored(by_row, v, v[1], sha, fame, refill_kg)
        assert monitored._valid_for(v, refill_kg) == run.valid_for(refill_kg)
    assert bits(by_row) == bits(by_run)


def test_slices_are_contiguous_and_cover_the_fleet() -> None:
    known = [f"bus-{i:03d}" for i in range(10)]
    for n in (1, 2, 3, 4):
        parts = monitored._slices(known, n)
        assert len(parts) == n and [d for p in parts for d in p] == known
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert monitored.processes_for(monitored.PARALLEL_MIN_DEVICES - 1) == 1
