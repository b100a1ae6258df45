"""The reference ingest server: verifies batches and stores each one once.

``POST /v1/batches`` takes one batch's exact bytes.  The answer (JSON):

- 201 ``stored``: new and verified.  ``gap: [a, b]`` when batches a..b of the
  device are missing before it (accepted; the gap is recorded and reported
  until the missing batches arrive), ``out_of_order: true`` when it filled
  such a gap late.
- 200 ``duplicate``: the same bytes were already stored (uploads are
  idempotent, and a replay is stored once).
- 400 ``malformed`` or ``truncated``: not a batch envelope (the reason says why).
- 403 ``unknown_device``, or ``kid_mismatch`` (signed by another key than the
  device's registered one: e.g. a batch spliced in from another device).
- 422 ``rejected``: algorithm outside the allow-list, bad signature, payload
  hash or payload; ``reasons`` lists them, ``codes`` their stable codes.
- 409 ``conflict``: the same (device, sequence) with other bytes; or
  ``chain_broken``: ``prev_hash`` does not match the stored neighbour.  Both
  are tamper alarms: logged at error level and kept in ``alarms`` with the
  offending bytes for the auditor (they carry a valid device signature).

Devices are registered out of band (:func:`register_device`, or ``cngmrv
ingest --register``), never over HTTP: a public key that anyone can upload
would let anyone forge a device.

Storage is the fleet database (:mod:`cngmrv.office.fleetdb`): SQLite by
default, PostgreSQL when given a ``postgresql://`` URL, for a fleet.  Each
batch is checked and stored, with its per-batch sums for the report
(:mod:`cngmrv.office.monitored`), in one transaction that first locks the
device's row, so concurrent posts of the same batch store it exactly once, on
one server or several.  When the database cannot take it (down, busy, or
migrated by a newer cngmrv under this server), the answer is 503
``unavailable`` with ``Retry-After``: the uploader keeps the batch and retries.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cngmrv.office import monitored
from cngmrv.office.fleetdb import IngestDB, IngestError, SchemaMismatch, open_db
from cngmrv.signed import batch
from cngmrv.signed.keys import ALLOWED_ALGS, kid_of, public_key_from_pem

log = logging.getLogger("cngmrv.ingest")

MAX_BODY = 16 * 1024 * 1024
RETRY_AFTER_S = 5  # seconds an uploader waits before retrying after a 503

__all__ = ["Ingest", "IngestDB", "IngestError", "IngestServer", "open_db", "register_device"]


def register_device(db: IngestDB, device_id: str, pubkey_pem: bytes) -> str:
    """Register (or confirm) a device's public key; returns its kid.

    Re-registering the same key is a no-op; a different key for a known device
    is refused, since it would orphan the device's existing chain.
    """
    kid = kid_of(public_key_from_pem(pubkey_pem, f"public key of {device_id}"))
    with db.tx():
        row = db.one("SELECT kid FROM devices WHERE device_id=?", (device_id,))
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

    def __init__(self, db: IngestDB, allowed_algs: Iterable[str] = ALLOWED_ALGS) -> None:
        self.db = db
        self.allowed_algs = frozenset(allowed_algs)
        self.counts: dict[str, int] = {}
        self._counts_lock = threading.Lock()
        self._keys: dict[bytes, Any] = {}

    def accept(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """Check and store one batch; returns the HTTP status and the JSON answer."""
        try:
            b = batch.parse(raw)
        except batch.BatchFormatError as e:
            code = "truncated" if str(e).startswith("truncated") else "malformed"
            return self._count(400, {"error": code, "reason": str(e)})
        with self.db.tx():
            return self._count(*self._accept(b))

    def _count(self, status: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        key = str(body.get("status") or body.get("error"))
        with self._counts_lock:
            self.counts[key] = self.counts.get(key, 0) + 1
        return status, body

    def _key(self, pem: bytes) -> Any:
        if pem not in self._keys:
            self._keys[pem] = public_key_from_pem(pem)
        return self._keys[pem]

    def _alarm(self, dev: str, seq: int, kind: str, detail: str, raw: bytes | None) -> None:
        log.error("event=tamper_alarm kind=%s device=%s seq=%d detail=%r", kind, dev, seq, detail)
        self.db.execute(
            "INSERT INTO alarms(device_id, seq, kind, detail, bytes, at) VALUES(?, ?, ?, ?, ?, ?)",
            (dev, seq, kind, detail, raw, time.time()),
        )

    def _accept(self, b: batch.Batch) -> tuple[int, dict[str, Any]]:
        dev, seq = b.device_id, b.seq
        row = self.db.one(
            "SELECT kid, pubkey_pem FROM devices WHERE device_id=?" + self.db.for_update, (dev,)
        )
        if row is None:
            log.warning("event=batch_rejected reason=unknown_device device=%s", dev)
            return 403, {"error": "unknown_device", "device_id": dev}
        alg = b.header["alg"]
        if alg not in self.allowed_algs:
            reason = f"alg {alg!r} is not allowed (allowed: {sorted(self.allowed_algs)})"
            log.warning("event=batch_rejected reason=alg_not_allowed device=%s seq=%d", dev, seq)
            return 422, {
                "error": "rejected",
                "codes": ["alg_not_allowed"],
                "reasons": [reason],
                "seq": seq,
            }
        if b.header["kid"] != row[0]:
            log.warning("event=batch_rejected reason=kid_mismatch device=%s seq=%d", dev, seq)
            return 403, {
                "error": "kid_mismatch",
                "reason": f"signed with key {b.header['kid'][:16]}…, not device {dev!r}'s",
                "seq": seq,
            }
        problems = batch.check(b, self._key(bytes(row[1])), self.allowed_algs)
        if problems:
            log.warning(
                "event=batch_rejected reason=%s device=%s seq=%d",
                ",".join(p.code for p in problems),
                dev,
                seq,
            )
            return 422, {
                "error": "rejected",
                "codes": [p.code for p in problems],
                "reasons": [p.text for p in problems],
                "seq": seq,
            }
        held = self.db.one("SELECT sha256 FROM batches WHERE device_id=? AND seq=?", (dev, seq))
        if held is not None:
            if bytes(held[0]) == b.file_hash:
                log.info("event=batch_duplicate device=%s seq=%d", dev, seq)
                return 200, {"status": "duplicate", "seq": seq}
            self._alarm(dev, seq, "conflict", "same sequence, other content", b.raw)
            return 409, {"error": "conflict", "seq": seq}
        if seq == 0 and b.header["prev_hash"] != batch.ZERO_HASH:
            return 422, {
                "error": "rejected",
                "codes": ["chain_broken"],
                "reasons": ["the first batch must carry 32 zero bytes as prev_hash"],
                "seq": seq,
            }
        before = self.db.one(
            "SELECT sha256 FROM batches WHERE device_id=? AND seq=?", (dev, seq - 1)
        )
        if before is not None and bytes(before[0]) != b.header["prev_hash"]:
            self._alarm(
                dev, seq, "chain_broken", f"prev_hash does not match batch {seq - 1}", b.raw
            )
            return 409, {"error": "chain_broken", "seq": seq, "detail": f"batch {seq - 1}"}
        after = self.db.one(
            "SELECT prev_hash FROM batches WHERE device_id=? AND seq=?", (dev, seq + 1)
        )
        if after is not None and bytes(after[0]) != b.file_hash:
            self._alarm(dev, seq, "chain_broken", f"batch {seq + 1} does not chain to it", b.raw)
            return 409, {"error": "chain_broken", "seq": seq, "detail": f"batch {seq + 1}"}
        last_row = self.db.one("SELECT max(seq) FROM batches WHERE device_id=?", (dev,))
        last = None if last_row is None or last_row[0] is None else int(last_row[0])
        now = time.time()
        self.db.execute(
            "INSERT INTO batches(device_id, seq, sha256, prev_hash, bytes, received_at) "
            "VALUES(?, ?, ?, ?, ?, ?)",
            (dev, seq, b.file_hash, b.header["prev_hash"], b.raw, now),
        )
        monitored.store(self.db, b)
        answer: dict[str, Any] = {"status": "stored", "seq": seq}
        expected = 0 if last is None else last + 1
        if seq > expected:
            self.db.execute(
                "INSERT INTO gaps(device_id, first_seq, last_seq, found_at) VALUES(?, ?, ?, ?)",
                (dev, expected, seq - 1, now),
            )
            log.warning("event=batch_gap device=%s missing=%d..%d", dev, expected, seq - 1)
            answer["gap"] = [expected, seq - 1]
        elif seq < expected:
            self._fill_gap(dev, seq, now)
            log.warning("event=batch_out_of_order device=%s seq=%d", dev, seq)
            answer["out_of_order"] = True
        return 201, answer

    def _fill_gap(self, dev: str, seq: int, now: float) -> None:
        row = self.db.one(
            "SELECT first_seq, last_seq, found_at FROM gaps "
            "WHERE device_id=? AND first_seq<=? AND last_seq>=?",
            (dev, seq, seq),
        )
        if row is None:
            return
        first, last, found = int(row[0]), int(row[1]), row[2]
        self.db.execute("DELETE FROM gaps WHERE device_id=? AND first_seq=?", (dev, first))
        for lo, hi in ((first, seq - 1), (seq + 1, last)):
            if lo <= hi:
                self.db.execute(
                    "INSERT INTO gaps(device_id, first_seq, last_seq, found_at) VALUES(?, ?, ?, ?)",
                    (dev, lo, hi, found),
                )

    def report(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Per device: batches held, last sequence, open gaps and alarms."""
        devs = (
            [device_id]
            if device_id is not None
            else [r[0] for r in self.db.all("SELECT device_id FROM devices ORDER BY device_id")]
        )
        out = []
        for dev in devs:
            kid = self.db.one("SELECT kid FROM devices WHERE device_id=?", (dev,))
            if kid is None:
                continue
            n, last = self.db.one(
                "SELECT count(*), max(seq) FROM batches WHERE device_id=?", (dev,)
            )
            gaps = self.db.all(
                "SELECT first_seq, last_seq FROM gaps WHERE device_id=? ORDER BY first_seq", (dev,)
            )
            alarms = self.db.all(
                "SELECT seq, kind, detail, at FROM alarms WHERE device_id=? ORDER BY at", (dev,)
            )
            out.append(
                {
                    "device_id": dev,
                    "kid": kid[0],
                    "batches": int(n),
                    "last_seq": None if last is None else int(last),
                    "gaps": [[int(a), int(b)] for a, b in gaps],
                    "alarms": [
                        {"seq": s, "kind": k, "detail": d, "at": a} for s, k, d, a in alarms
                    ],
                }
            )
        return out


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 refuses a burst of simultaneous uploads.
    request_queue_size = 128
    daemon_threads = True


