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
import logging
import math
import multiprocessing
import operator
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
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


# Where each column sits in a row selected as COLUMNS (the report reads rows by position).
_AT = {c: i for i, c in enumerate(COLUMNS)}
_PART, _HOUR, _STATUS, _VERSION = _AT["part"], _AT["hour"], _AT["status"], _AT["sums_version"]
_READINGS, _FIRST_T0, _LAST_T1 = _AT["readings"], _AT["first_t0"], _AT["last_t1"]


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


def _valid_for(v: Sequence[Any], refill_kg: float) -> bool:
    """:meth:`Run.valid_for` of the stored row ``v``."""
    dmax, dmin = v[_DMAX_USE], v[_DMIN_REFILL]
    return (dmax is None or dmax <= refill_kg) and (dmin is None or refill_kg < dmin)


@functools.lru_cache(maxsize=1 << 10)
def _epochs_of(text: str | None) -> frozenset[int]:
    # A few distinct values over a fleet (the boots of a batch): parsed once each.
    return frozenset(int(e) for e in str(text or "").split(",") if e)


_COV = tuple((ch, _AT[f"cov_{ch}"]) for ch in rp.CHANNELS)
_GAPS = tuple((ch, _AT[f"gaps_{ch}"], _AT[f"longest_{ch}"]) for ch in rp.CHANNELS)
_MODE = tuple((m, _AT[f"mode_{m}"]) for m in rp.MODES)
_COV_GAS, _COV_DIESEL = _AT["cov_gas_kg"], _AT["cov_diesel_l"]
(_DUR, _DIESEL, _GAS, _DISTANCE, _CREDITED, _UNSYNCED) = (
    _AT[c]
    for c in ("dur_s", "diesel_l", "gas_kg", "distance_km", "distance_credited_km", "unsynced_s")
)
(_LFC_FIRST, _LFC_LAST, _LFC_FIRST_DIESEL, _LFC_REST) = (
    _AT[c] for c in ("lfc_first", "lfc_last", "lfc_first_diesel", "lfc_rest_diesel")
)
(_INJ_KG, _INJ_FLOW, _INJ_N) = (_AT[c] for c in ("inj_kg", "inj_flow_kg", "inj_n"))
(_TANK_FIRST, _TANK_FIRST_GAS, _TANK_LAST, _TANK_USED, _TANK_FLOW, _TANK_REFILLS, _TANK_N) = (
    _AT[c]
    for c in (
        "tank_first", "tank_first_gas", "tank_last", "tank_used_kg", "tank_flow_kg",
        "tank_refills", "tank_n",
    )
)  # fmt: skip
_DMAX_USE, _DMIN_REFILL, _EPOCHS = _AT["tank_dmax_use"], _AT["tank_dmin_refill"], _AT["epochs"]


