"""``cngmrv report``: emission reductions per bus and period, traceable to signed batches.

The input is an ingest database (a fleet: table ``batches(device_id, seq,
sha256, bytes, received_at)``) or a device store (one bus: ``batches(seq,
bytes, ...)``).  Every batch is parsed and checked before a reading of it
counts: in an ingest database against the device's registered key
(signature, key id, payload hash, hash chain); in a device store, which holds
no public key, the payload hash and the hash chain only (``cngmrv verify``
checks its signatures).  A batch that fails is left out and listed.

Readings (``Batch.payload()["readings"]``) whose ``t0`` lies in the period are
summed per bus, per UTC day and per UTC hour.  The methodology
(:mod:`cngmrv.office.mrv`) then turns the sums into RE, PE and ER.  The
conservative rules live here, where the coverage is known:

- gas that was not measured (uncovered time) is absent, never filled;
- form B credits only the distance driven while both fuels were measured
  (per reading: distance x min(gas coverage, diesel coverage) / duration);
- a bus with any channel's coverage under the floor is flagged.

Each bus's figures carry the batch range they came from: device id, first and
last ``batch_seq``, the first and last batch file SHA-256, and the SHA-256 of
the concatenated file hashes of every contributing batch in sequence order.

Optional reading fields feed the cross-checks when present (their absence is
reported as "not available"): ``lfc_total_l`` (the LFC total-fuel counter, L),
``gas_kg_events`` (gas from injection events, kg per reading) and ``tank_kg``
(gas mass in the tank from the pressure/temperature balance, kg).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import gc
import hashlib
import html
import io
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from cngmrv.office import refills as refill_records
from cngmrv.office.mrv import (
    Emissions,
    Methodology,
    MethodologyError,
    Monitored,
    Part,
    conservative,
    emissions,
    fleet_er,
    sensitivity,
)
from cngmrv.signed import batch, chain, reading
from cngmrv.signed.archive import Holdings
from cngmrv.signed.keys import kid_of, public_key_from_pem

CHANNELS = reading.CHANNELS
MODES = reading.MODES
LFC_RESOLUTION_L = 0.5  # SPN 250, docs/domain.md section 3


class ReportError(ValueError):
    """The report cannot be made as asked (no data, unknown bus, bad period)."""


# -- period ------------------------------------------------------------------


def parse_when(text: str, end: bool = False) -> datetime:
    """A ``--from``/``--to`` value: ``YYYY-MM-DD`` (UTC) or an ISO 8601 date-time.

    A bare date as ``end`` means the end of that day, so ``--from 2025-01-01
    --to 2025-01-31`` covers all of January.  A date-time without an offset is UTC.
    """
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1) if end else start
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(f"not a date (YYYY-MM-DD) or ISO date-time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- aggregation -------------------------------------------------------------


@dataclass
class Sums:
    """Additive sums over readings; every figure of the report is a view of these."""

    readings: int = 0
    dur_s: float = 0.0
    diesel_l: float = 0.0
    gas_kg: float = 0.0
    distance_km: float = 0.0
    distance_credited_km: float = 0.0
    cov: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0.0))
    gaps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0))
    longest_gap_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CHANNELS, 0.0))
    mode_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, 0.0))
    unsynced_s: float = 0.0
    first_t0: float = math.inf
    last_t1: float = -math.inf
    seqs: dict[int, str] = field(default_factory=dict)  # batch_seq -> file sha256 hex
    # FAME share in force -> [diesel L, gas kg, distance km, credited km] of its readings
    parts: dict[float, list[float]] = field(default_factory=dict)

    def add(
        self, r: Mapping[str, Any], credited_km: float, seq: int, sha: str, fame: float = 0.0
    ) -> None:
        # Called for every reading of a fleet (60 a batch, at ingest and in a recompute):
        # each field is read and converted once.  The additions are the same, in the
        # same order, so the sums are the same to the last bit.
        diesel, gas = float(r["diesel_l"]), float(r["gas_kg"])
        distance, dur, t0 = float(r["distance_km"]), float(r["dur"]), float(r["t0"])
        part = self.parts.get(fame)
        if part is None:
            part = self.parts[fame] = [0.0, 0.0, 0.0, 0.0]
        part[0] += diesel
        part[1] += gas
        part[2] += distance
        part[3] += credited_km
        self.readings += 1
        self.dur_s += dur
        self.diesel_l += diesel
        self.gas_kg += gas
        self.distance_km += distance
        self.distance_credited_km += credited_km
        cov, into = r.get("cov") or {}, self.cov
        for ch in CHANNELS:
            into[ch] += float(cov.get(ch, 0.0))
        gaps = r.get("gaps")
        if gaps:
            for ch, (count, longest) in gaps.items():
                if ch in self.gaps:
                    self.gaps[ch] += int(count)
                    self.longest_gap_s[ch] = max(self.longest_gap_s[ch], float(longest))
        modes = r.get("mode_s")
        if modes:
            mode_s = self.mode_s
            for m, v in modes.items():
                if m in mode_s:
                    mode_s[m] += float(v)
        if r.get("clock") != reading.SYNCHRONISED:
            self.unsynced_s += dur
        if t0 < self.first_t0:  # min() and max(), without their calls
            self.first_t0 = t0
        if t0 + dur > self.last_t1:
            self.last_t1 = t0 + dur
        self.seqs[seq] = sha

    def coverage(self) -> dict[str, float]:
        return {ch: (self.cov[ch] / self.dur_s if self.dur_s > 0 else 0.0) for ch in CHANNELS}

    def monitored(self, low: float = 1.0, high: float = 1.0) -> Monitored:
        parts = tuple(Part(share, *v) for share, v in sorted(self.parts.items()))
        return Monitored(parts, low, high)


@dataclass
class CrossCheck:
    """Running state of the optional cross-checks of one bus."""

    lfc_first: float | None = None
    lfc_last: float | None = None
    lfc_diesel_l: float = 0.0  # integrated diesel after the first counter reading
    inj_kg: float = 0.0
    inj_flow_kg: float = 0.0  # flow-based gas over the readings that carry gas_kg_events
    inj_n: int = 0
    tank_prev: float | None = None
    tank_used_kg: float = 0.0
    tank_flow_kg: float = 0.0
    tank_refills: int = 0
    tank_n: int = 0

    def add(self, r: Mapping[str, Any], refill_kg: float) -> None:
        lfc = _opt_number(r.get("lfc_total_l"))
        if lfc is not None:
            if self.lfc_first is None:
                self.lfc_first = lfc
            else:
                self.lfc_diesel_l += float(r["diesel_l"])
            self.lfc_last = lfc
        # Without injection events in a reading (a kit that does not send them),
        # its event gas is "not measured", not zero.
        has_events = float((r.get("cov") or {}).get("gas_kg_events", 1.0)) > 0.0
        inj = _opt_number(r.get("gas_kg_events")) if has_events else None
        if inj is not None:
            self.inj_kg += inj
            self.inj_flow_kg += float(r["gas_kg"])
            self.inj_n += 1
        tank = _opt_number(r.get("tank_kg"))
        if tank is not None:
            self.tank_n += 1
            if self.tank_prev is not None:
                if tank - self.tank_prev > refill_kg:
                    self.tank_refills += 1  # a refill: the balance restarts from here
                else:
                    self.tank_used_kg += self.tank_prev - tank
                    self.tank_flow_kg += float(r["gas_kg"])
            self.tank_prev = tank

    def results(self, tolerance: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if self.lfc_first is None or self.lfc_last is None:
            out["diesel_lfc_counter"] = _unavailable("lfc_total_l")
        else:
            counter = self.lfc_last - self.lfc_first
            # Below this much fuel the counter's 0.5 L step alone could exceed the tolerance.
            enough = 2 * LFC_RESOLUTION_L / tolerance if tolerance > 0 else math.inf
            out["diesel_lfc_counter"] = _ratio(
                "LFC total-fuel counter / integrated LFE fuel rate",
                counter,
                self.lfc_diesel_l,
                tolerance,
                enough=self.lfc_diesel_l >= enough,
                unit="L",
            )
        out["gas_injection_events"] = (
            _ratio(
                "gas from injection events / gas from flow",
                self.inj_kg,
                self.inj_flow_kg,
                tolerance,
                enough=self.inj_flow_kg > 0,
                unit="kg",
            )
            if self.inj_n
            else _unavailable("gas_kg_events")
        )
        if self.tank_n < 2:
            out["gas_tank_balance"] = _unavailable("tank_kg")
        else:
            res = _ratio(
                "tank mass balance / gas from flow",
                self.tank_used_kg,
                self.tank_flow_kg,
                tolerance,
                enough=self.tank_flow_kg > 0,
                unit="kg",
            )
            res["refills"] = self.tank_refills
            out["gas_tank_balance"] = res
        return out


def _opt_number(v: Any) -> float | None:
    if v is None:  # the common case, for optional fields: answered first
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _unavailable(field_name: str) -> dict[str, Any]:
    return {"status": "not available", "reason": f"no reading carries {field_name}"}


def _ratio(
    what: str, check: float, integrated: float, tol: float, enough: bool, unit: str
) -> dict[str, Any]:
    out: dict[str, Any] = {"what": what, "check": check, "integrated": integrated, "unit": unit}
    if not enough or integrated <= 0:
        out.update(status="insufficient data", ratio=None, flagged=False)
        return out
    ratio = check / integrated
    flagged = abs(ratio - 1.0) > tol
    out.update(status="disagree" if flagged else "agree", ratio=ratio, flagged=flagged)
    return out


# -- reading and checking batches ----------------------------------------------


SIGNATURES = "verified against the registered keys, each within its range of sequences"


@dataclass
class DeviceBatches:
    """One device's batches as held, and the outcome of checking them."""

    device_id: str
    rows: list[tuple[int, bytes]]
    pubkey_pem: bytes | None = None
    ok: list[batch.Batch] = field(default_factory=list)
    excluded: dict[str, list[str]] = field(default_factory=dict)
    missing: list[tuple[int, int]] = field(default_factory=list)
    signatures: str = ""
    held: dict[int, str] = field(default_factory=dict)  # verified batch_seq -> file sha256 hex
    # The keys the ingest trusts for the device (device_keys): (PEM, first seq, last seq or None).
    key_ranges: list[tuple[bytes, int, int | None]] = field(default_factory=list)
    # (kid, first seq, last seq): which key signed each run of the batches that count.
    signed_by: list[tuple[str, int, int]] = field(default_factory=list)

    def keyring(self) -> batch.KeyRing:
        """The registered key, and every key the ingest trusts from a sequence on."""
        items: dict[str, tuple[Any, int, int | None]] = {}
        # The registered key is most often the first of the ranges too: loaded once.
        loaded: dict[bytes, tuple[Any, str]] = {}

        def load(pem: bytes, where: str) -> tuple[Any, str]:
            if pem not in loaded:
                pub = public_key_from_pem(pem, where)
                loaded[pem] = (pub, kid_of(pub))
            return loaded[pem]

        if self.pubkey_pem is not None:
            pub, kid = load(self.pubkey_pem, f"registered key of {self.device_id}")
            items[kid] = (pub, 0, None)
        for pem, first, last in self.key_ranges:
            pub, kid = load(pem, f"a registered key of {self.device_id}")
            items[kid] = (pub, first, last)
        return batch.KeyRing(
            {kid: (pub, self.device_id) for kid, (pub, _, _) in items.items()},
            {(self.device_id, kid): (a, b) for kid, (_, a, b) in items.items()},
        )


