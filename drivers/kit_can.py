"""The kit's signals from proprietary J1939 PGNs (PropB, 0xFF00-0xFFFF), described by a DBC.

Some kit ECUs talk CAN instead of a serial link. :class:`KitCanDecoder` turns
their frames into exactly the message dicts ``kit_codec.decode_body``
produces (``{"type": "status", "version": 2, "seq": ..., "tick_ms": ...,
"mode": ..., ...}``), so everything after the decoder is the same for both
transports.  The layout lives in a DBC file read with cantools; the one
shipped here, ``kit_propb.dbc``, is cngmrv's reference layout
(docs/kit-protocol.md, "CAN transport"), and a vendor's own DBC works if it
uses the same message and signal names.

Contract and limits:

* A PGN is matched by its DBC message (priority and source address in the
  DBC's frame id are ignored); frames from any source address other than
  ``source_address`` are counted in ``foreign`` and ignored.
* Signal names are the kit-codec field names. Raw all-ones (for signed
  signals 0x7FFF...) is "not available" and decodes as None, as does a value
  outside the signal's DBC range; bitmaps (``flags``, ``faults``,
  ``capabilities``) and ``counter`` have no such value.
* A STATUS is split over KIT_STATUS2, KIT_STATUS3, KIT_GAS_TOTAL and
  KIT_STATUS1, and is emitted when KIT_STATUS1 (sent last in each cycle)
  arrives, with the parts received within ``part_max_age_s`` before it;
  fields of older or missing parts are None (counted in ``stale_parts``).
  HELLO is emitted on KIT_HELLO2 with KIT_HELLO's fields likewise.
* ``tick_ms`` is the CAN timestamp in milliseconds (mod 2**32), and
  INJECTION's ``offset_us`` the sub-millisecond rest, so the pipeline anchors
  it to bus time like a serial kit's tick.  ``seq`` counts emitted messages:
  lost frames are counted from the 8-bit ``counter`` signals of KIT_STATUS3
  and KIT_INJECTION instead (``dropped``).
* ``decode`` never raises on bad frames: a frame cantools cannot decode (a
  short DLC) is counted in ``errors`` with ``last_error``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .j1939 import parse_id

DEFAULT_DBC = Path(__file__).with_name("kit_propb.dbc")
DEFAULT_SOURCE_ADDRESS = 0x27
PROPB_FIRST, PROPB_LAST = 0xFF00, 0xFFFF

# DBC message name -> (kit message type it feeds, whether it completes one).
ROLES: dict[str, tuple[str, bool]] = {
    "KIT_STATUS1": ("status", True),
    "KIT_STATUS2": ("status", False),
    "KIT_STATUS3": ("status", False),
    "KIT_GAS_TOTAL": ("status", False),
    "KIT_INJECTION": ("injection", True),
    "KIT_MODE": ("mode", True),
    "KIT_FAULT": ("fault", True),
    "KIT_HELLO": ("hello", False),
    "KIT_HELLO2": ("hello", True),
}
NO_NA = {"flags", "faults", "capabilities", "counter"}
STATUS_FIELDS = (
    "mode", "tank_bar", "gas_temp_c", "gas_flow_kgph", "reason", "flags", "faults",
    "sub_set_pct", "sub_act_pct", "regulator_bar", "rpm", "map_kpa", "pulse_ms", "gas_total_kg",
)  # fmt: skip
HELLO_FIELDS = (
    "role", "max_version", "kit_id", "fw_major", "fw_minor", "fw_patch", "status_period_ms",
    "injectors", "inj_flow", "inj_dead_ms", "capabilities",
)  # fmt: skip
COUNTER_NAMES = ("frames", "messages", "errors", "foreign", "dropped", "stale_parts")


class KitCanDecoder:
    """Decodes the kit's PropB frames (see the module docstring for the contract)."""

    def __init__(
        self,
        dbc: Path | str = DEFAULT_DBC,
        source_address: int = DEFAULT_SOURCE_ADDRESS,
        part_max_age_s: float = 0.25,
    ) -> None:
        if not 0 <= source_address <= 253:
            raise ValueError(f"source_address must be 0..253, got {source_address!r}")
        import cantools  # here, not at the top: see cngmrv.drivers.dbc

        db = cantools.database.can.Database()
        db.add_dbc_file(str(dbc))
        self.source_address = source_address
        self.part_max_age_s = part_max_age_s
        self._by_pgn: dict[int, Any] = {}
        for m in db.messages:
            if m.name not in ROLES:
                continue
            pgn = parse_id(m.frame_id).pgn
            if not PROPB_FIRST <= pgn <= PROPB_LAST:
                raise ValueError(f"{dbc}: {m.name} is PGN 0x{pgn:04X}, not PropB")
            self._by_pgn[pgn] = m
        missing = set(ROLES) - {m.name for m in self._by_pgn.values()}
        if missing:
            raise ValueError(f"{dbc}: missing kit messages {sorted(missing)}")
        self._signals = {
            m.name: [(s, _divisor(s.scale)) for s in m.signals] for m in self._by_pgn.values()
        }
        self._parts: dict[str, tuple[float, dict[str, Any]]] = {}
        self._counters: dict[str, int] = {}
        self._seq = 0
        self.frames = self.messages = self.errors = self.foreign = 0
        self.dropped = self.stale_parts = 0
        self.last_error: str | None = None

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTER_NAMES}

    @property
    def pgns(self) -> frozenset[int]:
        """The PGNs of the kit's DBC (for kernel acceptance filters)."""
        return frozenset(self._by_pgn)

    def wants(self, pgn: int) -> bool:
        """True for a PGN this decoder knows (a cheap pre-filter for the caller)."""
        return pgn in self._by_pgn

    def decode(self, t: float, can_id: int, data: bytes) -> list[dict[str, Any]]:
        """Kit messages completed by one frame (usually zero or one)."""
        try:
            jid = parse_id(can_id)
        except ValueError:
            return []
        m = self._by_pgn.get(jid.pgn)
        if m is None or jid.source != self.source_address:
            self.foreign += 1
            return []
        try:
            raw = m.decode(bytes(data), decode_choices=False, scaling=False)
        except Exception as exc:  # cantools raises several types for bad payloads
            self.errors += 1
            self.last_error = f"{m.name}: {exc}"
            return []
        self.frames += 1
        fields = self._physical(m.name, raw)
        kind, complete = ROLES[m.name]
        self._count(m.name, fields.pop("counter", None))
        if not complete:
            self._parts[m.name] = (t, fields)
            return []
        if kind == "status":
            for part in ("KIT_STATUS2", "KIT_STATUS3", "KIT_GAS_TOTAL"):
                fields.update(self._part(part, t))
            fields = {k: fields.get(k) for k in STATUS_FIELDS}
        elif kind == "hello":
            fields.update(self._part("KIT_HELLO", t))
            fields["role"] = 0
            fields = {k: fields.get(k) for k in HELLO_FIELDS}
        elif kind == "injection":
            status = self._parts.get("KIT_STATUS1")
            fresh = status is not None and t - status[0] <= 1.0
            fields["gas_temp_c"] = status[1].get("gas_temp_c") if status and fresh else None
        if kind == "status":
            self._parts["KIT_STATUS1"] = (t, fields)
        ms = math.floor(t * 1000.0)
        msg: dict[str, Any] = {
            "type": kind,
            "version": 2,
            "seq": self._seq,
            "tick_ms": ms & 0xFFFFFFFF,
        }
        if kind == "injection":
            msg["injector"] = fields.pop("injector")
            msg["offset_us"] = min(999, int((t * 1000.0 - ms) * 1000.0))
        msg.update(fields)
        self._seq = (self._seq + 1) & 0xFFFF
        self.messages += 1
        return [msg]

    def _part(self, name: str, t: float) -> dict[str, Any]:
        part = self._parts.get(name)
        if part is None or not 0 <= t - part[0] <= self.part_max_age_s:
            self.stale_parts += 1
            return {}
        return part[1]

    def _count(self, name: str, counter: int | None) -> None:
        if counter is None:
            return
        last = self._counters.get(name)
        if last is not None:
            self.dropped += (counter - last - 1) & 0xFF
        self._counters[name] = counter

    def _physical(self, name: str, raw: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sig, divisor in self._signals[name]:
            r = int(raw[sig.name])
            if sig.name not in NO_NA:
                na = (1 << (sig.length - 1)) - 1 if sig.is_signed else (1 << sig.length) - 1
                if r == na:
                    out[sig.name] = None
                    continue
            # Division by the integer 1/scale gives the float nearest the decimal
            # value, as kit_codec does (12345 / 1000 == 12.345).
            value: float = r / divisor + sig.offset if divisor else r * sig.scale + sig.offset
            if divisor == 1 and sig.offset == 0:
                value = r  # enums, counts, bitmaps stay ints
            lo, hi = sig.minimum, sig.maximum
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                out[sig.name] = None
            else:
                out[sig.name] = value
        return out


def _divisor(scale: float) -> int:
    """1/scale when that is an integer (0.001 -> 1000), else 0."""
    inv = 1.0 / scale
    return round(inv) if abs(inv - round(inv)) < 1e-9 else 0


def encode(
    dbc: Any, msg: dict[str, Any], source_address: int = DEFAULT_SOURCE_ADDRESS
) -> list[tuple[int, bytes]]:
    """Frames (29-bit id, data) carrying one kit message dict, in sending order.

    For simulators and tests: the inverse of :meth:`KitCanDecoder.decode` for
    the fields the DBC has (None encodes as not available). ``dbc`` is a
    loaded cantools database. ``counter`` values come from ``msg`` (default 0).
    """
    kind = msg["type"]
    names = [n for n, (k, _) in ROLES.items() if k == kind]
    # Parts first, the completing message last.
    names.sort(key=lambda n: ROLES[n][1])
    frames = []
    for name in names:
        m = dbc.get_message_by_name(name)
        raw = {}
        for sig in m.signals:
            value = msg.get(sig.name, 0 if sig.name in NO_NA else None)
            if value is None:
                raw[sig.name] = (
                    (1 << (sig.length - 1)) - 1 if sig.is_signed else (1 << sig.length) - 1
                )
            else:
                raw[sig.name] = int(round((value - sig.offset) / sig.scale))
        data = m.encode(raw, scaling=False, strict=False)
        pgn = parse_id(m.frame_id).pgn
        prio = (m.frame_id >> 26) & 7
        frames.append(((prio << 26) | (pgn << 8) | source_address, bytes(data)))
    return frames
