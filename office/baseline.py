"""Form B's reference consumption from a bus's own diesel-only data (``cngmrv sfc-ref``).

The baseline is the readings of one bus over a period in which it ran on
diesel alone (before the retrofit, or with the kit switched off): no metered
gas, no second in dual-fuel mode, diesel and distance fully covered.
``SFC_ref = sum(diesel_l) / sum(distance_km)`` over those readings, with the
FAME share of the blend they burned (volume-weighted, from the methodology's
schedule), so that the litres count by their energy later.  The result goes
into the project's methodology file as ``[bus_reference."DEVICE"]`` with its
provenance in ``source``; the file's other content and comments are kept.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cngmrv.office import mrv
from cngmrv.office.report import ReportError, read_source

COVERED = 0.999  # share of a reading's time diesel and distance must be covered


@dataclass(frozen=True)
class Reference:
    l_per_km: float
    fame_share_vol: float
    distance_km: float
    diesel_l: float
    source: str


def _check(bus: str, km: float, litres: float, min_km: float, where: str) -> None:
    if km < min_km:
        raise ReportError(
            f"{where}: only {km:.1f} km of diesel-only driving for {bus} (need {min_km:g} km)"
        )
    if litres <= 0:
        raise ReportError(f"{where}: no diesel recorded for {bus}")


def from_archive(
    path: Path, bus: str, start: datetime, end: datetime, min_km: float, m: mrv.Methodology
) -> Reference:
    """From the verified batches of an ingest database or device store."""
    _, devices = read_source(path, bus)
    lo, hi = start.timestamp(), end.timestamp()
    km = litres = fame_l = 0.0
    n = 0
    seqs: list[int] = []
    hashes: list[str] = []
    for b in devices[0].ok:
        used = False
        for r in b.payload().get("readings") or []:
            t0, dur = float(r["t0"]), float(r["dur"])
            if not lo <= t0 < hi or dur <= 0:
                continue
            cov = r.get("cov") or {}
            mode = r.get("mode_s") or {}
            if float(r["gas_kg"]) > 0 or float(mode.get("dual", 0.0)) > 0:
                continue
            if min(float(cov.get("diesel_l", 0)), float(cov.get("distance_km", 0))) < COVERED * dur:
                continue
            km += float(r["distance_km"])
            litres += float(r["diesel_l"])
            fame_l += float(r["diesel_l"]) * m.fame_share_at(t0)
            n += 1
            used = True
        if used:
            seqs.append(b.seq)
            hashes.append(b.file_hash.hex())
    _check(bus, km, litres, min_km, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    set_sha = hashlib.sha256(b"".join(bytes.fromhex(h) for h in hashes)).hexdigest()
    source = (
        f"derived by cngmrv sfc-ref on {datetime.now(UTC).date().isoformat()} from "
        f"{path.name} (sha256 {digest}): {n} diesel-only readings of {bus} between "
        f"{start.isoformat()} and {end.isoformat()}, {km:.3f} km, {litres:.3f} L; batches "
        f"{seqs[0]}..{seqs[-1]} ({len(seqs)} with readings, set sha256 {set_sha})"
    )
    return Reference(litres / km, fame_l / litres, km, litres, source)


def from_records(
    path: Path, bus: str, start: datetime, end: datetime, min_km: float, m: mrv.Methodology
) -> Reference:
    """From imported records: a CSV with columns ``date, distance_km, diesel_l`` (one bus)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"records {path}: cannot read: {e}") from None
    rows = csv.DictReader(text.splitlines())
    want = {"date", "distance_km", "diesel_l"}
    if set(rows.fieldnames or ()) != want:
        raise ReportError(f"records {path}, row 1: the header must be date, distance_km, diesel_l")
    km = litres = fame_l = 0.0
    n = 0
    for line, row in enumerate(rows, 2):
        try:
            day = datetime.fromisoformat(row["date"])
            d_km, d_l = float(row["distance_km"]), float(row["diesel_l"])
        except (TypeError, ValueError):
            raise ReportError(f"records {path}, row {line}: not a date and two numbers") from None
        if not (math.isfinite(d_km) and math.isfinite(d_l) and d_km >= 0 and d_l >= 0):
            raise ReportError(f"records {path}, row {line}: negative or non-finite figure")
        day = day if day.tzinfo else day.replace(tzinfo=UTC)
        if not start <= day < end:
            continue
        km += d_km
        litres += d_l
        fame_l += d_l * m.fame_share_at(day.timestamp())
        n += 1
    _check(bus, km, litres, min_km, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = (
        f"derived by cngmrv sfc-ref on {datetime.now(UTC).date().isoformat()} from imported "
        f"records {path.name} (sha256 {digest}): {n} days of {bus} between "
        f"{start.isoformat()} and {end.isoformat()}, {km:.3f} km, {litres:.3f} L"
    )
    return Reference(litres / km, fame_l / litres, km, litres, source)


def write(path: Path, bus: str, ref: Reference) -> None:
    """Set ``[bus_reference."BUS"]`` in the project file (replacing an older one), then check
    that the file still loads."""
    import tomlkit

    try:
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ReportError(f"cannot read methodology {path}: {e.strerror}") from None
    except tomlkit.exceptions.ParseError as e:
        raise ReportError(f"methodology {path}: not valid TOML: {e}") from None
    if "bus_reference" not in doc:
        doc["bus_reference"] = tomlkit.table(is_super_table=True)
    entry = tomlkit.table()
    entry["value"] = round(ref.l_per_km, 6)
    entry["unit"] = mrv.SFC_UNIT
    entry["fame_share_vol"] = round(ref.fame_share_vol, 6)
    entry["option"] = "C"
    entry["source"] = ref.source
    doc["bus_reference"][bus] = entry  # type: ignore[index]
    text = tomlkit.dumps(doc)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        mrv.load(tmp)
    except mrv.MethodologyError:
        tmp.unlink()
        raise
    tmp.replace(path)