def combine_stored(
    bus: rp.BusData, v: Sequence[Any], seq: int, sha: str, fame: float, refill_kg: float
) -> None:
    """:func:`combine` of the stored row ``v`` (COLUMNS' order, status ``ok``), its blend
    ``fame``: the same additions in the same order, without building its :class:`Run`.

    A fleet's report adds hundreds of thousands of stored runs: a Run each (its sums'
    dictionaries, its cross-checks) cost more than the additions.  tests/test_monitored.py
    holds it to :func:`combine` bit for bit.
    """
    hour_start = int(v[_HOUR])
    day = _day_of(hour_start)
    day_sums = bus.days.get(day)
    if day_sums is None:
        day_sums = bus.days[day] = rp.Sums()
    readings = int(v[_READINGS])
    dur, diesel, gas = v[_DUR], v[_DIESEL], v[_GAS]
    distance, credited = v[_DISTANCE], v[_CREDITED]
    first_t0, last_t1 = v[_FIRST_T0], v[_LAST_T1]
    for into in (bus.total, day_sums):
        into.readings += readings
        into.dur_s += dur
        into.diesel_l += diesel
        into.gas_kg += gas
        into.distance_km += distance
        into.distance_credited_km += credited
        cov, gaps, longest = into.cov, into.gaps, into.longest_gap_s
        for ch, i in _COV:
            cov[ch] += v[i]
        for ch, i, j in _GAPS:
            gaps[ch] += int(v[i])
            if v[j] > longest[ch]:
                longest[ch] = v[j]
        mode_s = into.mode_s
        for m, i in _MODE:
            mode_s[m] += v[i]
        into.unsynced_s += v[_UNSYNCED]
        if readings:
            part = into.parts.get(fame)
            if part is None:
                part = into.parts[fame] = [0.0, 0.0, 0.0, 0.0]
            part[0] += diesel
            part[1] += gas
            part[2] += distance
            part[3] += credited
        if first_t0 < into.first_t0:
            into.first_t0 = first_t0
        if last_t1 > into.last_t1:
            into.last_t1 = last_t1
        into.seqs[seq] = sha
    hour = bus.hours.get(hour_start)
    if hour is None:
        hour = bus.hours[hour_start] = [0.0, 0.0, 0.0]
    hour[0] += dur
    hour[1] += v[_COV_GAS]
    hour[2] += v[_COV_DIESEL]
    c = bus.checks
    if v[_LFC_FIRST] is not None:
        if c.lfc_first is None:
            c.lfc_first = v[_LFC_FIRST]
        else:
            c.lfc_diesel_l += float(v[_LFC_FIRST_DIESEL] or 0.0)
        c.lfc_diesel_l += v[_LFC_REST]
        c.lfc_last = v[_LFC_LAST]
    c.inj_kg += v[_INJ_KG]
    c.inj_flow_kg += v[_INJ_FLOW]
    c.inj_n += int(v[_INJ_N])
    tank_n = int(v[_TANK_N])
    if tank_n:
        tank_first = v[_TANK_FIRST]
        if c.tank_prev is not None and tank_first is not None:
            if tank_first - c.tank_prev > refill_kg:
                c.tank_refills += 1
            else:
                c.tank_used_kg += c.tank_prev - tank_first
                c.tank_flow_kg += float(v[_TANK_FIRST_GAS] or 0.0)
        c.tank_used_kg += v[_TANK_USED]
        c.tank_flow_kg += v[_TANK_FLOW]
        c.tank_refills += int(v[_TANK_REFILLS])
        c.tank_n += tank_n
        c.tank_prev = v[_TANK_LAST]
    epochs = _epochs_of(v[_EPOCHS])
    if epochs:
        bus.epochs |= epochs


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


@rp.paused_gc()
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
    try:
        held = Holdings(db, redact(db.target))
        if held.kind == "ingest":
            _refuse_newer(db)
        known = rp.buses_held(held, bus)
        kept = not (recompute or stock or "batch_runs" not in db.tables() or db.version() < 2)
        if held.kind == "ingest" and kept:
            keys, ranges = held.keys(), held.key_ranges()
            args = (keys, ranges, lo, hi, refill_kg, fame_at, fame_breaks)
            n = 1 if bus is not None else processes_for(len(known))
            if n == 1:
                return _kept(db, known, *args, whole=bus is None)
            return _kept_in_parallel(db, _slices(known, n), args)
        devices = rp.device_batches(held, known)
        for d in devices:
            rp._check(held.kind, d)
        return _recomputed(held.kind, devices, lo, hi, refill_kg, fame_at, stock)
    finally:
        db.close()


#: A fleet of at least this many devices is gathered in several processes, one per core
#: (below it, starting them and sending their totals back costs more than it saves):
#: measured with bench/fleet_report.py, docs/office.md.
PARALLEL_MIN_DEVICES = 1000


def processes_for(devices: int) -> int:
    """How many processes gather a fleet of ``devices`` (1: in this one)."""
    if devices < PARALLEL_MIN_DEVICES:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, devices // (PARALLEL_MIN_DEVICES // 2)))


