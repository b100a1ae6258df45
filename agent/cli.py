"""The ``cngmrv`` command line.

Subcommands live here, except those other packages contribute through the
``cngmrv.commands`` entry-point group (``sim`` comes from ``cngmrv.sim``), so
the agent never imports the simulator.  Every failure the user can cause
(a missing key, an unreadable store, a bad option) ends in one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path
from typing import NoReturn

from cngmrv.agent import batch, config, keys
from cngmrv.agent.store import StoreError, open_readonly

EXIT_USAGE = 2
EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: the user asked for `--help` if they want it.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _keygen(args: argparse.Namespace) -> int:
    key_path, pub_path = keys.generate(Path(args.out), overwrite=args.force)
    signer = keys.load_signer(key_path)
    out = {"key": str(key_path), "pub": str(pub_path), "kid": signer.kid}
    print(json.dumps(out) if args.json else f"wrote {key_path} and {pub_path}\nkid {signer.kid}")
    return 0


def _read_batches(db_path: Path) -> list[tuple[int, bytes]]:
    db = open_readonly(db_path)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "batches" not in tables:
            raise StoreError(f"{db_path} is not a cngmrv store (no batches table)")
        return [
            (int(s), bytes(b)) for s, b in db.execute("SELECT seq, bytes FROM batches ORDER BY seq")
        ]
    finally:
        db.close()


def _export(args: argparse.Namespace) -> int:
    rows = _read_batches(Path(args.db))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seq, raw in rows:
        (out / f"{seq}.batch").write_bytes(raw)
    if args.json:
        print(json.dumps({"exported": len(rows), "out": str(out)}))
    else:
        print(f"exported {len(rows)} batches to {out}")
    return 0


def _collect(paths: list[str]) -> list[tuple[str, bytes]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.batch")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    if not files:
        raise FileNotFoundError("no batch files given (a folder is searched for *.batch)")
    return [(str(f), f.read_bytes()) for f in files]


def _verify(args: argparse.Namespace) -> int:
    pub = keys.load_public_key(Path(args.pubkey))
    report = batch.verify_set(_collect(args.paths), pub)
    if args.json:
        print(
            json.dumps(
                {
                    "passed": report.passed,
                    "ok": len(report.ok),
                    "bad": report.bad,
                    "gaps": [list(g) for g in report.gaps],
                }
            )
        )
    else:
        for name, reasons in sorted(report.bad.items()):
            for r in reasons:
                print(f"BAD  {name}: {r}")
        for lo, hi in report.gaps:
            print(f"GAP  batch_seq {lo}" + (f"..{hi}" if hi != lo else "") + " missing")
        print(f"{len(report.ok)} batches verified, {len(report.bad)} bad, {len(report.gaps)} gaps")
    return 0 if report.passed else EXIT_FAILED


def _ingest(args: argparse.Namespace) -> int:
    from cngmrv.agent.ingest import IngestServer, register_device

    server = IngestServer(Path(args.db), args.host, args.port)
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


def _run(args: argparse.Namespace) -> int:
    from cngmrv.agent import service

    cfg = config.load(Path(args.config))
    config.check_key_file(cfg)
    return service.run(cfg, verbose=args.verbose)


def _config_check(args: argparse.Namespace) -> int:
    path = Path(args.file)
    cfg = config.load(path)
    kid = config.check_key_file(cfg)
    if args.json:
        print(json.dumps({"ok": True, "device": cfg.device_id, "kid": kid}))
    else:
        print(f"{path}: ok (device {cfg.device_id}, key {kid[:16]})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from urllib.error import URLError

    from cngmrv.agent import health

    cfg = config.load(Path(args.config))
    try:
        samples = health.fetch(cfg.health.port) if cfg.health.enabled else None
    except (URLError, OSError):
        samples = None
    if samples is None:
        # No agent answering: what the store says is still worth showing.
        counts = dict(_store_counts(cfg.store_path))
        if args.json:
            print(json.dumps({"running": False, **counts}))
        else:
            if cfg.health.enabled:
                print(f"agent not answering on 127.0.0.1:{cfg.health.port} (stopped?)")
            else:
                print("no health endpoint (health.enabled = false); from the store:")
            for k, v in counts.items():
                print(f"{k:<15} {v}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"running": True, "metrics": samples}))
    else:
        print("\n".join(health.describe(samples)))
    return 0


def _store_counts(db_path: Path) -> dict[str, int]:
    db = open_readonly(db_path)
    try:
        q = db.execute
        return {
            "readings": int(q("SELECT count(*) FROM readings").fetchone()[0]),
            "batches": int(q("SELECT count(*) FROM batches").fetchone()[0]),
            "pending": int(
                q("SELECT count(*) FROM batches WHERE uploaded_at IS NULL").fetchone()[0]
            ),
        }
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{db_path}: {e}") from None
    finally:
        db.close()


def _replay(args: argparse.Namespace) -> int:
    from cngmrv.agent import replay
    from cngmrv.agent.pipeline import PipelineConfig
    from cngmrv.drivers.dbc import DbcSignals

    pipeline = PipelineConfig(
        engine_source_address=args.engine_sa,
        engine_name=int(args.engine_name, 16) if args.engine_name else None,
    )
    dbc = DbcSignals(Path(args.dbc)) if args.dbc else None
    progress = sys.stderr if sys.stderr.isatty() and not args.no_progress else None
    summary = replay.replay(Path(args.file), pipeline, dbc, progress)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        replay.print_summary(summary)
    if summary["error"]:
        print(f"cngmrv replay: {summary['error']['message']}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cngmrv", description="Signed fuel and emission data from dual-fuel buses.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("run", help="run the agent from a TOML config")
    s.add_argument("--config", required=True, help="TOML config file")
    s.set_defaults(func=_run)

    s = sub.add_parser("config", help="check a config file")
    csub = s.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    c = csub.add_parser("check", help="validate FILE and the key file it names")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_config_check)

    s = sub.add_parser("status", help="the running agent's health, for a person")
    s.add_argument("--config", required=True, help="the agent's TOML config")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_status)

    s = sub.add_parser("keygen", help="make a device key pair (device.key 0600, device.pub)")
    s.add_argument("--out", required=True, help="folder for device.key and device.pub")
    s.add_argument("--force", action="store_true", help="replace an existing key")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_keygen)

    s = sub.add_parser("export", help="write each batch of a store as <batch_seq>.batch")
    s.add_argument("--db", required=True, help="device store (SQLite)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_export)

    s = sub.add_parser("verify", help="check signatures, hash chain and sequence gaps")
    s.add_argument("paths", nargs="+", metavar="FILES_OR_DIR")
    s.add_argument("--pubkey", required=True, help="the device's public key (PEM)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_verify)

    s = sub.add_parser("replay", help="run a CAN log through the agent's decoders and integrator")
    s.add_argument("file", help="candump .log, .asc, .blf, .trc, .csv, .db or .mf4 (also .gz)")
    s.add_argument("--engine-sa", type=int, default=0, help="engine source address (0)")
    s.add_argument("--engine-name", default="", help="pin the engine to this J1939 NAME (hex)")
    s.add_argument("--dbc", help="decode extra signals from this DBC")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_replay)

    s = sub.add_parser("ingest", help="run the reference ingest server")
    s.add_argument("--db", required=True, help="ingest database (SQLite)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument(
        "--register", action="append", metavar="DEVICE_ID=PUBKEY", help="register a device key"
    )
    s.set_defaults(func=_ingest)

    for ep in entry_points(group="cngmrv.commands"):
        ep.load()(sub)
    return p


def main(argv: list[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        code = int(args.func(args))
    except (
        keys.KeyFileError,
        StoreError,
        config.ConfigError,
        batch.BatchFormatError,
        FileNotFoundError,
        PermissionError,
        ValueError,
    ) as e:
        print(f"cngmrv {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except OSError as e:
        print(f"cngmrv {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
