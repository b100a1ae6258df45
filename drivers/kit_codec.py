# ruff: noqa: UP031, UP032
# %-formatting on purpose: this file must run on the kit microcontroller, and
# MicroPython compiles f-strings only as a build option, with fewer features.
"""Kit link codec: the wire format between the converter-kit ECU and the agent.

No public protocol exists for dual-fuel kit ECUs, so cngmrv defines one. The
specification, with units, rates, the handshake, the extension rules and test
vectors, is ``docs/kit-protocol.md``; this module is its reference
implementation, and the two must agree byte for byte (the tests check the
document's vectors against this code).

It runs both on CPython (the agent, the simulated kit) and on MicroPython (the
kit microcontroller), so it uses only ``struct``, no f-strings, no
dataclasses, no runtime typing (types are in comments, checked by mypy against
the MicroPython stubs), and it does no I/O.

In short: a frame is ``COBS(body || crc16_be) || 0x00`` with CRC-16/CCITT-FALSE.
A body is an 8-byte header (version, msg_type, seq, tick_ms; little-endian)
followed by the message's fields. Fields are declared once, in ``LAYOUTS``,
with the protocol version that introduced them; fields are append-only, so
any receiver decodes any version >= 1 by the prefix it knows.

Messages are plain dicts, the same for encoding and decoding::

    {"type": "status", "version": 2, "seq": 7, "tick_ms": 1000, "mode": 1,
     "tank_bar": 200.0, ...}

A field that is "not available" is None. A frame with a valid CRC and a
msg_type this code does not know decodes as ``{"type": "unknown", ...,
"msg_type": n, "payload": b"..."}``, which is a message, not an error.
"""

import struct

PROTOCOL_VERSION = 2

MSG_STATUS = 1
MSG_INJECTION = 2
MSG_MODE = 3
MSG_FAULT = 4
MSG_HELLO = 5

MODE_DIESEL = 0
MODE_DUAL = 1
MODE_FAULT = 2

# Why the kit is not in dual-fuel mode (STATUS.reason, MODE.reason).
REASON_NONE = 0
REASON_LOW_TANK = 1
REASON_DPF_REGEN = 2
REASON_FAULT = 3
REASON_SWITCH = 4
REASON_ENGINE = 5

# Fault codes 1..32; bit (code - 1) of the ``faults`` bitmaps.
FAULT_LOW_TANK = 1
FAULT_REDUCER_TEMP = 2
FAULT_INJECTOR_OPEN = 3
FAULT_TANK_SENSOR = 4
FAULT_TEMP_SENSOR = 5
FAULT_RAIL_SENSOR = 6
FAULT_REGULATOR = 7

# STATUS.flags bits.
FLAG_DPF_REGEN = 0x01
FLAG_SOLENOID_OPEN = 0x02
FLAG_ENGINE_RUNNING = 0x04

# HELLO.role and HELLO.capabilities bits.
ROLE_KIT = 0
ROLE_AGENT = 1
CAP_STATUS_V2 = 0x0001
CAP_INJECTION = 0x0002
CAP_HELLO_REPLY = 0x0004

# Encoded frame length without the delimiter. Leaves room for later message
# types while keeping the receive buffer of a microcontroller small.
MAX_FRAME_LEN = 256
# The largest body whose COBS encoding of body+crc fits MAX_FRAME_LEN:
# n bytes encode to at most n + 1 + n // 254 bytes.
MAX_BODY_LEN = 252

HEADER_FMT = "<BBHI"
HEADER_LEN = 8
# The version 1 STATUS fields, kept as named constants for older callers.
STATUS_FMT = "<BHhH"
STATUS_LEN = 7

NA_U8 = 0xFF
NA_U16 = 0xFFFF
NA_I16 = 0x7FFF
NA_U32 = 0xFFFFFFFF
NO_NA = -1  # for bitmaps: every raw value is valid

