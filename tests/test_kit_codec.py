"""Kit link codec: CRC, COBS, STATUS encoding, stream decoding, MicroPython subset."""

from __future__ import annotations

import ast
import binascii
import math
import struct
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cngmrv.drivers import kit_codec as kc

CODEC_PATH = Path(kc.__file__)


def status(seq: int, tick_ms: int = 0, **kw: object) -> bytes:
    fields: dict[str, object] = {
        "mode": kc.MODE_DUAL,
        "tank_bar": 180.0,
        "gas_temp_c": 20.0,
        "gas_flow_kgph": 5.0,
    }
    fields.update(kw)
    return kc.encode_status(seq, tick_ms, **fields)  # type: ignore[arg-type]


def crc_ok(raw: bytes) -> bool:
    # binascii.crc_hqx is CRC-16 poly 0x1021 unreflected; with init 0xFFFF it is
    # CCITT-FALSE, and an independent implementation. Over body||crc_be the
    # remainder is 0.
    return len(raw) >= 2 and binascii.crc_hqx(raw, 0xFFFF) == 0


# -- CRC ---------------------------------------------------------------------


def test_crc_check_value() -> None:
    assert kc.crc16_ccitt_false(b"123456789") == 0x29B1
    assert kc.crc16_ccitt_false(b"") == 0xFFFF


@given(st.binary(max_size=300), st.binary(max_size=50))
def test_crc_matches_independent_implementation_and_chains(a: bytes, b: bytes) -> None:
    assert kc.crc16_ccitt_false(a + b) == binascii.crc_hqx(a + b, 0xFFFF)
    assert kc.crc16_ccitt_false(b, kc.crc16_ccitt_false(a)) == kc.crc16_ccitt_false(a + b)


# -- COBS --------------------------------------------------------------------

# Vectors from the COBS literature (Cheshire & Baker form: a final block of 254
# non-zero bytes is followed by a 0x01 code byte).
COBS_VECTORS = [
    (b"", b"\x01"),
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255)) + b"\x01"),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
]


@pytest.mark.parametrize("plain, encoded", COBS_VECTORS)
def test_cobs_vectors(plain: bytes, encoded: bytes) -> None:
    assert kc.cobs_encode(plain) == encoded
    assert kc.cobs_decode(encoded) == plain


def test_cobs_decode_accepts_variant_without_trailing_code_byte() -> None:
    # Other COBS libraries drop the final 0x01 after a 254-byte block.
    assert kc.cobs_decode(b"\xff" + bytes(range(1, 255))) == bytes(range(1, 255))


