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
import sqlite3
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NoReturn

from cngmrv.agent.store import StoreError
from cngmrv.signed import archive, batch, keys

# cngmrv.agent.config is imported by the commands that read a config: it pulls in
# python-can (and with it asammdf, seconds of imports) that `report` and the other
# office commands never use.  Its ConfigError is a ValueError, caught in main().

EXIT_USAGE = 2
EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage dump: the user asked for `--help` if they want it.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _keygen(args: argparse.Namespace) -> int:
    if args.config:
        return _keygen_token(args)
    if args.existing:
        raise ValueError("--existing needs --config (a key on a PKCS#11 token)")
    key_path, pub_path = keys.generate(Path(args.out), overwrite=args.force)
    signer = keys.load_signer(key_path)
    out = {"key": str(key_path), "pub": str(pub_path), "kid": signer.kid}
    print(json.dumps(out) if args.json else f"wrote {key_path} and {pub_path}\nkid {signer.kid}")
    return 0


def _keygen_token(args: argparse.Namespace) -> int:
    """The key on the token the config's ``[signer]`` names: generated there, or exported."""
    from cngmrv.agent import config
    from cngmrv.signed import hsm

    cfg = config.load(Path(args.config))
    if cfg.signer.kind != "pkcs11":
        raise ValueError(
            f"{args.config}: signer.kind is 'file'; make a key file with: cngmrv keygen --out DIR"
        )
    if args.force:
        raise ValueError("--force does not apply to a token: its keys are never replaced here")
    out_dir = Path(args.out)
    pub_path = out_dir / keys.PUB_FILE
    if pub_path.exists() and not args.existing:
        raise FileExistsError(f"{pub_path} already exists; refusing to replace it")
    ref = config.token_key(cfg)
    try:
        pem = hsm.export_public(ref) if args.existing else hsm.generate_on_token(ref)
    except hsm.TokenError as e:
        raise config.ConfigError(f"signer.{e.part}: {e}") from None
    kid = keys.kid_of(keys.public_key_from_pem(pem))
    out_dir.mkdir(parents=True, exist_ok=True)
    pub_path.write_bytes(pem)
    out = {"token": ref.token_label, "key_label": ref.key_label, "pub": str(pub_path), "kid": kid}
    verb = "exported" if args.existing else "generated"
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{verb} key {ref.key_label!r} on token {ref.token_label!r}; wrote {pub_path}")
        print(f"kid {kid}")
    return 0


def _rotate_key(args: argparse.Namespace) -> int:
    """Hand the device's chain from the config's key to the new config's, with the agent stopped."""
    from cngmrv.agent import config
    from cngmrv.agent.recorder import Recorder
    from cngmrv.agent.runtime import recorder_config

    old_cfg, new_cfg = config.load(Path(args.config)), config.load(Path(args.to))
    if (old_cfg.device_id, old_cfg.store_path) != (new_cfg.device_id, new_cfg.store_path):
        raise ValueError(f"{args.to} must name the same device.id and store.path as {args.config}")
    old, new = config.open_signer(old_cfg), config.open_signer(new_cfg)
    try:
        # The agent's own start-up and stop: a signed BOOT and STOP around the rotation,
        # and the store's exclusive lock refuses to run beside a running agent.
        rec = Recorder(old_cfg.store_path, old_cfg.device_id, old, recorder_config(old_cfg))
        rec.start()
        try:
            sealed = rec.rotate(new)
            rec.stop()
        finally:
            rec.close()
    finally:
        old.close()
        new.close()
    out = {"device": old_cfg.device_id, "seq": sealed.seq, "old_kid": old.kid, "new_kid": new.kid}
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"batch {sealed.seq} announces key {new.kid[:16]} (signed by {old.kid[:16]}); "
            f"now put {args.to} in place of {args.config} and start the agent"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    rows = [r for r in archive.read_batches(Path(args.db), args.device) if r[1] >= args.since]
    out = Path(args.out)
    devices = sorted({d for d, _, _ in rows})
    for dev in devices:
        # Ids become folder names: one that is not a valid id could name any path.
        problem = batch.device_id_problem(dev)
        if problem:
            raise ValueError(f"{args.db} holds a device id that cannot be exported: {problem}")
    # A stale <n>.batch left in the folder would be verified with the rest.
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not an empty folder; export writes into a new or empty one")
    out.mkdir(parents=True, exist_ok=True)
    for dev, seq, raw in rows:
        # One folder per device when there are several, so file names stay <seq>.batch.
        folder = out / dev if len(devices) > 1 else out
        folder.mkdir(exist_ok=True)
        with open(folder / f"{int(seq)}.batch", "xb") as f:
            f.write(raw)
    if args.json:
        print(json.dumps({"exported": len(rows), "devices": devices, "out": str(out)}))
    else:
        print(f"exported {len(rows)} batches of {len(devices)} device(s) to {out}")
    return 0