def signed_by(batches: Iterable[batch.Batch]) -> list[tuple[str, int, int]]:
    """(kid, first seq, last seq) per run of ``batches`` signed by one key, in sequence order;
    a missing sequence does not end a run (gaps are reported on their own)."""
    out: list[tuple[str, int, int]] = []
    for b in sorted(batches, key=lambda b: b.seq):
        kid = str(b.header["kid"])
        if out and out[-1][0] == kid:
            out[-1] = (kid, out[-1][1], b.seq)
        else:
            out.append((kid, b.seq, b.seq))
    return out


def read_source(path: str | Path, bus: str | None = None) -> tuple[str, list[DeviceBatches]]:
    """(kind, devices) of an ingest database (``"ingest"``) or a device store (``"store"``),
    an SQLite file or, for an ingest database, a ``postgresql://`` URL, opened read-only;
    each device's batches checked (only those that pass count)."""
    from cngmrv.office.fleetdb import ReadOnlyDB, redact

    db = ReadOnlyDB(path)
    try:
        held = Holdings(db, redact(db.target))
        devices = device_batches(held, buses_held(held, bus))
    finally:
        db.close()
    for d in devices:
        _check(held.kind, d)
    return held.kind, devices


def buses_held(held: Holdings, bus: str | None = None) -> list[str]:
    """The buses to report on: ``bus`` if it is held, else every one held."""
    known = held.devices()
    if not known:
        raise ReportError(f"no buses in {held.where}")
    if bus is not None and bus not in known:
        raise ReportError(f"unknown bus {bus!r} in {held.where} (known: {', '.join(known)})")
    return [bus] if bus is not None else known


def device_batches(held: Holdings, buses: Iterable[str]) -> list[DeviceBatches]:
    """Each bus's batches as held, with the keys the database trusts for it (unchecked)."""
    keys, ranges = held.keys(), held.key_ranges()
    return [
        DeviceBatches(dev, held.batches(dev), keys.get(dev), key_ranges=ranges.get(dev, []))
        for dev in buses
    ]