# Field: (name, struct code, scale, raw_lo, raw_hi, raw_na, since_version).
# scale 0: an integer passed through as is (enum, counter, bitmap); otherwise
# the physical value is raw / scale. Raw values outside raw_lo..raw_hi that
# are not raw_na decode as None (out of range is as good as not available).
# Every field of a message is listed in wire order; a later version may only
# append.
LAYOUTS = {
    MSG_STATUS: (
        ("mode", "B", 0, 0, 0xFE, NA_U8, 1),
        ("tank_bar", "H", 100, 0, 0xFFFE, NA_U16, 1),
        ("gas_temp_c", "h", 10, -0x8000, 0x7FFE, NA_I16, 1),
        ("gas_flow_kgph", "H", 1000, 0, 0xFFFE, NA_U16, 1),
        ("reason", "B", 0, 0, 0xFE, NA_U8, 2),
        ("flags", "B", 0, 0, 0xFF, NO_NA, 2),
        ("faults", "I", 0, 0, 0xFFFFFFFF, NO_NA, 2),
        ("sub_set_pct", "B", 2, 0, 200, NA_U8, 2),
        ("sub_act_pct", "B", 2, 0, 200, NA_U8, 2),
        ("regulator_bar", "H", 1000, 0, 0xFFFE, NA_U16, 2),
        ("rpm", "H", 8, 0, 0xFFFE, NA_U16, 2),
        ("map_kpa", "H", 10, 0, 0xFFFE, NA_U16, 2),
        ("pulse_ms", "H", 1000, 0, 0xFFFE, NA_U16, 2),
        ("gas_total_kg", "I", 1000, 0, 0xFFFFFFFE, NA_U32, 2),
    ),
    MSG_INJECTION: (
        ("injector", "B", 0, 0, 0xFE, NA_U8, 2),
        ("offset_us", "H", 0, 0, 999, NA_U16, 2),
        ("pulse_ms", "H", 1000, 0, 0xFFFE, NA_U16, 2),
        ("rail_bar", "H", 1000, 0, 0xFFFE, NA_U16, 2),
        ("gas_temp_c", "h", 10, -0x8000, 0x7FFE, NA_I16, 2),
        ("mass_mg", "H", 100, 0, 0xFFFE, NA_U16, 2),
    ),
    MSG_MODE: (
        ("mode", "B", 0, 0, 0xFE, NA_U8, 2),
        ("previous", "B", 0, 0, 0xFE, NA_U8, 2),
        ("reason", "B", 0, 0, 0xFE, NA_U8, 2),
    ),
    MSG_FAULT: (
        ("code", "B", 0, 1, 32, NA_U8, 2),
        ("active", "B", 0, 0, 1, NA_U8, 2),
        ("faults", "I", 0, 0, 0xFFFFFFFF, NO_NA, 2),
    ),
    MSG_HELLO: (
        ("role", "B", 0, 0, 0xFE, NA_U8, 2),
        ("max_version", "B", 0, 1, 0xFE, NA_U8, 2),
        ("kit_id", "I", 0, 0, 0xFFFFFFFE, NA_U32, 2),
        ("fw_major", "B", 0, 0, 0xFE, NA_U8, 2),
        ("fw_minor", "B", 0, 0, 0xFE, NA_U8, 2),
        ("fw_patch", "B", 0, 0, 0xFE, NA_U8, 2),
        ("status_period_ms", "H", 0, 1, 0xFFFE, NA_U16, 2),
        ("injectors", "B", 0, 0, 0xFE, NA_U8, 2),
        ("inj_flow", "H", 1000, 0, 0xFFFE, NA_U16, 2),
        ("inj_dead_ms", "H", 1000, 0, 0xFFFE, NA_U16, 2),
        ("capabilities", "H", 0, 0, 0xFFFF, NO_NA, 2),
    ),
}  # type: dict[int, tuple[tuple[str, str, int, int, int, int, int], ...]]

TYPE_NAMES = {
    MSG_STATUS: "status",
    MSG_INJECTION: "injection",
    MSG_MODE: "mode",
    MSG_FAULT: "fault",
    MSG_HELLO: "hello",
}
TYPE_CODES = {name: code for code, name in TYPE_NAMES.items()}

# Highest rates a kit may send (docs/kit-protocol.md, "Rates"): the agent's
# buffers and the benchmark goal are sized from these.
MAX_STATUS_HZ = 100
MAX_INJECTION_HZ = 400
MAX_FRAMES_PER_S = 500


class KitProtocolError(ValueError):
    """A frame or body that does not follow the wire format."""


class CobsError(KitProtocolError):
    pass


class CrcError(KitProtocolError):
    pass


