"""The signed batch envelope: building, parsing and verifying it.

A batch file is the msgpack array ``["cngmrv-batch", 1, header, payload, signature]``
where ``header`` and ``payload`` are msgpack-encoded *byte strings* and
``signature`` is the DER ECDSA-P256-SHA256 signature over the exact ``header``
bytes.  Because the algorithm, key id, device id, sequence, previous-batch hash
and payload hash all sit inside the signed header, none of them can be changed
without breaking the signature (OCMF leaves its algorithm unsigned; we do not).

``prev_hash`` chains each batch to the SHA-256 of the previous batch *file*, so
a verifier detects both a deleted batch (a sequence gap) and a substituted one
(a chain break).  The first batch of a device carries 32 zero bytes.

The payload holds the readings column by column (``payload_format``
``"cols-1"``, see :func:`encode_readings`): a 60-reading batch is about a
third of the size of the same readings as a list of maps, and the encoding is
lossless, so :meth:`Batch.payload` gives back the very dicts that were sealed.
``docs/batch-format.md`` is the normative description, with test vectors.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric import ec

from cngmrv.signed.keys import (
    ALG,
    ALLOWED_ALGS,
    KeyFileError,
    Signer,
    kid_of,
    public_key_from_pem,
    verify_signature,
)

MAGIC = "cngmrv-batch"
VERSION = 1
ZERO_HASH = bytes(32)
REQUIRED_HEADER = ("alg", "kid", "device_id", "batch_seq", "prev_hash", "payload_sha256")
PAYLOAD_FORMAT = "cols-1"
# Fields build() derives from the payload; callers may not set them.
DERIVED_HEADER = ("payload_format", "n_readings", "n_events", "first_t0", "last_t0")
MAX_SEQ = (1 << 63) - 1  # sequences must fit a signed 64-bit SQL integer
MAX_DEVICE_ID = 128
_KID = re.compile(r"[0-9a-f]{64}")
# Integral floats below this travel as msgpack integers (at most 5 bytes instead of 9).
_SMALL_INT = 1 << 32
# Event kinds that explain missing batches or readings (see docs/batch-format.md).
LOSS_EVENTS = frozenset({"STORAGE_FULL", "STORE_REPLACED", "STORE_ROLLED_BACK"})
# The signed event by which a device hands its chain to a new key (docs/batch-format.md):
# the batch holding it is the old key's last; the next sequence is the new key's first.
ROTATION_EVENT = "KEY_ROTATION"


class BatchFormatError(ValueError):
    """The bytes are not a well-formed batch envelope; the message says which part."""


def packb(obj: Any) -> bytes:
    """The one msgpack encoding used for everything we sign or store."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    # strict_map_key=False: reading maps keyed by ints (mode numbers) must not fail.
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -- the columnar reading table ------------------------------------------------


def _float_entry(x: float) -> int | float:
    # -0.0 is integral but would come back as +0.0, so it stays a float.
    if x.is_integer() and abs(x) < _SMALL_INT and not (x == 0 and math.copysign(1.0, x) < 0):
        return int(x)
    return x


def _column(values: list[Any]) -> dict[str, Any]:
    first = packb(values[0])
    if all(packb(v) == first for v in values[1:]):
        return {"k": values[0]}
    if all(type(v) is float for v in values):
        return {"f": [_float_entry(v) for v in values]}
    if all(type(v) is dict and all(type(k) is str for k in v) for v in values):
        return {"m": encode_readings(values)}
    return {"v": values}