def _check(kind: str, d: DeviceBatches) -> None:
    """Fill ``ok``/``excluded``/``missing``: only batches that pass count in the report."""
    named = [(f"batch_seq {seq}", raw) for seq, raw in d.rows]
    if kind == "ingest":
        if d.pubkey_pem is None and not d.key_ranges:
            d.excluded = {n: ["device has no registered public key"] for n, _ in named}
            d.signatures = "not verifiable: no registered public key"
            return
        rep = batch.verify_set(named, d.keyring())
        good = set(rep.ok)
        d.ok = [b for b in (batch.parse(raw) for seq, raw in d.rows if seq in good)]
        d.excluded, d.missing = dict(rep.bad), list(rep.gaps)
        d.signed_by = signed_by(d.ok)
        d.signatures = SIGNATURES
        return
    # A device store holds no public key: check the payload hashes and the chain only.
    unreadable: dict[str, list[str]] = {}
    parsed: list[tuple[str, batch.Batch]] = []
    for name, raw in named:
        try:
            parsed.append((name, batch.parse(raw)))
        except batch.BatchFormatError as e:
            unreadable[name] = [str(e)]
    steps = dict(zip((n for n, _ in parsed), chain.walk(b for _, b in parsed), strict=True))
    for name, _ in named:
        if name in unreadable:
            d.excluded[name] = unreadable[name]
            continue
        step = steps[name]
        b = step.batch
        problems = []
        if b.device_id != d.device_id:
            problems.append(f"device_id {b.device_id!r} is not the store's {d.device_id!r}")
        if batch.sha256(b.payload_bytes) != b.header["payload_sha256"]:
            problems.append("payload SHA-256 does not match the header")
        if step.gap is not None:
            d.missing.append(step.gap)
        if not step.chained:
            problems.append("prev_hash does not match the previous batch: chain broken")
        if problems:
            d.excluded[name] = problems
        else:
            d.ok.append(b)
    d.signatures = "not checked (a device store holds no public key; use cngmrv verify)"


# -- the report ----------------------------------------------------------------


@dataclass
class BusData:
    device_id: str
    total: Sums = field(default_factory=Sums)
    days: dict[str, Sums] = field(default_factory=dict)
    # hour start (epoch s) -> [seconds, gas covered s, diesel covered s]
    hours: dict[int, list[float]] = field(default_factory=dict)
    checks: CrossCheck = field(default_factory=CrossCheck)
    epochs: set[int] = field(default_factory=set)
    stock: refill_records.Stock = field(default_factory=refill_records.Stock)
    day_stock: dict[str, refill_records.Stock] = field(default_factory=dict)


@dataclass
class Report:
    """The report as data (``data``, what ``--format json`` prints) plus plot series."""

    data: dict[str, Any]
    hourly: dict[str, dict[int, list[float]]]


def credited_km(r: Mapping[str, Any]) -> float:
    """The distance of one reading credited under form B: driven while both fuels were measured."""
    dur = float(r["dur"])
    cov = r.get("cov") or {}
    share = (
        min(float(cov.get("gas_kg", 0.0)), float(cov.get("diesel_l", 0.0))) / dur
        if dur > 0
        else 0.0
    )
    return float(r["distance_km"]) * min(1.0, max(0.0, share))


def _trace(device_id: str, seqs: Mapping[int, str], held: Mapping[int, str]) -> dict[str, Any]:
    """The batch range behind a figure: the batches whose readings it sums (``seqs``).

    ``count`` and ``set_sha256`` cover every verified batch from ``first_seq`` to
    ``last_seq`` (``held``), including those in between that carry only events,
    so an auditor can recompute the hash from the exported range.
    """
    if not seqs:
        return {"device_id": device_id, "count": 0}
    first, last = min(seqs), max(seqs)
    order = [s for s in sorted(held) if first <= s <= last]
    return {
        "device_id": device_id,
        "first_seq": first,
        "last_seq": last,
        "count": len(order),
        "first_sha256": seqs[first],
        "last_sha256": seqs[last],
        "set_sha256": hashlib.sha256(b"".join(bytes.fromhex(held[s]) for s in order)).hexdigest(),
    }


def _figures(
    m: Methodology, s: Sums, device_id: str, low: float = 1.0, high: float = 1.0
) -> tuple[dict[str, Any], Emissions]:
    q = s.monitored(low, high)
    em = emissions(m, q, device_id)
    b0 = emissions(m, q.at_blend(0.0), device_id)
    cov = s.coverage()
    mode_h = {k: v / 3600.0 for k, v in s.mode_s.items()}
    mode_h["unknown"] = max(0.0, s.dur_s - sum(s.mode_s.values())) / 3600.0
    return {
        "re_kg_co2": em.re_kg,
        "pe_kg_co2": em.pe_kg,
        "er_kg_co2": em.er_kg,
        "er_t_co2_rounded": m.round_er_t(em.er_kg),
        "re_a_kg_co2": em.re_a_kg,
        "re_b_kg_co2": em.re_b_kg,
        "pe_boundary_kg_co2": em.pe_boundary_kg,
        "er_kg_co2_at_b0": b0.er_kg,
        "blend_effect_kg_co2": em.er_kg - b0.er_kg,
        "fame_share_vol": (
            sum(share * v[0] for share, v in s.parts.items()) / s.diesel_l if s.diesel_l else None
        ),
        "fossil_diesel_mj": em.fossil_mj,
        "biogenic_diesel_mj": em.biogenic_mj,
        "diesel_l": s.diesel_l,
        "gas_kg": s.gas_kg,
        "gas_kg_credited": em.gas_kg_credited,
        "gas_credit_factor": em.gas_kg_credited / s.gas_kg if s.gas_kg > 0 else 1.0,
        "gas_factor_low": low,
        "gas_factor_high": high,
        "blend_parts": [
            {
                "fame_share_vol": share,
                "diesel_l": v[0],
                "gas_kg": v[1],
                "distance_km": v[2],
                "distance_credited_km": v[3],
            }
            for share, v in sorted(s.parts.items())
        ],
        "distance_km": s.distance_km,
        "distance_credited_km": s.distance_credited_km,
        "gas_energy_share": em.gas_energy_share,
        "hours": s.dur_s / 3600.0,
        "readings": s.readings,
        "coverage": min(cov.values()) if s.dur_s > 0 else 0.0,
        "coverage_by_channel": cov,
        "uncovered_s": {ch: max(0.0, s.dur_s - s.cov[ch]) for ch in CHANNELS},
        "gaps": {ch: {"count": s.gaps[ch], "longest_s": s.longest_gap_s[ch]} for ch in CHANNELS},
        "mode_h": mode_h,
    }, em


GAS_CHECKS = ("gas_injection_events", "gas_tank_balance")


def _check_factors(checks: Mapping[str, Mapping[str, Any]]) -> tuple[float, float]:
    """(low, high) gas factors from the gas cross-checks that failed their tolerance.

    A failed check makes its own figure credible too: form A credits the lowest,
    form B's PE burns the highest.
    """
    low = high = 1.0
    for name in GAS_CHECKS:
        res = checks.get(name, {})
        if res.get("flagged") and res.get("ratio") is not None:
            low, high = min(low, res["ratio"]), max(high, res["ratio"])
    return low, high


