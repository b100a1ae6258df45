"""SAE J1939 codec: identifiers and the parameter groups cngmrv reads.

Pure functions over integers and bytes: no I/O, no clock, standard library only,
so the same code serves the live bus, log replay and the simulator.

Scope and limits:

* Identifiers are 29-bit (J1939-21). The PGN includes the extended data page (EDP)
  and data page (DP) bits; for PDU1 (PF < 240) the PS byte is the destination and
  is zero in the PGN, for PDU2 the PS byte is the group extension.
* Signals are whole little-endian fields of 1, 2 or 4 bytes (see :data:`SIGNALS`).
  Bit-packed states and DM1 are not decoded here yet; ``decode(PGN_DM1, ...)``
  returns ``{}`` like any PGN without a table entry.
* Raw values are range-checked before scaling (docs/domain.md section 3): the top byte
  of a field decides its status -- up to 0xFA valid, 0xFE error, 0xFF not
  available, 0xFB..0xFD reserved and reported as out of range. Only valid raw
  values become numbers; everything else is ``None``, because an error or
  not-available value must never be integrated.
* Scaling is done as ``raw * num / den + offset`` in exact integer arithmetic up to
  the final division, so a decoded value is the double nearest to the true
  physical value (``3`` raw at 0.05 L/h decodes to ``0.15``, not
  ``0.15000000000000002``) whenever the offset is an integer, as it is for every
  signal in the table. Totals summed by auditors then match the decimal figures.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from fractions import Fraction
from types import MappingProxyType
from typing import Literal, NamedTuple

__all__ = [
    "GLOBAL",
    "PGN_ADDRESS_CLAIMED",
    "PGN_CCVS",
    "PGN_DM1",
    "PGN_EEC1",
    "PGN_EI",
    "PGN_ET1",
    "PGN_GFC",
    "PGN_HOURS",
    "PGN_LFC",
    "PGN_LFE",
    "PGN_NAMES",
    "PGN_REQUEST",
    "PGN_TP_CM",
    "PGN_TP_DT",
    "PGN_VD",
    "PGN_VDHR",
    "SIGNALS",
    "DecodeError",
    "Decoded",
    "J1939Id",
    "SignalSpec",
    "Status",
    "decode",
    "decode_detail",
    "encode",
    "encode_request",
    "make_id",
    "parse_id",
    "pgn_of",
]

PGN_EEC1 = 61444  # 0xF004 electronic engine controller 1
PGN_LFE = 65266  # 0xFEF2 fuel economy (liquid)
PGN_LFC = 65257  # 0xFEE9 fuel consumption (liquid)
PGN_CCVS = 65265  # 0xFEF1 cruise control / vehicle speed
PGN_VDHR = 65217  # 0xFEC1 high-resolution vehicle distance
PGN_VD = 65248  # 0xFEE0 vehicle distance
PGN_ET1 = 65262  # 0xFEEE engine temperature 1
PGN_HOURS = 65253  # 0xFEE5 engine hours, revolutions
PGN_GFC = 65199  # 0xFEAF gaseous fuel consumption
PGN_EI = 65170  # 0xFE92 engine information
PGN_DM1 = 65226  # 0xFECA active diagnostic trouble codes (decoded in drivers.dm1)
# Network management and transport (PDU1: the PS byte is a destination address).
PGN_REQUEST = 59904  # 0xEA00
PGN_TP_CM = 60416  # 0xEC00 transport connection management (drivers.tp)
PGN_TP_DT = 60160  # 0xEB00 transport data transfer (drivers.tp)
PGN_ADDRESS_CLAIMED = 60928  # 0xEE00 address claimed / cannot claim (drivers.address)
GLOBAL = 255  # destination address of a broadcast

PGN_NAMES: Mapping[int, str] = MappingProxyType(
    {
        PGN_EEC1: "EEC1",
        PGN_LFE: "LFE",
        PGN_LFC: "LFC",
        PGN_CCVS: "CCVS",
        PGN_VDHR: "VDHR",
        PGN_VD: "VD",
        PGN_ET1: "ET1",
        PGN_HOURS: "HOURS",
        PGN_GFC: "GFC",
        PGN_EI: "EI",
        PGN_DM1: "DM1",
        PGN_REQUEST: "Request",
        PGN_TP_CM: "TP.CM",
        PGN_TP_DT: "TP.DT",
        PGN_ADDRESS_CLAIMED: "AddressClaimed",
    }
)

_MAX_ID = 0x1FFFFFFF
#: An 11-bit (standard) CAN identifier travels in the agent's frame tuples as
#: ``id | STANDARD_ID_FLAG``: above every 29-bit identifier, so one tuple layout
#: carries both and no J1939 decoder mistakes an OBD-II answer for a PGN.
STANDARD_ID_FLAG = 1 << 31
_MAX_PGN = 0x3FFFF
_PDU2_MIN_PF = 240
_GLOBAL = GLOBAL

Status = Literal["ok", "error", "not_available", "out_of_range"]


class J1939Id(NamedTuple):
    """The fields of a 29-bit J1939 identifier; ``destination`` is 255 for PDU2."""

    priority: int
    pgn: int
    source: int
    destination: int


class Decoded(NamedTuple):
    """One decoded signal: ``value`` is ``None`` unless ``status`` is ``"ok"``."""

    value: float | None
    status: Status


class DecodeError(ValueError):
    """A frame of a known PGN that cannot be decoded.

    ``str()`` names the PGN and the reason, e.g. ``"LFE (65266): need 4 bytes, got 3"``;
    ``pgn`` and ``reason`` are kept as attributes for structured logging.
    """

    def __init__(self, pgn: int, reason: str) -> None:
        self.pgn = pgn
        self.reason = reason
        super().__init__(f"{PGN_NAMES.get(pgn, 'PGN')} ({pgn}): {reason}")

    def __reduce__(self) -> tuple[type[DecodeError], tuple[int, str]]:
        # The default pickling replays self.args (the message) into __init__, which
        # takes (pgn, reason); exceptions cross process boundaries in the agent.
        return (DecodeError, (self.pgn, self.reason))


class SignalSpec(NamedTuple):
    """One SPN: a little-endian unsigned field of ``length`` bytes (1, 2 or 4).

    ``start`` is 1-based as in the J1939 tables. Physical value is
    ``raw * resolution + offset`` for raw values up to :attr:`raw_max`.
    """

    name: str
    start: int
    length: int
    resolution: float
    offset: float
    unit: str
    spn: int

    @property
    def raw_max(self) -> int:
        """Largest valid raw value: 0xFA, 0xFAFF or 0xFAFFFFFF."""
        return ((0xFA + 1) << (8 * (self.length - 1))) - 1

    @property
    def min_value(self) -> float:
        """Smallest valid physical value (raw 0)."""
        return _to_physical(0, _scale(self.resolution), self.offset)

    @property
    def max_value(self) -> float:
        """Largest valid physical value, exactly as :func:`decode` returns it."""
        return _to_physical(self.raw_max, _scale(self.resolution), self.offset)


def _scale(resolution: float) -> Fraction:
    # J1939 resolutions are short decimals or binary fractions (0.05, 0.4, 1/512);
    # recovering the intended rational lets decode round once instead of twice.
    return Fraction(resolution).limit_denominator(1_000_000)


def _to_physical(raw: int, scale: Fraction, offset: float) -> float:
    return raw * scale.numerator / scale.denominator + offset


def _sig(
    name: str, spn: int, first: int, last: int, resolution: float, offset: float, unit: str
) -> SignalSpec:
    return SignalSpec(name, first, last - first + 1, resolution, offset, unit, spn)


SIGNALS: Mapping[int, tuple[SignalSpec, ...]] = MappingProxyType(
    {
        PGN_EEC1: (
            _sig("actual_torque_pct", 513, 3, 3, 1.0, -125.0, "%"),
            _sig("engine_speed_rpm", 190, 4, 5, 0.125, 0.0, "rpm"),
        ),
        PGN_LFE: (
            _sig("fuel_rate_lph", 183, 1, 2, 0.05, 0.0, "L/h"),
            _sig("instant_economy_kmpl", 184, 3, 4, 1 / 512, 0.0, "km/L"),
        ),
        PGN_LFC: (
            _sig("trip_fuel_l", 182, 1, 4, 0.5, 0.0, "L"),
            _sig("total_fuel_l", 250, 5, 8, 0.5, 0.0, "L"),
        ),
        PGN_CCVS: (_sig("wheel_speed_kmh", 84, 2, 3, 1 / 256, 0.0, "km/h"),),
        PGN_VDHR: (
            _sig("total_distance_km", 917, 1, 4, 0.005, 0.0, "km"),
            _sig("trip_distance_km", 918, 5, 8, 0.005, 0.0, "km"),
        ),
        PGN_VD: (
            _sig("vd_trip_distance_km", 244, 1, 4, 0.125, 0.0, "km"),
            _sig("vd_total_distance_km", 245, 5, 8, 0.125, 0.0, "km"),
        ),
        PGN_ET1: (_sig("coolant_temp_c", 110, 1, 1, 1.0, -40.0, "°C"),),
        PGN_HOURS: (_sig("engine_hours_h", 247, 1, 4, 0.05, 0.0, "h"),),
        PGN_GFC: (
            _sig("trip_gas_kg", 1039, 1, 4, 0.5, 0.0, "kg"),
            _sig("total_gas_kg", 1040, 5, 8, 0.5, 0.0, "kg"),
        ),
        PGN_EI: (_sig("gas_mass_flow_kgph", 1241, 5, 6, 0.05, 0.0, "kg/h"),),
    }
)


# --------------------------------------------------------------------------- identifiers


def parse_id(can_id: int) -> J1939Id:
    """Split a 29-bit CAN identifier into priority, PGN, source and destination.

    Raises ``ValueError`` if ``can_id`` does not fit in 29 bits (an 11-bit frame
    is not J1939 and must be filtered out by the caller via ``is_extended_id``).
    """
    if not 0 <= can_id <= _MAX_ID:
        raise ValueError(f"CAN id {can_id:#x} is not a 29-bit identifier")
    pf = (can_id >> 16) & 0xFF
    if pf < _PDU2_MIN_PF:
        return J1939Id(can_id >> 26, (can_id >> 8) & 0x3FF00, can_id & 0xFF, (can_id >> 8) & 0xFF)
    return J1939Id(can_id >> 26, (can_id >> 8) & 0x3FFFF, can_id & 0xFF, _GLOBAL)


def pgn_of(can_id: int) -> int:
    """The PGN of a 29-bit identifier, as :func:`parse_id` gives it, without building a tuple.

    The per-frame fast path: the caller must have checked that ``can_id`` fits
    in 29 bits (``parse_id`` raises otherwise; this does not check).
    """
    # PF >= 240 (PDU2) exactly when the top four bits of PF are all set.
    return (can_id >> 8) & (0x3FFFF if can_id & 0xF00000 == 0xF00000 else 0x3FF00)


def make_id(pgn: int, source: int, priority: int = 6, destination: int = 255) -> int:
    """Build the 29-bit identifier for ``pgn`` sent by ``source``; inverse of :func:`parse_id`.

    Raises ``ValueError`` for out-of-range fields, for a PDU1 PGN whose low byte is
    not zero (that byte is the destination, not part of the PGN), and for a
    destination other than 255 on a PDU2 (broadcast-only) PGN.
    """
    if not 0 <= pgn <= _MAX_PGN:
        raise ValueError(f"PGN {pgn} out of range 0..{_MAX_PGN}")
    if not 0 <= source <= 0xFF:
        raise ValueError(f"source address {source} out of range 0..255")
    if not 0 <= priority <= 7:
        raise ValueError(f"priority {priority} out of range 0..7")
    if not 0 <= destination <= 0xFF:
        raise ValueError(f"destination address {destination} out of range 0..255")
    if (pgn >> 8) & 0xFF < _PDU2_MIN_PF:
        if pgn & 0xFF:
            raise ValueError(f"PGN {pgn} is PDU1 and must have a zero low byte")
        ps = destination
    else:
        if destination != _GLOBAL:
            raise ValueError(f"PGN {pgn} is PDU2 (broadcast); destination must be 255")
        ps = pgn & 0xFF
    return (priority << 26) | ((pgn & 0x3FF00) << 8) | (ps << 8) | source


# --------------------------------------------------------------------------- payloads


class _Field(NamedTuple):
    name: str
    num: int
    den: int
    offset: float
    raw_max: int
    top_shift: int


class _Codec(NamedTuple):
    name: str
    layout: struct.Struct  # unpacks the fields in byte order, skipping unused bytes
    need: int  # last used byte (1-based) == minimum payload length
    fields: tuple[_Field, ...]
    gaps: tuple[int, ...]  # 0-based indices of unused bytes before ``need``


_FORMAT = {1: "B", 2: "H", 4: "I"}


def _build(pgn: int, specs: tuple[SignalSpec, ...]) -> _Codec:
    fmt = "<"
    pos = 0
    fields = []
    gaps: list[int] = []
    for spec in sorted(specs, key=lambda s: s.start):
        if spec.length not in _FORMAT:
            raise ValueError(f"{spec.name}: unsupported length {spec.length}")
        if spec.start - 1 < pos:
            raise ValueError(f"{spec.name}: overlaps the previous signal")
        gap = spec.start - 1 - pos
        gaps.extend(range(pos, spec.start - 1))
        fmt += f"{gap}x{_FORMAT[spec.length]}" if gap else _FORMAT[spec.length]
        pos = spec.start - 1 + spec.length
        scale = _scale(spec.resolution)
        fields.append(
            _Field(
                spec.name,
                scale.numerator,
                scale.denominator,
                spec.offset,
                spec.raw_max,
                8 * (spec.length - 1),
            )
        )
    layout = struct.Struct(fmt)
    assert layout.size == pos  # "<" means no alignment padding
    if pos > 8:
        raise ValueError(f"PGN {pgn}: signals extend past byte 8")
    return _Codec(PGN_NAMES.get(pgn, "PGN"), layout, pos, tuple(fields), tuple(gaps))


_CODECS: dict[int, _Codec] = {pgn: _build(pgn, specs) for pgn, specs in SIGNALS.items()}


def _unpack(pgn: int, codec: _Codec, data: bytes) -> tuple[int, ...]:
    if len(data) < codec.need:
        raise DecodeError(pgn, f"need {codec.need} bytes, got {len(data)}")
    return codec.layout.unpack_from(data)


def decode(pgn: int, data: bytes) -> dict[str, float | None]:
    """Decode every signal of ``pgn`` from ``data`` (a bytes-like payload).

    Returns ``{}`` for a PGN without a table entry. A signal is ``None`` when its raw
    value is error, not available or above the valid maximum; use
    :func:`decode_detail` to learn which. Bytes after the last used one are
    ignored (they may belong to SPNs we do not read).

    Raises :class:`DecodeError` if ``data`` is shorter than the last byte used by
    the PGN's signals.
    """
    codec = _CODECS.get(pgn)
    if codec is None:
        return {}
    out: dict[str, float | None] = {}
    for f, raw in zip(codec.fields, _unpack(pgn, codec, data), strict=True):
        out[f.name] = raw * f.num / f.den + f.offset if raw <= f.raw_max else None
    return out


def decode_detail(pgn: int, data: bytes) -> dict[str, Decoded]:
    """Like :func:`decode`, but with the status of each signal.

    Statuses: ``"ok"``, ``"error"`` (top byte 0xFE), ``"not_available"`` (top byte
    0xFF), ``"out_of_range"`` (top byte 0xFB..0xFD, reserved by J1939).
    """
    codec = _CODECS.get(pgn)
    if codec is None:
        return {}
    out: dict[str, Decoded] = {}
    for f, raw in zip(codec.fields, _unpack(pgn, codec, data), strict=True):
        if raw <= f.raw_max:
            out[f.name] = Decoded(raw * f.num / f.den + f.offset, "ok")
        else:
            out[f.name] = _INVALID[raw >> f.top_shift]
    return out


_INVALID = {
    0xFB: Decoded(None, "out_of_range"),
    0xFC: Decoded(None, "out_of_range"),
    0xFD: Decoded(None, "out_of_range"),
    0xFE: Decoded(None, "error"),
    0xFF: Decoded(None, "not_available"),
}


def encode(pgn: int, values: Mapping[str, float | None]) -> bytes:
    """Build the 8-byte payload of ``pgn`` from physical ``values``.

    Missing or ``None`` signals are sent as not available (all 0xFF), as are unused
    bytes. Each value is rounded to the nearest raw step (ties to even).

    Raises ``ValueError`` for a PGN without a table entry, for a name that is not a
    signal of ``pgn`` (a typo would otherwise silently send not-available), and for
    a value outside ``[spec.min_value, spec.max_value]`` (NaN included).
    """
    codec = _CODECS.get(pgn)
    if codec is None:
        raise ValueError(f"PGN {pgn}: no signal table to encode with")
    unknown = values.keys() - {f.name for f in codec.fields}
    if unknown:
        raise ValueError(f"{codec.name} ({pgn}): unknown signal(s) {sorted(unknown)}")
    raws = []
    for f in codec.fields:
        value = values.get(f.name)
        if value is None:
            raws.append((0xFF << f.top_shift) | ((1 << f.top_shift) - 1))
            continue
        lo = f.offset
        hi = f.raw_max * f.num / f.den + f.offset
        if not lo <= value <= hi:
            raise ValueError(f"{codec.name} ({pgn}): {f.name}={value!r} outside [{lo}, {hi}]")
        # Clamp guards against float noise at the upper edge rounding one step past it.
        raws.append(min(round((value - f.offset) * f.den / f.num), f.raw_max))
    out = bytearray(b"\xff" * 8)
    codec.layout.pack_into(out, 0, *raws)
    # pack_into zeroes the skipped ("x") bytes; J1939 wants unused bytes 0xFF.
    for i in codec.gaps:
        out[i] = 0xFF
    return bytes(out)


def encode_request(pgn: int) -> bytes:
    """The 3-byte payload of a Request (PGN 59904) for ``pgn``, little-endian.

    Raises ``ValueError`` if ``pgn`` is out of range.
    """
    if not 0 <= pgn <= _MAX_PGN:
        raise ValueError(f"PGN {pgn} out of range 0..{_MAX_PGN}")
    return pgn.to_bytes(3, "little")