def _seq_key(p: Path) -> tuple[int, int | str]:
    return (0, int(p.stem)) if p.stem.isdigit() else (1, p.name)


def _collect(paths: list[str]) -> list[tuple[str, bytes]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.batch"), key=lambda f: (str(f.parent), _seq_key(f))))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    if not files:
        raise FileNotFoundError("no batch files given (a folder is searched for *.batch)")
    return [(str(f), f.read_bytes()) for f in files]


def _keyring(args: argparse.Namespace) -> batch.KeyRing:
    items: list[tuple[str | None, Any]] = []
    for spec in args.pubkey or []:
        device, sep, path = spec.rpartition("=")
        items.append((device if sep else None, keys.load_public_key(Path(path))))
    limits: dict[tuple[str, str], tuple[int, int | None]] = {}
    if args.registry:
        # Each key with the sequences the ingest trusted it for (rotations, revocations).
        for dev, pem, first, last in archive.registered_key_ranges(Path(args.registry)):
            key = keys.public_key_from_pem(pem, f"key of {dev}")
            items.append((dev, key))
            limits[(dev, keys.kid_of(key))] = (first, last)
    if not items:
        raise ValueError("give the device keys: --pubkey FILE, --pubkey DEVICE=FILE or --registry")
    ring = batch.KeyRing.of(items)
    return batch.KeyRing(ring.keys, limits)


def _expected_last(specs: list[str]) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for spec in specs:
        device, sep, seq = spec.rpartition("=")
        if not seq.isdigit():
            raise ValueError(f"--expect-last takes [DEVICE=]SEQ, got {spec!r}")
        out[device if sep else None] = int(seq)
    return out


def _span(a: int | None, b: int | None) -> str:
    return "-" if a is None else f"{a}..{b}"


def _verify(args: argparse.Namespace) -> int:
    ring = _keyring(args)
    named: list[tuple[str, bytes]] = []
    if args.db:
        named += [(f"{d}:{s}", raw) for d, s, raw in archive.read_batches(Path(args.db))]
    if args.paths:
        named += _collect(args.paths)
    if not named:
        raise FileNotFoundError("nothing to verify: give batch files, a folder or --db")
    report = batch.audit(named, ring)
    if args.db:
        # The ingest refused these batches, so they are not in its table: only its alarms say so.
        for a in archive.ingest_alarms(Path(args.db)):
            report.findings.append(
                batch.Finding(
                    "bad",
                    "ingest_alarm",
                    f"the ingest filed a {a['kind']} alarm ({a['repeats']}x): {a['detail']}",
                    str(a["device_id"]),
                    a["seq"] if isinstance(a["seq"], int) else None,
                )
            )
    if args.expect_last:
        batch.check_tail(report, _expected_last(args.expect_last))
    if args.json:
        print(json.dumps(report.as_dict(), default=str))
        return 0 if report.passed else EXIT_FAILED
    for f in report.findings:
        where = f.where or (f"{f.device_id} seq {f.seq}" if f.seq is not None else f.device_id)
        print(f"{f.severity.upper():<5} {f.code:<16} {where}: {f.text}")
    cols = ("device", "batches", "bad", "seqs", "gaps", "readings", "boots", "unclean", "clock")
    print(
        f"{cols[0]:<16} {cols[1]:>7} {cols[2]:>4} {cols[3]:>11} {cols[4]:>4} "
        f"{cols[5]:>9} {cols[6]:>5} {cols[7]:>7} {cols[8]:>5}"
    )
    for dev, d in sorted(report.devices.items()):
        print(
            f"{dev:<16} {d.batches:>7} {d.bad:>4} {_span(d.first_seq, d.last_seq):>11} "
            f"{len(d.gaps) + len(d.explained_gaps):>4} {d.readings:>9} {len(d.boot_epochs):>5} "
            f"{d.unclean_stops:>7} {len(d.clock_events):>5}"
        )
    for dev, d in sorted(report.devices.items()):
        if len(d.key_ranges) > 1:  # a rotation: say which key signed which batches
            for kid, first, last in d.key_ranges:
                print(f"{dev:<16} key {kid[:16]} signed batches {first}..{last}")
        if d.legacy_v1:
            print(
                f"{dev}: {d.legacy_v1} version-1 batches accepted under the legacy rules "
                "(docs/batch-format.md)"
            )
    verdict = "PASSED" if report.passed else "FAILED"
    print(f"{verdict}: {len(report.verified)} batches verified, {len(report.findings)} findings")
    return 0 if report.passed else EXIT_FAILED


def _run(args: argparse.Namespace) -> int:
    from cngmrv.agent import config, service

    cfg = config.load(Path(args.config))
    # Checked here for a one-line error; the agent opens its own (a token session holds the login).
    config.open_signer(cfg).close()
    return service.run(cfg, verbose=args.verbose)


def _config_check(args: argparse.Namespace) -> int:
    from cngmrv.agent import config

    path = Path(args.file)
    cfg = config.load(path)
    signer = config.open_signer(cfg)
    kid = signer.kid
    signer.close()
    if args.json:
        print(json.dumps({"ok": True, "device": cfg.device_id, "kid": kid}))
    else:
        print(f"{path}: ok (device {cfg.device_id}, key {kid[:16]})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from urllib.error import URLError

    from cngmrv.agent import config, health

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
    db = archive.open_readonly(db_path)
    try:
        q = db.execute
        return {
            # One row holds the readings of one commit (agent/store.py).
            "readings": int(q("SELECT ifnull(sum(n), 0) FROM readings").fetchone()[0]),
            "batches": int(q("SELECT count(*) FROM batches").fetchone()[0]),
            "pending": int(q("SELECT count(*) FROM batches WHERE uploaded = 0").fetchone()[0]),
            # Refused by the ingest for good, kept (agent/upload.py).
            "refused": int(q("SELECT count(*) FROM batches WHERE uploaded = 2").fetchone()[0]),
        }
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{db_path}: {e}") from None
    finally:
        db.close()


def _replay_source(text: str) -> tuple[str, str | int]:
    from cngmrv.drivers.address import SIGNALS, parse_source_rule

    signal, sep, rule = text.partition("=")
    if not sep or signal not in SIGNALS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIGNAL=RULE, SIGNAL one of {SIGNALS}")
    try:
        return signal, parse_source_rule(rule)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _replay_max_gap(text: str) -> tuple[str, float | str]:
    import math

    from cngmrv.agent.pipeline import GAP_SIGNALS

    if text == "auto":
        return "*", "auto"  # every integrated signal
    signal, sep, value = text.partition("=")
    if not sep or signal not in GAP_SIGNALS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected SIGNAL=SECONDS or SIGNAL=auto, SIGNAL one of {tuple(GAP_SIGNALS)}"
        )
    if value == "auto":
        return signal, value
    try:
        gap = float(value)
    except ValueError:
        gap = math.nan
    if not gap > 0 or not math.isfinite(gap):
        raise argparse.ArgumentTypeError(f"{text!r}: the gap must be a number of seconds > 0")
    return signal, gap


def _replay(args: argparse.Namespace) -> int:
    from cngmrv.agent import replay
    from cngmrv.agent.pipeline import GAP_SIGNALS, PipelineConfig
    from cngmrv.drivers.dbc import DbcSignals

    pipeline = PipelineConfig(
        engine_source_address=args.engine_sa,
        engine_name=int(args.engine_name, 16) if args.engine_name else None,
        sources=dict(args.source),
        max_gap_s={sig: gap for sig, gap in args.max_gap if gap != "auto"},
    )
    detect = {sig for sig, gap in args.max_gap if gap == "auto"}
    if "*" in detect:
        detect = set(GAP_SIGNALS)
    dbc = DbcSignals(Path(args.dbc)) if args.dbc else None
    progress = sys.stderr if sys.stderr.isatty() and not args.no_progress else None
    try:
        summary = replay.replay(Path(args.file), pipeline, dbc, progress, detect)
    except (ValueError, OSError) as e:
        if not args.json:
            raise
        # --json promises one JSON object on stdout, also when the log cannot be read.
        message = str(e)
        print(
            json.dumps(
                {
                    "file": args.file,
                    "error": {"where": None, "reason": message, "message": message},
                },
                indent=2,
            )
        )
        print(f"cngmrv replay: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        replay.print_summary(summary)
    if summary["error"]:
        print(f"cngmrv replay: {summary['error']['message']}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``plugins=False`` leaves out the contributed commands."""
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

    s = sub.add_parser(
        "keygen",
        help="make a device key pair (device.key 0600, device.pub), or one on a PKCS#11 token",
    )
    s.add_argument("--out", required=True, help="folder for device.key and device.pub")
    s.add_argument("--force", action="store_true", help="replace an existing key file")
    s.add_argument(
        "--config",
        metavar="FILE",
        help="generate the key on the PKCS#11 token this agent config's [signer] names; "
        "only device.pub is written",
    )
    s.add_argument(
        "--existing",
        action="store_true",
        help="with --config: export the public key of the token's existing key instead",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_keygen)

    s = sub.add_parser(
        "rotate-key",
        help="hand the device's chain to a new key (agent stopped): the old key signs the handover",
    )
    s.add_argument("--config", required=True, help="the agent's config, naming the current key")
    s.add_argument("--to", required=True, metavar="FILE", help="the same config with the new key")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_rotate_key)

    s = sub.add_parser("export", help="write each batch of a store as <batch_seq>.batch")
    s.add_argument("--db", required=True, help="device store or ingest database (SQLite)")
    s.add_argument(
        "--out", required=True, help="a new or empty output folder (one subfolder per device)"
    )
    s.add_argument("--device", help="only this device (ingest databases hold many)")
    s.add_argument("--since", type=int, default=0, metavar="SEQ", help="from this batch_seq on")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_export)

    s = sub.add_parser(
        "verify", help="audit batches: signatures, chain, gaps, boot epochs, clock events"
    )
    s.add_argument("paths", nargs="*", metavar="FILES_OR_DIR")
    s.add_argument("--db", help="verify the batches held in a store or ingest database")
    s.add_argument(
        "--pubkey",
        action="append",
        metavar="[DEVICE=]PEM",
        help="a trusted public key, optionally bound to one device (repeatable)",
    )
    s.add_argument("--registry", help="trust the device keys registered in an ingest database")
    s.add_argument(
        "--expect-last",
        action="append",
        metavar="[DEVICE=]SEQ",
        help="the last batch_seq known from outside the files (e.g. the ingest's last_seq): "
        "a chain cut off before it fails (repeatable)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_verify)

    s = sub.add_parser("replay", help="run a CAN log through the agent's decoders and integrator")
    s.add_argument("file", help="candump .log, .asc, .blf, .trc, .csv, .db or .mf4 (also .gz)")
    s.add_argument("--engine-sa", type=int, default=0, help="engine source address (0)")
    s.add_argument("--engine-name", default="", help="pin the engine to this J1939 NAME (hex)")
    s.add_argument(
        "--source",
        type=_replay_source,
        action="append",
        default=[],
        metavar="SIGNAL=RULE",
        help="take a signal (fuel_rate, fuel_total, engine_speed, wheel_speed) from an address, "
        "'engine', 'function:N' or 'auto' (repeatable; docs/can.md)",
    )
    s.add_argument(
        "--max-gap",
        type=_replay_max_gap,
        action="append",
        default=[],
        metavar="SIGNAL=SECONDS|SIGNAL=auto|auto",
        help="a prescaled log: bridge longer gaps of a signal (fuel_rate, wheel_speed, "
        "engine_speed), or detect its logger's steady period; 'auto' alone: of every "
        "signal (repeatable)",
    )
    s.add_argument("--dbc", help="decode extra signals from this DBC")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_replay)

    for ep in entry_points(group="cngmrv.commands") if plugins else ():
        ep.load()(sub)
    return p


def _first_word(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


# The bus's own commands.  When one of them runs, the contributed commands (the
# office's, the simulator's) are not even registered, so the agent in a bus
# imports none of their modules.
_BUILTIN = frozenset(
    {"run", "config", "status", "keygen", "rotate-key", "export", "verify", "replay"}
)


def main(argv: list[str] | None = None) -> NoReturn:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(plugins=_first_word(words) not in _BUILTIN)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        code = int(args.func(args))
    except (
        keys.SignerError,
        StoreError,
        batch.BatchFormatError,
        archive.ArchiveError,
        FileNotFoundError,
        PermissionError,
        ValueError,
    ) as e:
        print(f"cngmrv {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except OSError as e:
        print(f"cngmrv {args.command}: error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except ModuleNotFoundError as e:
        # A command of the office or the simulator, on the bus install that leaves their
        # packages out: say so, rather than a traceback.  A missing module of our own is a bug.
        if e.name is None or e.name.partition(".")[0] == "cngmrv":
            raise
        print(
            f"cngmrv {args.command}: error: needs the Python package {e.name!r}, which this "
            "install lacks: the bus install leaves out the office and the simulator "
            "(pip install 'cngmrv[office]')",
            file=sys.stderr,
        )
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