def _dispenser(
    m: Methodology,
    b: BusData,
    records: refill_records.RefillSet,
) -> tuple[dict[str, Any], dict[str, float | None]]:
    """The dispenser-record check of one bus, and its anchored gas per day (None: no tank)."""
    invoices = records.of(b.device_id)
    seen = refill_records.refills_seen(b.stock.seen_refills, m.refill_threshold_kg)
    matched = refill_records.match(invoices, seen, m.refill_match_window_s, m.cross_check_tolerance)
    anchor = refill_records.anchored_gas_kg(
        b.stock, invoices, matched.counted_at, b.total.first_t0, b.total.last_t1
    )
    per_day = {
        day: refill_records.anchored_gas_kg(
            b.day_stock[day], invoices, matched.counted_at, s.first_t0, s.last_t1
        )
        for day, s in b.days.items()
    }
    doubles = [
        f"invoice {a.invoice_id} entered twice (rows {a.row} and {r.row}), counted once"
        for a, r in records.doubles
        if a.device_id == b.device_id
    ]
    res: dict[str, Any] = {
        "what": "dispenser records (opening + invoiced - closing tank stock) / gas from flow",
        "unit": "kg",
        "file": records.path,
        "invoices": len(invoices),
        "refills_seen": len(seen),
        "mismatches": matched.mismatches + doubles,
    }
    if anchor is None:
        res.update(status="not available", reason="no reading carries tank_kg", flagged=True)
    else:
        anchor = max(0.0, anchor)
        ratio = anchor / b.total.gas_kg if b.total.gas_kg > 0 else None
        disagree = ratio is not None and abs(ratio - 1.0) > m.cross_check_tolerance
        res.update(
            check=anchor,
            integrated=b.total.gas_kg,
            ratio=ratio,
            status="disagree" if disagree else "agree",
            flagged=disagree or bool(res["mismatches"]),
        )
    return res, per_day


def _fill_factor(s: Sums) -> float:
    """Metered gas scaled up to the uncovered gas time at the metered rate: the highest
    credible gas when a kg of gas raises emissions (a gap must not hide it)."""
    covered = s.cov["gas_kg"]
    return s.dur_s / covered if covered > 0 and s.dur_s > covered else 1.0


def _anchor_factors(anchor: float | None, metered: float) -> tuple[float, float]:
    if anchor is None or metered <= 0:
        return 1.0, 1.0
    ratio = max(0.0, anchor) / metered
    return min(1.0, ratio), max(1.0, ratio)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector paused (as a ``with`` or a decorator), then as it was.

    A fleet's report makes millions of objects that all live to its end: the collector
    would re-scan the growing heap again and again (a second of a 10,000-bus report),
    to find nothing; reference counting still frees what is dropped.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


