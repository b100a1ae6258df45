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
from pathlib import Path
from typing import Any


def _ingest(args: argparse.Namespace) -> int:
    from cngmrv.office.ingest import Ingest, open_db, register_device

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
    db = open_db(args.db)
    try:
        for item in args.register or []:
            device_id, sep, pub = item.partition("=")
            if not sep:
                raise ValueError(f"--register takes DEVICE_ID=PUBKEY_FILE, got {item!r}")
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
        **{k: v for k, v in limits.items() if v is not None},
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    # Imported here: the report (and matplotlib for HTML) loads only when asked for.
    from cngmrv.office import mrv, report

    methodology = mrv.load(Path(args.methodology) if args.methodology else None)
    fmt = "json" if args.json else args.format
    start = report.parse_when(args.date_from) if args.date_from else None
    end = report.parse_when(args.date_to, end=True) if args.date_to else None
    rep = report.build(Path(args.db), methodology, start, end, args.bus, args.coverage_floor)
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
        "--register", action="append", metavar="DEVICE_ID=PUBKEY", help="register a device key"
    )
    s.add_argument("--report", action="store_true", help="print gaps and alarms per device, exit")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_ingest)


def register_report(sub: Any) -> None:
    """Add ``cngmrv report`` (entry point group ``cngmrv.commands``)."""
    s = sub.add_parser("report", help="emission reductions per bus and period (csv/json/html)")
    s.add_argument("--db", required=True, help="ingest database (fleet) or device store (one bus)")
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
