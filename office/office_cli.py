"""The office's subcommands: ``cngmrv ingest`` and ``cngmrv report``.

Contributed to the ``cngmrv`` command line through the ``cngmrv.commands``
entry-point group, as the simulator contributes ``sim``, so the bus's CLI
never imports the office.  Each command imports its module only when run: a
``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any


def _ingest(args: argparse.Namespace) -> int:
    from cngmrv.office.fleetdb import SCHEMA_VERSION, IngestDB, migrate_db, redact
    from cngmrv.office.ingest import (
        Ingest,
        open_db,
        register_device,
        register_key,
        revoke_key,
        revoke_key_since,
    )

    if args.migrate:
        db = IngestDB(args.db, check_version=False)
        try:
            before, after = migrate_db(db)
        finally:
            db.close()
        what = "already at" if before == after else f"migrated from schema version {before} to"
        print(f"ingest database {redact(args.db)}: {what} schema version {SCHEMA_VERSION}")
        return 0
    if args.revoke:
        db = open_db(args.db)
        try:
            for item in args.revoke:
                device_id, kid, at = _at(item, "--revoke", "DEVICE=KID@SEQ or DEVICE=KID@TIME")
                if isinstance(at, int):
                    seq, hit = at, revoke_key(db, device_id, kid, at)
                else:
                    seq, hit = revoke_key_since(db, device_id, kid, at.timestamp())
                since = "" if isinstance(at, int) else f" (the first it signed at {at.isoformat()})"
                print(
                    f"revoked {device_id} key {kid[:16]} from batch {seq}{since}"
                    f" ({hit} stored batches signed with it from there are now alarms)",
                    file=sys.stderr,
                )
        finally:
            db.close()
        if not args.report:
            return 0
    if args.report:
        db = open_db(args.db)
        try:
            devices = Ingest(db).report()
        finally:
            db.close()
        if args.json:
            print(json.dumps(devices))
        for d in [] if args.json else devices:
            gaps = ", ".join(f"{a}..{b}" for a, b in d["gaps"]) or "none"
            print(
                f"{d['device_id']}: {d['batches']} batches "
                f"({d['legacy_v1']} version 1, accepted under the legacy rules), "
                f"last {d['last_seq']}, gaps {gaps}, {len(d['alarms'])} alarms"
            )
            for kid, first, last in d["signed_by"]:
                print(f"  key {kid[:16]} signed batches {first}..{last}")
            for a in d["alarms"]:
                print(f"  ALARM {a['kind']} seq {a['seq']} ({a['repeats']}x): {a['detail']}")
        return 0
    # Read first: a token file others can read stops the ingest before it listens.
    token = _read_token(Path(args.read_token_file)) if args.read_token_file else None
    db = open_db(args.db)
    try:
        for item in args.register or []:
            device_id, sep, pub = item.partition("=")
            if not sep:
                raise ValueError(f"--register takes DEVICE_ID=PUBKEY_FILE[@SEQ], got {item!r}")
            path, at, seq = pub.rpartition("@")
            if at and seq.isdigit():
                kid = register_key(db, device_id, Path(path).read_bytes(), int(seq))
                print(f"registered {device_id} kid {kid} from batch {seq}", file=sys.stderr)
                continue
            kid = register_device(db, device_id, Path(pub).read_bytes())
            print(f"registered {device_id} kid {kid}", file=sys.stderr)
    finally:
        db.close()
    from cngmrv.office.ingest_serve import serve

    print(
        f"ingest listening on http://{args.host}:{args.port}/v1/batches "
        f"({args.workers} worker processes)",
        file=sys.stderr,
        flush=True,
    )
    # Only the limits given on the command line: the rest keep serve()'s defaults.
    limits = {
        "request_deadline_s": args.request_deadline,
        "max_connections": args.max_connections,
        "db_deadline_s": args.db_deadline,
        "retry_after_s": args.retry_after,
        "pool_size": args.pool,
    }
    serve(
        args.db,
        args.host,
        args.port,
        args.workers,
        forwarded_allow_ips=args.forwarded_allow_ips,
        read_token=token,
        **{k: v for k, v in limits.items() if v is not None},
    )
    return 0


def _at(item: str, option: str, form: str) -> tuple[str, str, int | datetime]:
    """DEVICE=VALUE@SEQ, or @TIME: an ISO 8601 time with its zone (a time without one
    would mean another moment on another operator's machine)."""
    device_id, sep, rest = item.partition("=")
    value, at, when = rest.rpartition("@")
    if not (sep and at and device_id and value and when):
        raise ValueError(f"{option} takes {form}, got {item!r}")
    if when.isdigit():
        return device_id, value, int(when)
    try:
        moment = datetime.fromisoformat(when)
    except ValueError:
        raise ValueError(
            f"{option}: {when!r} is neither a batch sequence nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(
            f"{option}: the time {when!r} needs its zone, e.g. {when}Z or {when}+07:00"
        )
    return device_id, value, moment


def _read_token(path: Path) -> str:
    """The operator's read token: the first line of a file that only its owner can read."""
    if path.stat().st_mode & 0o077:
        raise PermissionError(f"read token file {path} is accessible by group/others; chmod 600")
    lines = path.read_text(encoding="utf-8").splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ValueError(f"read token in {path} is shorter than 16 characters")
    return token


def _report(args: argparse.Namespace) -> int:
    # Imported here: the report (and matplotlib for HTML) loads only when asked for.
    from cngmrv.office import mrv, refills, report

    methodology = mrv.load(Path(args.methodology) if args.methodology else None)
    fmt = "json" if args.json else args.format
    start = report.parse_when(args.date_from) if args.date_from else None
    end = report.parse_when(args.date_to, end=True) if args.date_to else None
    records = refills.read(Path(args.refills)) if args.refills else None
    rep = report.build(
        args.db,
        methodology,
        start,
        end,
        args.bus,
        args.coverage_floor,
        args.recompute,
        refills=records,
        conservative_set=args.conservative,
    )
    if fmt == "xlsx":
        from cngmrv.office import workbook

        if not args.out:
            raise report.ReportError("--format xlsx writes a file: give --out FILE.xlsx")
        workbook.write(rep, Path(args.out))
        text = ""
    else:
        text = report.render(rep, fmt)
    if args.out:
        if fmt != "xlsx":
            Path(args.out).write_text(text, encoding="utf-8")
        d = rep.data
        print(
            f"wrote {args.out}: ER {d['er_kg_co2'] / 1000:.3f} t CO2 ("
            + (
                f"{d['er_t_co2_rounded']:g} t rounded down"
                if d["er_kg_co2"] > 0
                else "nothing to issue"
            )
            + f"), {len(d['buses'])} buses, "
            f"flagged: {', '.join(d['flagged']) or 'none'}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return 0


def _sfc_ref(args: argparse.Namespace) -> int:
    from cngmrv.office import baseline, mrv, report

    m = mrv.load(Path(args.methodology))
    start = report.parse_when(args.date_from)
    end = report.parse_when(args.date_to, end=True)
    if (args.db is None) == (args.records is None):
        raise report.ReportError("sfc-ref takes one of --db or --records")
    if args.db:
        ref = baseline.from_archive(Path(args.db), args.bus, start, end, args.min_km, m)
    else:
        ref = baseline.from_records(Path(args.records), args.bus, start, end, args.min_km, m)
    baseline.write(Path(args.methodology), args.bus, ref)
    print(
        f"{args.methodology}: [bus_reference.{args.bus}] = {ref.l_per_km:.5f} L/km "
        f"({ref.distance_km:.1f} km, {ref.diesel_l:.1f} L)",
        file=sys.stderr,
    )
    return 0


def register_ingest(sub: Any) -> None:
    """Add ``cngmrv ingest`` (entry point group ``cngmrv.commands``)."""
    s = sub.add_parser("ingest", help="run the ingest server (uvicorn, worker processes)")
    s.add_argument(
        "--db", required=True, help="ingest database: SQLite file, or a postgresql:// URL"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    s.add_argument("--pool", type=int, help="database connections per worker (default 4)")
    s.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections per worker, more are answered 503 (default 1000)",
    )
    s.add_argument(
        "--request-deadline",
        type=float,
        metavar="S",
        help="seconds a client has to send a whole request (default 30)",
    )
    s.add_argument(
        "--db-deadline",
        type=float,
        metavar="S",
        help="seconds a request may wait for the database before a 503 (default 5)",
    )
    s.add_argument(
        "--retry-after",
        type=int,
        metavar="S",
        help="the Retry-After of a 503, in seconds (default 10)",
    )
    s.add_argument(
        "--forwarded-allow-ips",
        metavar="IPS",
        help="trust X-Forwarded-* from these proxy addresses (e.g. 127.0.0.1)",
    )
    s.add_argument(
        "--register",
        action="append",
        metavar="DEVICE_ID=PUBKEY[@SEQ]",
        help="register a device key; with @SEQ, a registered device's next key from batch SEQ "
        "on (a rotation whose announcing batch never arrived)",
    )
    s.add_argument(
        "--revoke",
        action="append",
        metavar="DEVICE_ID=KID@SEQ|TIME",
        help="revoke a device key from batch SEQ on, or from an ISO 8601 TIME with its zone (the "
        "first batch it signed then, by the device's clock or the ingest's): later batches "
        "signed with it are refused "
        "and filed as alarms; then exit (with --report, report)",
    )
    s.add_argument(
        "--read-token-file",
        metavar="FILE",
        help="the operator's token for GET /v1/devices/<id> (file mode 0600); without it, off",
    )
    s.add_argument("--report", action="store_true", help="print gaps and alarms per device, exit")
    s.add_argument(
        "--migrate",
        action="store_true",
        help="bring the database's schema to this version's, then exit (docs/fleet-database.md)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_ingest)


def register_report(sub: Any) -> None:
    """Add ``cngmrv report`` (entry point group ``cngmrv.commands``)."""
    s = sub.add_parser("report", help="emission reductions per bus and period (csv/json/html)")
    s.add_argument(
        "--db",
        required=True,
        help="ingest database (fleet: SQLite file or postgresql:// URL) or device store (one bus)",
    )
    s.add_argument(
        "--recompute",
        action="store_true",
        help="re-derive every figure from the signed batch bytes, not the ingest's sums",
    )
    s.add_argument("--from", dest="date_from", metavar="DATE", help="YYYY-MM-DD or ISO time, UTC")
    s.add_argument("--to", dest="date_to", metavar="DATE", help="a date is inclusive (whole day)")
    s.add_argument("--format", choices=("csv", "json", "html", "xlsx"), default="csv")
    s.add_argument("--json", action="store_true", help="same as --format json")
    s.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    s.add_argument("--methodology", metavar="FILE", help="project methodology TOML")
    s.add_argument("--bus", metavar="ID", help="only this bus (device id)")
    s.add_argument(
        "--coverage-floor",
        type=float,
        metavar="X",
        help="flag a bus with coverage under X, 0..1 (default: the methodology's)",
    )
    s.add_argument(
        "--refills",
        metavar="CSV",
        help="dispenser records: time, device_id, station, kg, invoice_id (docs/mrv-methodology.md)",
    )
    s.add_argument(
        "--conservative",
        action="store_true",
        help="every ranged parameter at the end that lowers ER, boundary terms included",
    )
    s.set_defaults(func=_report)
    d = sub.add_parser(
        "sfc-ref",
        help="derive a bus's form B reference consumption from its diesel-only data "
        "and write it into a project methodology file",
    )
    d.add_argument("--db", help="ingest database or device store holding the baseline period")
    d.add_argument(
        "--records", metavar="CSV", help="imported records instead: date, distance_km, diesel_l"
    )
    d.add_argument("--bus", required=True, metavar="ID", help="the bus (device id)")
    d.add_argument("--from", dest="date_from", metavar="DATE", required=True)
    d.add_argument("--to", dest="date_to", metavar="DATE", required=True)
    d.add_argument(
        "--methodology", required=True, metavar="FILE", help="project methodology TOML to update"
    )
    d.add_argument(
        "--min-km", type=float, default=100.0, help="refuse a baseline shorter than this (km)"
    )
    d.set_defaults(func=_sfc_ref)
