"""The signed batch envelope: building, parsing and verifying it.

A batch file is the msgpack array ``["cngmrv-batch", 2, header, payload, signature]``
where ``header`` and ``payload`` are msgpack-encoded *byte strings* and
``signature`` is the DER ECDSA-P256-SHA256 signature over the exact ``header``
bytes.  Because the algorithm, key id, device id, sequence, previous-batch hash
and payload hash all sit inside the signed header, none of them can be changed
without breaking the signature (OCMF leaves its algorithm unsigned; we do not).

Each batch has exactly one valid encoding (version 2): the envelope and the
header must be msgpack's shortest form (what :func:`packb` writes), the
signature strict DER with a low ``s``.  A relay that re-encodes a batch
(``(r, n-s)``, an array16, a bin32, DER with extra zeros, trailing bytes) gets
it refused as ``noncanonical``; it can never make a second valid copy.  The
batch's identity (:attr:`Batch.batch_id`) is the SHA-256 of its header bytes,
and ``prev_hash`` chains each batch to the previous one's batch id, so neither
depends on the signature bytes.  A verifier detects a deleted batch (a sequence
gap) and a substituted one (a chain break).  The first batch of a device carries
32 zero bytes.

Version 1 batches (stored before version 2) stay verifiable under their own
rules (:attr:`Batch.link_ids`): chained by the SHA-256 of the whole file, both
``s`` forms accepted.  This module is the one owner of these rules: the ingest,
``cngmrv verify``, the store and the reports call it.

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
from functools import cached_property
from pathlib import PurePath
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from cngmrv.signed.keys import (
    ALG,
    ALLOWED_ALGS,
    P256_ORDER,
    KeyFileError,
    Signer,
    kid_of,
    low_s,
    public_key_from_pem,
    verify_signature,
)

MAGIC = "cngmrv-batch"
VERSION = 2  # what build() writes: one valid encoding per batch
LEGACY_VERSION = 1  # stored data from before version 2; verified under its own rules
VERSIONS = frozenset({LEGACY_VERSION, VERSION})
# Where the version byte sits in every canonical envelope (after 0x95 and the fixstr magic).
VERSION_OFFSET = 2 + len(MAGIC)
# The largest batch file accepted anywhere (the ingest's body limit too).  Real
# batches are 0.4-8 KB; a batch of the most readings a config allows
# (agent/config.py) is far below this.  Parsing costs memory linear in these bytes.
MAX_BATCH_BYTES = 256 * 1024
MAX_HEADER_BYTES = 4096
MAX_SIGNATURE_BYTES = 72  # DER of two 33-byte integers
# Nesting a header or payload may have: events are maps of scalars or short lists.
MAX_DEPTH = 16
ZERO_HASH = bytes(32)
REQUIRED_HEADER = ("alg", "kid", "device_id", "batch_seq", "prev_hash", "payload_sha256")
PAYLOAD_FORMAT = "cols-1"
# Fields build() derives from the payload; callers may not set them.
DERIVED_HEADER = ("payload_format", "n_readings", "n_events", "first_t0", "last_t0")
MAX_SEQ = (1 << 63) - 1  # sequences must fit a signed 64-bit SQL integer
MAX_DEVICE_ID = 128
_KID = re.compile(r"[0-9a-f]{64}")
_DEVICE_ID = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9._:-]{0,127}")
# Integral floats below this travel as msgpack integers (at most 5 bytes instead of 9).
_SMALL_INT = 1 << 32
# Event kinds that explain missing batches or readings (see docs/batch-format.md).
LOSS_EVENTS = frozenset({"STORAGE_FULL", "STORE_REPLACED", "STORE_ROLLED_BACK"})
# The signed event by which a device hands its chain to a new key (docs/batch-format.md):
# the batch holding it is the old key's last; the next sequence is the new key's first.
ROTATION_EVENT = "KEY_ROTATION"


class BatchFormatError(ValueError):
    """The bytes are not a well-formed batch envelope; the message says which part.

    ``code`` is the stable code the ingest answers and ``verify`` reports:
    ``malformed``, ``truncated`` or ``noncanonical``.
    """

    code = "malformed"

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        if code is not None:
            self.code = code
        elif text.startswith("truncated"):
            self.code = "truncated"


class NonCanonicalError(BatchFormatError):
    """Not the one valid encoding of a batch: a re-encoding by someone other than the signer."""

    code = "noncanonical"


def packb(obj: Any) -> bytes:
    """The one msgpack encoding used for everything we sign or store."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes, max_len: int | None = None) -> Any:
    """Unpack msgpack with every container and string bounded by ``max_len`` entries.

    The default bound is the data's own length (a container cannot hold more
    entries than it has bytes); extension types are refused.  Depth is bounded
    by msgpack's own stack, and by :data:`MAX_DEPTH` where batches are parsed.
    """
    n = len(data) if max_len is None else max_len
    # strict_map_key=False: reading maps keyed by ints (mode numbers) must not fail.
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=False,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n,
        max_ext_len=0,
    )