@paused_gc()
def build(
    db_path: str | Path,
    methodology: Methodology,
    start: datetime | None = None,
    end: datetime | None = None,
    bus: str | None = None,
    coverage_floor: float | None = None,
    recompute: bool = False,
    refills: refill_records.RefillSet | None = None,
    conservative_set: bool = False,
) -> Report:
    """Read, check, aggregate and compute; ReportError when the period holds no readings,
    or a bus has no reference consumption under form B (the list of them).

    ``db_path`` is a device store, or an ingest database: a SQLite file or a
    ``postgresql://`` URL.  The monitored totals come from
    :func:`cngmrv.office.monitored.gather`: from the ingest's per-batch sums,
    or with ``recompute`` re-derived from the signed bytes (the same figures).
    Dispenser records (``refills``) need the tank stock reading by reading,
    which the sums do not hold: with them, every figure is re-derived.
    """
    from cngmrv.office import monitored  # imports this module: bound at call time
    from cngmrv.office.fleetdb import redact

    if start is not None and end is not None and end <= start:
        raise ReportError(f"empty period: --to {_iso(end.timestamp())} is not after --from")
    floor = methodology.coverage_floor if coverage_floor is None else coverage_floor
    if not 0.0 <= floor <= 1.0:
        raise ReportError(f"coverage floor must be between 0 and 1, got {floor}")
    lo = start.timestamp() if start else -math.inf
    hi = end.timestamp() if end else math.inf
    m = methodology
    breaks = sorted({t for p in m.blend for t in (p.start, p.end) if math.isfinite(t)})
    try:
        got = monitored.gather(
            db_path,
            lo,
            hi,
            m.refill_threshold_kg,
            bus,
            recompute,
            fame_at=m.fame_share_at,
            fame_breaks=breaks,
            stock=refills is not None,
        )
    except MethodologyError as e:
        raise ReportError(f"methodology: {e}") from None
    kind, devices, buses = got.kind, got.devices, got.buses
    unclassed = m.buses_without_reference(d.device_id for d in devices)
    if unclassed:
        raise ReportError(
            f"methodology {m.files[0].name if m.files else '(given)'}: "
            f"form {m.form} needs a class ([buses.class]) or a [bus_reference] for "
            f"every bus; none for {len(unclassed)}: {', '.join(unclassed)}"
        )
    period = _period_text(start, end)
    if not any(b.total.readings for b in buses):
        who = f"bus {bus!r}" if bus else redact(db_path)
        raise ReportError(f"no readings {period} in {who}")
    total = Sums()
    for b in buses:
        _merge_sums(total, b.total)
    # Gas factors first: the conservative set and the sensitivity run on the same gas.
    prepared = []
    for b in buses:
        checks = b.checks.results(m.cross_check_tolerance)
        low, high = _check_factors(checks)
        high = max(high, _fill_factor(b.total))
        day_anchor: dict[str, float | None] = {}
        if refills is not None:
            checks["dispenser_records"], day_anchor = _dispenser(m, b, refills)
            a_low, a_high = _anchor_factors(
                checks["dispenser_records"].get("check"), b.total.gas_kg
            )
            low, high = min(low, a_low), max(high, a_high)
        prepared.append((checks, low, high, day_anchor))
    fleet_q = [
        (b.device_id, b.total.monitored(lo_, hi_))
        for b, (_, lo_, hi_, _) in zip(buses, prepared, strict=True)
    ]
    central = m
    if conservative_set or m.parameter_set == "conservative":
        m = conservative(m, fleet_q)
    out_buses = []
    fleet = dict.fromkeys(
        ("re_kg_co2", "pe_kg_co2", "er_kg_co2", "er_kg_co2_at_b0", "pe_boundary_kg_co2",
         "diesel_mj", "gas_mj", "gas_kg_credited"), 0.0,
    )  # fmt: skip
    for d, b, (checks, low, high, day_anchor) in zip(devices, buses, prepared, strict=True):
        fig, em = _figures(m, b.total, d.device_id, low, high)
        for k in ("re_kg_co2", "pe_kg_co2", "er_kg_co2", "er_kg_co2_at_b0", "pe_boundary_kg_co2"):
            fleet[k] += fig[k]
        fleet["diesel_mj"] += em.diesel_mj
        fleet["gas_mj"] += em.gas_mj
        fleet["gas_kg_credited"] += em.gas_kg_credited
        flags: list[str] = []
        notes: list[str] = []
        if not b.total.readings:
            flags.append("no readings in the period")
        else:
            for ch, c in fig["coverage_by_channel"].items():
                if c < floor:
                    flags.append(
                        f"{ch} coverage {100 * c:.2f} % is under the floor {100 * floor:g} %"
                    )
        for name, res in checks.items():
            if res.get("flagged"):
                ratio = res.get("ratio")
                flags.append(
                    f"cross-check {name}: "
                    + (f"ratio {ratio:.3f}" if ratio is not None else res["status"])
                )
            for text in res.get("mismatches", []):
                flags.append(f"{name}: {text}")
        if fig["gas_credit_factor"] > 1.0:
            notes.append(
                f"gas credited at {100 * fig['gas_credit_factor']:.2f} % of the metered: a kg of "
                "gas raises emissions here, so gaps are filled at the metered rate"
            )
        if fig["gas_credit_factor"] < 1.0:
            flags.append(
                f"credited gas lowered to {100 * fig['gas_credit_factor']:.2f} % of the metered gas"
            )
        if d.excluded:
            flags.append(f"{len(d.excluded)} batches failed verification and were left out")
        if d.missing:
            flags.append(
                "batch sequences missing: "
                + ", ".join(f"{lo_}" if lo_ == hi_ else f"{lo_}..{hi_}" for lo_, hi_ in d.missing)
            )
        if b.total.unsynced_s > 0:
            notes.append(
                f"{b.total.unsynced_s / 3600:.2f} h of readings were timed by a clock not "
                "marked synchronised; their day may be off"
            )
        held = d.held
        days = []
        check_low, check_high = _check_factors(checks)
        for day, s in sorted(b.days.items()):
            a_low, a_high = _anchor_factors(day_anchor.get(day), s.gas_kg)
            day_high = max(check_high, a_high, _fill_factor(s))
            dfig, _ = _figures(m, s, d.device_id, min(check_low, a_low), day_high)
            days.append({"date": day, **dfig, "batches": _trace(d.device_id, s.seqs, held)})
        trace = _trace(d.device_id, b.total.seqs, held)
        trace.update(
            signatures=d.signatures,
            signed_by=[list(r) for r in d.signed_by],
            excluded={k: v for k, v in d.excluded.items()},
            missing_seqs=[list(g) for g in d.missing],
        )
        out_buses.append(
            {
                "device_id": d.device_id,
                "class": m.class_of(d.device_id),
                "sfc_ref_l_per_km": m.sfc_ref(d.device_id).value if m.uses_form_b() else None,
                "ch4_gas_kg_per_tj": m.ch4_gas_kg_per_tj(d.device_id),
                **fig,
                "flagged": bool(flags),
                "flags": flags,
                "notes": notes,
                "boot_epochs": sorted(b.epochs),
                "cross_checks": checks,
                "batches": trace,
                "days": days,
            }
        )
    cov = total.coverage()
    energy = fleet["diesel_mj"] + fleet["gas_mj"]
    data: dict[str, Any] = {
        "report": "cngmrv emission reductions",
        "generated_at": _iso(datetime.now(UTC).timestamp()),
        "source": {"db": redact(db_path), "kind": kind, "totals": got.how},
        "period": {
            "from": _iso(start.timestamp()) if start else None,
            "to": _iso(end.timestamp()) if end else None,
            "first_reading": _iso(total.first_t0),
            "last_reading_end": _iso(total.last_t1),
        },
        "methodology": methodology_data(m),
        "coverage_floor": floor,
        "re_kg_co2": fleet["re_kg_co2"],
        "pe_kg_co2": fleet["pe_kg_co2"],
        "er_kg_co2": fleet["er_kg_co2"],
        "er_t_co2_rounded": m.round_er_t(fleet["er_kg_co2"]),
        "er_kg_co2_at_b0": fleet["er_kg_co2_at_b0"],
        "blend_effect_kg_co2": fleet["er_kg_co2"] - fleet["er_kg_co2_at_b0"],
        "pe_boundary_kg_co2": fleet["pe_boundary_kg_co2"],
        "er_kg_co2_per_kg_gas": fleet["er_kg_co2"] / total.gas_kg if total.gas_kg > 0 else None,
        "diesel_l": total.diesel_l,
        "gas_kg": total.gas_kg,
        "gas_kg_credited": fleet["gas_kg_credited"],
        "distance_km": total.distance_km,
        "gas_energy_share": fleet["gas_mj"] / energy if energy > 0 else None,
        "hours": total.dur_s / 3600.0,
        "coverage": min(cov.values()) if total.dur_s > 0 else 0.0,
        "coverage_by_channel": cov,
        "mode_h": {k: v / 3600.0 for k, v in total.mode_s.items()},
        "flagged": [b["device_id"] for b in out_buses if b["flagged"]],
        "gap_treatment": GAP_TREATMENT[m.form],
        "sensitivity": _sensitivity(central, m, fleet_q),
        "buses": out_buses,
    }
    return Report(data, {d.device_id: b.hours for d, b in zip(devices, buses, strict=True)})


def methodology_data(m: Methodology) -> dict[str, Any]:
    """The methodology as the report shows it: the values in use (after any parameter set)."""

    def param(name: str, p: Any, value: float) -> dict[str, Any]:
        out = {"value": value, "unit": p.unit, "source": p.source, "option": p.option}
        if p.description:
            out["description"] = p.description
        if p.ranged:
            out.update(low=p.low, high=p.high, file_value=p.value)
        if p.fame_share_vol is not None:
            out["fame_share_vol"] = p.fame_share_vol
        return out

    return {
        "id": m.id,
        "name": m.name,
        "version": m.version,
        "form": m.form,
        "include_ch4_n2o": m.include_ch4_n2o,
        "gwp_set": m.gwp_set,
        "parameter_set": m.parameter_set,
        "boundary": {
            "include_compression": m.include_compression,
            "include_upstream_leakage": m.include_upstream_leakage,
        },
        "files": [{"name": f.name, "sha256": f.sha256} for f in m.files],
        "parameters": {k: param(k, p, m.p(k)) for k, p in m.parameters.items()},
        "blend": [
            {
                "name": b.name,
                "from": _iso(b.start),
                "to": _iso(b.end) if math.isfinite(b.end) else None,
                "fame_share_vol": b.fame_share_vol,
                "source": b.source,
            }
            for b in m.blend
        ],
        "reference_consumption": {
            k: param(k, p, p.value) for k, p in m.reference_consumption.items()
        },
        "bus_reference": {k: param(k, p, p.value) for k, p in m.bus_reference.items()},
        "engine_slip": {k: param(k, p, p.value) for k, p in m.engine_slip.items()},
        "bus_engine": dict(m.bus_engine),
        "monitored": m.monitored_info,
        "monitored_bus": m.monitored_bus,
        "ex_ante": {"per_bus_day": m.ex_ante, "source": m.ex_ante_source},
        "rounding": {"step_t_co2": m.rounding_step_t, "direction": "down"},
    }


def _sensitivity(
    central: Methodology, used: Methodology, fleet: list[tuple[str, Monitored]]
) -> dict[str, Any]:
    cons = used if used.parameter_set == "conservative" else conservative(central, fleet)
    return {
        "er_kg_co2_central": fleet_er(central, fleet),
        "er_kg_co2_conservative": fleet_er(cons, fleet),
        "conservative_values": dict(cons.overrides),
        "parameters": sensitivity(central, fleet),
    }