class LengthError(KitProtocolError):
    pass


class VersionError(KitProtocolError):
    pass


def _make_crc_table():
    # type: () -> list[int]
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            if crc & 0x8000:
                crc = ((crc << 1) ^ 0x1021) & 0xFFFF
            else:
                crc = (crc << 1) & 0xFFFF
        table.append(crc)
    return table


# 256 small ints cost about 1 kB on a microcontroller, and the table makes the
# CRC roughly eight times faster than the bitwise loop, which matters when the
# agent replays logs many times faster than real time.
_CRC_TABLE = _make_crc_table()


def crc16_ccitt_false(data, crc=0xFFFF):
    # type: (bytes | bytearray | memoryview, int) -> int
    """CRC-16/CCITT-FALSE of ``data``; pass a previous result as ``crc`` to continue it."""
    table = _CRC_TABLE
    for byte in bytes(data):
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def cobs_encode(data):
    # type: (bytes | bytearray | memoryview) -> bytes
    """COBS-encode ``data``; the result contains no 0x00 and no delimiter."""
    out = bytearray()
    block = bytearray()
    for byte in bytes(data):
        if byte == 0:
            out.append(len(block) + 1)
            out.extend(block)
            block = bytearray()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(0xFF)
                out.extend(block)
                block = bytearray()
    out.append(len(block) + 1)
    out.extend(block)
    return bytes(out)


def cobs_decode(data):
    # type: (bytes | bytearray | memoryview) -> bytes
    """Decode one COBS-encoded frame (without its delimiter).

    Raises CobsError (a ValueError) on empty input, a 0x00 inside the frame or
    a code byte that points past the end.
    """
    data = bytes(data)
    n = len(data)
    if n == 0:
        raise CobsError("cobs: empty frame")
    out = bytearray()
    i = 0
    while i < n:
        code = data[i]
        if code == 0:
            raise CobsError("cobs: zero byte at offset %d" % i)
        end = i + code
        if end > n:
            raise CobsError("cobs: code 0x%02x at offset %d runs past end of frame" % (code, i))
        block = data[i + 1 : end]
        if block.find(b"\x00") >= 0:
            raise CobsError("cobs: zero byte inside block at offset %d" % i)
        out.extend(block)
        i = end
        # A code below 0xFF stands for its data plus one zero; the zero after
        # the last block is the phantom one the encoder appended, so drop it.
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def _check_int(name, value, lo, hi):
    # type: (str, object, int, int) -> int
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an int, got %r" % (name, value))
    if value < lo or value > hi:
        raise ValueError("%s=%d out of range %d..%d" % (name, value, lo, hi))
    return value


def _scaled(name, value, scale, lo, hi, na):
    # type: (str, object, int, int, int, int) -> int
    """Raw integer for a physical value, ``na`` for None.

    ``lo``/``hi`` are the raw limits; ``na`` lies outside them so a real value
    can never be mistaken for "not available".
    """
    if value is None:
        return na
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a number or None, got %r" % (name, value))
    # NaN and infinities fail every comparison or overflow the raw range;
    # checked before round() because CPython and MicroPython raise different
    # exceptions for them.
    if not (-1e12 < value < 1e12):
        raise ValueError("%s=%r is not a finite number in range" % (name, value))
    raw = int(round(value * scale))
    if raw < lo or raw > hi:
        raise ValueError("%s=%r out of range %r..%r" % (name, value, lo / scale, hi / scale))
    return raw


def _build_layouts():
    # type: () -> dict[tuple[int, int], tuple[str, int, tuple[tuple[str, str, int, int, int, int, int], ...], tuple[str, ...]]]
    """(msg_type, version) -> (struct format, size, fields sent, field names not yet defined)."""
    out = {}
    for code in LAYOUTS:
        fields = LAYOUTS[code]
        first = fields[0][6]
        for version in range(first, PROTOCOL_VERSION + 1):
            sent = tuple([f for f in fields if f[6] <= version])
            later = tuple([f[0] for f in fields if f[6] > version])
            fmt = "<" + "".join([f[1] for f in sent])
            out[(code, version)] = (fmt, struct.calcsize(fmt), sent, later)
    return out


_LAYOUT = _build_layouts()