def _handler(ingest: Ingest) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "cngmrv-ingest/1"
        timeout = 30  # seconds a client may stall mid-request before it is dropped

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http " + format, *args)

        def send_error(
            self, code: int, message: str | None = None, explain: str | None = None
        ) -> None:
            # An unknown method is the client's mistake: 405, not "501 not implemented".
            super().send_error(405 if code == 501 else code, message, explain)

        def _reply(
            self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            body = json.dumps(obj).encode()
            try:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client went away; the outcome is already stored

        def do_GET(self) -> None:
            if self.path == "/v1/health":
                self._reply(200, {"status": "ok", "counts": ingest.counts})
            elif self.path.startswith("/v1/devices/"):
                found = ingest.report(unquote(self.path.removeprefix("/v1/devices/")))
                if found:
                    self._reply(200, found[0])
                else:
                    self._reply(404, {"error": "not_found"})
            else:
                self._reply(404, {"error": "not_found"})

        def _not_allowed(self) -> None:
            self._reply(405, {"error": "method_not_allowed"})

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed

        def do_POST(self) -> None:
            if self.path != "/v1/batches":
                self._reply(404, {"error": "not_found"})
                return
            if self.headers.get("Transfer-Encoding"):
                self._reply(411, {"error": "length_required", "reason": "send Content-Length"})
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._reply(411, {"error": "length_required"})
                return
            if length <= 0 or length > MAX_BODY:
                self._reply(413, {"error": "bad_length", "max": MAX_BODY})
                return
            try:
                raw = self.rfile.read(length)
            except OSError:
                return  # timed out or reset mid-body: nobody is left to answer
            if len(raw) < length:
                self._reply(
                    400,
                    {
                        "error": "truncated",
                        "reason": f"body ended after {len(raw)} of {length} bytes",
                    },
                )
                return
            headers: dict[str, str] = {}
            try:
                status, obj = ingest.accept(raw)
            except Exception as e:
                if isinstance(e, SchemaMismatch) or ingest.db.is_unavailable(e):
                    log.error("event=ingest_unavailable error=%r", str(e).splitlines()[0])
                    status, obj = 503, {"error": "unavailable", "reason": str(e).splitlines()[0]}
                    headers["Retry-After"] = str(RETRY_AFTER_S)
                else:
                    log.exception("event=ingest_internal_error")
                    status, obj = 500, {"error": "internal"}
            self._reply(status, obj, headers)

    return Handler


class IngestServer:
    """The HTTP server in a background thread; ``url`` is where to POST batches."""

    def __init__(
        self,
        db_target: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_algs: Iterable[str] = ALLOWED_ALGS,
        migrate: bool = False,
    ) -> None:
        self.db = open_db(db_target, migrate=migrate)
        self.ingest = Ingest(self.db, allowed_algs)
        try:
            self._httpd = _Server((host, port), _handler(self.ingest))
        except OSError:
            self.db.close()
            raise
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1/batches"

    def start(self) -> IngestServer:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        # A short poll so stop() returns promptly.
        self._httpd.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self.db.close()


def stored_batches(db: IngestDB, device_id: str) -> list[tuple[int, bytes]]:
    rows = db.all("SELECT seq, bytes FROM batches WHERE device_id=? ORDER BY seq", (device_id,))
    return [(int(s), bytes(r)) for s, r in rows]
