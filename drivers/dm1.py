"""DM1 (PGN 65226): active diagnostic trouble codes and lamp states.

Pure decoding of a DM1 payload, whether it came in one frame (one DTC) or
reassembled by the transport protocol (several DTCs).  Standard library only.

Layout (J1939-73 5.7.1, docs/domain.md section 3):

* byte 1: lamp status, two bits each, from the top: malfunction indicator
  (MIL), red stop, amber warning, engine protect; ``00`` off, ``01`` on,
  ``10`` error, ``11`` not available;
* byte 2: the same lamps' flash codes (``00`` slow, ``01`` fast, ``11`` off/not
  available);
* then 4 bytes per DTC: SPN bits 1-16 little-endian in bytes 3-4 of the DTC
  group, SPN bits 17-19 in the top three bits of the third byte, FMI in its low
  five bits, and in the fourth byte the SPN conversion method (top bit) and the
  occurrence count (low seven bits, 127 = not available).

Limits: only conversion method 0 (the current J1939 SPN layout) is decoded; a
DTC with the bit set uses one of three obsolete byte orders that cannot be told
apart from the payload, so the whole message is refused with a
:class:`Dm1Error` rather than reporting wrong SPNs.  The "no active DTC" fillers
ECUs send (all zero or all 0xFF DTC groups) are not DTCs.  Bytes after the
last whole DTC group must be 0xFF padding.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["LAMPS", "Dm1", "Dm1Error", "Dtc", "decode_dm1"]

LAMPS = ("mil", "red_stop", "amber_warning", "protect")
_STATE = ("off", "on", "error", "not_available")
_FLASH = ("slow", "fast", "reserved", "off")
_NO_DTC = (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff")


class Dm1Error(ValueError):
    """A DM1 payload that cannot be decoded; the message says why."""


class Dtc(NamedTuple):
    """One active trouble code.  ``occurrences`` is ``None`` when not available (127)."""

    spn: int
    fmi: int
    occurrences: int | None


class Dm1(NamedTuple):
    """A decoded DM1: lamp states and flash codes by name, and the active DTCs in order."""

    lamps: dict[str, str]
    flash: dict[str, str]
    dtcs: tuple[Dtc, ...]

    @property
    def active(self) -> frozenset[tuple[int, int]]:
        """The active set as ``(spn, fmi)`` pairs: what identifies a fault."""
        return frozenset((d.spn, d.fmi) for d in self.dtcs)


def decode_dm1(data: bytes) -> Dm1:
    """Decode a DM1 payload of any length (8 bytes single-frame, longer by TP).

    Raises :class:`Dm1Error` if it is shorter than 6 bytes (lamps plus one DTC
    group, as every single-frame DM1 has), if a DTC uses conversion method 1, or
    if the bytes after the last whole DTC group are not 0xFF padding.
    """
    if len(data) < 6:
        raise Dm1Error(f"DM1: need at least 6 bytes, got {len(data)}")
    lamp_byte, flash_byte = data[0], data[1]
    lamps = {name: _STATE[(lamp_byte >> (6 - 2 * i)) & 3] for i, name in enumerate(LAMPS)}
    flash = {name: _FLASH[(flash_byte >> (6 - 2 * i)) & 3] for i, name in enumerate(LAMPS)}
    end = 2 + (len(data) - 2) // 4 * 4
    if any(b != 0xFF for b in data[end:]):
        raise Dm1Error(f"DM1: {len(data) - end} trailing byte(s) after the DTCs are not 0xFF")
    dtcs = []
    for i in range(2, end, 4):
        group = bytes(data[i : i + 4])
        if group in _NO_DTC:
            continue
        b3, b4 = group[2], group[3]
        if b4 & 0x80:
            raise Dm1Error(f"DM1: DTC at byte {i + 1} uses SPN conversion method 1 (obsolete)")
        spn = group[0] | group[1] << 8 | (b3 >> 5) << 16
        oc = b4 & 0x7F
        dtcs.append(Dtc(spn, b3 & 0x1F, None if oc == 0x7F else oc))
    return Dm1(lamps, flash, tuple(dtcs))