def _layout(code, version):
    # type: (int, int) -> tuple[str, int, tuple[tuple[str, str, int, int, int, int, int], ...], tuple[str, ...]]
    first = LAYOUTS[code][0][6]
    if version < first:
        version = first
    elif version > PROTOCOL_VERSION:
        version = PROTOCOL_VERSION
    return _LAYOUT[(code, version)]


def encode_header(msg_type, seq, tick_ms, version=PROTOCOL_VERSION):
    # type: (int, int, int, int) -> bytes
    _check_int("version", version, 1, 0xFF)
    _check_int("msg_type", msg_type, 0, 0xFF)
    _check_int("seq", seq, 0, 0xFFFF)
    _check_int("tick_ms", tick_ms, 0, 0xFFFFFFFF)
    return struct.pack(HEADER_FMT, version, msg_type, seq, tick_ms)


def encode_frame(body):
    # type: (bytes | bytearray | memoryview) -> bytes
    """Wrap a body into a complete wire frame: COBS(body || crc16) || 0x00."""
    body = bytes(body)
    if len(body) > MAX_BODY_LEN:
        raise ValueError("body of %d bytes exceeds %d" % (len(body), MAX_BODY_LEN))
    crc = crc16_ccitt_false(body)
    return cobs_encode(body + struct.pack(">H", crc)) + b"\x00"


_HEADER_KEYS = ("type", "version", "seq", "tick_ms")


def encode_message(msg):
    # type: (dict[str, object]) -> bytes
    """Complete wire frame (with trailing 0x00) for a message dict.

    ``msg`` has the shape ``decode_body`` returns: "type" (a name in
    TYPE_CODES), "seq", "tick_ms", optionally "version" (default
    PROTOCOL_VERSION, at most that) and the fields of that version. A field
    left out is sent as "not available" (bitmaps as 0); None sends "not
    available" too, except for bitmaps, which have no such value.

    Raises ValueError for an unknown type or field, a field the chosen version
    does not have, or a value out of its range (it is never clipped: a clipped
    reading would silently misstate gas use), and TypeError for a value of the
    wrong type.
    """
    name = msg.get("type")
    code = TYPE_CODES.get(name, 0) if isinstance(name, str) else 0
    if not code:
        raise ValueError("cannot encode message type %r" % (name,))
    version = msg.get("version", PROTOCOL_VERSION)
    _check_int("version", version, 1, PROTOCOL_VERSION)
    fmt, _size, sent, later = _layout(code, version)  # type: ignore[arg-type]
    names = [f[0] for f in sent]
    for key in msg:
        if key in _HEADER_KEYS or key in names:
            continue
        if key in later:
            if msg[key] is None:
                continue
            raise ValueError("%s.%s needs a protocol version above %r" % (name, key, version))
        raise ValueError("%s has no field %r" % (name, key))
    raw = []
    for fname, _code, scale, lo, hi, na, _since in sent:
        value = msg.get(fname, 0 if na == NO_NA else None)
        if scale:
            raw.append(_scaled(fname, value, scale, lo, hi, na))
        elif value is None:
            if na == NO_NA:
                raise ValueError("%s.%s is a bitmap and cannot be None" % (name, fname))
            raw.append(na)
        else:
            raw.append(_check_int(fname, value, lo, hi))
    body = encode_header(code, msg.get("seq"), msg.get("tick_ms"), version)  # type: ignore[arg-type]
    return encode_frame(body + struct.pack(fmt, *raw))


def encode_status(
    seq, tick_ms, mode, tank_bar, gas_temp_c, gas_flow_kgph, ext=None, version=PROTOCOL_VERSION
):
    # type: (int, int, int | None, float | None, float | None, float | None, dict[str, object] | None, int) -> bytes
    """Complete wire frame for a STATUS message; ``ext`` holds the fields added after version 1.

    Same rules as ``encode_message``.
    """
    msg = {
        "type": "status",
        "version": version,
        "seq": seq,
        "tick_ms": tick_ms,
        "mode": mode,
        "tank_bar": tank_bar,
        "gas_temp_c": gas_temp_c,
        "gas_flow_kgph": gas_flow_kgph,
    }  # type: dict[str, object]
    if ext:
        for key in ext:
            if key in msg:
                raise ValueError("status field %r given twice" % (key,))
            msg[key] = ext[key]
    return encode_message(msg)


