"""Re-encodings of a genuine batch that a relay could make without the device's key.

Each function takes a batch file's exact bytes and returns another encoding of
the same signed content: the signature still verifies over the same header
bytes (except :func:`header_map16`, which needs the key: the canonical check
must refuse it all the same).  Used by the tests of the batch format's "one valid
encoding per batch" (tests/test_canonical.py, tests/test_batch.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import msgpack
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from cngmrv.signed import keys


def _parts(raw: bytes) -> list:
    return list(msgpack.unpackb(raw, raw=False))


def _str(s: str, wide: bool = False) -> bytes:
    b = s.encode()
    return (b"\xd9" + bytes([len(b)]) if wide else bytes([0xA0 | len(b)])) + b


def _bin(b: bytes, wide: bool = False) -> bytes:
    return (b"\xc6" + struct.pack(">I", len(b)) if wide else msgpack.packb(b)[: -len(b)]) + b


def _envelope(
    parts: list,
    array16: bool = False,
    uint8_version: bool = False,
    bin32: bool = False,
    str8: bool = False,
) -> bytes:
    magic, version, header, payload, sig = parts
    head = b"\xdc\x00\x05" if array16 else b"\x95"
    ver = b"\xcc" + bytes([version]) if uint8_version else bytes([version])
    return head + _str(magic, str8) + ver + _bin(header, bin32) + _bin(payload) + _bin(sig)


def _der_int(x: int, extra_zero: bool = False) -> bytes:
    b = x.to_bytes((x.bit_length() + 7) // 8, "big")
    if b[0] & 0x80:
        b = b"\x00" + b
    if extra_zero:
        b = b"\x00" + b
    return b"\x02" + bytes([len(b)]) + b


def _with_sig(raw: bytes, sig: bytes) -> bytes:
    p = _parts(raw)
    p[4] = sig
    return msgpack.packb(p, use_bin_type=True)


def high_s(raw: bytes) -> bytes:
    """(r, n - s): still a valid ECDSA signature over the same header."""
    r, s = decode_dss_signature(_parts(raw)[4])
    return _with_sig(raw, encode_dss_signature(r, keys.P256_ORDER - s))


def der_leading_zero(raw: bytes) -> bytes:
    """DER with an extra leading zero byte in r: BER-valid, not strict DER."""
    r, s = decode_dss_signature(_parts(raw)[4])
    body = _der_int(r, extra_zero=True) + _der_int(s)
    return _with_sig(raw, b"\x30" + bytes([len(body)]) + body)


def der_long_length(raw: bytes) -> bytes:
    """DER whose SEQUENCE length is written in long form (0x81 nn)."""
    r, s = decode_dss_signature(_parts(raw)[4])
    body = _der_int(r) + _der_int(s)
    return _with_sig(raw, b"\x30\x81" + bytes([len(body)]) + body)


def array16(raw: bytes) -> bytes:
    return _envelope(_parts(raw), array16=True)


def uint8_version(raw: bytes) -> bytes:
    return _envelope(_parts(raw), uint8_version=True)


def bin32(raw: bytes) -> bytes:
    return _envelope(_parts(raw), bin32=True)


def str8_magic(raw: bytes) -> bytes:
    return _envelope(_parts(raw), str8=True)


def trailing(raw: bytes) -> bytes:
    return raw + b"\x00"


def header_map16(raw: bytes, signer: keys.Signer) -> bytes:
    """The same header map as a map16, re-signed by the key holder: still not canonical."""
    p = _parts(raw)
    header = msgpack.unpackb(p[2], raw=False)
    body = b"".join(
        msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in header.items()
    )
    p[2] = b"\xde" + struct.pack(">H", len(header)) + body
    p[4] = keys.low_s(signer.sign(p[2]))
    return msgpack.packb(p, use_bin_type=True)


# Every re-encoding a relay can make without the key, by name.
REENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "high_s": high_s,
    "der_leading_zero": der_leading_zero,
    "der_long_length": der_long_length,
    "array16": array16,
    "uint8_version": uint8_version,
    "bin32": bin32,
    "str8_magic": str8_magic,
    "trailing": trailing,
}