def encode_readings(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Readings (maps with string keys) as a column table: ``{"n": N, "cols": {key: column}}``.

    Each column is a one-entry map whose key says how it is stored:

    - ``k``: every reading holds this same value (compared by its msgpack bytes);
    - ``f``: every reading holds a float; integral ones are stored as integers
      (turn each entry back into a float when decoding);
    - ``m``: every reading holds a map with string keys: a nested column table;
    - ``v``: every reading holds a value, stored as is;
    - ``s``: only some readings hold the key: ``[[index, value], ...]``.

    Lossless: :func:`decode_readings` returns equal values of the same types.
    Key order within a decoded reading follows the order keys were first seen.
    """
    keys: dict[str, None] = {}
    for r in rows:
        for k in r:
            if type(k) is not str:
                raise TypeError(f"reading keys must be strings, got {k!r}")
            keys.setdefault(k, None)
    cols: dict[str, Any] = {}
    for k in keys:
        present = [i for i, r in enumerate(rows) if k in r]
        if len(present) == len(rows):
            cols[k] = _column([r[k] for r in rows])
        else:
            cols[k] = {"s": [[i, rows[i][k]] for i in present]}
    return {"n": len(rows), "cols": cols}


def decode_readings(table: Any, where: str = "readings") -> list[dict[str, Any]]:
    """The inverse of :func:`encode_readings`; raises BatchFormatError naming the column."""
    if not isinstance(table, dict) or set(table) != {"n", "cols"}:
        raise BatchFormatError(f"{where} is not a column table {{n, cols}}")
    n, cols = table["n"], table["cols"]
    if type(n) is not int or not 0 <= n <= 1_000_000 or not isinstance(cols, dict):
        raise BatchFormatError(f"{where}: bad row count or columns")
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, col in cols.items():
        name = f"{where}.{key}"
        if type(key) is not str or not isinstance(col, dict) or len(col) != 1:
            raise BatchFormatError(f"{name}: a column is a one-entry map")
        ((tag, val),) = col.items()
        if tag == "k":
            packed = packb(val)
            for r in rows:
                r[key] = unpackb(packed)  # a fresh copy per row: rows must not share maps
        elif tag == "s":
            if not isinstance(val, list):
                raise BatchFormatError(f"{name}: sparse column is not a list")
            last = -1
            for item in val:
                if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int):
                    raise BatchFormatError(f"{name}: sparse entry is not [index, value]")
                if not last < item[0] < n:
                    raise BatchFormatError(f"{name}: sparse index {item[0]} out of order or range")
                last = item[0]
                rows[item[0]][key] = item[1]
        else:
            values: Any = decode_readings(val, name) if tag == "m" else val
            if not isinstance(values, list) or len(values) != n:
                raise BatchFormatError(f"{name}: column does not have {n} entries")
            if tag == "f":
                if not all(type(v) in (int, float) for v in values):
                    raise BatchFormatError(f"{name}: float column holds a non-number")
                values = [float(v) for v in values]
            elif tag not in ("v", "m"):
                raise BatchFormatError(f"{name}: unknown column kind {tag!r}")
            for r, v in zip(rows, values, strict=True):
                r[key] = v
    return rows


# -- building -------------------------------------------------------------------


def build(
    signer: Signer,
    device_id: str,
    batch_seq: int,
    prev_hash: bytes,
    payload: Mapping[str, Any],
    extra_header: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode and sign one batch; returns the exact file bytes.

    ``payload`` holds ``readings`` (a list of maps, stored column by column)
    and ``events`` (a list of maps, stored as is).  ``extra_header`` adds
    fields such as ``boot_epoch`` and ``first_reading_seq``; it may not
    override the required fields or those derived from the payload.
    """
    if len(prev_hash) != 32:
        raise ValueError("prev_hash must be 32 bytes")
    if not 0 <= batch_seq <= MAX_SEQ:
        raise ValueError("batch_seq out of range")
    readings = list(payload.get("readings", ()))
    events = list(payload.get("events", ()))
    body = {k: v for k, v in payload.items() if k not in ("readings", "events")}
    body["readings"] = encode_readings(readings)
    body["events"] = events
    payload_bytes = packb(body)
    extra = dict(extra_header or {})
    clash = set(extra) & (set(REQUIRED_HEADER) | set(DERIVED_HEADER))
    if clash:
        raise ValueError(f"extra_header may not set {sorted(clash)}")
    header: dict[str, Any] = {
        "alg": ALG,
        "kid": signer.kid,
        "device_id": device_id,
        "batch_seq": int(batch_seq),
        "prev_hash": bytes(prev_hash),
        "payload_sha256": sha256(payload_bytes),
        "payload_format": PAYLOAD_FORMAT,
        "n_readings": len(readings),
        "n_events": len(events),
    }
    if readings and "t0" in readings[0] and "t0" in readings[-1]:
        header["first_t0"] = readings[0]["t0"]
        header["last_t0"] = readings[-1]["t0"]
    header.update(extra)
    header_bytes = packb(header)
    return packb([MAGIC, VERSION, header_bytes, payload_bytes, signer.sign(header_bytes)])


# -- parsing --------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """A parsed batch: the raw parts plus the decoded header."""

    raw: bytes
    header_bytes: bytes
    payload_bytes: bytes
    signature: bytes
    header: dict[str, Any]

    @property
    def seq(self) -> int:
        return int(self.header["batch_seq"])

    @property
    def device_id(self) -> str:
        return str(self.header["device_id"])

    @property
    def file_hash(self) -> bytes:
        return sha256(self.raw)

    @property
    def first_reading_seq(self) -> int | None:
        v = self.header.get("first_reading_seq")
        return v if type(v) is int else None

    @property
    def n_readings(self) -> int | None:
        v = self.header.get("n_readings")
        return v if type(v) is int else None

    def payload(self) -> dict[str, Any]:
        """Decode the payload, readings as a list of dicts; only meaningful after :func:`check`.

        Batches written before ``payload_format`` existed hold readings as a
        plain list of maps; both layouts decode to the same shape.
        """
        try:
            obj = unpackb(self.payload_bytes)
        except ValueError as e:
            raise BatchFormatError(f"payload bytes are not msgpack: {e}") from None
        if not isinstance(obj, dict):
            raise BatchFormatError("payload is not a map")
        readings = obj.get("readings", [])
        if self.header.get("payload_format") == PAYLOAD_FORMAT:
            obj["readings"] = decode_readings(readings)
        elif "payload_format" in self.header:
            raise BatchFormatError(f"unknown payload_format {self.header['payload_format']!r}")
        elif not isinstance(readings, list):
            raise BatchFormatError("readings is not a list")
        events = obj.setdefault("events", [])
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise BatchFormatError("events is not a list of maps")
        return obj

    def events(self) -> list[dict[str, Any]]:
        return list(self.payload()["events"])


def rotation_event(new_signer: Signer) -> dict[str, Any]:
    """The body of the ``KEY_ROTATION`` event announcing ``new_signer``'s key."""
    return {"new_kid": new_signer.kid, "new_pubkey": new_signer.public_pem()}


def rotation_of(b: Batch) -> tuple[str, ec.EllipticCurvePublicKey] | None:
    """The (kid, public key) a batch hands its device's chain to, or None.

    Only meaningful for a batch that verified: the announcement is as good as
    the signature over it.  A malformed announcement (a kid that is not the
    key's, a key that is not P-256, two announcements) raises BatchFormatError.
    """
    if not b.header.get("n_events"):
        return None
    found = [e for e in b.events() if e.get("kind") == ROTATION_EVENT]
    if not found:
        return None
    if len(found) > 1:
        raise BatchFormatError(f"batch {b.seq} announces {len(found)} new keys")
    e = found[0]
    pem = e.get("new_pubkey")
    if not isinstance(pem, bytes):
        raise BatchFormatError("KEY_ROTATION new_pubkey is not a PEM byte string")
    try:
        key = public_key_from_pem(pem, "KEY_ROTATION new_pubkey")
    except KeyFileError as err:
        raise BatchFormatError(str(err)) from None
    if e.get("new_kid") != kid_of(key):
        raise BatchFormatError("KEY_ROTATION new_kid is not the kid of new_pubkey")
    return kid_of(key), key


def _unpack_part(data: bytes, what: str) -> Any:
    try:
        return unpackb(data)
    except msgpack.ExtraData:
        raise BatchFormatError(f"{what} has trailing bytes after the msgpack value") from None
    except ValueError as e:
        if "incomplete input" in str(e):
            raise BatchFormatError(f"truncated: {what} ends inside a msgpack value") from None
        raise BatchFormatError(f"{what} is not msgpack: {e or type(e).__name__}") from None
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise BatchFormatError(f"{what} is not msgpack: {e or type(e).__name__}") from None


def _check_header(header: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_HEADER if k not in header]
    if missing:
        raise BatchFormatError(f"header lacks {', '.join(missing)}")
    if type(header["alg"]) is not str:
        raise BatchFormatError("alg is not a string")
    if type(header["kid"]) is not str or not _KID.fullmatch(header["kid"]):
        raise BatchFormatError("kid is not 64 lowercase hex digits")
    dev = header["device_id"]
    if type(dev) is not str or not dev or len(dev) > MAX_DEVICE_ID:
        raise BatchFormatError(f"device_id is not a string of 1..{MAX_DEVICE_ID} characters")
    for k in ("batch_seq", "first_reading_seq", "n_readings", "n_events", "boot_epoch"):
        if k in header and not (type(header[k]) is int and 0 <= header[k] <= MAX_SEQ):
            raise BatchFormatError(f"{k} is not an integer in 0..2**63-1")
    for k in ("prev_hash", "payload_sha256"):
        if not isinstance(header[k], bytes) or len(header[k]) != 32:
            raise BatchFormatError(f"{k} is not 32 bytes")


def parse(raw: bytes) -> Batch:
    """Parse the envelope and header, checking shape and types only (not the signature)."""
    outer = _unpack_part(raw, "envelope")
    if not isinstance(outer, list) or len(outer) != 5:
        raise BatchFormatError("envelope is not a 5-element msgpack array")
    magic, version, header_bytes, payload_bytes, signature = outer
    if magic != MAGIC:
        raise BatchFormatError(f"magic is {magic!r}, expected {MAGIC!r}")
    if version != VERSION or type(version) is not int:
        raise BatchFormatError(f"unsupported envelope version {version!r}")
    for name, part in (
        ("header", header_bytes),
        ("payload", payload_bytes),
        ("signature", signature),
    ):
        if not isinstance(part, bytes):
            raise BatchFormatError(f"{name} is not a byte string")
    header = _unpack_part(header_bytes, "header bytes")
    if not isinstance(header, dict) or not all(type(k) is str for k in header):
        raise BatchFormatError("header is not a map with string keys")
    _check_header(header)
    return Batch(raw, header_bytes, payload_bytes, signature, header)


# -- checking -------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One reason a batch is refused: a stable ``code`` and a sentence for people."""

    code: str
    text: str

    def __str__(self) -> str:
        return self.text


def check(
    batch: Batch,
    public_key: ec.EllipticCurvePublicKey,
    allowed_algs: Iterable[str] = ALLOWED_ALGS,
) -> list[Problem]:
    """Problems with one batch on its own (algorithm, key id, signature, payload).

    The algorithm is checked first and alone: a header naming an algorithm
    outside the allow-list is refused whatever its signature says.
    """
    allowed = sorted(allowed_algs)
    alg = batch.header["alg"]
    if alg not in allowed:
        return [Problem("alg_not_allowed", f"alg {alg!r} is not allowed (allowed: {allowed})")]
    problems = []
    if batch.header["kid"] != kid_of(public_key):
        problems.append(Problem("kid_mismatch", "kid does not match the public key"))
    if not verify_signature(public_key, batch.signature, batch.header_bytes):
        problems.append(Problem("bad_signature", "signature does not verify over the header bytes"))
    if sha256(batch.payload_bytes) != batch.header["payload_sha256"]:
        problems.append(Problem("payload_hash", "payload SHA-256 does not match the signed header"))
    if problems:
        return problems
    try:
        body = batch.payload()
    except BatchFormatError as e:
        return [Problem("bad_payload", f"payload: {e}")]
    n = batch.header.get("n_readings")
    if n is not None and n != len(body["readings"]):
        problems.append(
            Problem(
                "bad_payload", f"header says {n} readings, payload holds {len(body['readings'])}"
            )
        )
    return problems


# -- auditing a set of batches ---------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """Something an auditor must see.  ``severity``: bad (fails), gap, or note."""

    severity: str
    code: str
    text: str
    device_id: str | None = None
    seq: int | None = None
    where: str | None = None  # the file (or other name) it came from

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class DeviceSummary:
    """What one device's batches say, once verified."""

    device_id: str
    kids: set[str] = field(default_factory=set)
    batches: int = 0  # verified, each counted once
    bad: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)
    explained_gaps: list[tuple[int, int]] = field(default_factory=list)
    readings: int = 0
    reading_gaps: list[tuple[int, int]] = field(default_factory=list)
    first_t0: float | None = None
    last_t0: float | None = None
    boot_epochs: list[int] = field(default_factory=list)
    unclean_stops: int = 0
    clock_events: list[dict[str, Any]] = field(default_factory=list)
    loss_events: list[dict[str, Any]] = field(default_factory=list)
    event_kinds: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    # [kid, first seq, last seq] for each run of verified batches one key signed, in order
    key_ranges: list[list[Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["kids"] = sorted(self.kids)
        for k in ("gaps", "explained_gaps", "reading_gaps"):
            d[k] = [list(g) for g in d[k]]
        return d


@dataclass
class AuditReport:
    devices: dict[str, DeviceSummary] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    # (device, seq) of every batch whose signature, payload and links all verified
    verified: set[tuple[str, int]] = field(default_factory=set)

    @property
    def passed(self) -> bool:
        return not any(f.severity in ("bad", "gap") for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form; ``ok``, ``bad`` and ``gaps`` keep the shape of :class:`ChainReport`."""
        bad: dict[str, list[str]] = {}
        for f in self.findings:
            if f.severity == "bad":
                bad.setdefault(f.where or f"{f.device_id} seq {f.seq}", []).append(f.text)
        return {
            "passed": self.passed,
            "ok": len(self.verified),
            "bad": bad,
            "gaps": sorted(
                list(g) for s in self.devices.values() for g in s.gaps + s.explained_gaps
            ),
            "devices": {d: s.as_dict() for d, s in sorted(self.devices.items())},
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclass(frozen=True)
class KeyRing:
    """Public keys a verifier trusts, by kid, each optionally bound to one device id.

    ``limits`` bounds a key's use on one device to the sequences ``(first,
    last)`` (``last`` None: open), as rotations set them (:func:`follow_rotations`).
    """

    keys: Mapping[str, tuple[ec.EllipticCurvePublicKey, str | None]]
    limits: Mapping[tuple[str, str], tuple[int, int | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, items: Iterable[tuple[str | None, ec.EllipticCurvePublicKey]]) -> KeyRing:
        return cls({kid_of(k): (k, dev) for dev, k in items})

    def refusal(self, device_id: str, kid: str, seq: int) -> Problem | None:
        """Why ``kid`` may not sign batch ``seq`` of ``device_id`` (outside its limits), or None."""
        lim = self.limits.get((device_id, kid))
        if lim is None or (lim[0] <= seq and (lim[1] is None or seq <= lim[1])):
            return None
        span = f"{lim[0]}..{'' if lim[1] is None else lim[1]}"
        return Problem(
            "key_not_valid",
            f"key {kid[:16]}… signs batches {span} of {device_id!r}, not {seq}: "
            "a key used outside its rotation range",
        )


def follow_rotations(batches: Iterable[Batch], ring: KeyRing) -> KeyRing:
    """``ring`` plus the keys the batches hand their chains to, each bound to its device.

    Walks each device's batches in sequence order: a batch that verifies under
    a key the ring trusts and announces a new key (``KEY_ROTATION``) makes the
    new key trusted for the device from the next sequence on, and ends the old
    key's range at that batch.  A rotation in a batch the set lacks is not
    followed: give the new key (``--pubkey DEVICE=FILE``) to verify past it.
    """
    keys = dict(ring.keys)
    limits = dict(ring.limits)
    ordered = sorted(batches, key=lambda b: (b.device_id, b.seq))
    for b in ordered:
        dev, kid, seq = b.device_id, b.header["kid"], b.seq
        entry = keys.get(kid)
        if entry is None or entry[1] not in (None, dev):
            continue
        if KeyRing(keys, limits).refusal(dev, kid, seq) is not None:
            continue
        if check(b, entry[0]):
            continue
        try:
            announced = rotation_of(b)
        except BatchFormatError:
            continue
        if announced is None:
            continue
        new_kid, new_key = announced
        # Limits the caller gave (an ingest's revocations) stay: a rotation only narrows.
        first, last = limits.get((dev, kid), (0, None))
        limits[(dev, kid)] = (first, seq if last is None else min(last, seq))
        keys.setdefault(new_kid, (new_key, dev))
        limits.setdefault((dev, new_kid), (seq + 1, None))
    return KeyRing(keys, limits)


def _seq_from_name(name: str) -> int | None:
    stem = PurePath(name).stem
    return int(stem) if stem.isdigit() else None


def _covered(gap: tuple[int, int], events: list[dict[str, Any]], key: str) -> bool:
    for e in events:
        r = e.get(key)
        if isinstance(r, list) and len(r) == 2 and r[0] <= gap[0] and gap[1] <= r[1]:
            return True
    return False


def _split(
    gap: tuple[int, int], events: list[dict[str, Any]], key: str
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split a missing range into (unexplained, explained) parts by the events' ``key`` ranges.

    Interval arithmetic, never a set of sequence numbers: a forged header may
    claim a sequence near 2**63.
    """
    cuts = sorted(
        (int(r[0]), int(r[1]))
        for e in events
        if isinstance(r := e.get(key), list)
        and len(r) == 2
        and all(type(x) is int for x in r)
        and r[0] <= r[1]
    )
    unexplained, explained = [], []
    lo, hi = gap
    for a, b in cuts:
        if b < lo or a > hi:
            continue
        if a > lo:
            unexplained.append((lo, a - 1))
        explained.append((max(a, lo), min(b, hi)))
        lo = b + 1
        if lo > hi:
            break
    if lo <= hi:
        unexplained.append((lo, hi))
    return unexplained, explained


def audit(
    named: Iterable[tuple[str, bytes]],
    keyring: KeyRing,
    allowed_algs: Iterable[str] = ALLOWED_ALGS,
) -> AuditReport:
    """Verify batches of one or more devices, as an auditor would.

    Per batch: envelope, algorithm allow-list, key id (and the device a key is
    bound to), signature, payload hash, payload decoding, and that a file
    named ``<n>.batch`` holds batch ``n``.  Per device: duplicates (replays)
    and conflicts, the hash chain between consecutive batches, sequence gaps
    (explained when a signed loss event names the range), reading-sequence
    continuity, boot epochs that only go up, and clock events.

    A bad batch still occupies its sequence: it is reported as bad, not as a gap.
    """
    allowed = list(allowed_algs)
    report = AuditReport()
    by_dev: dict[str, dict[int, list[tuple[str, Batch, bool]]]] = {}
    named = list(named)
    parsed = []
    for _, raw in named:
        try:
            parsed.append(parse(raw))
        except BatchFormatError:
            pass  # reported below, in order
    keyring = follow_rotations(parsed, keyring)

    def bad(code: str, text: str, dev: str | None, seq: int | None, where: str | None) -> None:
        report.findings.append(Finding("bad", code, text, dev, seq, where))

    for name, raw in named:
        try:
            b = parse(raw)
        except BatchFormatError as e:
            code = "truncated" if str(e).startswith("truncated") else "malformed"
            bad(code, str(e), None, None, name)
            continue
        dev, seq = b.device_id, b.seq
        problems: list[Problem] = []
        named_seq = _seq_from_name(name)
        if named_seq is not None and named_seq != seq:
            problems.append(
                Problem(
                    "misplaced",
                    f"file is named for batch {named_seq} but holds batch_seq {seq}: "
                    "batches were reordered or renamed",
                )
            )
        entry = keyring.keys.get(b.header["kid"])
        if b.header["alg"] not in allowed:
            alg = b.header["alg"]
            problems.append(
                Problem(
                    "alg_not_allowed", f"alg {alg!r} is not allowed (allowed: {sorted(allowed)})"
                )
            )
        elif entry is None:
            problems.append(
                Problem("unknown_kid", f"no trusted public key has kid {b.header['kid'][:16]}…")
            )
        else:
            key, bound = entry
            if bound is not None and bound != dev:
                problems.append(
                    Problem(
                        "device_mismatch",
                        f"signed with the key of device {bound!r} but names device {dev!r}: "
                        "a batch spliced in from another device",
                    )
                )
            problems.extend(check(b, key, allowed))
            outside = keyring.refusal(dev, b.header["kid"], seq)
            if outside is not None and not problems:
                problems.append(outside)
        summary = report.devices.setdefault(dev, DeviceSummary(dev))
        for p in problems:
            bad(p.code, p.text, dev, seq, name)
        if problems:
            summary.bad += 1
        by_dev.setdefault(dev, {}).setdefault(seq, []).append((name, b, not problems))

    for dev, seqs in sorted(by_dev.items()):
        _audit_device(report, report.devices[dev], seqs)
    return report


def _audit_device(
    report: AuditReport,
    summary: DeviceSummary,
    seqs: dict[int, list[tuple[str, Batch, bool]]],
) -> None:
    dev = summary.device_id
    good: dict[int, Batch] = {}
    for seq, copies in seqs.items():
        ok = [(n, b) for n, b, g in copies if g]
        distinct = {b.raw for _, b in ok}
        if len(distinct) > 1:
            names = ", ".join(n for n, _ in ok)
            report.findings.append(
                Finding(
                    "bad",
                    "conflict",
                    f"batch_seq {seq} signed twice with other content ({names})",
                    dev,
                    seq,
                )
            )
            summary.bad += len(ok)
            continue
        for name, _ in ok[1:]:
            summary.duplicates += 1
            report.findings.append(
                Finding(
                    "bad",
                    "replayed",
                    f"replayed: an identical copy of batch_seq {seq} (counted once)",
                    dev,
                    seq,
                    name,
                )
            )
        if ok:
            good[seq] = ok[0][1]
    present = sorted(seqs)
    if present:
        summary.first_seq, summary.last_seq = present[0], present[-1]
    events_by_seq = {s: b.events() for s, b in good.items()}
    all_events = [e for s in sorted(events_by_seq) for e in events_by_seq[s]]
    loss = [e for e in all_events if e.get("kind") in LOSS_EVENTS]
    summary.loss_events = loss
    holes = [(a + 1, b - 1) for a, b in zip([-1, *present], present, strict=False) if b > a + 1]
    for hole in holes:
        unexplained, explained = _split(hole, loss, "lost_batches")
        for gap in explained:
            summary.explained_gaps.append(gap)
            report.findings.append(
                Finding(
                    "note",
                    "gap_explained",
                    f"batches {gap[0]}..{gap[1]} missing, explained by a signed loss event",
                    dev,
                    gap[0],
                )
            )
        for gap in unexplained:
            summary.gaps.append(gap)
            report.findings.append(
                Finding("gap", "gap", f"batches {gap[0]}..{gap[1]} missing", dev, gap[0])
            )
    prev_epoch = -1
    for seq in sorted(good):
        b = good[seq]
        linked = True
        if seq == 0 and b.header["prev_hash"] != ZERO_HASH:
            linked = False
            report.findings.append(
                Finding(
                    "bad",
                    "chain_broken",
                    "first batch's prev_hash is not 32 zero bytes",
                    dev,
                    seq,
                    f"seq {seq}",
                )
            )
        before = good.get(seq - 1)
        if before is not None and b.header["prev_hash"] != before.file_hash:
            linked = False
            report.findings.append(
                Finding(
                    "bad",
                    "chain_broken",
                    f"prev_hash does not match batch {seq - 1}: chain broken",
                    dev,
                    seq,
                    f"seq {seq}",
                )
            )
        if before is not None:
            _check_reading_link(report, summary, before, b, events_by_seq[seq])
        epoch = b.header.get("boot_epoch")
        if isinstance(epoch, int):
            if epoch < prev_epoch:
                linked = False
                report.findings.append(
                    Finding(
                        "bad",
                        "epoch_regression",
                        f"boot_epoch went back from {prev_epoch} to {epoch}",
                        dev,
                        seq,
                    )
                )
            prev_epoch = max(prev_epoch, epoch)
        if linked:
            report.verified.add((dev, seq))
        summary.batches += 1
        summary.kids.add(b.header["kid"])
        ranges = summary.key_ranges
        if ranges and ranges[-1][0] == b.header["kid"] and ranges[-1][2] == seq - 1:
            ranges[-1][2] = seq
        else:
            ranges.append([b.header["kid"], seq, seq])
        summary.readings += b.n_readings or 0
        if b.header.get("first_t0") is not None:
            t0, t1 = b.header["first_t0"], b.header["last_t0"]
            summary.first_t0 = t0 if summary.first_t0 is None else min(summary.first_t0, t0)
            summary.last_t0 = t1 if summary.last_t0 is None else max(summary.last_t0, t1)
        for e in events_by_seq[seq]:
            kind = str(e.get("kind"))
            summary.event_kinds[kind] = summary.event_kinds.get(kind, 0) + 1
            if kind == "BOOT":
                _check_boot(report, summary, e, seq)
            elif "CLOCK" in kind:
                summary.clock_events.append({"seq": seq, **e})


def _check_reading_link(
    report: AuditReport,
    summary: DeviceSummary,
    before: Batch,
    b: Batch,
    events: list[dict[str, Any]],
) -> None:
    f0, n0, f1 = before.first_reading_seq, before.n_readings, b.first_reading_seq
    if f0 is None or n0 is None or f1 is None or f0 + n0 == f1:
        return
    dev, seq = summary.device_id, b.seq
    if f1 < f0 + n0:
        report.findings.append(
            Finding(
                "bad",
                "reading_overlap",
                f"readings from {f1} were already sealed in batch {seq - 1}",
                dev,
                seq,
            )
        )
        return
    gap = (f0 + n0, f1 - 1)
    if _covered(gap, events, "lost_readings"):
        report.findings.append(
            Finding(
                "note",
                "reading_gap_explained",
                f"readings {gap[0]}..{gap[1]} missing, explained by a signed loss event",
                dev,
                seq,
            )
        )
    else:
        summary.reading_gaps.append(gap)
        report.findings.append(
            Finding(
                "gap",
                "reading_gap",
                f"readings {gap[0]}..{gap[1]} missing before batch {seq}",
                dev,
                seq,
            )
        )


def _check_boot(report: AuditReport, summary: DeviceSummary, e: dict[str, Any], seq: int) -> None:
    epoch = e.get("epoch")
    if not isinstance(epoch, int):
        return
    if summary.boot_epochs and epoch <= summary.boot_epochs[-1]:
        report.findings.append(
            Finding(
                "bad",
                "epoch_regression",
                f"BOOT epoch {epoch} does not follow {summary.boot_epochs[-1]}",
                summary.device_id,
                seq,
            )
        )
    summary.boot_epochs.append(epoch)
    if e.get("clean_stop") is False:
        summary.unclean_stops += 1


@dataclass
class ChainReport:
    """Result of verifying one device's batches with one key (the simple view of :func:`audit`)."""

    ok: list[int] = field(default_factory=list)
    bad: dict[str, list[str]] = field(default_factory=dict)  # name -> reasons
    gaps: list[tuple[int, int]] = field(default_factory=list)  # inclusive missing ranges

    @property
    def passed(self) -> bool:
        return not self.bad and not self.gaps


def verify_set(
    named: Iterable[tuple[str, bytes]], public_key: ec.EllipticCurvePublicKey
) -> ChainReport:
    """Verify each batch, the hash chain between consecutive ones and sequence gaps.

    Sequences start at 0, so a set whose lowest sequence is above 0 reports the
    missing head as a gap.  A batch whose bytes were altered fails its own
    check; its successor then also reports a chain break, since the chain is
    over file bytes.
    """
    full = audit(named, KeyRing.of([(None, public_key)]))
    report = ChainReport()
    for f in full.findings:
        if f.severity == "bad":
            report.bad.setdefault(f.where or f"seq {f.seq}", []).append(f.text)
    for s in full.devices.values():
        report.gaps.extend(s.gaps + s.explained_gaps)
    report.gaps.sort()
    report.ok = sorted(seq for _, seq in full.verified)
    return report