@given(
    st.binary(min_size=0, max_size=300)
    | st.lists(st.sampled_from([0, 1, 255]), max_size=300).map(bytes)
)
@example(b"\x00" * 300)
@example(b"\x01" * 300)
def test_cobs_round_trip(data: bytes) -> None:
    enc = kc.cobs_encode(data)
    assert b"\x00" not in enc
    assert len(enc) <= len(data) + 1 + len(data) // 254
    assert kc.cobs_decode(enc) == data


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"", "empty"),
        (b"\x00", "zero byte"),
        (b"\x02", "past end"),
        (b"\x05\x11\x22", "past end"),
        (b"\x03\x11\x00", "zero byte"),
        (b"\x02\x11\x00\x01", "zero byte"),
        (b"\xff" + b"\x01" * 253, "past end"),
    ],
)
def test_cobs_decode_malformed_raises(bad: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        kc.cobs_decode(bad)


# -- STATUS encode/decode ----------------------------------------------------

# Hand-checked test vectors. If one of these changes, the wire format changed:
# that needs a protocol version bump and a note in docs, not a new vector.
#
# Vector 1: seq=1, tick_ms=1000, dual-fuel, 200.00 bar, 15.5 degC, 12.345 kg/h
#   header  01 01 | 01 00 | E8 03 00 00        version, type, seq LE, tick LE
#   status  01 | 20 4E | 9B 00 | 39 30         mode, 20000, 155, 12345 (LE)
#   crc     A8 0E                              CRC-CCITT-FALSE, big-endian
#   COBS, zeros marked "|":  01 01 01 | E8 03 | | 01 20 4E 9B | 39 30 A8 0E
#   -> 04 01 01 01  03 E8 03  01  05 01 20 4E 9B  05 39 30 A8 0E, then 00
VECTOR_1 = bytes.fromhex("04 01 01 01 03 e8 03 01 05 01 20 4e 9b 05 39 30 a8 0e 00")
VECTOR_1_BODY = bytes.fromhex("01 01 01 00 e8 03 00 00 01 20 4e 9b 00 39 30")
#
# Vector 2: seq=65535, tick_ms=2**32-1, everything N/A except -40.0 degC.
#   body 01 01 FF FF FF FF FF FF | FF FF FF 70 FE FF FF, crc 73 67
#   (-400 = 0xFE70). No zero byte, so one COBS block: code 0x12 = 1 + 17.
VECTOR_2 = bytes.fromhex("12 01 01 ff ff ff ff ff ff ff ff ff 70 fe ff ff 73 67 00")


V2_STATUS_NONE = {
    "reason": None,
    "flags": None,
    "faults": None,
    "sub_set_pct": None,
    "sub_act_pct": None,
    "regulator_bar": None,
    "rpm": None,
    "map_kpa": None,
    "pulse_ms": None,
    "gas_total_kg": None,
}


def test_vector_1_bytes() -> None:
    assert binascii.crc_hqx(VECTOR_1_BODY, 0xFFFF) == 0xA80E
    assert kc.encode_status(1, 1000, kc.MODE_DUAL, 200.0, 15.5, 12.345, version=1) == VECTOR_1
    assert kc.cobs_decode(VECTOR_1[:-1]) == VECTOR_1_BODY + b"\xa8\x0e"
    # A version 1 kit still decodes; the fields it cannot send are not available.
    assert kc.decode_frame(VECTOR_1[:-1]) == {
        "type": "status",
        "version": 1,
        "seq": 1,
        "tick_ms": 1000,
        "mode": 1,
        "tank_bar": 200.0,
        "gas_temp_c": 15.5,
        "gas_flow_kgph": 12.345,
        **V2_STATUS_NONE,
    }


def test_vector_2_bytes() -> None:
    assert kc.encode_status(0xFFFF, 0xFFFFFFFF, None, None, -40.0, None, version=1) == VECTOR_2
    msg = kc.decode_frame(VECTOR_2[:-1])
    assert msg["seq"] == 0xFFFF and msg["tick_ms"] == 0xFFFFFFFF
    assert (msg["mode"], msg["tank_bar"], msg["gas_temp_c"], msg["gas_flow_kgph"]) == (
        None,
        None,
        -40.0,
        None,
    )


def test_version_1_layout_is_a_prefix_of_version_2() -> None:
    v1 = kc.cobs_decode(VECTOR_1[:-1])[:-2]
    v2 = kc.cobs_decode(kc.encode_status(1, 1000, kc.MODE_DUAL, 200.0, 15.5, 12.345)[:-1])[:-2]
    assert v2[0] == 2 and v2[1:15] == v1[1:15] and len(v2) == 35


def opt(strategy: st.SearchStrategy[float]) -> st.SearchStrategy[float | None]:
    return st.none() | strategy


@given(
    seq=st.integers(0, 0xFFFF),
    tick=st.integers(0, 0xFFFFFFFF),
    mode=st.none() | st.integers(0, 254),
    tank=opt(st.floats(0, 655.34)),
    temp=opt(st.floats(-3276.8, 3276.6)),
    flow=opt(st.floats(0, 65.534)),
)
def test_status_round_trip(
    seq: int,
    tick: int,
    mode: int | None,
    tank: float | None,
    temp: float | None,
    flow: float | None,
) -> None:
    frame = kc.encode_status(seq, tick, mode, tank, temp, flow)
    assert frame.endswith(b"\x00") and b"\x00" not in frame[:-1]
    msg = kc.FrameDecoder().feed(frame)[0]
    assert msg["type"] == "status" and msg["version"] == kc.PROTOCOL_VERSION
    assert (msg["seq"], msg["tick_ms"], msg["mode"]) == (seq, tick, mode)
    for key, value, step in (
        ("tank_bar", tank, 0.01),
        ("gas_temp_c", temp, 0.1),
        ("gas_flow_kgph", flow, 0.001),
    ):
        if value is None:
            assert msg[key] is None
        else:
            # Rounding to the nearest step: within half a step, plus float slack.
            assert msg[key] is not None and abs(msg[key] - value) <= step / 2 + 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [
        {"seq": -1},
        {"seq": 0x10000},
        {"tick_ms": -1},
        {"tick_ms": 2**32},
        {"mode": -1},
        {"mode": 255},  # 0xFF means N/A; pass None for that
        {"tank_bar": -0.01},
        {"tank_bar": 655.35},  # raw 0xFFFF is N/A
        {"gas_temp_c": 3276.7},  # raw 0x7FFF is N/A
        {"gas_temp_c": -3276.9},
        {"gas_flow_kgph": 65.535},
        {"gas_flow_kgph": -1.0},
        {"gas_flow_kgph": math.nan},
        {"tank_bar": math.inf},
        {"gas_temp_c": -math.inf},
    ],
)
def test_encode_status_rejects_out_of_range(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "seq": 0,
        "tick_ms": 0,
        "mode": 0,
        "tank_bar": 1.0,
        "gas_temp_c": 1.0,
        "gas_flow_kgph": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError):
        kc.encode_status(**args)  # type: ignore[arg-type]