GAP_TREATMENT = {
    "A": (
        "Uncovered gas time counts 0 kg: gas is never filled in or interpolated, so a gap "
        "can only lower the emission reduction. Diesel gaps change RE and PE equally and "
        "leave ER unchanged under form A."
    ),
    "B": (
        "Uncovered gas time counts 0 kg, and the distance driven while gas or diesel was "
        "not measured is not credited to RE (per reading: distance x min(gas, diesel "
        "coverage) / duration); its diesel still counts in PE. A gap can only lower the "
        "emission reduction."
    ),
}
GAP_TREATMENT["both"] = (
    GAP_TREATMENT["B"] + " Per bus and period RE is the lower of forms A and B, PE the higher."
)


def _merge_sums(into: Sums, s: Sums) -> None:
    # Twice per stored run in a fleet report (its bus and its day): each dict is looked up
    # once, min() and max() are comparisons.  The same additions in the same order.
    into.readings += s.readings
    into.dur_s += s.dur_s
    into.diesel_l += s.diesel_l
    into.gas_kg += s.gas_kg
    into.distance_km += s.distance_km
    into.distance_credited_km += s.distance_credited_km
    cov, gaps, longest = into.cov, into.gaps, into.longest_gap_s
    s_cov, s_gaps, s_longest = s.cov, s.gaps, s.longest_gap_s
    for ch in CHANNELS:
        cov[ch] += s_cov[ch]
        gaps[ch] += s_gaps[ch]
        if s_longest[ch] > longest[ch]:
            longest[ch] = s_longest[ch]
    mode_s, s_mode = into.mode_s, s.mode_s
    for k in MODES:
        mode_s[k] += s_mode[k]
    into.unsynced_s += s.unsynced_s
    for share, v in s.parts.items():
        part = into.parts.get(share)
        if part is None:
            part = into.parts[share] = [0.0, 0.0, 0.0, 0.0]
        for i, x in enumerate(v):
            part[i] += x
    if s.first_t0 < into.first_t0:
        into.first_t0 = s.first_t0
    if s.last_t1 > into.last_t1:
        into.last_t1 = s.last_t1


def _period_text(start: datetime | None, end: datetime | None) -> str:
    if start and end:
        return f"between {_iso(start.timestamp())} and {_iso(end.timestamp())}"
    if start:
        return f"since {_iso(start.timestamp())}"
    if end:
        return f"before {_iso(end.timestamp())}"
    return "at all"


# -- outputs -------------------------------------------------------------------


def to_json(report: Report) -> str:
    # Compact: a fleet's report is tens of megabytes, and an indent makes json use its
    # pure-Python encoder (seconds per thousand buses).  ``jq .`` shows it indented.
    return json.dumps(report.data, allow_nan=False)


CSV_COLUMNS = (
    "scope", "device_id", "date", "readings", "hours", "diesel_l", "gas_kg", "distance_km",
    "distance_credited_km", "gas_energy_share", "re_kg_co2", "pe_kg_co2", "er_kg_co2",
    "er_t_co2_rounded", "coverage", "coverage_diesel_l", "coverage_gas_kg",
    "coverage_distance_km", "gaps_diesel_l", "gaps_gas_kg", "gaps_distance_km",
    "longest_gap_gas_s", "uncovered_gas_s", "er_kg_co2_at_b0", "fame_share_vol",
    "gas_kg_credited", "pe_boundary_kg_co2", "mode_diesel_h", "mode_dual_h", "mode_fault_h",
    "mode_unknown_h", "flagged", "flags", "first_seq", "last_seq", "batch_count",
    "first_sha256", "last_sha256", "set_sha256", "methodology", "methodology_version",
)  # fmt: skip


def _csv_row(
    scope: str, device: str, day: str, fig: Mapping[str, Any], meta: Mapping[str, Any]
) -> dict[str, Any]:
    cov, gaps, mode = fig["coverage_by_channel"], fig["gaps"], fig["mode_h"]
    trace = fig.get("batches") or {}
    row = {k: fig.get(k, "") for k in CSV_COLUMNS}
    row.update(
        scope=scope,
        device_id=device,
        date=day,
        gas_energy_share="" if fig["gas_energy_share"] is None else fig["gas_energy_share"],
        **{f"coverage_{ch}": cov[ch] for ch in CHANNELS},
        **{f"gaps_{ch}": gaps[ch]["count"] for ch in CHANNELS} if gaps else {},
        longest_gap_gas_s=gaps["gas_kg"]["longest_s"] if gaps else "",
        uncovered_gas_s=fig["uncovered_s"]["gas_kg"] if "uncovered_s" in fig else "",
        **{f"mode_{k}_h": v for k, v in mode.items()},
        flagged=fig.get("flagged", ""),
        flags="; ".join(fig.get("flags", [])),
        first_seq=trace.get("first_seq", ""),
        last_seq=trace.get("last_seq", ""),
        batch_count=trace.get("count", ""),
        first_sha256=trace.get("first_sha256", ""),
        last_sha256=trace.get("last_sha256", ""),
        set_sha256=trace.get("set_sha256", ""),
        methodology=meta["id"],
        methodology_version=meta["version"],
    )
    return row


def to_csv(report: Report) -> str:
    """One row per bus and day, one per bus, and one for the fleet (``device_id`` ``*``)."""
    d = report.data
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for bus in d["buses"]:
        for day in bus["days"]:
            w.writerow(_csv_row("day", bus["device_id"], day["date"], day, d["methodology"]))
    for bus in d["buses"]:
        w.writerow(_csv_row("bus", bus["device_id"], "", bus, d["methodology"]))
    fleet = {**d, "gaps": {}, "flags": [], "flagged": bool(d["flagged"])}
    w.writerow(_csv_row("fleet", "*", "", fleet, d["methodology"]))
    return buf.getvalue()


# -- HTML ----------------------------------------------------------------------

PLOT_DPI = 100


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(height: float) -> Any:
    # The object-oriented API with no pyplot: no global state, no display backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(11, height), layout="constrained")


def _days(d: Mapping[str, Any]) -> list[str]:
    return sorted({day["date"] for bus in d["buses"] for day in bus["days"]})


def plot_gas_share(d: Mapping[str, Any]) -> str:
    days = _days(d)
    fig = _figure(3.6)
    ax = fig.add_subplot()
    for bus in d["buses"]:
        by_day = {x["date"]: x["gas_energy_share"] for x in bus["days"]}
        ys = [100 * by_day[x] if by_day.get(x) is not None else math.nan for x in days]
        ax.plot(days, ys, marker="o", label=bus["device_id"])
    ax.set_ylim(0, 100)
    ax.set_ylabel("gas share of fuel energy (%)")
    ax.set_title("Daily gas energy share per bus")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small", ncols=min(4, len(d["buses"])))
    ax.tick_params(axis="x", labelrotation=30)
    return _png(fig)


