"""Dispenser records as the gas anchor: the station's invoiced kg against the bus's tank.

A refill CSV (``cngmrv report --refills FILE``) has one row per refill, with a
header naming these columns (others are refused):

``time``
    ISO 8601 date-time of the refill; UTC unless it carries an offset.
``device_id``
    the bus (as in the signed batches).
``station``
    the station's name or id.
``kg``
    gas dispensed, kg (a positive number).
``invoice_id``
    the dispenser's or invoice's id; the same id twice with the same content
    is a double entry (counted once, named); with different content, an error.

Each record is matched to the refill the agent saw nearest in time (a rise of
the tank's gas mass, ``refuel_kg`` in a reading) within
``monitoring.refill_match_window_s``.  The gas the dispenser records vouch for
over a period is the mass balance ``opening stock + invoiced - closing stock``,
the stocks read from the agent's ``tank_kg`` (P.V/(Z.R.T)); an invoice counts in
the period where its matched refill shows in the tank, so a refill that
straddles a period boundary is not counted on one side and stocked on the
other.  Pure: :func:`read` is the only I/O.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

COLUMNS = ("time", "device_id", "station", "kg", "invoice_id")


class RefillError(ValueError):
    """A refill CSV cannot be used; the message names the file, the row and the reason."""


@dataclass(frozen=True)
class Refill:
    row: int  # line number in the file (the header is line 1)
    time: float  # epoch s
    device_id: str
    station: str
    kg: float
    invoice_id: str


@dataclass
class RefillSet:
    """The records of one file, double entries set apart."""

    path: str
    refills: list[Refill]
    doubles: list[tuple[Refill, Refill]] = field(default_factory=list)  # (kept, repeated)

    def of(self, device_id: str) -> list[Refill]:
        return [r for r in self.refills if r.device_id == device_id]


def read(path: Path) -> RefillSet:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise RefillError(f"refills {path}: cannot read: {e}") from None
    return parse(text, str(path))


def parse(text: str, label: str) -> RefillSet:
    """Every row checked; the first bad row ends the parse with file, row and reason."""
    try:
        return _parse(text, label)
    except csv.Error as e:
        raise RefillError(f"refills {label}: not readable as CSV: {e}") from None


def _parse(text: str, label: str) -> RefillSet:
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None:
        raise RefillError(f"refills {label}: empty file (want a header: {', '.join(COLUMNS)})")
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    unknown = [h for h in header if h not in COLUMNS]
    if missing or unknown or len(set(header)) != len(header):
        raise RefillError(
            f"refills {label}, row 1: the header must name {', '.join(COLUMNS)} once each"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(unknown)}" if unknown else "")
        )
    out = RefillSet(label, [])
    seen: dict[str, Refill] = {}
    for line, values in enumerate(rows, 2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise RefillError(
                f"refills {label}, row {line}: {len(values)} fields, the header has {len(header)}"
            )
        rec = dict(zip(header, (v.strip() for v in values), strict=True))
        r = _record(label, line, rec)
        if r.invoice_id in seen:
            first = seen[r.invoice_id]
            same = (first.time, first.device_id, first.station, first.kg) == (
                r.time, r.device_id, r.station, r.kg,
            )  # fmt: skip
            if not same:
                raise RefillError(
                    f"refills {label}, row {line}: invoice_id {r.invoice_id!r} already on row "
                    f"{first.row} with different content"
                )
            out.doubles.append((first, r))
            continue
        seen[r.invoice_id] = r
        out.refills.append(r)
    return out


def _record(label: str, line: int, rec: Mapping[str, str]) -> Refill:
    def bad(reason: str) -> RefillError:
        return RefillError(f"refills {label}, row {line}: {reason}")

    try:
        when = datetime.fromisoformat(rec["time"])
    except ValueError:
        raise bad(f"time {rec['time']!r} is not an ISO 8601 date-time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        kg = float(rec["kg"])
    except ValueError:
        raise bad(f"kg {rec['kg']!r} is not a number") from None
    if not math.isfinite(kg) or kg <= 0:
        raise bad(f"kg must be a positive number, got {rec['kg']!r}")
    for k in ("device_id", "station", "invoice_id"):
        if not rec[k]:
            raise bad(f"{k} is empty")
    return Refill(line, when.timestamp(), rec["device_id"], rec["station"], kg, rec["invoice_id"])


# -- the tank, as the agent recorded it ------------------------------------------------


@dataclass
class Stock:
    """The tank over the readings of one bus and period, in reading order.

    ``opening_kg`` is the stock at the start of the first reading that carries
    ``tank_kg``: its end-of-reading tank plus its metered gas minus any refill in
    it (the tank is read at reading ends); ``closing_kg`` the last ``tank_kg``.
    """

    opening_kg: float | None = None
    closing_kg: float | None = None
    gas_before_tank_kg: float = 0.0  # metered gas of readings before the first tank_kg
    seen_refills: list[tuple[float, float]] = field(default_factory=list)  # (t0, kg risen)

    def add(self, r: Mapping[str, Any]) -> None:
        tank = _number(r.get("tank_kg"))
        refuel = _number(r.get("refuel_kg")) or 0.0
        if refuel > 0:
            self.seen_refills.append((float(r["t0"]), refuel))
        if tank is None:
            if self.opening_kg is None:
                self.gas_before_tank_kg += float(r["gas_kg"])
            return
        if self.opening_kg is None:
            self.opening_kg = tank + float(r["gas_kg"]) - refuel
        self.closing_kg = tank


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


@dataclass(frozen=True)
class Match:
    """Dispenser records matched to the agent's refills of one bus."""

    # invoice id -> time the gas shows in the tank (the matched refill's reading, or its own)
    counted_at: dict[str, float]
    mismatches: list[str]