def decode_body(body):
    # type: (bytes | bytearray | memoryview) -> dict[str, object]
    """Decode a body whose CRC has already been checked.

    Raises LengthError or VersionError (both ValueError) with the reason.
    Fields that the frame's version does not have yet are None; fields of a
    newer version than this code knows, and any other trailing bytes, are
    ignored.
    """
    body = bytes(body)
    if len(body) < HEADER_LEN:
        raise LengthError("body too short for header: %d bytes, need %d" % (len(body), HEADER_LEN))
    version, msg_type, seq, tick_ms = struct.unpack_from(HEADER_FMT, body, 0)
    if version == 0:
        raise VersionError("protocol version 0 is invalid")
    name = TYPE_NAMES.get(msg_type)
    if name is None:
        return {
            "type": "unknown",
            "version": version,
            "seq": seq,
            "tick_ms": tick_ms,
            "msg_type": msg_type,
            "payload": body[HEADER_LEN:],
        }
    fmt, size, sent, later = _layout(msg_type, version)
    if len(body) < HEADER_LEN + size:
        raise LengthError(
            "%s body too short: %d bytes, need %d" % (name, len(body), HEADER_LEN + size)
        )
    msg = {"type": name, "version": version, "seq": seq, "tick_ms": tick_ms}  # type: dict[str, object]
    values = struct.unpack_from(fmt, body, HEADER_LEN)
    i = 0
    for fname, _code, scale, lo, hi, na, _since in sent:
        raw = values[i]
        i += 1
        if raw == na or raw < lo or raw > hi:
            msg[fname] = None
        elif scale:
            # Division, not multiplication by 0.01, gives the float nearest the
            # decimal value (12345 / 1000 == 12.345, 12345 * 0.001 != 12.345).
            msg[fname] = raw / scale
        else:
            msg[fname] = raw
    for fname in later:
        msg[fname] = None
    return msg


def decode_frame(frame):
    # type: (bytes | bytearray | memoryview) -> dict[str, object]
    """Decode one frame as received, without its 0x00 delimiter.

    Raises CobsError, CrcError, LengthError or VersionError (all ValueError).
    """
    if len(frame) > MAX_FRAME_LEN:
        raise LengthError("frame of %d bytes exceeds %d" % (len(frame), MAX_FRAME_LEN))
    raw = cobs_decode(frame)
    if len(raw) < 2:
        raise LengthError("frame too short for crc: %d bytes" % len(raw))
    body = raw[:-2]
    received = (raw[-2] << 8) | raw[-1]
    computed = crc16_ccitt_false(body)
    if received != computed:
        raise CrcError("crc mismatch: received 0x%04x, computed 0x%04x" % (received, computed))
    return decode_body(body)


COUNTER_NAMES = (
    "frames_ok",
    "crc_errors",
    "cobs_errors",
    "length_errors",
    "version_errors",
    "unknown_types",
    "dropped_frames",
    "kit_restarts",
    "bytes_discarded",
)


