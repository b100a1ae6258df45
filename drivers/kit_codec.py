# ruff: noqa: UP031, UP032
# %-formatting on purpose: this file must run on the kit microcontroller, and
# MicroPython compiles f-strings only as a build option, with fewer features.
"""Kit link codec: wire format v1 between the converter-kit ECU and the agent.

No public protocol exists for dual-fuel kit ECUs, so cngmrv defines this one.
It is deliberately small; a later revision adds a handshake and event streams
without breaking what is written here (see "Extension rules").

This module is the single reference implementation. It runs both on CPython
(the agent, the simulated kit) and on MicroPython (the kit microcontroller),
so it uses only ``struct``, no f-strings, no dataclasses, no runtime typing,
and it does no I/O.

Framing
=======
A frame on the wire is::

    COBS(body || crc16) || 0x00

* COBS is Consistent Overhead Byte Stuffing (Cheshire & Baker, 1999). It
  removes every 0x00 from the frame, so 0x00 is the only delimiter and a
  receiver that starts mid-stream resynchronises at the next 0x00.
  Encoders emit the original Cheshire & Baker form (a final block of 254
  non-zero bytes is followed by a 0x01 code byte); decoders also accept the
  common variant that omits that trailing 0x01.
* crc16 is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, not reflected,
  xorout 0x0000; the check value of b"123456789" is 0x29B1) over ``body``,
  appended big-endian.
* The COBS-encoded frame, without its delimiter, is at most MAX_FRAME_LEN
  (256) bytes, so a body is at most MAX_BODY_LEN (252) bytes. Receivers
  discard longer runs, which bounds their memory.
* A sender may emit extra 0x00 bytes (empty frames); receivers ignore them.
  A kit SHOULD send one 0x00 before its first frame after boot, so that a
  receiver holding a partial frame from before drops it at once.

Body
====
Multi-byte integers in the body are little-endian (only the CRC after it is
big-endian). Every body starts with the 8-byte header::

    offset size type  field
    0      1    u8    version   protocol revision; this document is 1
    1      1    u8    msg_type  see below
    2      2    u16   seq       frame counter, +1 for every frame of any
                                type, wraps 65535 -> 0
    4      4    u32   tick_ms   kit milliseconds since kit boot, wraps

msg_type 1, STATUS (7 bytes after the header, body length 15)::

    offset size type  field          unit / scale       not available
    8      1    u8    mode           0 diesel-only,     0xFF
                                     1 dual-fuel,
                                     2 fault
    9      2    u16   tank_pressure  0.01 bar/bit       0xFFFF
    11     2    i16   gas_temp       0.1 degC/bit       0x7FFF
    13     2    u16   gas_mass_flow  0.001 kg/h/bit     0xFFFF

Ranges: tank pressure 0..655.34 bar, gas temperature -3276.8..3276.6 degC,
gas mass flow 0..65.534 kg/h (a city bus needs up to about 40 kg/h).
Mode values 3..254 are reserved; receivers pass them through and consumers
treat them as "not dual-fuel" (conservative for emission reductions).

Extension rules
===============
* Fields are append-only: a later revision may add fields at the end of a
  message, never move, resize, rescale or reinterpret an existing one.
  Receivers ignore trailing bytes they do not know and reject bodies shorter
  than the fields they need.
* ``version`` is raised whenever fields or message types are added. Because
  every revision is a superset of the previous one, a receiver decodes any
  version >= 1 with the fields it knows and reports the version it saw.
  Version 0 is invalid.
* A new message type gets a new msg_type number. A receiver passes a frame
  with a valid CRC and an unknown msg_type on as an "unknown" message (and
  counts it) instead of treating it as an error. msg_type 0 is reserved.

Decoded messages
================
``decode_body`` returns plain dicts, for STATUS::

    {"type": "status", "version": 1, "seq": 7, "tick_ms": 1000, "mode": 1,
     "tank_bar": 200.0, "gas_temp_c": 15.5, "gas_flow_kgph": 12.345}

with None for a field that is not available, and for an unknown type::

    {"type": "unknown", "version": 1, "seq": 7, "tick_ms": 1000,
     "msg_type": 9, "payload": b"..."}
"""

import struct

PROTOCOL_VERSION = 1

MSG_STATUS = 1

MODE_DIESEL = 0
MODE_DUAL = 1
MODE_FAULT = 2