MERGE_S = 300.0  # rises this close together are one refill (a fill spans several readings)


def refills_seen(rises: Iterable[tuple[float, float]], min_kg: float) -> list[tuple[float, float]]:
    """The agent's tank rises as refills: rises less than ``MERGE_S`` apart merged (at the
    first one's time), and merged rises under ``min_kg`` left out as sensor noise."""
    out: list[list[float]] = []
    for t, kg in sorted(rises):
        if out and t - out[-1][2] < MERGE_S:
            out[-1][1] += kg
            out[-1][2] = t
        else:
            out.append([t, kg, t])
    return [(t, kg) for t, kg, _ in out if kg >= min_kg]


def match(
    invoices: Sequence[Refill],
    seen: Iterable[tuple[float, float]],
    window_s: float,
    tolerance: float,
) -> Match:
    """Each invoice to the agent's refill (see :func:`refills_seen`) nearest in time
    within ``window_s``.

    Named as mismatches: an invoice with no refill seen near it, a refill seen
    with no invoice, and a refill whose invoiced kg differ from the tank's rise
    by more than ``tolerance`` (a share of the invoiced kg).
    """
    seen = sorted(seen)
    by_refill: dict[int, list[Refill]] = {}
    counted: dict[str, float] = {}
    problems: list[str] = []
    for inv in sorted(invoices, key=lambda r: r.time):
        near = [
            (abs(t - inv.time), i) for i, (t, _) in enumerate(seen) if abs(t - inv.time) <= window_s
        ]
        if not near:
            counted[inv.invoice_id] = inv.time
            problems.append(
                f"invoice {inv.invoice_id} (row {inv.row}, {inv.kg:g} kg at {_iso(inv.time)}): "
                f"no refill seen in the tank within {window_s:g} s"
            )
            continue
        i = min(near)[1]
        by_refill.setdefault(i, []).append(inv)
        counted[inv.invoice_id] = seen[i][0]
    for i, (t, kg) in enumerate(seen):
        invs = by_refill.get(i, [])
        if not invs:
            problems.append(f"refill seen at {_iso(t)} (+{kg:.2f} kg in the tank): no invoice")
            continue
        billed = sum(r.kg for r in invs)
        if abs(kg - billed) > tolerance * billed:
            ids = ", ".join(r.invoice_id for r in invs)
            problems.append(
                f"refill seen at {_iso(t)}: the tank rose {kg:.2f} kg, invoiced {billed:g} kg "
                f"({ids})"
            )
    return Match(counted, problems)


def anchored_gas_kg(
    stock: Stock, invoices: Sequence[Refill], counted_at: Mapping[str, float], lo: float, hi: float
) -> float | None:
    """Gas the dispenser records vouch for in [lo, hi): opening + invoiced - closing stock.

    None without tank readings.  Gas metered before the first tank reading is not
    vouched for and is left out (the caller's minimum then credits less).
    """
    if stock.opening_kg is None or stock.closing_kg is None:
        return None
    billed = sum(r.kg for r in invoices if lo <= counted_at.get(r.invoice_id, r.time) < hi)
    return stock.opening_kg + billed - stock.closing_kg


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