def plot_daily_fuel(d: Mapping[str, Any]) -> str:
    days = _days(d)
    buses = d["buses"]
    fig = _figure(5.2)
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / max(1, len(buses))
    for i, bus in enumerate(buses):
        by_day = {x["date"]: x for x in bus["days"]}
        xs = [j + (i - (len(buses) - 1) / 2) * width for j in range(len(days))]
        for ax, key in zip(axes, ("diesel_l", "gas_kg"), strict=True):
            ys = [by_day[x][key] if x in by_day else 0.0 for x in days]
            ax.bar(xs, ys, width=width, label=bus["device_id"])
    axes[0].set_ylabel("diesel (L)")
    axes[1].set_ylabel("gas (kg)")
    axes[0].set_title("Daily fuel per bus")
    axes[0].legend(fontsize="small", ncols=min(4, len(buses)))
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(days)), days, rotation=30)
    return _png(fig)


def plot_coverage(d: Mapping[str, Any], hourly: Mapping[str, Mapping[int, list[float]]]) -> str:
    """Hourly gas and diesel coverage per bus as heat maps; gaps show as red cells."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    buses = [b["device_id"] for b in d["buses"]]
    hours = sorted({h for dev in buses for h in hourly.get(dev, {})})
    t0, t1 = hours[0], hours[-1]
    n = (t1 - t0) // 3600 + 1
    cmap = LinearSegmentedColormap.from_list(
        "cov", ["#c0392b", "#f1c40f", "#27ae60"]
    ).with_extremes(bad="#dddddd")
    fig = _figure(1.4 + 0.9 * len(buses))
    axes = fig.subplots(2, 1, sharex=True)
    image = None
    for ax, idx, name in zip(axes, (1, 2), ("gas (kit)", "diesel (CAN)"), strict=True):
        grid = np.full((len(buses), n), np.nan)
        for i, dev in enumerate(buses):
            for h, v in hourly.get(dev, {}).items():
                if v[0] > 0:
                    grid[i, (h - t0) // 3600] = 100 * v[idx] / v[0]
        image = ax.imshow(
            np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=100,
            interpolation="nearest", extent=(0, n, len(buses) - 0.5, -0.5),
        )  # fmt: skip
        ax.set_yticks(range(len(buses)), buses)
        ax.set_title(f"{name} coverage per hour (%), grey: no readings")
    step = max(1, n // 12)
    ticks = list(range(0, n, step))
    axes[1].set_xticks(
        ticks,
        [datetime.fromtimestamp(t0 + 3600 * k, UTC).strftime("%m-%d %H:00") for k in ticks],
        rotation=30,
    )
    axes[1].set_xlabel("hour (UTC)")
    fig.colorbar(image, ax=list(axes), label="coverage (%)", shrink=0.9)
    return _png(fig)


def plot_er(d: Mapping[str, Any]) -> str:
    buses = d["buses"]
    fig = _figure(1.2 + 0.5 * len(buses))
    ax = fig.add_subplot()
    names = [b["device_id"] for b in buses]
    # Tonnes for a real period, kilograms for a short test run, so the bars never read 0.000.
    scale, unit = (1000.0, "t") if max(abs(b["er_kg_co2"]) for b in buses) >= 1000 else (1.0, "kg")
    ers = [b["er_kg_co2"] / scale for b in buses]
    colours = ["#e67e22" if b["flagged"] else "#2e86c1" for b in buses]
    bars = ax.barh(names, ers, color=colours)
    ax.bar_label(bars, [f"{v:,.3f} {unit}" for v in ers], padding=3, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel(f"emission reduction ({unit} CO2)")
    ax.set_title(
        f"ER per bus (fleet {d['er_kg_co2'] / scale:,.3f} {unit}; orange: flagged)", loc="left"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.15)
    return _png(fig)


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0;font-size:12px}
td,th{border:1px solid #ccc;padding:3px 5px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.flag{color:#b03a2e;font-weight:bold}.ok{color:#1e8449}
.big{font-size:28px;font-weight:bold}code{font-size:12px;word-break:break-all}
img{max-width:100%;display:block;margin:8px 0}
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return html.escape(str(v))


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def to_html(report: Report) -> str:
    """One self-contained page: summary, per-bus table, plots (PNG, base64), traces."""
    d = report.data
    e = html.escape
    m = d["methodology"]
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Emission reductions {e(d['period']['first_reading'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Emission reductions: dual-fuel bus fleet</h1>",
        f"<p>Period: {e(d['period']['from'] or 'start of data')} to "
        f"{e(d['period']['to'] or 'end of data')} (readings {e(d['period']['first_reading'])}"
        f" to {e(d['period']['last_reading_end'])}). Source: <code>{e(d['source']['db'])}</code>"
        f" ({e(d['source']['kind'])}). Methodology: {e(m['name'])}, version "
        f"<b>{e(m['version'])}</b>, form <b>{e(m['form'])}</b>"
        f"{', CH4 and N2O included' if m['include_ch4_n2o'] else ', CO2 only'}, "
        f"<b>{e(m['parameter_set'])}</b> parameter set, boundary: "
        f"{e(_boundary_text(m['boundary']))}.</p>",
        f"<p class='big'>ER {_fmt(d['er_kg_co2'] / 1000)} t CO2 ({_fmt(d['er_kg_co2'], 1)} kg) "
        f"&rarr; {_fmt(d['er_t_co2_rounded'], 0)} t for issuance (rounded down)</p>",
        f"<p>RE {_fmt(d['re_kg_co2'])} kg, PE {_fmt(d['pe_kg_co2'])} kg; diesel "
        f"{_fmt(d['diesel_l'])} L, gas {_fmt(d['gas_kg'])} kg, distance "
        f"{_fmt(d['distance_km'])} km, gas energy share {_pct(d['gas_energy_share'])}.</p>",
        f"<p>The diesel blend: ER {_fmt(d['er_kg_co2'], 1)} kg at the blend in force, "
        f"{_fmt(d['er_kg_co2_at_b0'], 1)} kg had it been fossil diesel (B0); the blend's "
        f"effect {_fmt(d['blend_effect_kg_co2'], 1)} kg. Credited gas "
        f"{_fmt(d['gas_kg_credited'])} kg of {_fmt(d['gas_kg'])} kg metered.</p>",
    ]
    if d["flagged"]:
        out.append(
            f"<p class='flag'>Flagged: {e(', '.join(d['flagged']))} "
            f"(coverage floor {100 * d['coverage_floor']:g} %)</p>"
        )
    else:
        out.append(
            f"<p class='ok'>No bus flagged (coverage floor {100 * d['coverage_floor']:g} %).</p>"
        )
    out.append("<h2>Per bus</h2><table><tr>")
    heads = ("bus", "class", "hours", "diesel L", "gas kg", "km", "gas share", "FAME share",
             "RE kg", "PE kg", "ER kg", "ER at B0 kg", "gas cov.", "diesel cov.", "km cov.", "gas gaps",
             "dual h", "diesel h", "fault h", "unknown h", "flags")  # fmt: skip
    out += [f"<th class='{'l' if h in ('bus', 'flags') else ''}'>{h}</th>" for h in heads]
    out.append("</tr>")
    for b in d["buses"]:
        c = b["coverage_by_channel"]
        cells = [
            _fmt(b["class"]), _fmt(b["hours"], 2), _fmt(b["diesel_l"]), _fmt(b["gas_kg"]),
            _fmt(b["distance_km"]), _pct(b["gas_energy_share"]), _pct(b["fame_share_vol"]),
            _fmt(b["re_kg_co2"]), _fmt(b["pe_kg_co2"]), _fmt(b["er_kg_co2"]),
            _fmt(b["er_kg_co2_at_b0"]), _pct(c["gas_kg"]), _pct(c["diesel_l"]),
            _pct(c["distance_km"]),
            f"{b['gaps']['gas_kg']['count']} (longest {b['gaps']['gas_kg']['longest_s']:,.0f} s)",
            _fmt(b["mode_h"]["dual"], 2), _fmt(b["mode_h"]["diesel"], 2),
            _fmt(b["mode_h"]["fault"], 2), _fmt(b["mode_h"]["unknown"], 2),
        ]  # fmt: skip
        flags = "<br>".join(e(f) for f in b["flags"]) or "<span class='ok'>none</span>"
        out.append(
            f"<tr><td class='l'>{e(b['device_id'])}</td>"
            + "".join(f"<td>{x}</td>" for x in cells)
            + f"<td class='l{' flag' if b['flagged'] else ''}'>{flags}</td></tr>"
        )
    out.append("</table>")
    out.append(f"<p><b>Gaps:</b> {e(d['gap_treatment'])}</p>")
    plots = (
        ("Daily gas energy share", plot_gas_share(d)),
        ("Daily fuel per bus", plot_daily_fuel(d)),
        ("Coverage and gaps over time", plot_coverage(d, report.hourly)),
        ("Emission reduction per bus", plot_er(d)),
    )
    for title, png in plots:
        out.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{png}'>")
    out.append("<h2>Cross-checks</h2><table><tr><th class='l'>bus</th><th class='l'>check</th>")
    out.append("<th>ratio</th><th class='l'>status</th></tr>")
    for b in d["buses"]:
        for name, r in b["cross_checks"].items():
            status = r["status"] + (f" ({r['reason']})" if "reason" in r else "")
            cls = " flag" if r.get("flagged") else ""
            out.append(
                f"<tr><td class='l'>{e(b['device_id'])}</td><td class='l'>{e(name)}</td>"
                f"<td>{_fmt(r.get('ratio'))}</td><td class='l{cls}'>{e(status)}</td></tr>"
            )
    out.append("</table>")
    sens = d["sensitivity"]
    out.append(
        "<h2>Sensitivity</h2>"
        f"<p>Fleet ER {_fmt(sens['er_kg_co2_central'], 1)} kg with the file's values, "
        f"{_fmt(sens['er_kg_co2_conservative'], 1)} kg with every ranged parameter at the "
        "end that lowers it and the boundary terms included (the conservative set).</p>"
        "<table><tr><th class='l'>parameter</th><th>value</th><th>low</th><th>high</th>"
        "<th>ER at low, kg</th><th>ER at high, kg</th><th>swing, kg</th></tr>"
    )
    for r in sens["parameters"]:
        out.append(
            f"<tr><td class='l'>{e(r['parameter'])} ({e(r['unit'])})</td><td>{r['value']:g}</td>"
            f"<td>{r['low']:g}</td><td>{r['high']:g}</td><td>{_fmt(r['er_kg_co2_at_low'], 1)}</td>"
            f"<td>{_fmt(r['er_kg_co2_at_high'], 1)}</td><td>{_fmt(r['swing_kg_co2'], 1)}</td></tr>"
        )
    out.append("</table>")
    out.append("<h2>Traceability: signed batches behind each figure</h2><table><tr>")
    out.append("<th class='l'>bus</th><th>batch_seq</th><th>batches</th>")
    out.append("<th class='l'>first / last batch SHA-256, SHA-256 of the set</th>")
    out.append("<th class='l'>signatures</th></tr>")
    for b in d["buses"]:
        t = b["batches"]
        if not t.get("count"):
            out.append(f"<tr><td class='l'>{e(b['device_id'])}</td><td colspan=4>none</td></tr>")
            continue
        out.append(
            f"<tr><td class='l'>{e(b['device_id'])}</td><td>{t['first_seq']}..{t['last_seq']}</td>"
            f"<td>{t['count']}</td><td class='l'><code>{t['first_sha256']}<br>{t['last_sha256']}"
            f"<br>{t['set_sha256']}</code></td><td class='l'>{e(t['signatures'])}"
            + "".join(
                f"<br>key <code>{e(kid[:16])}</code> signed {a}..{b}"
                for kid, a, b in t.get("signed_by", [])
            )
            + "</td></tr>"
        )
    out.append("</table>")
    out.append("<h2>Methodology parameters</h2><table><tr><th class='l'>parameter</th>")
    out.append("<th>value</th><th class='l'>unit</th><th class='l'>source</th></tr>")
    for k, p in {
        **m["parameters"],
        **{f"sfc_ref {c}": p for c, p in m["reference_consumption"].items()},
    }.items():
        out.append(
            f"<tr><td class='l'>{e(k)}</td><td>{p['value']:g}</td><td class='l'>{e(p['unit'])}"
            f"</td><td class='l'>{e(p['source'])}</td></tr>"
        )
    out.append("</table><h2>Diesel blend schedule</h2><table><tr><th class='l'>blend</th>")
    out.append("<th class='l'>from</th><th class='l'>to</th><th>FAME share</th>")
    out.append("<th class='l'>source</th></tr>")
    for bl in m["blend"]:
        out.append(
            f"<tr><td class='l'>{e(bl['name'])}</td><td class='l'>{e(bl['from'])}</td>"
            f"<td class='l'>{e(bl['to'] or 'open')}</td><td>{_pct(bl['fame_share_vol'])}</td>"
            f"<td class='l'>{e(bl['source'])}</td></tr>"
        )
    out.append("</table><p>Files: ")
    out.append(", ".join(f"{e(f['name'])} <code>{f['sha256']}</code>" for f in m["files"]))
    out.append(f"</p><p>Generated {e(d['generated_at'])} by cngmrv report.</p></body></html>")
    return "".join(out)


def _boundary_text(b: Mapping[str, bool]) -> str:
    parts = [
        name
        for key, name in (
            ("include_compression", "station compression electricity"),
            ("include_upstream_leakage", "upstream methane"),
        )
        if b[key]
    ]
    return "vehicle tailpipe" + "".join(f" + {p}" for p in parts)


def render(report: Report, fmt: str) -> str:
    if fmt == "json":
        return to_json(report) + "\n"
    if fmt == "csv":
        return to_csv(report)
    if fmt == "html":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ReportError(
                "the HTML report needs the office install: pip install 'cngmrv[office]'"
            ) from None
        return to_html(report)
    raise ReportError(f"unknown format {fmt!r} (csv, json, html; xlsx through workbook.write)")