def _slices(known: list[str], n: int) -> list[list[str]]:
    """``known`` (sorted) cut into ``n`` contiguous slices of about equal length."""
    size = len(known)
    return [known[i * size // n : (i + 1) * size // n] for i in range(n)]


_KeptArgs = tuple[
    dict[str, bytes],
    dict[str, list[tuple[bytes, int, int | None]]],
    float,
    float,
    float,
    "FameAt | None",
    Sequence[float],
]


def _kept_slice(source: str, snapshot: str | None, known: list[str], args: _KeptArgs) -> Totals:
    db = ReadOnlyDB(source, snapshot)
    try:
        return _kept(db, known, *args, whole=False)
    finally:
        db.close()


def _answer(
    conn: Connection, source: str, snapshot: str | None, known: list[str], args: _KeptArgs
) -> None:
    """A forked process's work: gather ``known``, send the totals (or the error) back."""
    out: tuple[str, Any]
    try:
        out = ("ok", _kept_slice(source, snapshot, known, args))
    except BaseException as e:  # sent to the parent, which raises it
        out = ("error", e)
    try:
        conn.send(out)
    except Exception as e:  # an exception that does not pickle: its text
        conn.send(("error", IngestError(f"gathering {known[0]}..{known[-1]}: {e}")))
    conn.close()


def _kept_in_parallel(db: ReadOnlyDB, slices: list[list[str]], args: _KeptArgs) -> Totals:
    """:func:`_kept` of each slice of devices in its own process, this one doing the first
    on ``db``; the totals in device order.

    Exactness does not depend on the split: each device's runs are added in the same
    order whichever process adds them, and the report combines buses in device order
    afterwards.  On PostgreSQL every process reads ``db``'s snapshot (exported, and held
    by ``db`` until they are done), so the fleet is read at one moment; on SQLite each
    process reads its own, a moment per slice.  Forked (the arguments, a methodology's
    ``fame_at`` among them, are not pickled); only the totals come back through a pipe.
    A child never touches the connection it inherits: it opens its own, and ends with
    ``os._exit`` (multiprocessing's fork), which closes nothing of the parent's.
    """
    source, snapshot = db.target, db.snapshot()
    ctx = multiprocessing.get_context("fork")
    # A forked child flushes the parent's buffered output as its own when it ends.
    sys.stdout.flush()
    sys.stderr.flush()
    workers: list[tuple[BaseProcess, Connection]] = []
    done = False
    try:
        for part in slices[1:]:
            here, there = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_answer, args=(there, source, snapshot, part, args), daemon=True
            )
            proc.start()
            there.close()
            workers.append((proc, here))
        got = [_kept(db, slices[0], *args, whole=False)]
        for (p, here), part in zip(workers, slices[1:], strict=True):
            try:
                status, value = here.recv()
            except EOFError:
                p.join()
                raise IngestError(
                    f"the process gathering {part[0]}..{part[-1]} ended without an answer "
                    f"(exit code {p.exitcode})"
                ) from None
            if status != "ok":
                raise value
            got.append(value)
        done = True
    finally:
        for p, here in workers:
            here.close()
            if not done and p.is_alive():
                p.terminate()
            p.join()
    return Totals(
        "ingest",
        KEPT,
        [d for t in got for d in t.devices],
        [b for t in got for b in t.buses],
    )


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
    whole: bool = True,
) -> Totals:
    """The totals of the devices ``known`` (sorted) from the stored runs; ``whole``: they are
    every device the database holds (no filter in SQL)."""
    big = 2**62
    only = functools.partial(_only, db, known, whole)
    # Every held batch's hash in one query (a fleet's devices one by one would be a round
    # trip each), cut to each bus's range of sequences below.  Hex once per batch: the
    # runs' sums and the trace share the string.
    hashes: dict[str, dict[int, str]] = {d: {} for d in known}
    sql, args = only("device_id")
    for dev, seq, sha in db.all(
        "SELECT device_id, seq, sha256 FROM batches WHERE 1 = 1" + sql, args, binary=True
    ):
        of_dev = hashes.get(dev)
        if of_dev is not None:
            of_dev[seq] = sha.hex()
    # Rows whose hour overlaps [lo, hi); those cut by lo or hi are re-derived below.
    sql, args = only("device_id")
    rows = db.all(
        f"SELECT {', '.join(COLUMNS)} FROM batch_runs "
        "WHERE ((hour > ? AND hour < ?) OR status = 'raw' OR sums_version <> ?)" + sql,
        (_bound_lo(lo, big), _bound(hi, big), SUMS_VERSION, *args),
        binary=True,
    )
    # Per device: (seq, part, blend, row, hash) of each stored run that answers exactly.
    stored: dict[str, list[tuple[Any, ...]]] = {d: [] for d in known}
    redo: set[tuple[str, int]] = set()
    breaks = tuple(fame_breaks)
    # The hours a change of blend falls in: a run elsewhere cannot hold one, and in an hour
    # without one every reading has the same blend (asked once per hour, not per run).
    cut = {int(k // 3600) * 3600 for k in breaks}
    blend_of: dict[int, float] = {}
    for v in rows:
        dev, seq = v[0], v[1]
        of_dev = hashes.get(dev)
        sha = None if of_dev is None else of_dev.get(seq)
        if sha is None:  # another device's, or a row without its batch
            continue
        if v[_STATUS] != "ok" or v[_VERSION] != SUMS_VERSION:
            if v[_STATUS] != "empty" or v[_VERSION] != SUMS_VERSION:
                redo.add((dev, seq))
            continue
        hour = v[_HOUR]
        if hour < lo or hour + 3600 > hi or not _valid_for(v, refill_kg):
            redo.add((dev, seq))
            continue
        fame = 0.0
        if fame_at is not None and v[_READINGS]:
            # The stored run holds share 0: it takes the blend in force, unless one changes
            # inside it.
            first, last = v[_FIRST_T0], v[_LAST_T1]
            within = hour <= first < hour + 3600 and last <= hour + 7200
            if not within or hour in cut or hour + 3600 in cut:
                if any(first < k < last for k in breaks):
                    redo.add((dev, seq))
                    continue
                fame = fame_at(first)
            else:
                known_blend = blend_of.get(hour)
                if known_blend is None:
                    known_blend = blend_of[hour] = fame_at(first)
                fame = known_blend
        stored[dev].append((seq, v[_PART], fame, v, sha))
    # Batches stored without sums (by a cngmrv from before them): decoded here.
    sql, args = only("b.device_id")
    for dev, seq in db.all(
        "SELECT b.device_id, b.seq FROM batches b WHERE NOT EXISTS (SELECT 1 FROM batch_runs r "
        "WHERE r.device_id = b.device_id AND r.seq = b.seq)" + sql,
        args,
    ):
        if str(dev) in stored:
            redo.add((str(dev), int(seq)))
    # Stored, then its key was revoked from before it (ingest.revoke_key): it no longer counts.
    revoked: dict[str, dict[str, list[str]]] = {}
    gone: set[tuple[str, int]] = set()
    sql, args = only("a.device_id")
    for dev, seq, detail in db.all(
        "SELECT a.device_id, a.seq, a.detail FROM alarms a JOIN batches b "
        "ON b.device_id = a.device_id AND b.seq = a.seq AND b.sha256 IS NOT NULL "
        "WHERE a.kind = 'revoked_key'" + sql,
        args,
    ):
        if str(dev) in stored:
            gone.add((str(dev), int(seq)))
            redo.discard((str(dev), int(seq)))
            revoked.setdefault(str(dev), {})[f"batch_seq {int(seq)}"] = [
                f"signed with a revoked key: {detail}"
            ]
    for dev, seq in sorted(redo):
        (raw,) = db.all("SELECT bytes FROM batches WHERE device_id=? AND seq=?", (dev, seq))[0]
        gone.add((dev, seq))
        for run in runs_of(stored_batch(bytes(raw)), lo, hi, refill_kg, fame_at):
            # A decoded run: no blend, row or hash, it carries its own.
            stored[dev].append((seq, run.part, None, run, None))
    if redo:
        log.info("event=report_drill_down batches=%d", len(redo))
    devices, buses = [], []
    sql, args = only("device_id")
    missing = _missing(db, known, sql, args)
    for dev in known:
        d = rp.DeviceBatches(dev, [], keys.get(dev), key_ranges=ranges.get(dev, []))
        # The ingest verified each batch on arrival, under the key valid for its sequence.
        d.signatures = rp.SIGNATURES
        d.excluded = revoked.get(dev, {})
        d.missing = missing.get(dev, [])
        bus = rp.BusData(dev)
        runs = stored[dev]
        if gone:
            runs = [r for r in runs if r[2] is None or (dev, r[0]) not in gone]
        # In batch sequence, then run, order: the one order both ways add in.
        runs.sort(key=_SEQ_PART)
        for seq, _, fame, v, sha in runs:
            if fame is None:
                combine(bus, v, refill_kg)
            else:
                combine_stored(bus, v, seq, sha, fame, refill_kg)
        of_dev = hashes[dev]
        if bus.total.seqs:
            first, last = min(bus.total.seqs), max(bus.total.seqs)
            d.held = {s: h for s, h in sorted(of_dev.items()) if first <= s <= last}
        if of_dev:
            d.signed_by = _signed_by(d, min(of_dev), max(of_dev))
        devices.append(d)
        buses.append(bus)
    return Totals("ingest", KEPT, devices, buses)


_SEQ_PART = operator.itemgetter(0, 1)


def _only(db: ReadOnlyDB, known: list[str], whole: bool, col: str) -> tuple[str, tuple[Any, ...]]:
    """The SQL condition (`` AND ...``) and arguments that select the devices ``known``."""
    if whole:
        return "", ()
    if len(known) == 1:
        return f" AND {col} = ?", (known[0],)
    # A contiguous slice of the sorted ids.  Python orders strings by code point, as SQLite's
    # BINARY and PostgreSQL's "C" collation do (UTF-8 keeps it); the database's own
    # collation may not.  A superset would do too: rows of other devices are skipped.
    collate = ' COLLATE "C"' if db.dialect == "postgresql" else ""
    return f" AND {col}{collate} >= ? AND {col}{collate} <= ?", (known[0], known[-1])


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