def test_encode_status_rejects_non_numbers() -> None:
    with pytest.raises(TypeError):
        kc.encode_status(0, 0, 1, "200", 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kc.encode_status(0, 0, True, 1.0, 1.0, 1.0)


def header(msg_type: int = kc.MSG_STATUS, seq: int = 0, tick: int = 0, version: int = 1) -> bytes:
    return struct.pack("<BBHI", version, msg_type, seq, tick)


STATUS_FIELDS = struct.pack("<BHhH", 1, 20000, 155, 12345)


STATUS_V2_FIELDS = STATUS_FIELDS + struct.pack(
    "<BBIBBHHHHI", 0, 6, 0, 125, 122, 2950, 11601, 1423, 6125, 12345678
)


def test_decode_body_ignores_appended_fields_and_reports_version() -> None:
    msg = kc.decode_body(header(version=7) + STATUS_V2_FIELDS + b"\x01\x02\x03")
    assert msg["type"] == "status" and msg["version"] == 7
    assert msg["tank_bar"] == 200.0 and msg["gas_flow_kgph"] == 12.345
    assert msg["rpm"] == 1450.125 and msg["gas_total_kg"] == 12345.678
    # Version 1 bodies may carry trailing bytes too; they are not version 2 fields.
    msg = kc.decode_body(header(version=1) + STATUS_FIELDS + b"\x00" * 20)
    assert msg["rpm"] is None and msg["flags"] is None


@pytest.mark.parametrize(
    "body, error, reason",
    [
        (b"", kc.LengthError, "too short for header"),
        (header()[:7], kc.LengthError, "too short for header"),
        (header(), kc.LengthError, "status body too short"),
        (header() + STATUS_FIELDS[:-1], kc.LengthError, "status body too short"),
        (header(version=0) + STATUS_FIELDS, kc.VersionError, "version 0"),
        # A version 2 frame must hold the version 2 fields.
        (header(version=2) + STATUS_FIELDS, kc.LengthError, "status body too short"),
        (header(version=2) + STATUS_V2_FIELDS[:-1], kc.LengthError, "status body too short"),
        (header(kc.MSG_INJECTION) + b"\x01" * 10, kc.LengthError, "injection body too short"),
        (header(kc.MSG_MODE) + b"\x01" * 2, kc.LengthError, "mode body too short"),
        (header(kc.MSG_FAULT, version=9) + b"\x01" * 5, kc.LengthError, "fault body too short"),
        (header(kc.MSG_HELLO) + b"\x01" * 15, kc.LengthError, "hello body too short"),
    ],
)
def test_decode_body_rejects(body: bytes, error: type[Exception], reason: str) -> None:
    with pytest.raises(error, match=reason):
        kc.decode_body(body)
    assert issubclass(error, ValueError)


def test_unknown_type_is_a_message_not_an_error() -> None:
    frame = kc.encode_frame(header(msg_type=200, seq=3, tick=9) + b"future")
    dec = kc.FrameDecoder()
    assert dec.feed(frame) == [
        {
            "type": "unknown",
            "version": 1,
            "seq": 3,
            "tick_ms": 9,
            "msg_type": 200,
            "payload": b"future",
        }
    ]
    assert (dec.frames_ok, dec.unknown_types, dec.last_error) == (1, 1, None)


@settings(max_examples=50)
@given(st.binary(min_size=kc.MAX_BODY_LEN - 8, max_size=kc.MAX_BODY_LEN - 8))
def test_largest_body_fits_max_frame_len(payload: bytes) -> None:
    frame = kc.encode_frame(header(msg_type=99) + payload)
    assert len(frame) - 1 <= kc.MAX_FRAME_LEN
    assert kc.FrameDecoder().feed(frame)[0]["payload"] == payload


def test_encode_frame_rejects_oversized_body() -> None:
    with pytest.raises(ValueError):
        kc.encode_frame(b"\x01" * (kc.MAX_BODY_LEN + 1))


# -- FrameDecoder ------------------------------------------------------------


def decode_all(chunks: list[bytes]) -> tuple[list[dict], kc.FrameDecoder]:
    dec = kc.FrameDecoder()
    out: list[dict] = []
    for chunk in chunks:
        out.extend(dec.feed(chunk))
    return out, dec


STREAM = b"".join(status(s, 10 * s, tank_bar=100.0 + s) for s in range(4)) + VECTOR_1


def test_split_at_every_boundary_gives_same_messages() -> None:
    whole, _ = decode_all([STREAM])
    assert [m["seq"] for m in whole] == [0, 1, 2, 3, 1]
    for i in range(len(STREAM) + 1):
        assert decode_all([STREAM[:i], STREAM[i:]])[0] == whole, i
    byte_by_byte, dec = decode_all([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert byte_by_byte == whole
    assert dec.bytes_discarded == 0 and dec.crc_errors == 0


@given(st.lists(st.integers(0, len(STREAM)), max_size=10))
def test_split_at_random_boundaries(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert decode_all(chunks)[0] == decode_all([STREAM])[0]


def test_garbage_before_and_between_frames_is_skipped_and_counted() -> None:
    # A receiver that starts mid-stream sees the tail of a frame first.
    tail = status(99)[5:]
    banner = b"KIT fw 1.2 boot\r\n\x00"  # text the kit prints, then a delimiter
    stream = tail + status(0) + banner + status(1) + b"\x00\x00" + status(2)
    msgs, dec = decode_all([stream])
    assert [m["seq"] for m in msgs] == [0, 1, 2]
    assert dec.bytes_discarded == len(tail) - 1 + len(banner) - 1
    # The leading partial frame is expected at connect time: not an error.
    assert dec.cobs_errors + dec.crc_errors + dec.length_errors == 1
    assert dec.last_error is not None


def test_garbage_glued_to_a_frame_costs_that_frame_only() -> None:
    stream = status(0) + b"\x07junk" + status(1) + status(2)
    msgs, dec = decode_all([stream])
    assert [m["seq"] for m in msgs] == [0, 2]
    assert dec.cobs_errors + dec.crc_errors == 1
    assert dec.dropped_frames == 1


def cobs_code_positions(encoded: bytes) -> set[int]:
    positions, i = set(), 0
    while i < len(encoded):
        positions.add(i)
        i += encoded[i]
    return positions


def test_flipped_bit_is_a_crc_error_and_neighbours_survive() -> None:
    frames = [status(s) for s in range(3)]
    bad = bytearray(frames[1])
    # Flip a data byte, not a COBS code byte (a code flip is a framing error).
    pos = next(i for i in range(len(bad) - 1) if i not in cobs_code_positions(bytes(bad[:-1])))
    bad[pos] ^= 0x04
    msgs, dec = decode_all([frames[0] + bytes(bad) + frames[2]])
    assert [m["seq"] for m in msgs] == [0, 2]
    assert dec.crc_errors == 1
    assert dec.frames_ok == 2
    assert dec.last_error is not None and "crc mismatch" in dec.last_error
    assert dec.bytes_discarded == len(bad) - 1


def test_every_single_bit_flip_is_rejected() -> None:
    frames = [status(s, tank_bar=123.45) for s in range(3)]
    middle = frames[1]
    for pos in range(len(middle) - 1):
        for bit in range(8):
            bad = bytearray(middle)
            bad[pos] ^= 1 << bit
            msgs, dec = decode_all([frames[0] + bytes(bad) + frames[2]])
            assert [m["seq"] for m in msgs] == [0, 2], (pos, bit)
            assert dec.crc_errors + dec.cobs_errors + dec.length_errors >= 1


@pytest.mark.parametrize(
    "seqs, dropped",
    [
        ([1000, 1001, 1002], 0),  # first frame sets the baseline
        ([5, 6, 9], 2),
        ([65534, 65535, 0, 1], 0),  # wraparound is not a drop
        ([65535, 1], 1),
        ([65000, 10], 545),
    ],
)
def test_seq_gaps_count_dropped_frames(seqs: list[int], dropped: int) -> None:
    _, dec = decode_all([status(s, 1000 + i) for i, s in enumerate(seqs)])
    assert dec.dropped_frames == dropped
    assert dec.frames_ok == len(seqs)


def test_kit_restart_is_not_counted_as_dropped_frames() -> None:
    stream = status(500, 60_000) + status(501, 60_100) + status(0, 250) + status(1, 350)
    _, dec = decode_all([stream])
    assert (dec.kit_restarts, dec.dropped_frames) == (1, 0)
    # tick_ms wrapping at 2**32 is not a restart.
    _, dec = decode_all([status(7, 2**32 - 50) + status(8, 50)])
    assert (dec.kit_restarts, dec.dropped_frames) == (0, 0)


def test_overlong_run_is_bounded_and_counted() -> None:
    dec = kc.FrameDecoder()
    assert len(dec.feed(status(0))) == 1
    junk = bytes(range(1, 256)) * 40
    for i in range(0, len(junk), 97):
        assert dec.feed(junk[i : i + 97]) == []
        assert len(dec._buf) <= kc.MAX_FRAME_LEN
    assert dec.length_errors == 1
    assert dec.bytes_discarded == len(junk)
    msgs = dec.feed(b"\x00" + status(1))
    assert [m["seq"] for m in msgs] == [1]
    assert dec.bytes_discarded == len(junk)
    # Same when the delimiter arrives in the same chunk as the long run.
    assert dec.feed(b"\x01" * 300 + b"\x00" + status(2)) != []
    assert dec.length_errors == 2


def test_resync_drops_partial_frame_and_keeps_seq_baseline() -> None:
    dec = kc.FrameDecoder()
    dec.feed(status(0))
    dec.feed(status(1)[:6])
    dec.resync()
    assert dec.bytes_discarded == 6
    assert [m["seq"] for m in dec.feed(status(5))] == [5]
    assert dec.dropped_frames == 4


def reference_messages(stream: bytes) -> list[dict]:
    """What a correct decoder must yield, derived independently of FrameDecoder."""
    out = []
    for run in stream.split(b"\x00")[:-1]:  # the last piece is unterminated
        if not run or len(run) > kc.MAX_FRAME_LEN:
            continue
        try:
            raw = kc.cobs_decode(run)
        except ValueError:
            continue
        if not crc_ok(raw):
            continue
        try:
            out.append(kc.decode_body(raw[:-2]))
        except ValueError:
            continue
    return out


frames_st = st.builds(
    lambda seq, mode, tank: status(seq, mode=mode, tank_bar=tank),
    st.integers(0, 0xFFFF),
    st.none() | st.integers(0, 254),
    st.none() | st.floats(0, 600),
)
pieces_st = st.lists(
    st.binary(max_size=40) | frames_st | st.just(b"\x00") | st.binary(min_size=250, max_size=600),
    max_size=12,
)


@settings(max_examples=300)
@given(pieces=pieces_st, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_fuzz_never_raises_and_only_yields_crc_valid_messages(
    pieces: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(pieces)
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    msgs, dec = decode_all([stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    assert msgs == reference_messages(stream)
    assert dec.frames_ok == len(msgs)
    assert dec.unknown_types == sum(m["type"] == "unknown" for m in msgs)
    assert len(dec._buf) <= kc.MAX_FRAME_LEN


@given(st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    msgs, _ = decode_all([data])
    assert msgs == reference_messages(data)


# -- MicroPython subset ------------------------------------------------------

# A syntactic approximation that catches the usual ways CPython-only code slips
# into the codec. The real checks: `make lint` type-checks the codec against
# MicroPython's stubs (mypy-micropython.ini), and test_kit_micropython.py runs
# it under MicroPython itself.
ALLOWED_IMPORTS = {"struct"}
FORBIDDEN_CALL_KEYWORDS = {("from_bytes", "byteorder"), ("from_bytes", "signed"), ("hex", "sep")}


def micropython_violations(source: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in ALLOWED_IMPORTS:
                    problems.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            problems.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.JoinedStr):
            # f-strings are a MicroPython build option and never support "=";
            # the codec uses %-formatting instead.
            problems.append(f"{where}: f-string")
        elif isinstance(node, ast.Match):
            problems.append(f"{where}: match statement")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            for kw in node.keywords:
                if (node.func.attr, kw.arg) in FORBIDDEN_CALL_KEYWORDS:
                    problems.append(f"{where}: {node.func.attr}({kw.arg}=...)")
            if node.func.attr == "hex" and node.args:
                problems.append(f"{where}: hex(sep)")
        elif isinstance(node, ast.Name) and node.id in {"dataclass", "dataclasses", "typing"}:
            problems.append(f"{where}: {node.id}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # MicroPython's annotation support is partial; type comments give
            # mypy the same information and cannot break on the kit.
            annotated = [a for a in node.args.args + node.args.kwonlyargs if a.annotation]
            if annotated or node.returns is not None:
                problems.append(f"{where}: annotation on {node.name}")
        elif isinstance(node, ast.AnnAssign):
            problems.append(f"{where}: variable annotation")
    return problems


def test_codec_stays_in_micropython_subset() -> None:
    assert micropython_violations(CODEC_PATH.read_text()) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import typing",
        "from dataclasses import dataclass",
        "import binascii",
        "x = f'{a=}'",
        "x = f'{a}'",
        "n = int.from_bytes(b, byteorder='little')",
        "s = b.hex(':')",
        "def f(x: int) -> int:\n    return x",
        "match x:\n    case 1:\n        pass",
    ],
)
def test_micropython_check_catches(snippet: str) -> None:
    assert micropython_violations(snippet) != []