# Encoded frame length without the delimiter. 256 is plenty for v1 (18 bytes
# for STATUS) and leaves room for later message types, while keeping the
# receive buffer of a microcontroller small.
MAX_FRAME_LEN = 256
# The largest body whose COBS encoding of body+crc fits MAX_FRAME_LEN:
# n bytes encode to at most n + 1 + n // 254 bytes.
MAX_BODY_LEN = 252

HEADER_FMT = "<BBHI"
HEADER_LEN = 8
STATUS_FMT = "<BHhH"
STATUS_LEN = 7

NA_U8 = 0xFF
NA_U16 = 0xFFFF
NA_I16 = 0x7FFF


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
    # type: (str, int, int, int) -> int
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be an int, got %r" % (name, value))
    if value < lo or value > hi:
        raise ValueError("%s=%d out of range %d..%d" % (name, value, lo, hi))
    return value


def _scaled(name, value, scale, lo, hi, na):
    # type: (str, float | None, int, int, int, int) -> int
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


def encode_status(seq, tick_ms, mode, tank_bar, gas_temp_c, gas_flow_kgph):
    # type: (int, int, int | None, float | None, float | None, float | None) -> bytes
    """Complete wire frame (with trailing 0x00) for a STATUS message.

    None for a field encodes "not available". A value outside the field's
    range raises ValueError rather than being clipped, because a clipped
    reading would silently misstate gas use.
    """
    if mode is None:
        raw_mode = NA_U8
    else:
        raw_mode = _check_int("mode", mode, 0, NA_U8 - 1)
    body = encode_header(MSG_STATUS, seq, tick_ms) + struct.pack(
        STATUS_FMT,
        raw_mode,
        _scaled("tank_bar", tank_bar, 100, 0, NA_U16 - 1, NA_U16),
        _scaled("gas_temp_c", gas_temp_c, 10, -0x8000, NA_I16 - 1, NA_I16),
        _scaled("gas_flow_kgph", gas_flow_kgph, 1000, 0, NA_U16 - 1, NA_U16),
    )
    return encode_frame(body)


def _decode_status(body, msg):
    # type: (bytes, dict) -> dict
    if len(body) < HEADER_LEN + STATUS_LEN:
        raise LengthError(
            "status body too short: %d bytes, need %d" % (len(body), HEADER_LEN + STATUS_LEN)
        )
    mode, tank, temp, flow = struct.unpack_from(STATUS_FMT, body, HEADER_LEN)
    msg["type"] = "status"
    msg["mode"] = None if mode == NA_U8 else mode
    # Division, not multiplication by 0.01, gives the float nearest the
    # decimal value (12345 / 1000 == 12.345, 12345 * 0.001 != 12.345).
    msg["tank_bar"] = None if tank == NA_U16 else tank / 100
    msg["gas_temp_c"] = None if temp == NA_I16 else temp / 10
    msg["gas_flow_kgph"] = None if flow == NA_U16 else flow / 1000
    return msg


# msg_type -> decoder for the fields after the header. Later revisions add
# entries here; anything absent decodes as an "unknown" message.
_BODY_DECODERS = {MSG_STATUS: _decode_status}


def decode_body(body):
    # type: (bytes | bytearray | memoryview) -> dict
    """Decode a body whose CRC has already been checked.

    Raises LengthError or VersionError (both ValueError) with the reason.
    """
    body = bytes(body)
    if len(body) < HEADER_LEN:
        raise LengthError("body too short for header: %d bytes, need %d" % (len(body), HEADER_LEN))
    version, msg_type, seq, tick_ms = struct.unpack_from(HEADER_FMT, body, 0)
    if version == 0:
        raise VersionError("protocol version 0 is invalid")
    msg = {"type": "unknown", "version": version, "seq": seq, "tick_ms": tick_ms}
    decoder = _BODY_DECODERS.get(msg_type)
    if decoder is None:
        msg["msg_type"] = msg_type
        msg["payload"] = body[HEADER_LEN:]
        return msg
    return decoder(body, msg)


def decode_frame(frame):
    # type: (bytes | bytearray | memoryview) -> dict
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
        # type: (bytes | bytearray | memoryview) -> list[dict]
        out = []  # type: list[dict]
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
        # type: (bytes, list[dict]) -> None
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
        self._track_seq(msg["seq"], msg["tick_ms"])
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
