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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric import ec

from cngmrv.agent.keys import ALG, Signer, kid_of, verify_signature

MAGIC = "cngmrv-batch"
VERSION = 1
ZERO_HASH = bytes(32)
REQUIRED_HEADER = ("alg", "kid", "device_id", "batch_seq", "prev_hash", "payload_sha256")


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


def build(
    signer: Signer,
    device_id: str,
    batch_seq: int,
    prev_hash: bytes,
    payload: Mapping[str, Any],
    extra_header: Mapping[str, Any] | None = None,
) -> bytes:
    """Encode and sign one batch; returns the exact file bytes.

    ``extra_header`` adds informative fields (boot epoch, time range); it may
    not override the required ones.
    """
    if len(prev_hash) != 32:
        raise ValueError("prev_hash must be 32 bytes")
    payload_bytes = packb(dict(payload))
    header: dict[str, Any] = dict(extra_header or {})
    clash = set(header) & set(REQUIRED_HEADER)
    if clash:
        raise ValueError(f"extra_header may not set {sorted(clash)}")
    header.update(
        {
            "alg": ALG,
            "kid": signer.kid,
            "device_id": device_id,
            "batch_seq": int(batch_seq),
            "prev_hash": bytes(prev_hash),
            "payload_sha256": sha256(payload_bytes),
        }
    )
    header_bytes = packb(header)
    return packb([MAGIC, VERSION, header_bytes, payload_bytes, signer.sign(header_bytes)])


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

    def payload(self) -> dict[str, Any]:
        """Decode the payload; only meaningful after :func:`check` passed."""
        obj = unpackb(self.payload_bytes)
        if not isinstance(obj, dict):
            raise BatchFormatError("payload is not a map")
        return obj


def parse(raw: bytes) -> Batch:
    """Parse the envelope and header, checking shape only (not the signature)."""
    try:
        outer = unpackb(raw)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise BatchFormatError(f"not msgpack: {e}") from None
    if not isinstance(outer, list) or len(outer) != 5:
        raise BatchFormatError("envelope is not a 5-element msgpack array")
    magic, version, header_bytes, payload_bytes, signature = outer
    if magic != MAGIC:
        raise BatchFormatError(f"magic is {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise BatchFormatError(f"unsupported envelope version {version!r}")
    for name, part in (
        ("header", header_bytes),
        ("payload", payload_bytes),
        ("signature", signature),
    ):
        if not isinstance(part, bytes):
            raise BatchFormatError(f"{name} is not a byte string")
    try:
        header = unpackb(header_bytes)
    except Exception as e:
        raise BatchFormatError(f"header bytes are not msgpack: {e}") from None
    if not isinstance(header, dict):
        raise BatchFormatError("header is not a map")
    missing = [k for k in REQUIRED_HEADER if k not in header]
    if missing:
        raise BatchFormatError(f"header lacks {', '.join(missing)}")
    if not isinstance(header["batch_seq"], int) or header["batch_seq"] < 0:
        raise BatchFormatError("batch_seq is not a non-negative integer")
    for k in ("prev_hash", "payload_sha256"):
        if not isinstance(header[k], bytes) or len(header[k]) != 32:
            raise BatchFormatError(f"{k} is not 32 bytes")
    return Batch(raw, header_bytes, payload_bytes, signature, header)


def check(batch: Batch, public_key: ec.EllipticCurvePublicKey) -> list[str]:
    """Problems with one batch on its own (algorithm, key id, signature, payload hash)."""
    problems = []
    if batch.header["alg"] != ALG:
        problems.append(f"alg is {batch.header['alg']!r}, expected {ALG!r}")
    if batch.header["kid"] != kid_of(public_key):
        problems.append("kid does not match the public key")
    if not verify_signature(public_key, batch.signature, batch.header_bytes):
        problems.append("signature does not verify over the header bytes")
    if sha256(batch.payload_bytes) != batch.header["payload_sha256"]:
        problems.append("payload SHA-256 does not match the signed header")
    return problems


@dataclass
class ChainReport:
    """Result of verifying a set of one device's batches."""

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
    report = ChainReport()
    good: dict[int, Batch] = {}
    # A bad batch still occupies its sequence number: it is reported as bad, not as a gap.
    parsed: dict[int, Batch] = {}
    for name, raw in named:
        try:
            b = parse(raw)
        except BatchFormatError as e:
            report.bad.setdefault(name, []).append(str(e))
            continue
        parsed.setdefault(b.seq, b)
        problems = check(b, public_key)
        if b.seq in good and good[b.seq].raw != raw:
            problems.append(f"batch_seq {b.seq} appears twice with different content")
        if problems:
            report.bad.setdefault(name, []).extend(problems)
            continue
        good[b.seq] = b
    seen = sorted(good)
    if parsed:
        expected = 0
        for seq in sorted(parsed):
            if seq > expected:
                report.gaps.append((expected, seq - 1))
            expected = seq + 1
    for seq in seen:
        b = good[seq]
        if seq == 0:
            if b.header["prev_hash"] != ZERO_HASH:
                report.bad.setdefault(f"seq {seq}", []).append(
                    "first batch's prev_hash is not 32 zero bytes"
                )
                continue
        elif seq - 1 in parsed and b.header["prev_hash"] != parsed[seq - 1].file_hash:
            report.bad.setdefault(f"seq {seq}", []).append(
                f"prev_hash does not match batch {seq - 1}: chain broken"
            )
            continue
        report.ok.append(seq)
    return report
