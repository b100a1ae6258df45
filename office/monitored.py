"""The report's monitored totals: per-batch sums kept by the ingest, or recomputed from bytes.

The ingest stores, in the transaction that stores a batch, what the batch's
readings add to the report (``batch_runs``): one row per *run*, a maximal
stretch of the batch's readings in one UTC hour, holding the sums of
:class:`~cngmrv.office.report.Sums` and the partial state of the cross-checks
(:class:`~cngmrv.office.report.CrossCheck`).  The report then selects the
runs of its period in SQL and combines them per bus, day and hour
(:func:`gather`); it decodes a batch (the per-bus drill-down) only where a
stored row cannot answer exactly:

- the run's hour is cut by ``--from``/``--to``;
- the methodology's refill threshold would classify one of the run's tank
  steps differently from the threshold the ingest used (each row keeps the
  interval of thresholds it is valid for);
- the row was written by other sums code (``sums_version``), could not be
  derived at ingest (``status='raw'``), or is missing (a batch stored by a
  cngmrv without this table).

``recompute=True`` re-derives every figure from the raw signed bytes instead:
every batch is verified again and its runs computed with the same
:func:`runs_of`.  Both ways combine the same runs in the same order
(device, batch sequence, run), with plain float additions done here and not
in SQL: a database's ``SUM`` over floats adds in an order of its choosing
(and SQLite compensates rounding, PostgreSQL does not), so SQL sums would
differ from each other and from a recompute in the last bits.  With the
combination here, both ways and both databases give the same figures, bit
for bit (tests/test_fleetdb.py).
"""

from __future__ import annotations

import functools
import gc
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cngmrv.office import refills as refill_records
from cngmrv.office import report as rp
from cngmrv.office.fleetdb import IngestError, ReadOnlyDB, redact, stored_batch
from cngmrv.signed import batch, reading
from cngmrv.signed.archive import Holdings

if TYPE_CHECKING:
    from cngmrv.office.fleetdb import IngestDB

log = logging.getLogger("cngmrv.monitored")

#: Bump when what a run row holds, or how it is computed from readings, changes:
#: rows of another version are then re-derived from the batch bytes by the report.
# The diesel blend in force at an epoch time: its FAME share by volume.
FameAt = Callable[[float], float]

SUMS_VERSION = 1

#: The refill threshold the ingest classifies tank steps with.  Any value works:
#: each row keeps the interval of thresholds its classification holds for.
INGEST_REFILL_KG = 2.0

_FLOATS = (
    ["dur_s", "diesel_l", "gas_kg", "distance_km", "distance_credited_km"]
    + [f"cov_{ch}" for ch in rp.CHANNELS]
    + [f"longest_{ch}" for ch in rp.CHANNELS]
    + [f"mode_{m}" for m in rp.MODES]
    + ["unsynced_s", "first_t0", "last_t1"]
    + ["lfc_first", "lfc_last", "lfc_first_diesel", "lfc_rest_diesel"]
    + ["inj_kg", "inj_flow_kg"]
    + ["tank_first", "tank_first_gas", "tank_last", "tank_used_kg", "tank_flow_kg"]
    + ["tank_dmax_use", "tank_dmin_refill"]
)
_INTS = ["readings"] + [f"gaps_{ch}" for ch in rp.CHANNELS] + ["inj_n", "tank_refills", "tank_n"]
_KEY = ["device_id", "seq", "part", "hour", "status", "sums_version"]
COLUMNS = (*_KEY, *_INTS, *_FLOATS, "epochs")