class FrameDecoder:
    """Stream decoder: feed it arbitrary byte chunks, get complete messages back.

    It resynchronises after garbage (everything up to the next 0x00 is
    discarded), never raises on bad input, and never holds more than
    MAX_FRAME_LEN bytes: a longer run without a delimiter is discarded up to
    the next 0x00 and counted once in ``length_errors``.

    Counters (plain ints):

    * ``frames_ok``: frames accepted, unknown message types included.
    * ``crc_errors``, ``cobs_errors``, ``length_errors`` (too short or too
      long), ``version_errors``: frames rejected, by reason.
    * ``unknown_types``: accepted frames with a msg_type this code does not know.
    * ``dropped_frames``: frames missing according to ``seq`` (mod 65536); the
      first frame, and the first after a kit restart, set the baseline.
    * ``kit_restarts``: ``tick_ms`` went backwards (mod 2**32, by more than
      2**31 ms), so the kit rebooted and its seq restarted; such a jump is not
      counted as dropped frames. A kit that ran longer than about 24.8 days
      before rebooting looks like a forward jump and is counted as drops.
    * ``bytes_discarded``: bytes of rejected or skipped frames (delimiters and
      empty frames not included).

    ``last_error`` is the reason the most recent frame was rejected, or None.

    The first run of bytes the decoder sees (and the first after
    ``resync()``) may be the tail of a frame whose start it missed. If that
    run does not decode, its bytes are counted in ``bytes_discarded`` but not
    as an error, so that connecting mid-stream does not look like a fault.
    """

    def __init__(self, max_frame_len=MAX_FRAME_LEN):
        # type: (int) -> None
        self.max_frame_len = max_frame_len
        self.frames_ok = 0
        self.crc_errors = 0
        self.cobs_errors = 0
        self.length_errors = 0
        self.version_errors = 0
        self.unknown_types = 0
        self.dropped_frames = 0
        self.kit_restarts = 0
        self.bytes_discarded = 0
        self.last_error = None  # type: str | None
        self._buf = bytearray()
        self._skipping = False
        self._at_start = True
        self._last_seq = None  # type: int | None
        self._last_tick = 0

    def counters(self):
        # type: () -> dict[str, int]
        return {name: getattr(self, name) for name in COUNTER_NAMES}

    def resync(self):
        # type: () -> None
        """Forget any partial frame, e.g. after the link was reopened.

        Counters and the seq baseline are kept, so frames lost while the link
        was down show up in ``dropped_frames``.
        """
        self.bytes_discarded += len(self._buf)
        self._buf = bytearray()
        self._skipping = False
        self._at_start = True

    def feed(self, data):
        # type: (bytes | bytearray | memoryview) -> list[dict[str, object]]
        out = []  # type: list[dict[str, object]]
        data = bytes(data)
        n = len(data)
        start = 0
        while start < n:
            end = data.find(b"\x00", start)
            if end < 0:
                self._extend(data[start:])
                break
            self._finish(data[start:end], out)
            start = end + 1
        return out

    def _reject(self, counter, reason, nbytes):
        # type: (str, str, int) -> None
        setattr(self, counter, getattr(self, counter) + 1)
        self.bytes_discarded += nbytes
        self.last_error = reason

    def _extend(self, chunk):
        # type: (bytes) -> None
        if self._skipping:
            self.bytes_discarded += len(chunk)
            return
        if len(self._buf) + len(chunk) > self.max_frame_len:
            self._reject(
                "length_errors",
                "no delimiter within %d bytes" % self.max_frame_len,
                len(self._buf) + len(chunk),
            )
            self._buf = bytearray()
            self._skipping = True
            self._at_start = False
            return
        self._buf.extend(chunk)

    def _finish(self, chunk, out):
        # type: (bytes, list[dict[str, object]]) -> None
        if self._skipping:
            self.bytes_discarded += len(chunk)
            self._skipping = False
            return
        if self._buf:
            frame = bytes(self._buf) + chunk
            self._buf = bytearray()
        else:
            frame = chunk
        at_start = self._at_start
        self._at_start = False
        if not frame:
            return
        if len(frame) > self.max_frame_len:
            self._reject(
                "length_errors",
                "frame of %d bytes exceeds %d" % (len(frame), self.max_frame_len),
                len(frame),
            )
            return
        try:
            msg = decode_frame(frame)
        except KitProtocolError as exc:
            if at_start:
                self.bytes_discarded += len(frame)
                self.last_error = "partial frame at start of stream: %s" % exc
                return
            if isinstance(exc, CrcError):
                counter = "crc_errors"
            elif isinstance(exc, CobsError):
                counter = "cobs_errors"
            elif isinstance(exc, VersionError):
                counter = "version_errors"
            else:
                counter = "length_errors"
            self._reject(counter, str(exc), len(frame))
            return
        seq = msg["seq"]
        tick_ms = msg["tick_ms"]
        if isinstance(seq, int) and isinstance(tick_ms, int):  # always: decode_body sets them
            self._track_seq(seq, tick_ms)
        self.frames_ok += 1
        if msg["type"] == "unknown":
            self.unknown_types += 1
        out.append(msg)

    def _track_seq(self, seq, tick_ms):
        # type: (int, int) -> None
        last = self._last_seq
        if last is not None:
            if (tick_ms - self._last_tick) & 0xFFFFFFFF > 0x80000000:
                self.kit_restarts += 1
            else:
                self.dropped_frames += (seq - last - 1) & 0xFFFF
        self._last_seq = seq
        self._last_tick = tick_ms