def _depth(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """True when ``obj`` nests lists and maps no deeper than ``limit``."""
    # Level by level, following only the containers: a payload holds thousands of
    # scalars and few containers (it is checked for every batch the ingest takes).
    level = [obj] if isinstance(obj, dict | list) else []
    for _ in range(limit):
        below: list[Any] = []
        for o in level:
            for v in o.values() if isinstance(o, dict) else o:
                if isinstance(v, dict | list):
                    below.append(v)
        if not below:
            return True
        level = below
    return not level


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
    version: int = VERSION,
) -> bytes:
    """Encode and sign one batch; returns the exact file bytes, in their one valid encoding.

    ``prev_hash`` is the previous batch's :attr:`Batch.chain_id` (32 zero
    bytes for batch 0).  ``payload`` holds ``readings`` (a list of maps, stored
    column by column) and ``events`` (a list of maps, stored as is).
    ``extra_header`` adds fields such as ``boot_epoch`` and
    ``first_reading_seq``; it may not override the required fields or those
    derived from the payload.  Whatever ``s`` the signer returns, version 2
    carries the low one.  ``version=1`` writes the legacy envelope with the
    signer's signature as is (for tests of stored version-1 data).
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown batch version {version}")
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
    signature = signer.sign(header_bytes)
    if version == VERSION:
        signature = low_s(signature)
    return packb([MAGIC, version, header_bytes, payload_bytes, signature])


# -- parsing --------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """A parsed batch: the raw parts plus the decoded header."""

    raw: bytes
    header_bytes: bytes
    payload_bytes: bytes
    signature: bytes
    header: dict[str, Any]
    version: int = VERSION

    @property
    def seq(self) -> int:
        return int(self.header["batch_seq"])

    @property
    def device_id(self) -> str:
        return str(self.header["device_id"])

    # Hashes of the batch's own immutable bytes, computed once (the ingest reads each
    # several times a batch).
    @cached_property
    def file_hash(self) -> bytes:
        """SHA-256 of the whole file (version 1's chain id; informative for version 2)."""
        return sha256(self.raw)

    @cached_property
    def batch_id(self) -> bytes:
        """The batch's identity: SHA-256 of the exact header bytes, whatever its signature.

        The header commits to the key, device, sequence, previous batch and
        payload, so two copies with one batch id hold the same signed content:
        a duplicate, never a conflict.
        """
        return sha256(self.header_bytes)

    @property
    def legacy(self) -> bool:
        """A version-1 batch, verified under the legacy rules (docs/batch-format.md)."""
        return self.version == LEGACY_VERSION

    @property
    def chain_id(self) -> bytes:
        """What the next batch's ``prev_hash`` carries: the batch id (v2), the file hash (v1)."""
        return self.file_hash if self.legacy else self.batch_id

    @property
    def link_ids(self) -> frozenset[bytes]:
        """Every ``prev_hash`` value that validly links a successor to this batch.

        Version 2: its batch id only.  Version 1: the SHA-256 of its file, or
        of its ``(r, n-s)`` twin re-encoded canonically: old signers did not
        normalize ``s``, so either copy may be the one the device chained to.
        """
        if not self.legacy:
            return frozenset({self.batch_id})
        # From the canonical re-packing of the parts, not only the bytes held: an ingest
        # from before format 2 may hold a re-wrapped copy of the file the device chained to.
        parts = [MAGIC, self.version, self.header_bytes, self.payload_bytes]
        ids = {self.file_hash, sha256(packb([*parts, self.signature]))}
        try:
            r, s = decode_dss_signature(self.signature)
        except ValueError:
            return frozenset(ids)
        ids.add(sha256(packb([*parts, encode_dss_signature(r, P256_ORDER - s)])))
        return frozenset(ids)

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
        obj = _unpack_part(self.payload_bytes, "payload bytes")
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


def claimed(raw: bytes) -> Batch | None:
    """What a non-canonical file claims to be, read without the canonical checks; else None.

    Never a proof of anything (only :func:`parse` and :func:`check` say whether
    a file is a valid batch): it lets a verifier name the device and sequence
    a re-encoded copy stands for, and its batch id.  Bounded like :func:`parse`.
    """
    try:
        outer = msgpack.unpackb(
            raw[:MAX_BATCH_BYTES],
            raw=False,
            max_str_len=64,
            max_bin_len=MAX_BATCH_BYTES,
            max_array_len=5,
            max_map_len=0,
            max_ext_len=0,
        )
    except msgpack.ExtraData as e:
        outer = e.unpacked
    except Exception:  # any garbage: there is no claim to read
        return None
    if not (isinstance(outer, list) and len(outer) == 5):
        return None
    _, version, header_bytes, payload_bytes, signature = outer
    if not all(isinstance(p, bytes) for p in (header_bytes, payload_bytes, signature)):
        return None
    if len(header_bytes) > MAX_HEADER_BYTES:
        return None
    try:
        header = _unpack_part(header_bytes, "header bytes", 256)
        if not isinstance(header, dict) or not all(type(k) is str for k in header):
            return None
        _check_header(header)
    except BatchFormatError:
        return None
    return Batch(raw, header_bytes, payload_bytes, signature, header, int(version))


def chain_id(raw: bytes) -> bytes:
    """The ``prev_hash`` the batch after ``raw`` carries (:attr:`Batch.chain_id`)."""
    return parse(raw).chain_id


def links(before: Batch, prev_hash: bytes) -> bool:
    """True when ``prev_hash`` (a successor's header field) links to ``before``."""
    return prev_hash in before.link_ids


def _unpack_part(data: bytes, what: str, max_len: int | None = None) -> Any:
    try:
        obj = unpackb(data, max_len)
    except msgpack.ExtraData:
        raise NonCanonicalError(f"{what} has trailing bytes after the msgpack value") from None
    except ValueError as e:
        if "incomplete input" in str(e):
            raise BatchFormatError(f"truncated: {what} ends inside a msgpack value") from None
        raise BatchFormatError(f"{what} is not msgpack: {e or type(e).__name__}") from None
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise BatchFormatError(f"{what} is not msgpack: {e or type(e).__name__}") from None
    if not _depth(obj):
        raise BatchFormatError(f"{what} nests deeper than {MAX_DEPTH} levels")
    return obj


def _check_header(header: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED_HEADER if k not in header]
    if missing:
        raise BatchFormatError(f"header lacks {', '.join(missing)}")
    if type(header["alg"]) is not str:
        raise BatchFormatError("alg is not a string")
    if type(header["kid"]) is not str or not _KID.fullmatch(header["kid"]):
        raise BatchFormatError("kid is not 64 lowercase hex digits")
    problem = device_id_problem(header["device_id"])
    if problem:
        raise BatchFormatError(problem)
    for k in ("batch_seq", "first_reading_seq", "n_readings", "n_events", "boot_epoch"):
        if k in header and not (type(header[k]) is int and 0 <= header[k] <= MAX_SEQ):
            raise BatchFormatError(f"{k} is not an integer in 0..2**63-1")
    for k in ("prev_hash", "payload_sha256"):
        if not isinstance(header[k], bytes) or len(header[k]) != 32:
            raise BatchFormatError(f"{k} is not 32 bytes")


def _check_signature(signature: bytes, version: int) -> None:
    """Strict DER, ``0 < r, s < n``, and (version 2) low ``s``: the one valid signature form."""
    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        raise NonCanonicalError("signature is not a strict DER (r, s) sequence") from None
    if encode_dss_signature(r, s) != signature:
        raise NonCanonicalError("signature is not in strict DER form")
    if not (0 < r < P256_ORDER and 0 < s < P256_ORDER):
        raise BatchFormatError("signature r or s is out of range")
    if version == VERSION and s > P256_ORDER // 2:
        raise NonCanonicalError("signature has a high s: version 2 allows only s <= n/2")


def parse(raw: bytes) -> Batch:
    """Parse the envelope and header, checking shape, types and canonical form (not the key).

    Raises :class:`NonCanonicalError` for any encoding but the one valid one
    (envelope or header not in shortest msgpack form, trailing bytes, DER not
    strict, a high ``s`` in version 2), :class:`BatchFormatError` otherwise.
    Every unpack is bounded before any check: the envelope to five elements
    and :data:`MAX_BATCH_BYTES`, the header to :data:`MAX_HEADER_BYTES`.
    """
    if len(raw) > MAX_BATCH_BYTES:
        raise BatchFormatError(f"batch is {len(raw)} bytes, more than {MAX_BATCH_BYTES}")
    try:
        outer = msgpack.unpackb(
            raw,
            raw=False,
            max_str_len=len(MAGIC),
            max_bin_len=MAX_BATCH_BYTES,
            max_array_len=5,
            max_map_len=0,
            max_ext_len=0,
        )
    except msgpack.ExtraData as e:
        head = e.unpacked
        if isinstance(head, list) and len(head) == 5 and head[0] == MAGIC:
            raise NonCanonicalError("envelope has trailing bytes after the batch") from None
        raise BatchFormatError("envelope is not a 5-element msgpack array") from None
    except ValueError as e:
        if "incomplete input" in str(e):
            raise BatchFormatError("truncated: envelope ends inside a msgpack value") from None
        raise BatchFormatError(f"envelope is not msgpack: {e or type(e).__name__}") from None
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise BatchFormatError(f"envelope is not msgpack: {e or type(e).__name__}") from None
    if not isinstance(outer, list) or len(outer) != 5:
        raise BatchFormatError("envelope is not a 5-element msgpack array")
    magic, version, header_bytes, payload_bytes, signature = outer
    if magic != MAGIC:
        raise BatchFormatError(f"magic is {magic!r}, expected {MAGIC!r}")
    if type(version) is not int or version not in VERSIONS:
        raise BatchFormatError(f"unsupported envelope version {version!r}")
    for name, part in (
        ("header", header_bytes),
        ("payload", payload_bytes),
        ("signature", signature),
    ):
        if not isinstance(part, bytes):
            raise BatchFormatError(f"{name} is not a byte string")
    if packb(outer) != raw:
        raise NonCanonicalError("envelope is not in canonical (shortest) msgpack form")
    if len(header_bytes) > MAX_HEADER_BYTES or len(signature) > MAX_SIGNATURE_BYTES:
        raise BatchFormatError("header or signature is longer than a batch's can be")
    header = _unpack_part(header_bytes, "header bytes", 256)
    if not isinstance(header, dict) or not all(type(k) is str for k in header):
        raise BatchFormatError("header is not a map with string keys")
    if packb(header) != header_bytes:
        raise NonCanonicalError("header is not in canonical (shortest) msgpack form")
    _check_header(header)
    _check_signature(signature, version)
    return Batch(raw, header_bytes, payload_bytes, signature, header, version)


def device_id_problem(device_id: object) -> str | None:
    """Why ``device_id`` is not a valid device id, or None: the one rule, used everywhere.

    1..128 characters of letters, digits, ``.``, ``_``, ``-`` and ``:``, not
    starting with ``.`` or ``-``: it becomes a folder name on export and a log
    field, so no path separators, control characters or spaces.  Version-1
    batches written with other ids fail here too; none are known to exist.
    """
    if type(device_id) is not str or not _DEVICE_ID.fullmatch(device_id):
        return (
            f"device_id {device_id!r:.60} is not 1..{MAX_DEVICE_ID} characters of "
            "letters, digits, '.', '_', '-', ':' (not starting with '.' or '-')"
        )
    return None


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
    return check_payload(batch, public_key, allowed_algs)[0]


def check_payload(
    batch: Batch,
    public_key: ec.EllipticCurvePublicKey,
    allowed_algs: Iterable[str] = ALLOWED_ALGS,
) -> tuple[list[Problem], dict[str, Any] | None]:
    """:func:`check`, and the payload it decoded: None unless the batch has no problem.

    For a caller that reads the payload next (the ingest's per-batch sums): the
    payload of a verified batch, decoded once.
    """
    allowed = sorted(allowed_algs)
    alg = batch.header["alg"]
    if alg not in allowed:
        return [
            Problem("alg_not_allowed", f"alg {alg!r} is not allowed (allowed: {allowed})")
        ], None
    problems = []
    if batch.header["kid"] != kid_of(public_key):
        problems.append(Problem("kid_mismatch", "kid does not match the public key"))
    if not verify_signature(public_key, batch.signature, batch.header_bytes):
        problems.append(Problem("bad_signature", "signature does not verify over the header bytes"))
    if sha256(batch.payload_bytes) != batch.header["payload_sha256"]:
        problems.append(Problem("payload_hash", "payload SHA-256 does not match the signed header"))
    if problems:
        return problems, None
    try:
        body = batch.payload()
    except BatchFormatError as e:
        return [Problem("bad_payload", f"payload: {e}")], None
    n = batch.header.get("n_readings")
    if n is not None and n != len(body["readings"]):
        problems.append(
            Problem(
                "bad_payload", f"header says {n} readings, payload holds {len(body['readings'])}"
            )
        )
        return problems, None
    return problems, body


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
    legacy_v1: int = 0  # verified batches accepted under the version-1 rules

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

    reencoded: list[tuple[str, Batch | None, NonCanonicalError]] = []
    for name, raw in named:
        try:
            b = parse(raw)
        except NonCanonicalError as e:
            reencoded.append((name, claimed(raw), e))
            continue
        except BatchFormatError as e:
            bad(e.code, str(e), None, None, name)
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

    # A re-encoded copy beside the valid one is a relay's doing, not a second batch.
    held = {b.batch_id for seqs in by_dev.values() for c in seqs.values() for _, b, ok in c if ok}
    for name, claim, err in reencoded:
        if claim is None:
            bad(err.code, str(err), None, None, name)
        elif claim.batch_id in held:
            report.findings.append(
                Finding(
                    "note",
                    "noncanonical_copy",
                    f"a re-encoded copy of a batch held in its valid form, ignored ({err})",
                    claim.device_id,
                    claim.seq,
                    name,
                )
            )
        else:
            # Like any bad batch it occupies its sequence: reported as bad, not as a gap.
            dev, seq = claim.device_id, claim.seq
            bad(
                err.code,
                f"{err}; the valid encoding of this batch is not in the set",
                dev,
                seq,
                name,
            )
            report.devices.setdefault(dev, DeviceSummary(dev)).bad += 1
            by_dev.setdefault(dev, {}).setdefault(seq, []).append((name, claim, False))
    for dev, seqs in sorted(by_dev.items()):
        _audit_device(report, report.devices[dev], seqs)
    return report


def _audit_device(
    report: AuditReport,
    summary: DeviceSummary,
    seqs: dict[int, list[tuple[str, Batch, bool]]],
) -> None:
    # Imported here: the walker is built on this module's Batch and links.
    from cngmrv.signed import chain

    dev = summary.device_id
    good: dict[int, Batch] = {}
    for seq, copies in seqs.items():
        ok = [(n, b) for n, b, g in copies if g]
        distinct = {b.batch_id for _, b in ok}
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
                    f"replayed: another copy of batch_seq {seq} with the same batch id "
                    "(counted once)",
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
    for hole in chain.holes(present):
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
    for step in chain.walk(good[seq] for seq in sorted(good)):
        b, seq, before = step.batch, step.batch.seq, step.before
        if not step.head_ok:
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
        if not step.linked:
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
        if step.epoch_from is not None:
            report.findings.append(
                Finding(
                    "bad",
                    "epoch_regression",
                    f"boot_epoch went back from {step.epoch_from} to {b.header['boot_epoch']}",
                    dev,
                    seq,
                )
            )
        if step.chained and step.epoch_from is None:
            report.verified.add((dev, seq))
        summary.batches += 1
        summary.legacy_v1 += b.legacy
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


def check_tail(report: AuditReport, expected: Mapping[str | None, int]) -> None:
    """Compare each device's last batch with an outside anchor; missing tails are gaps.

    A chain cannot show that batches after its last one were deleted: nothing
    signed points forward.  ``expected`` maps a device id (or None: every
    device audited) to the last sequence known from outside the files, e.g. the
    ingest's ``last_seq`` or a sequence a device reported in a heartbeat.
    """
    for dev, summary in sorted(report.devices.items()):
        want = expected.get(dev, expected.get(None))
        if want is None:
            continue
        last = -1 if summary.last_seq is None else summary.last_seq
        if last < want:
            summary.gaps.append((last + 1, want))
            report.findings.append(
                Finding(
                    "gap",
                    "tail_missing",
                    f"batches {last + 1}..{want} missing after the last one held "
                    f"(expected the chain to reach {want})",
                    dev,
                    last + 1,
                )
            )
    for named, want in expected.items():
        if named is not None and named not in report.devices:
            report.findings.append(
                Finding(
                    "gap", "tail_missing", f"no batches of {named!r}; expected 0..{want}", named
                )
            )


@dataclass
class ChainReport:
    """Result of verifying one device's batches (the simple view of :func:`audit`)."""

    ok: list[int] = field(default_factory=list)
    bad: dict[str, list[str]] = field(default_factory=dict)  # name -> reasons
    gaps: list[tuple[int, int]] = field(default_factory=list)  # inclusive missing ranges

    @property
    def passed(self) -> bool:
        return not self.bad and not self.gaps


def verify_set(
    named: Iterable[tuple[str, bytes]], keys: ec.EllipticCurvePublicKey | KeyRing
) -> ChainReport:
    """Verify each batch, the hash chain between consecutive ones and sequence gaps.

    ``keys`` is the device's key, or a :class:`KeyRing` of the keys it held
    over time, each bound to its range of sequences (a key used outside its
    range is ``key_not_valid``).  Rotations announced in the chain are
    followed either way.

    Sequences start at 0, so a set whose lowest sequence is above 0 reports the
    missing head as a gap.  A batch whose bytes were altered fails its own
    check (a re-encoded one as ``noncanonical``); the chain runs over batch
    ids, so a re-encoding never breaks its successor's link.
    """
    ring = keys if isinstance(keys, KeyRing) else KeyRing.of([(None, keys)])
    full = audit(named, ring)
    report = ChainReport()
    for f in full.findings:
        if f.severity == "bad":
            report.bad.setdefault(f.where or f"seq {f.seq}", []).append(f.text)
    for s in full.devices.values():
        report.gaps.extend(s.gaps + s.explained_gaps)
    report.gaps.sort()
    report.ok = sorted(seq for _, seq in full.verified)
    return report
