"""The reference ingest server: verifies batches and stores them once.

``POST /v1/batches`` takes one batch's exact bytes.  The answer:

- 201 ``stored``: new, verified, chained to the device's previous batch;
- 200 ``duplicate``: the same bytes were already stored (uploads are idempotent);
- 400 malformed envelope; 403 unknown device or key id; 422 bad signature or hash;
- 409 ``conflict``: the same (device, sequence) with other bytes (flagged and kept
  for the auditor in ``conflicts``), or ``out_of_order``: the batch does not follow
  the device's last stored one (the body names the expected sequence).

Devices are registered out of band (:func:`register_device`, or
``cngmrv ingest --register``), never over HTTP: a public key that anyone can
upload would let anyone forge a device.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cngmrv.agent import batch
from cngmrv.agent.keys import kid_of, public_key_from_pem

log = logging.getLogger("cngmrv.ingest")

MAX_BODY = 16 * 1024 * 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, kid TEXT NOT NULL, pubkey_pem BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    device_id TEXT NOT NULL, seq INTEGER NOT NULL, sha256 BLOB NOT NULL,
    bytes BLOB NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE TABLE IF NOT EXISTS conflicts (
    device_id TEXT NOT NULL, seq INTEGER NOT NULL, bytes BLOB NOT NULL, received_at REAL NOT NULL
);
"""


def open_db(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


def register_device(db: sqlite3.Connection, device_id: str, pubkey_pem: bytes) -> str:
    """Register (or confirm) a device's public key; returns its kid.

    Re-registering the same key is a no-op; a different key for a known device
    is refused, since it would orphan the device's existing chain.
    """
    kid = kid_of(public_key_from_pem(pubkey_pem, f"public key of {device_id}"))
    row = db.execute("SELECT kid FROM devices WHERE device_id=?", (device_id,)).fetchone()
    if row is not None and row[0] != kid:
        raise ValueError(f"device {device_id!r} is already registered with another key")
    if row is None:
        db.execute(
            "INSERT INTO devices(device_id, kid, pubkey_pem) VALUES(?, ?, ?)",
            (device_id, kid, pubkey_pem),
        )
    return kid


class Ingest:
    """Verification and storage, separate from HTTP so tests can call it directly."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}

    def accept(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            b = batch.parse(raw)
        except batch.BatchFormatError as e:
            return 400, {"error": "malformed", "reason": str(e)}
        with self._lock:
            return self._accept(b)

    def _accept(self, b: batch.Batch) -> tuple[int, dict[str, Any]]:
        dev, seq = b.device_id, b.seq
        row = self._db.execute(
            "SELECT kid, pubkey_pem FROM devices WHERE device_id=?", (dev,)
        ).fetchone()
        if row is None:
            return 403, {"error": "unknown_device", "device_id": dev}
        key = public_key_from_pem(bytes(row[1]))
        problems = batch.check(b, key)
        if problems:
            status = 403 if "kid does not match the public key" in problems else 422
            return status, {"error": "rejected", "reasons": problems, "seq": seq}
        held = self._db.execute(
            "SELECT sha256 FROM batches WHERE device_id=? AND seq=?", (dev, seq)
        ).fetchone()
        if held is not None:
            if bytes(held[0]) == b.file_hash:
                return 200, {"status": "duplicate", "seq": seq}
            self._db.execute(
                "INSERT INTO conflicts(device_id, seq, bytes, received_at) VALUES(?, ?, ?, ?)",
                (dev, seq, b.raw, time.time()),
            )
            log.error("event=batch_conflict device=%s seq=%d", dev, seq)
            return 409, {"error": "conflict", "seq": seq}
        last = self._db.execute(
            "SELECT seq, sha256 FROM batches WHERE device_id=? ORDER BY seq DESC LIMIT 1", (dev,)
        ).fetchone()
        expected_seq, expected_prev = (
            (0, batch.ZERO_HASH)
            if last is None
            else (
                last[0] + 1,
                bytes(last[1]),
            )
        )
        if seq != expected_seq or b.header["prev_hash"] != expected_prev:
            return 409, {"error": "out_of_order", "seq": seq, "expected_seq": expected_seq}
        self._db.execute(
            "INSERT INTO batches(device_id, seq, sha256, bytes, received_at) VALUES(?, ?, ?, ?, ?)",
            (dev, seq, b.file_hash, b.raw, time.time()),
        )
        return 201, {"status": "stored", "seq": seq}


def _handler(ingest: Ingest) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cngmrv-ingest/1"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http " + format, *args)

        def _reply(self, status: int, obj: dict[str, Any]) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/v1/health":
                self._reply(200, {"status": "ok"})
            else:
                self._reply(404, {"error": "not_found"})

        def do_POST(self) -> None:
            if self.path != "/v1/batches":
                self._reply(404, {"error": "not_found"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._reply(411, {"error": "length_required"})
                return
            if length <= 0 or length > MAX_BODY:
                self._reply(413, {"error": "bad_length", "max": MAX_BODY})
                return
            status, obj = ingest.accept(self.rfile.read(length))
            self._reply(status, obj)

    return Handler


class IngestServer:
    """The HTTP server in a background thread; ``url`` is where to POST batches."""

    def __init__(self, db_path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.db = open_db(db_path)
        self.ingest = Ingest(self.db)
        self._httpd = ThreadingHTTPServer((host, port), _handler(self.ingest))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1/batches"

    def start(self) -> IngestServer:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self.db.close()


def stored_batches(db: sqlite3.Connection, device_id: str) -> list[tuple[int, bytes]]:
    rows = db.execute(
        "SELECT seq, bytes FROM batches WHERE device_id=? ORDER BY seq", (device_id,)
    ).fetchall()
    return [(int(s), bytes(r)) for s, r in rows]
