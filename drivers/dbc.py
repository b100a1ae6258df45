"""Extra J1939 signals from a user-supplied DBC file, decoded with cantools.

Fleet engineers often have a DBC for a make's proprietary or less common PGNs.
:class:`DbcSignals` decodes those alongside the built-in table
(:mod:`cngmrv.drivers.j1939`), with the same rule: a raw value in J1939's error
or not-available range becomes ``None``, never a number.

Contract and limits:

* Only 29-bit (extended) messages are used, and they are matched by **PGN**,
  not by the whole identifier, because J1939 DBCs carry a placeholder source
  address.  A message whose identifier has source address 0xFE (the usual
  placeholder) is taken from the engine, whatever address the engine has at
  the time (:attr:`DbcMessage.source` is ``None``); a message with any other
  source address is taken only from that address.  So two ECUs' values of
  one signal are never mixed.  11-bit messages in the DBC are ignored and
  listed in :attr:`DbcSignals.skipped`.
* Signals are named ``"<message>.<signal>"``.  Multiplexed messages are
  decoded as cantools decodes them (only the selected signals).
* J1939 range checks on the raw value (unsigned integer signals only): 8, 16,
  24 and 32-bit signals are valid up to 0xFA, 0xFAFF, 0xFAFFFF and 0xFAFFFFFF
  (the top byte decides, as in the built-in table); 2-bit signals are valid
  0..1 and 4-bit signals 0..10 (J1939-71 discrete parameters); any other length
  treats all ones (not available) and all ones minus one (error) as invalid.
  Signed and floating-point signals are scaled as cantools scales them.
* Loading the file is the only I/O, in the constructor; :meth:`decode` is pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

# cantools is imported where a DBC is loaded: it costs a third of a second and
# several MB at start, which an agent without a DBC should not pay.

__all__ = ["DbcError", "DbcMessage", "DbcSignals"]

_PLACEHOLDER_SA = 0xFE
_PDU2_MIN_PF = 240


class DbcError(ValueError):
    """The DBC cannot be loaded, or a payload cannot be decoded with it."""


class DbcMessage(NamedTuple):
    pgn: int
    source: int | None  # None: the engine's current address
    name: str
    message: Any  # cantools.database.can.Message


def _pgn(frame_id: int) -> int:
    pgn = (frame_id >> 8) & 0x3FFFF
    return pgn & 0x3FF00 if (pgn >> 8) & 0xFF < _PDU2_MIN_PF else pgn


def _invalid_above(length: int) -> int | None:
    """Largest valid raw value for an unsigned J1939 field of ``length`` bits."""
    if length in (8, 16, 24, 32):
        return ((0xFA + 1) << (length - 8)) - 1
    if length == 2:
        return 1
    if length == 4:
        return 10
    if length >= 3:
        return (1 << length) - 3
    return None  # a single bit has no error or not-available code


class DbcSignals:
    """The 29-bit messages of one DBC, ready to decode by PGN."""

    def __init__(self, path: Path | str) -> None:
        import cantools

        self._error = cantools.database.errors.Error
        try:
            db = cantools.database.load_file(str(path), database_format="dbc", strict=False)
        except (OSError, cantools.database.errors.Error, ValueError) as e:
            raise DbcError(f"cannot load DBC {path}: {e}") from None
        if not isinstance(db, cantools.database.can.Database):
            raise DbcError(f"{path} is not a CAN database")
        self.path = Path(path)
        self.messages: dict[int, DbcMessage] = {}
        self.skipped: list[str] = []
        self._limits: dict[int, dict[str, int | None]] = {}
        for m in db.messages:
            if not m.is_extended_frame:
                self.skipped.append(m.name)
                continue
            pgn = _pgn(m.frame_id)
            sa = m.frame_id & 0xFF
            if pgn in self.messages:
                raise DbcError(
                    f"DBC {path}: messages {self.messages[pgn].name} and {m.name} share PGN {pgn}"
                )
            self.messages[pgn] = DbcMessage(pgn, None if sa == _PLACEHOLDER_SA else sa, m.name, m)
            self._limits[pgn] = {
                s.name: None if s.is_signed or s.is_float else _invalid_above(s.length)
                for s in m.signals
            }

    @property
    def pgns(self) -> frozenset[int]:
        return frozenset(self.messages)

    def signal_names(self) -> Iterable[str]:
        for dm in self.messages.values():
            for s in dm.message.signals:
                yield f"{dm.name}.{s.name}"

    def decode(self, pgn: int, data: bytes) -> dict[str, float | None]:
        """Decode ``data`` as the DBC's message for ``pgn``; ``{}`` if the DBC has none.

        Raises :class:`DbcError` if the payload is shorter than the message.
        """
        dm = self.messages.get(pgn)
        if dm is None:
            return {}
        m = dm.message
        try:
            raw = m.decode(bytes(data), decode_choices=False, scaling=False)
        except self._error as e:
            raise DbcError(f"{dm.name} (PGN {pgn}): {e}") from None
        limits = self._limits[pgn]
        out: dict[str, float | None] = {}
        for s in m.signals:
            if s.name not in raw:
                continue  # not selected by the multiplexer
            value = raw[s.name]
            limit = limits[s.name]
            if limit is not None and value > limit:
                out[f"{dm.name}.{s.name}"] = None
            else:
                out[f"{dm.name}.{s.name}"] = float(
                    s.conversion.raw_to_scaled(value, decode_choices=False)
                )
        return out