def create_table(db: IngestDB) -> None:
    _, real = db.types
    cols = ", ".join(
        [f"{c} BIGINT" for c in _INTS] + [f"{c} {real}" for c in _FLOATS] + ["epochs TEXT"]
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS batch_runs (device_id TEXT NOT NULL, seq BIGINT NOT NULL, "
        "part INTEGER NOT NULL, hour BIGINT, status TEXT NOT NULL, "
        f"sums_version INTEGER NOT NULL, {cols}, PRIMARY KEY (device_id, seq, part))"
    )
    db.execute("CREATE INDEX IF NOT EXISTS batch_runs_hour ON batch_runs (hour)")


# -- runs -------------------------------------------------------------------------


@dataclass
class Run:
    """What one run of a batch's readings adds: sums and the cross-checks' partial state."""

    device_id: str
    seq: int
    part: int
    hour: int
    sha: str  # the batch file's SHA-256, hex
    sums: rp.Sums = field(default_factory=rp.Sums)
    checks: rp.CrossCheck = field(default_factory=rp.CrossCheck)
    lfc_first_diesel: float | None = None
    tank_first_gas: float | None = None
    tank_first: float | None = None
    tank_dmax_use: float | None = None
    tank_dmin_refill: float | None = None
    epochs: set[int] = field(default_factory=set)

    def add(self, r: dict[str, Any], refill_kg: float, fame: float = 0.0) -> None:
        self.sums.add(r, rp.credited_km(r), self.seq, self.sha, fame)
        c = self.checks
        if c.lfc_first is None and rp._opt_number(r.get("lfc_total_l")) is not None:
            self.lfc_first_diesel = float(r["diesel_l"])
        tank = rp._opt_number(r.get("tank_kg"))
        if tank is not None:
            if c.tank_prev is None:
                self.tank_first, self.tank_first_gas = tank, float(r["gas_kg"])
            else:
                step = tank - c.tank_prev
                if step > refill_kg:
                    self.tank_dmin_refill = _min(self.tank_dmin_refill, step)
                else:
                    self.tank_dmax_use = _max(self.tank_dmax_use, step)
        c.add(r, refill_kg)
        if isinstance(r.get("epoch"), int):
            self.epochs.add(r["epoch"])

    def valid_for(self, refill_kg: float) -> bool:
        """Whether its tank steps classify the same under ``refill_kg`` as when computed."""
        return (self.tank_dmax_use is None or self.tank_dmax_use <= refill_kg) and (
            self.tank_dmin_refill is None or refill_kg < self.tank_dmin_refill
        )


def _min(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _max(a: float | None, b: float) -> float:
    return b if a is None else max(a, b)


def runs_of(
    b: batch.Batch,
    lo: float = -math.inf,
    hi: float = math.inf,
    refill_kg: float = INGEST_REFILL_KG,
    fame_at: FameAt | None = None,
    payload: dict[str, Any] | None = None,
) -> list[Run]:
    """The runs of ``b``'s readings, each summing only its readings with ``lo <= t0 < hi``.

    Runs are cut by hour over all readings, before the period filter, so a
    run's identity (``part``) does not depend on the period.  Runs with no
    reading in the period are left out.  Raises on a payload the report could
    not read either (BatchFormatError, KeyError, TypeError, ValueError).
    ``fame_at`` gives each reading's diesel blend (FAME share by volume); the
    ingest stores runs without it (share 0), relabelled by :func:`gather`.
    ``payload``: ``b.payload()`` when the caller decoded it already.
    """
    sha = b.file_hash.hex()
    runs: list[Run] = []
    part, hour, cur = -1, None, None
    for r in (b.payload() if payload is None else payload).get("readings") or []:
        why = reading.problem(r)
        if why is not None:
            raise ValueError(why)
        t0 = float(r["t0"])
        h = int(t0 // 3600) * 3600
        if h != hour:
            part, hour, cur = part + 1, h, None
        if not lo <= t0 < hi:
            continue
        if cur is None:
            cur = Run(b.device_id, b.seq, part, h, sha)
            runs.append(cur)
        cur.add(r, refill_kg, 0.0 if fame_at is None else fame_at(t0))
    return runs


def _row(run: Run) -> tuple[Any, ...]:
    s, c = run.sums, run.checks
    values: dict[str, Any] = {
        "device_id": run.device_id,
        "seq": run.seq,
        "part": run.part,
        "hour": run.hour,
        "status": "ok",
        "sums_version": SUMS_VERSION,
        "readings": s.readings,
        "dur_s": s.dur_s,
        "diesel_l": s.diesel_l,
        "gas_kg": s.gas_kg,
        "distance_km": s.distance_km,
        "distance_credited_km": s.distance_credited_km,
        **{f"cov_{ch}": s.cov[ch] for ch in rp.CHANNELS},
        **{f"gaps_{ch}": s.gaps[ch] for ch in rp.CHANNELS},
        **{f"longest_{ch}": s.longest_gap_s[ch] for ch in rp.CHANNELS},
        **{f"mode_{m}": s.mode_s[m] for m in rp.MODES},
        "unsynced_s": s.unsynced_s,
        "first_t0": s.first_t0,
        "last_t1": s.last_t1,
        "lfc_first": c.lfc_first,
        "lfc_last": c.lfc_last,
        "lfc_first_diesel": run.lfc_first_diesel,
        "lfc_rest_diesel": c.lfc_diesel_l,
        "inj_kg": c.inj_kg,
        "inj_flow_kg": c.inj_flow_kg,
        "inj_n": c.inj_n,
        "tank_first": run.tank_first,
        "tank_first_gas": run.tank_first_gas,
        "tank_last": c.tank_prev,
        "tank_used_kg": c.tank_used_kg,
        "tank_flow_kg": c.tank_flow_kg,
        "tank_refills": c.tank_refills,
        "tank_n": c.tank_n,
        "tank_dmax_use": run.tank_dmax_use,
        "tank_dmin_refill": run.tank_dmin_refill,
        "epochs": ",".join(str(e) for e in sorted(run.epochs)),
    }
    return tuple(values[k] for k in COLUMNS)


def _run(row: dict[str, Any], sha: str) -> Run:
    run = Run(str(row["device_id"]), int(row["seq"]), int(row["part"]), int(row["hour"]), sha)
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


_INSERT = f"INSERT INTO batch_runs({', '.join(COLUMNS)}) VALUES({', '.join('?' * len(COLUMNS))})"
_MARK = "INSERT INTO batch_runs(device_id, seq, part, status, sums_version, readings) "
_MARK += "VALUES(?, ?, 0, ?, ?, 0)"


def store(db: IngestDB, b: batch.Batch, payload: dict[str, Any] | None = None) -> None:
    """Store ``b``'s runs; call in the transaction that stores the batch.

    ``payload``: ``b.payload()``, when the caller decoded it already (the ingest,
    verifying the batch: :func:`cngmrv.signed.batch.check_payload`).

    A batch with no readings gets one ``empty`` row, and one whose readings
    the sums code cannot read a ``raw`` row (the report then decodes it as
    before): the batch itself is stored either way.
    """
    try:
        runs = runs_of(b, payload=payload)
    except (batch.BatchFormatError, KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning(
            "event=batch_sums_underivable device=%s seq=%d error=%r", b.device_id, b.seq, str(e)
        )
        db.execute(_MARK, (b.device_id, b.seq, "raw", SUMS_VERSION))
        return
    if not runs:
        db.execute(_MARK, (b.device_id, b.seq, "empty", SUMS_VERSION))
    db.executemany(_INSERT, [_row(run) for run in runs])


def backfill(db: IngestDB) -> int:
    """Store the runs of every stored batch that has none (a migration); returns how many."""
    todo = db.all(
        "SELECT device_id, seq FROM batches b WHERE NOT EXISTS (SELECT 1 FROM batch_runs r "
        "WHERE r.device_id = b.device_id AND r.seq = b.seq)"
    )
    for dev, seq in todo:
        row = db.one("SELECT bytes FROM batches WHERE device_id=? AND seq=?", (dev, seq))
        store(db, stored_batch(bytes(row[0])))
    return len(todo)


# -- combining ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def _day_of(hour: int) -> str:
    # The UTC date of an hour, asked once per run of a fleet's report: remembered.
    return datetime.fromtimestamp(hour, UTC).date().isoformat()


def combine(bus: rp.BusData, run: Run, refill_kg: float) -> None:
    """Add one run to a bus's totals, day and hour: the one place runs are summed."""
    s = run.sums
    day = _day_of(run.hour)
    day_sums = bus.days.get(day)
    if day_sums is None:
        day_sums = bus.days[day] = rp.Sums()
    for into in (bus.total, day_sums):
        rp._merge_sums(into, s)
        into.seqs[run.seq] = run.sha
    hour = bus.hours.setdefault(run.hour, [0.0, 0.0, 0.0])
    hour[0] += s.dur_s
    hour[1] += s.cov["gas_kg"]
    hour[2] += s.cov["diesel_l"]
    c, p = bus.checks, run.checks
    if p.lfc_first is not None:
        if c.lfc_first is None:
            c.lfc_first = p.lfc_first
        else:
            c.lfc_diesel_l += float(run.lfc_first_diesel or 0.0)
        c.lfc_diesel_l += p.lfc_diesel_l
        c.lfc_last = p.lfc_last
    c.inj_kg += p.inj_kg
    c.inj_flow_kg += p.inj_flow_kg
    c.inj_n += p.inj_n
    if p.tank_n:
        if c.tank_prev is not None and run.tank_first is not None:
            # The step from the previous run's last tank reading to this run's first.
            if run.tank_first - c.tank_prev > refill_kg:
                c.tank_refills += 1
            else:
                c.tank_used_kg += c.tank_prev - run.tank_first
                c.tank_flow_kg += float(run.tank_first_gas or 0.0)
        c.tank_used_kg += p.tank_used_kg
        c.tank_flow_kg += p.tank_flow_kg
        c.tank_refills += p.tank_refills
        c.tank_n += p.tank_n
        c.tank_prev = p.tank_prev
    bus.epochs |= run.epochs


# -- the seam: where the report gets its monitored totals -------------------------------


@dataclass
class Totals:
    """What :func:`gather` gives the report: per device, its batches' outcome and its sums."""

    kind: str  # "ingest" or "store"
    how: str  # "per-batch sums kept by the ingest" or "recomputed from the signed bytes"
    devices: list[rp.DeviceBatches]
    buses: list[rp.BusData]


RECOMPUTED = "recomputed from the signed batch bytes"
KEPT = "per-batch sums kept by the ingest, checked on arrival"


def gather(
    source: str | Path,
    lo: float,
    hi: float,
    refill_kg: float,
    bus: str | None = None,
    recompute: bool = False,
    fame_at: FameAt | None = None,
    fame_breaks: Sequence[float] = (),
    stock: bool = False,
) -> Totals:
    """The monitored totals of readings with ``lo <= t0 < hi``, per bus, day and hour.

    ``source`` is a device store or an ingest database (SQLite file or
    ``postgresql://`` URL), opened read-only.  An ingest database at schema 2
    or later answers from its per-batch sums unless ``recompute``; a device
    store, or an older ingest database, is always recomputed from its bytes.

    ``fame_at`` splits the sums by the diesel blend of each reading; a stored
    run is relabelled with its blend when no change of blend (``fame_breaks``,
    the schedule's period bounds) falls inside it, and decoded otherwise.
    ``stock`` (the tank stock per bus and day, for dispenser records) follows
    every reading in order, which no stored sum holds: it is always recomputed.
    """
    db = ReadOnlyDB(source)
    # A fleet's runs are hundreds of thousands of objects that all live to the end: the
    # cyclic collector would re-scan the growing heap again and again (most of the time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        held = Holdings(db, redact(db.target))
        if held.kind == "ingest":
            _refuse_newer(db)
        known = rp.buses_held(held, bus)
        kept = not (recompute or stock or "batch_runs" not in db.tables() or db.version() < 2)
        if held.kind == "ingest" and kept:
            keys, ranges = held.keys(), held.key_ranges()
            return _kept(db, known, keys, ranges, lo, hi, refill_kg, fame_at, fame_breaks)
        devices = rp.device_batches(held, known)
        for d in devices:
            rp._check(held.kind, d)
        return _recomputed(held.kind, devices, lo, hi, refill_kg, fame_at, stock)
    finally:
        if collecting:
            gc.enable()
        db.close()


def _refuse_newer(db: ReadOnlyDB) -> None:
    from cngmrv.office.fleetdb import SCHEMA_VERSION

    held = db.version()
    if held > SCHEMA_VERSION:
        raise IngestError(
            f"ingest database {redact(db.target)} is at schema version {held}, written by a "
            f"newer cngmrv; this one reads versions up to {SCHEMA_VERSION}: upgrade cngmrv"
        )


def _recomputed(
    kind: str,
    devices: list[rp.DeviceBatches],
    lo: float,
    hi: float,
    refill_kg: float,
    fame_at: FameAt | None = None,
    stock: bool = False,
) -> Totals:
    buses = []
    for d in devices:
        bus = rp.BusData(d.device_id)
        for b in d.ok:
            for run in runs_of(b, lo, hi, refill_kg, fame_at):
                combine(bus, run, refill_kg)
            if stock:
                _add_stock(bus, b, lo, hi)
        d.held = {b.seq: b.file_hash.hex() for b in d.ok}
        buses.append(bus)
    return Totals(kind, RECOMPUTED, devices, buses)


def _add_stock(bus: rp.BusData, b: batch.Batch, lo: float, hi: float) -> None:
    for r in b.payload().get("readings") or []:
        t0 = float(r["t0"])
        if lo <= t0 < hi:
            day = datetime.fromtimestamp(t0, UTC).date().isoformat()
            bus.stock.add(r)
            bus.day_stock.setdefault(day, refill_records.Stock()).add(r)


def _relabel(run: Run, fame_at: FameAt, breaks: Sequence[float]) -> bool:
    """Give a stored run (share 0) its blend; False when the blend may change inside it."""
    s = run.sums
    if not s.readings:
        return True
    if any(s.first_t0 < k < s.last_t1 for k in breaks):
        return False
    s.parts = {fame_at(s.first_t0): s.parts[0.0]}
    return True


def _bound(hi: float, big: int) -> int:
    # An hour h overlaps [..., hi) when h < hi, that is h < ceil(hi).
    return big if math.isinf(hi) else math.ceil(hi)


def _bound_lo(lo: float, big: int) -> int:
    # An hour h overlaps [lo, ...) when h + 3600 > lo, that is h > floor(lo) - 3600.
    return -big if math.isinf(lo) else math.floor(lo) - 3600


def _kept(
    db: ReadOnlyDB,
    known: list[str],
    keys: dict[str, bytes],
    ranges: dict[str, list[tuple[bytes, int, int | None]]],
    lo: float,
    hi: float,
    refill_kg: float,
    fame_at: FameAt | None = None,
    fame_breaks: Sequence[float] = (),
) -> Totals:
    big = 2**62
    one = len(known) == 1
    dev_sql = " AND r.device_id = ?" if one else ""
    dev_arg: tuple[Any, ...] = (known[0],) if one else ()
    # Rows whose hour overlaps [lo, hi); those cut by lo or hi are re-derived below.
    rows = db.all(
        f"SELECT {', '.join('r.' + c for c in COLUMNS)}, b.sha256 FROM batch_runs r "
        "JOIN batches b ON b.device_id = r.device_id AND b.seq = r.seq "
        "WHERE ((r.hour > ? AND r.hour < ?) OR r.status = 'raw' OR r.sums_version <> ?)" + dev_sql,
        (_bound_lo(lo, big), _bound(hi, big), SUMS_VERSION, *dev_arg),
    )
    runs: dict[str, dict[int, list[Run]]] = {d: {} for d in known}
    redo: set[tuple[str, int]] = set()
    for values in rows:
        row = dict(zip(COLUMNS, values, strict=False))
        dev, seq = str(row["device_id"]), int(row["seq"])
        if dev not in runs:
            continue
        if row["status"] != "ok" or row["sums_version"] != SUMS_VERSION:
            if row["status"] != "empty" or row["sums_version"] != SUMS_VERSION:
                redo.add((dev, seq))
            continue
        run = _run(row, bytes(values[-1]).hex())
        if run.hour < lo or run.hour + 3600 > hi or not run.valid_for(refill_kg):
            redo.add((dev, seq))
        elif fame_at is not None and not _relabel(run, fame_at, fame_breaks):
            redo.add((dev, seq))
        runs[dev].setdefault(seq, []).append(run)
    # Batches stored without sums (by a cngmrv from before them): decoded here.
    for dev, seq in db.all(
        "SELECT b.device_id, b.seq FROM batches b WHERE NOT EXISTS (SELECT 1 FROM batch_runs r "
        "WHERE r.device_id = b.device_id AND r.seq = b.seq)" + dev_sql.replace("r.", "b."),
        dev_arg,
    ):
        if str(dev) in runs:
            redo.add((str(dev), int(seq)))
    # Stored, then its key was revoked from before it (ingest.revoke_key): it no longer counts.
    revoked: dict[str, dict[str, list[str]]] = {}
    for dev, seq, detail in db.all(
        "SELECT a.device_id, a.seq, a.detail FROM alarms a JOIN batches b "
        "ON b.device_id = a.device_id AND b.seq = a.seq AND b.sha256 IS NOT NULL "
        "WHERE a.kind = 'revoked_key'" + dev_sql.replace("r.", "a."),
        dev_arg,
    ):
        if str(dev) in runs:
            runs[str(dev)].pop(int(seq), None)
            redo.discard((str(dev), int(seq)))
            revoked.setdefault(str(dev), {})[f"batch_seq {int(seq)}"] = [
                f"signed with a revoked key: {detail}"
            ]
    for dev, seq in sorted(redo):
        (raw,) = db.all("SELECT bytes FROM batches WHERE device_id=? AND seq=?", (dev, seq))[0]
        runs[dev][seq] = runs_of(stored_batch(bytes(raw)), lo, hi, refill_kg, fame_at)
    if redo:
        log.info("event=report_drill_down batches=%d", len(redo))
    devices, buses = [], []
    missing = _missing(db, known, dev_sql.replace("r.", ""), dev_arg)
    # Every held batch's hash in one query (a fleet's devices one by one would be a round
    # trip each), cut to each bus's range of sequences below.
    hashes: dict[str, dict[int, bytes]] = {d: {} for d in known}
    for dev, seq, sha in db.all(
        "SELECT device_id, seq, sha256 FROM batches WHERE 1 = 1" + dev_sql.replace("r.", ""),
        dev_arg,
    ):
        if str(dev) in hashes:
            hashes[str(dev)][int(seq)] = bytes(sha)
    held_range = {dev: (min(h), max(h)) for dev, h in hashes.items() if h}
    for dev in known:
        d = rp.DeviceBatches(dev, [], keys.get(dev), key_ranges=ranges.get(dev, []))
        # The ingest verified each batch on arrival, under the key valid for its sequence.
        d.signatures = rp.SIGNATURES
        d.excluded = revoked.get(dev, {})
        d.missing = missing.get(dev, [])
        bus = rp.BusData(dev)
        for seq in sorted(runs[dev]):
            for run in sorted(runs[dev][seq], key=lambda r: r.part):
                combine(bus, run, refill_kg)
        if bus.total.seqs:
            first, last = min(bus.total.seqs), max(bus.total.seqs)
            d.held = {s: h.hex() for s, h in sorted(hashes[dev].items()) if first <= s <= last}
        if dev in held_range:
            d.signed_by = _signed_by(d, *held_range[dev])
        devices.append(d)
        buses.append(bus)
    return Totals("ingest", KEPT, devices, buses)


def _signed_by(d: rp.DeviceBatches, first: int, last: int) -> list[tuple[str, int, int]]:
    """Which key signed each part of ``first..last``, from the ranges the ingest held them
    to when it stored them (a batch outside its key's range is refused, never stored; one
    stored before its key was revoked from an earlier sequence is excluded)."""
    ring = d.keyring()
    out = []
    for kid in ring.keys:
        a, b = ring.limits[(d.device_id, kid)]
        lo_, hi_ = max(a, first), last if b is None else min(b, last)
        if lo_ <= hi_:
            out.append((kid, lo_, hi_))
    return sorted(out, key=lambda r: r[1])


def _missing(
    db: ReadOnlyDB, known: Iterable[str], dev_sql: str, dev_arg: tuple[Any, ...]
) -> dict[str, list[tuple[int, int]]]:
    """Per device, the ranges of batch sequences not held, from 0 to the last held."""
    out: dict[str, list[tuple[int, int]]] = {}
    for dev, seq, prev in db.all(
        "SELECT device_id, seq, prev FROM (SELECT device_id, seq, "
        "LAG(seq) OVER (PARTITION BY device_id ORDER BY seq) AS prev FROM batches "
        "WHERE 1 = 1" + dev_sql + ") t WHERE (prev IS NULL AND seq > 0) OR seq > prev + 1",
        dev_arg,
    ):
        first = 0 if prev is None else int(prev) + 1
        out.setdefault(str(dev), []).append((first, int(seq) - 1))
    return {k: sorted(v) for k, v in out.items()}
