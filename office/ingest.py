"""The ingest: verifies batches and stores each one once.

This module holds the request logic (:class:`Ingest`); the storage is
:mod:`cngmrv.office.fleetdb`; HTTP is :mod:`cngmrv.office.ingest_app` (the ASGI app)
and :mod:`cngmrv.office.ingest_serve` (uvicorn, and the in-process server).

``POST /v1/batches`` takes one batch's exact bytes.  The answer (JSON):

- 201 ``stored``: new and verified.  ``gap: [a, b]`` when batches a..b of the
  device are missing before it (accepted; the gap is recorded and reported
  until the missing batches arrive), ``out_of_order: true`` when it filled
  such a gap late.
- 200 ``duplicate``: a batch with the same batch id (SHA-256 of the signed
  header) is already stored (uploads are idempotent, and a replay is stored
  once, whatever signature bytes it carries).
- Both acknowledgements name ``device_id``, ``seq`` and ``batch_id`` (hex):
  the uploader checks them, so a captive portal's 200 page is no ack.
- 400 ``malformed``, ``truncated``, or ``noncanonical``: not a batch envelope
  in its one valid encoding (the reason says why; a re-encoded copy of a
  genuine batch lands here, is not stored and raises no alarm).
- 403 ``unknown_device``, or ``kid_mismatch`` (signed by another key than the
  device's registered one: e.g. a batch spliced in from another device).
- 422 ``rejected``: algorithm outside the allow-list, bad signature, payload
  hash or payload; ``reasons`` lists them, ``codes`` their stable codes.
- 409 ``conflict``: the same (device, sequence) with another batch id; or
  ``chain_broken``: ``prev_hash`` does not link to the stored neighbour.  Both
  are tamper alarms: logged at error level and kept in ``alarms`` with the
  offending bytes for the auditor (they carry a valid device signature).  Each
  distinct (device, seq, kind, batch id) is kept once; reposts only count up
  its ``repeats``, so a flood of reposts costs no storage.

Version-1 batches (stored data from before format 2) are accepted under the
legacy rules of :mod:`cngmrv.signed.batch`; :meth:`Ingest.report` counts them.
Untrusted fields (device ids, reasons) are logged through ``%r``, so a
newline in a device id cannot forge a log line.

Devices are registered out of band (:func:`register_device`, or ``cngmrv
ingest --register``), never over HTTP: a public key that anyone can upload
would let anyone forge a device.

A device may hold several keys over time, each valid for a range of its
sequences (table ``device_keys``).  A new key is trusted only through the
chain (a stored, verified batch signed by the current key announcing it in a
``KEY_ROTATION`` event: valid from the next sequence, and the old key ends
there) or out of band (:func:`register_key`, ``--register DEVICE=PUB@SEQ``).
:func:`revoke_key` (``--revoke DEVICE=KID@SEQ``) ends a key at a sequence.
A verified batch signed by a key outside its range is 403 ``key_not_valid``
and a tamper alarm: someone holds a key that should no longer sign.

Reading is for the operator only.  ``GET /v1/devices/<id>`` (batches, last
sequence, gaps, tamper alarms) answers only a request carrying
``Authorization: Bearer <read token>`` (``cngmrv ingest --read-token-file``);
without a token configured it is off.  Anyone else gets the same 401 whether
the device exists or not: the answer would tell a forger which ids exist and
whether the forgery was noticed.  ``GET /v1/health`` says ``ok`` to anyone
(a load balancer needs it) and adds the outcome counts for the token holder
only.  ``docs/security.md`` lists what each endpoint reveals.

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

import hmac
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives import serialization

from cngmrv.office import monitored
from cngmrv.office.fleetdb import IngestDB, IngestError, open_db, stored_batch
from cngmrv.signed import batch, chain
from cngmrv.signed.keys import ALLOWED_ALGS, kid_of, public_key_from_pem

log = logging.getLogger("cngmrv.ingest")

# The largest body read: one batch (signed/batch.py, docs/batch-format.md).
MAX_BODY = batch.MAX_BATCH_BYTES

__all__ = [
    "Ingest",
    "IngestDB",
    "IngestError",
    "open_db",
    "may_read",
    "read_auth",
    "register_device",
    "register_key",
    "revoke_key",
    "revoke_key_since",
    "first_seq_at",
    "stored_batch",
]


# What the checks of one batch read, in one statement that SQLite and PostgreSQL both run:
# whether the device's first key has its device_keys row; the signing key's row; the
# batches held at seq, seq - 1 (bytes) and seq + 1 (its prev_hash); the device's last seq.
_FACTS = (
    "SELECT (SELECT count(*) FROM device_keys k JOIN devices d "
    "ON d.device_id = k.device_id AND d.kid = k.kid WHERE d.device_id = ?), "
    "(SELECT pubkey_pem FROM device_keys WHERE device_id=? AND kid=?), "
    "(SELECT valid_from FROM device_keys WHERE device_id=? AND kid=?), "
    "(SELECT valid_until FROM device_keys WHERE device_id=? AND kid=?), "
    "(SELECT bytes FROM batches WHERE device_id=? AND seq=?), "
    "(SELECT bytes FROM batches WHERE device_id=? AND seq=?), "
    "(SELECT prev_hash FROM batches WHERE device_id=? AND seq=?), "
    "(SELECT max(seq) FROM batches WHERE device_id=?)"
)


def register_device(db: IngestDB, device_id: str, pubkey_pem: bytes) -> str:
    """Register (or confirm) a device's public key; returns its kid.

    Re-registering the same key is a no-op; a different key for a known device
    is refused, since it would orphan the device's existing chain.
    """
    problem = batch.device_id_problem(device_id)
    if problem:
        raise ValueError(problem)
    kid = kid_of(public_key_from_pem(pubkey_pem, f"public key of {device_id!r}"))
    with db.tx():
        row = db.one("SELECT kid FROM devices WHERE device_id=?", (device_id,))
        if row is not None and row[0] != kid:
            raise ValueError(
                f"device {device_id!r} is already registered with another key "
                "(a new key takes a first sequence: DEVICE=PUB@SEQ)"
            )
        if row is None:
            db.execute(
                "INSERT INTO devices(device_id, kid, pubkey_pem) VALUES(?, ?, ?)",
                (device_id, kid, pubkey_pem),
            )
            _adopt_first_key(db, device_id)
    return kid


def _adopt_first_key(db: IngestDB, device_id: str) -> None:
    # The key in `devices` is the device's first, valid from sequence 0; databases from
    # before device_keys existed get its row the first time the device is looked at.
    row = db.one("SELECT kid, pubkey_pem FROM devices WHERE device_id=?", (device_id,))
    if row is None:
        return
    held = db.one("SELECT 1 FROM device_keys WHERE device_id=? AND kid=?", (device_id, row[0]))
    if held is None:
        db.execute(
            "INSERT INTO device_keys(device_id, kid, pubkey_pem, valid_from, valid_until, via, at) "
            "VALUES(?, ?, ?, 0, NULL, 'registered', ?)",
            (device_id, row[0], bytes(row[1]), time.time()),
        )


def _add_key(
    db: IngestDB, device_id: str, kid: str, pubkey_pem: bytes, first_seq: int, via: str
) -> None:
    """Trust ``kid`` for ``device_id`` from ``first_seq`` on; every older key ends before it."""
    _adopt_first_key(db, device_id)
    held = db.one(
        "SELECT valid_from FROM device_keys WHERE device_id=? AND kid=?", (device_id, kid)
    )
    if held is None:
        db.execute(
            "INSERT INTO device_keys(device_id, kid, pubkey_pem, valid_from, valid_until, via, at) "
            "VALUES(?, ?, ?, ?, NULL, ?, ?)",
            (device_id, kid, pubkey_pem, first_seq, via, time.time()),
        )
    db.execute(
        "UPDATE device_keys SET valid_until=? WHERE device_id=? AND kid<>? AND valid_from<? "
        "AND (valid_until IS NULL OR valid_until>=?)",
        (first_seq - 1, device_id, kid, first_seq, first_seq),
    )


def register_key(db: IngestDB, device_id: str, pubkey_pem: bytes, first_seq: int) -> str:
    """Register a registered device's next key out of band, valid from ``first_seq``; its kid.

    For a rotation whose announcing batch never arrived: the older keys end at
    ``first_seq - 1``, so batches they sign from there on are refused.
    """
    kid = kid_of(public_key_from_pem(pubkey_pem, f"public key of {device_id}"))
    if not 0 <= first_seq <= batch.MAX_SEQ:
        raise ValueError(f"first sequence {first_seq} out of range")
    with db.tx():
        if db.one("SELECT 1 FROM devices WHERE device_id=?", (device_id,)) is None:
            raise ValueError(f"device {device_id!r} is not registered; register it first")
        _add_key(db, device_id, kid, pubkey_pem, first_seq, f"registered from {first_seq}")
    return kid


def first_seq_at(db: IngestDB, device_id: str, kid: str, when: float) -> int:
    """The first batch of ``device_id`` that ``kid`` signed at or after ``when`` (epoch s).

    A batch counts as "after" when either clock says so: the device's (its
    first reading's ``t0``) or the ingest's (when it was stored).  The device's
    clock is the thief's to set, so a batch dated back still falls after when
    it arrived after; none does: the device's next sequence, so everything it
    signs from now on.
    """
    last = -1
    for seq, raw, received in db.all(
        "SELECT seq, bytes, received_at FROM batches WHERE device_id=? ORDER BY seq",
        (device_id,),
    ):
        last = int(seq)
        b = stored_batch(bytes(raw))
        if b.header["kid"] != kid:
            continue
        signed_t = b.header.get("first_t0")
        if float(received) >= when or (signed_t is not None and float(signed_t) >= when):
            return int(seq)
    return last + 1


def revoke_key(db: IngestDB, device_id: str, kid: str, from_seq: int) -> int:
    """End ``kid``'s use for ``device_id`` at ``from_seq``; returns the stored batches it hits.

    Later batches signed with it are refused as ``key_not_valid`` alarms; those
    already stored from ``from_seq`` on stay (they are evidence) and each gets
    a ``revoked_key`` alarm, so the report shows them.
    """
    with db.tx():
        return _revoke(db, device_id, kid, from_seq)


def revoke_key_since(db: IngestDB, device_id: str, kid: str, when: float) -> tuple[int, int]:
    """End ``kid``'s use for ``device_id`` from a time (epoch s): :func:`revoke_key` from
    :func:`first_seq_at`, in one transaction.  Returns (that sequence, stored batches hit)."""
    with db.tx():
        from_seq = first_seq_at(db, device_id, kid, when)
        return from_seq, _revoke(db, device_id, kid, from_seq)


def _revoke(db: IngestDB, device_id: str, kid: str, from_seq: int) -> int:
    _adopt_first_key(db, device_id)
    row = db.one(
        "SELECT valid_from, valid_until FROM device_keys WHERE device_id=? AND kid=?",
        (device_id, kid),
    )
    if row is None:
        raise ValueError(f"device {device_id!r} has no key {kid}")
    until = row[1]
    if until is None or int(until) >= from_seq:
        db.execute(
            "UPDATE device_keys SET valid_until=? WHERE device_id=? AND kid=?",
            (from_seq - 1, device_id, kid),
        )
    hit = 0
    for seq, raw in db.all(
        "SELECT seq, bytes FROM batches WHERE device_id=? AND seq>=? ORDER BY seq",
        (device_id, from_seq),
    ):
        b = stored_batch(bytes(raw))
        if b.header["kid"] != kid:
            continue
        hit += 1
        # Once per stored batch, like every alarm: revoking again adds none.
        if db.one(
            "SELECT 1 FROM alarms WHERE device_id=? AND seq=? AND kind=? AND batch_id=?",
            (device_id, seq, "revoked_key", b.batch_id),
        ):
            continue
        db.execute(
            "INSERT INTO alarms(device_id, seq, kind, detail, bytes, at, batch_id, repeats) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, 1)",
            (
                device_id,
                seq,
                "revoked_key",
                "stored before its key was revoked",
                None,
                time.time(),
                b.batch_id,
            ),
        )
    log.warning(
        "event=key_revoked device=%r kid=%s from_seq=%d stored_after=%d",
        device_id,
        kid[:16],
        from_seq,
        hit,
    )
    return hit


def read_auth(read_token: str | None) -> bytes | None:
    """The ``Authorization`` value that carries ``read_token`` (None: reading is off)."""
    return f"Bearer {read_token}".encode() if read_token else None


def may_read(expected: bytes | None, authorization: str | None) -> bool:
    """True when an ``Authorization`` header value is ``expected`` (:func:`read_auth`).

    Always False when no read token is configured: reading is then off.
    """
    if expected is None or not authorization:
        return False
    return hmac.compare_digest(expected, authorization.strip().encode())


class Ingest:
    """Verification and storage, separate from HTTP so tests can call it directly."""

    def __init__(
        self,
        db: IngestDB,
        allowed_algs: Iterable[str] = ALLOWED_ALGS,
        read_token: str | None = None,
    ) -> None:
        self.db = db
        self.allowed_algs = frozenset(allowed_algs)
        self._read_auth = read_auth(read_token)
        self.counts: dict[str, int] = {}
        self._counts_lock = threading.Lock()
        self._keys: dict[bytes, Any] = {}

    def may_read(self, authorization: str | None) -> bool:
        """True when an ``Authorization`` header value carries the operator's read token."""
        return may_read(self._read_auth, authorization)

    def accept(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """Check and store one batch; returns the HTTP status and the JSON answer."""
        try:
            b = batch.parse(raw)
        except batch.BatchFormatError as e:
            log.warning("event=batch_rejected reason=%s detail=%r", e.code, str(e))
            return self._count(400, {"error": e.code, "reason": str(e)})
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

    def _alarm(self, b: batch.Batch, kind: str, detail: str) -> None:
        """File a tamper alarm once per (device, seq, kind, batch id); a repeat only counts."""
        dev, seq, bid = b.device_id, b.seq, b.batch_id
        held = self.db.one(
            "SELECT repeats FROM alarms WHERE device_id=? AND seq=? AND kind=? AND batch_id=?",
            (dev, seq, kind, bid),
        )
        if held is not None:
            log.info("event=tamper_alarm_repeat kind=%s device=%r seq=%d", kind, dev, seq)
            self.db.execute(
                "UPDATE alarms SET repeats = repeats + 1 "
                "WHERE device_id=? AND seq=? AND kind=? AND batch_id=?",
                (dev, seq, kind, bid),
            )
            return
        log.error("event=tamper_alarm kind=%s device=%r seq=%d detail=%r", kind, dev, seq, detail)
        self.db.execute(
            "INSERT INTO alarms(device_id, seq, kind, detail, bytes, at, batch_id, repeats) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, 1)",
            (dev, seq, kind, detail, b.raw, time.time(), bid),
        )

    @staticmethod
    def _ack(status: str, b: batch.Batch) -> dict[str, Any]:
        # Names what was stored, so the uploader can tell this ingest's answer from any 2xx.
        return {
            "status": status,
            "device_id": b.device_id,
            "seq": b.seq,
            "batch_id": b.batch_id.hex(),
        }

    def _accept(self, b: batch.Batch) -> tuple[int, dict[str, Any]]:
        dev, seq, kid = b.device_id, b.seq, b.header["kid"]
        # Sent together (on PostgreSQL in one round trip, with BEGIN and the schema check):
        # the lock on the device's row, then, under it, all that the checks below read.
        lock = self.db.execute(
            "SELECT kid FROM devices WHERE device_id=?" + self.db.for_update, (dev,)
        )
        facts = self.db.one(
            _FACTS, (dev, dev, kid, dev, kid, dev, kid, dev, seq, dev, seq - 1, dev, seq + 1, dev)
        )
        if lock.fetchone() is None:
            log.warning("event=batch_rejected reason=unknown_device device=%r", dev)
            return 403, {"error": "unknown_device", "device_id": dev}
        adopted, key_pem, valid_from, valid_until, held_raw, before_raw, after_prev, last = facts
        alg = b.header["alg"]
        if alg not in self.allowed_algs:
            reason = f"alg {alg!r} is not allowed (allowed: {sorted(self.allowed_algs)})"
            log.warning("event=batch_rejected reason=alg_not_allowed device=%r seq=%d", dev, seq)
            return 422, {
                "error": "rejected",
                "codes": ["alg_not_allowed"],
                "reasons": [reason],
                "seq": seq,
            }
        if not adopted:
            _adopt_first_key(self.db, dev)
            key_pem, valid_from, valid_until = self.db.one(
                "SELECT pubkey_pem, valid_from, valid_until FROM device_keys "
                "WHERE device_id=? AND kid=?",
                (dev, kid),
            ) or (None, None, None)
        if key_pem is None:
            log.warning("event=batch_rejected reason=kid_mismatch device=%r seq=%d", dev, seq)
            return 403, {
                "error": "kid_mismatch",
                "reason": f"signed with key {b.header['kid'][:16]}…, not one of device {dev!r}'s",
                "seq": seq,
            }
        problems, payload = batch.check_payload(b, self._key(bytes(key_pem)), self.allowed_algs)
        if problems:
            log.warning(
                "event=batch_rejected reason=%s device=%r seq=%d",
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
        first, until = int(valid_from), None if valid_until is None else int(valid_until)
        if not first <= seq or (until is not None and seq > until):
            # A valid signature by a key that should no longer (or not yet) sign: a stolen
            # old key after a rotation or a revocation.
            span = f"{first}..{'' if until is None else until}"
            self._alarm(b, "key_not_valid", f"key valid for {span} only")
            return 403, {
                "error": "key_not_valid",
                "reason": f"key {b.header['kid'][:16]}… signs batches {span} only",
                "seq": seq,
            }
        if held_raw is not None:
            held = stored_batch(bytes(held_raw))
            if held.batch_id == b.batch_id:
                log.info("event=batch_duplicate device=%r seq=%d", dev, seq)
                return 200, self._ack("duplicate", b)
            self._alarm(b, "conflict", "same sequence, another batch id")
            return 409, {"error": "conflict", "seq": seq}
        if not chain.head_ok(b):
            return 422, {
                "error": "rejected",
                "codes": ["chain_broken"],
                "reasons": ["the first batch must carry 32 zero bytes as prev_hash"],
                "seq": seq,
            }
        before = None if before_raw is None else stored_batch(bytes(before_raw))
        if before is not None and not chain.linked(before, b.header["prev_hash"]):
            self._alarm(b, "chain_broken", f"prev_hash does not match batch {seq - 1}")
            return 409, {"error": "chain_broken", "seq": seq, "detail": f"batch {seq - 1}"}
        if after_prev is not None and not chain.linked(b, bytes(after_prev)):
            self._alarm(b, "chain_broken", f"batch {seq + 1} does not chain to it")
            return 409, {"error": "chain_broken", "seq": seq, "detail": f"batch {seq + 1}"}
        last_seq = None if last is None else int(last)
        now = time.time()
        self.db.execute(
            "INSERT INTO batches(device_id, seq, sha256, prev_hash, bytes, received_at) "
            "VALUES(?, ?, ?, ?, ?, ?)",
            (dev, seq, b.file_hash, b.header["prev_hash"], b.raw, now),
        )
        self._follow_rotation(b)
        monitored.store(self.db, b, payload)
        answer = self._ack("stored", b)
        if b.legacy:
            self._count(201, {"status": "legacy_v1"})
        expected = 0 if last_seq is None else last_seq + 1
        gap = chain.gap_before(seq, expected)
        if gap is not None:
            self.db.execute(
                "INSERT INTO gaps(device_id, first_seq, last_seq, found_at) VALUES(?, ?, ?, ?)",
                (dev, *gap, now),
            )
            log.warning("event=batch_gap device=%r missing=%d..%d", dev, *gap)
            answer["gap"] = list(gap)
        elif seq < expected:
            self._fill_gap(dev, seq, now)
            log.warning("event=batch_out_of_order device=%r seq=%d", dev, seq)
            answer["out_of_order"] = True
        return 201, answer

    def _follow_rotation(self, b: batch.Batch) -> None:
        """Trust the key a stored, verified batch hands its chain to, from the next sequence."""
        try:
            announced = batch.rotation_of(b)
        except batch.BatchFormatError as e:
            log.error(
                "event=rotation_ignored device=%r seq=%d reason=%r", b.device_id, b.seq, str(e)
            )
            return
        if announced is None:
            return
        kid, key = announced
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _add_key(self.db, b.device_id, kid, pem, b.seq + 1, f"rotation in batch {b.seq}")
        log.warning("event=key_rotated device=%r seq=%d new_kid=%s", b.device_id, b.seq, kid[:16])

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
        """Per device: batches held, last sequence, open gaps, alarms, and its keys.

        ``keys``: each key the device was trusted with, its sequence range and how
        it came (registered, or a rotation in batch N); ``signed_by``: the stored
        batches as runs ``[kid, first seq, last seq]`` of one key.
        """
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
                "SELECT seq, kind, detail, at, batch_id, repeats FROM alarms "
                "WHERE device_id=? ORDER BY at",
                (dev,),
            )
            # The version byte sits at a fixed offset of every canonical envelope.
            legacy = self.db.one(
                "SELECT count(*) FROM batches WHERE device_id=? AND substr(bytes, ?, 1) = ?",
                (dev, batch.VERSION_OFFSET + 1, bytes([batch.LEGACY_VERSION])),
            )
            key_rows = self.db.all(
                "SELECT kid, valid_from, valid_until, via FROM device_keys WHERE device_id=? "
                "ORDER BY valid_from",
                (dev,),
            )
            signed_by: list[list[Any]] = []
            for seq, raw in stored_batches(self.db, dev):
                k = stored_batch(raw).header["kid"]
                if signed_by and signed_by[-1][0] == k and signed_by[-1][2] == seq - 1:
                    signed_by[-1][2] = seq
                else:
                    signed_by.append([k, seq, seq])
            out.append(
                {
                    "device_id": dev,
                    "kid": kid[0],
                    "batches": int(n),
                    "last_seq": None if last is None else int(last),
                    "gaps": [[int(a), int(b)] for a, b in gaps],
                    "legacy_v1": int(legacy[0]),
                    "alarms": [
                        {
                            "seq": s,
                            "kind": k,
                            "detail": d,
                            "at": a,
                            "batch_id": None if i is None else bytes(i).hex(),
                            "repeats": int(r),
                        }
                        for s, k, d, a, i, r in alarms
                    ],
                    "keys": [
                        {
                            "kid": k,
                            "valid_from": int(f),
                            "valid_until": None if u is None else int(u),
                            "via": v,
                        }
                        for k, f, u, v in key_rows
                    ],
                    "signed_by": signed_by,
                }
            )
        return out


def __getattr__(name: str) -> Any:
    # The in-process server moved to ingest_serve (it needs uvicorn); old imports keep working.
    if name == "IngestServer":
        from cngmrv.office.ingest_serve import IngestServer

        return IngestServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def stored_batches(db: IngestDB, device_id: str) -> list[tuple[int, bytes]]:
    rows = db.all("SELECT seq, bytes FROM batches WHERE device_id=? ORDER BY seq", (device_id,))
    return [(int(s), bytes(r)) for s, r in rows]
