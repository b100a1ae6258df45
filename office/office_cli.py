"""The office's subcommands: ``cngmrv ingest`` and ``cngmrv report``.

Contributed to the ``cngmrv`` command line through the ``cngmrv.commands``
entry-point group, as the simulator contributes ``sim``, so the bus's CLI
never imports the office.  Each command imports its module only when run: a
``--help`` stays cheap.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def _ingest(args: argparse.Namespace) -> int:
    from cngmrv.office.fleetdb import SCHEMA_VERSION, IngestDB, migrate_db, redact
    from cngmrv.office.ingest import Ingest, IngestServer, open_db, register_device

    if args.migrate:
        db = IngestDB(args.db, check_version=False)
        try:
            before, after = migrate_db(db)
        finally:
            db.close()
        what = "already at" if before == after else f"migrated from schema version {before} to"
        print(f"ingest database {redact(args.db)}: {what} schema version {SCHEMA_VERSION}")
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
                f"{d['device_id']}: {d['batches']} batches, last {d['last_seq']}, "
                f"gaps {gaps}, {len(d['alarms'])} alarms"
            )
            for a in d["alarms"]:
                print(f"  ALARM {a['kind']} seq {a['seq']}: {a['detail']}")
        return 0
    server = IngestServer(args.db, args.host, args.port)
    for item in args.register or []:
        device_id, sep, pub = item.partition("=")
        if not sep:
            raise ValueError(f"--register takes DEVICE_ID=PUBKEY_FILE, got {item!r}")
        kid = register_device(server.db, device_id, Path(pub).read_bytes())
        print(f"registered {device_id} kid {kid}", file=sys.stderr)
    print(f"ingest listening on {server.url}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    return 0


def _report(args: argparse.Namespace) -> int:
    # Imported here: the report (and matplotlib for HTML) loads only when asked for.
    from cngmrv.office import mrv, report

    methodology = mrv.load(Path(args.methodology) if args.methodology else None)
    fmt = "json" if args.json else args.format
    start = report.parse_when(args.date_from) if args.date_from else None
    end = report.parse_when(args.date_to, end=True) if args.date_to else None
    rep = report.build(
        args.db, methodology, start, end, args.bus, args.coverage_floor, args.recompute
    )
    text = report.render(rep, fmt)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        d = rep.data
        print(
            f"wrote {args.out}: ER {d['er_kg_co2'] / 1000:.3f} t CO2 "
            f"({d['er_t_co2_rounded']:g} t rounded down), {len(d['buses'])} buses, "
            f"flagged: {', '.join(d['flagged']) or 'none'}",
            file=sys.stderr,
        )
    else:
        sys.stdout.write(text)
    return 0


def register_ingest(sub: Any) -> None:
    """Add ``cngmrv ingest`` (entry point group ``cngmrv.commands``)."""
    s = sub.add_parser("ingest", help="run the reference ingest server")
    s.add_argument(
        "--db", required=True, help="ingest database: SQLite file, or a postgresql:// URL"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument(
        "--register", action="append", metavar="DEVICE_ID=PUBKEY", help="register a device key"
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
    s.add_argument("--format", choices=("csv", "json", "html"), default="csv")
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
    s.set_defaults(func=_report)
