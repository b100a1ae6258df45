"""The report's gathering of stored runs (cngmrv.office.monitored): its shortcuts, bit for bit.

A fleet's report adds stored rows without building a Run each
(:func:`monitored.combine_stored`) and, for a large fleet, in several processes:
both must give what :func:`monitored.combine` gives, to the last bit.  The
databases' both-ways agreement is in tests/test_fleetdb.py.
"""

from __future__ import annotations

import dataclasses
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


@settings(max_examples=200, deadline=None)
@given(stored_rows(), st.sampled_from([0.0, 0.07, 0.4]), st.sampled_from([0.5, 2.0]))
def test_combining_a_stored_row_is_combining_its_run(
    rows: list[tuple[Any, ...]], fame: float, refill_kg: float
) -> None:
    by_run, by_row = rp.BusData("bus-1"), rp.BusData("bus-1")
    for v in rows:
        sha = f"{v[1]:064x}"
        run = monitored._run(dict(zip(monitored.COLUMNS, v, strict=True)), sha)
        assert monitored._relabel(run, lambda _t: fame, ())
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
