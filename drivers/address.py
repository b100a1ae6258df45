"""J1939-81 address claiming, seen by a listener: NAMEs, who holds which address, and the engine.

On a J1939 bus an ECU is known by its 64-bit NAME; its one-byte source address
is only claimed, and may change at power-up when two ECUs contend for the same
address (the lower NAME wins, the loser claims another or reports that it
cannot claim).  A gateway that reads the engine's fuel rate "from SA 0" would,
after such a change, read another ECU's numbers.  :class:`EngineTracker`
follows the engine's NAME instead.  Pure logic, standard library only.

:class:`AddressClaimer` is the other side, for the rare configuration in
which the agent transmits (Requests): it claims an address with the device's
own NAME, defends it, and gives it up when a lower NAME contends.
"""

from __future__ import annotations

from typing import NamedTuple

from cngmrv.drivers.j1939 import GLOBAL, PGN_ADDRESS_CLAIMED, PGN_REQUEST, make_id

__all__ = [
    "ENGINE_SIGNALS",
    "NULL_ADDRESS",
    "SIGNALS",
    "AddressClaimer",
    "AddressTable",
    "Contest",
    "EngineTracker",
    "Name",
    "SignalSource",
    "SourceRule",
    "check_source_rule",
    "encode_name",
    "parse_name",
    "parse_source_rule",
    "says_engine",
]

NULL_ADDRESS = 254  # source of a "cannot claim address" message
CLAIM_SETTLE_S = 0.250  # J1939-81: wait this long after claiming before other traffic


class Name(NamedTuple):
    """The fields of a 64-bit J1939 NAME (J1939-81 4.1.1), lowest bits first."""

    identity: int  # 21 bits
    manufacturer: int  # 11 bits
    ecu_instance: int  # 3 bits
    function_instance: int  # 5 bits
    function: int  # 8 bits (0 = engine)
    reserved: int  # 1 bit
    vehicle_system: int  # 7 bits
    vehicle_system_instance: int  # 4 bits
    industry_group: int  # 3 bits
    arbitrary_address_capable: bool


def parse_name(value: int) -> Name:
    """Split a NAME (as an unsigned 64-bit integer) into its fields."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"NAME {value:#x} is not a 64-bit unsigned integer")
    return Name(
        value & 0x1FFFFF,
        (value >> 21) & 0x7FF,
        (value >> 32) & 0x7,
        (value >> 35) & 0x1F,
        (value >> 40) & 0xFF,
        (value >> 48) & 0x1,
        (value >> 49) & 0x7F,
        (value >> 56) & 0xF,
        (value >> 60) & 0x7,
        bool(value >> 63),
    )


def encode_name(name: Name) -> int:
    """Inverse of :func:`parse_name`; raises ``ValueError`` for a field that does not fit."""
    widths = (21, 11, 3, 5, 8, 1, 7, 4, 3, 1)
    shifts = (0, 21, 32, 35, 40, 48, 49, 56, 60, 63)
    value = 0
    for field, width, shift, label in zip(name, widths, shifts, Name._fields, strict=True):
        v = int(field)
        if not 0 <= v < 1 << width:
            raise ValueError(f"NAME field {label}={v} does not fit in {width} bits")
        value |= v << shift
    return value


class AddressTable:
    """Who holds which source address, from the Address Claimed messages seen so far.

    Contention is resolved as the ECUs themselves resolve it: when a NAME
    claims an address another NAME holds, the lower NAME keeps it.  A claim
    from the null address (254) means that NAME has no address.  Bounded: only
    NAMEs that currently hold an address are kept (at most 254).
    """

    def __init__(self) -> None:
        self._by_address: dict[int, int] = {}
        self._by_name: dict[int, int] = {}
        self.claims = 0
        self.contentions = 0

    def name_at(self, address: int) -> int | None:
        return self._by_address.get(address)

    def address_of(self, name: int) -> int | None:
        return self._by_name.get(name)

    def assume(self, address: int, name: int) -> None:
        """Record ``name`` at ``address`` without a claim (one made before listening began)."""
        if address in self._by_address or name in self._by_name:
            return
        self._by_address[address] = name
        self._by_name[name] = address

    def first_with_function(self, function: int) -> int | None:
        """The lowest address held by a NAME whose function field is ``function``."""
        found = [a for a, n in self._by_address.items() if parse_name(n).function == function]
        return min(found) if found else None

    def on_claim(self, source: int, data: bytes) -> bool:
        """Apply an Address Claimed frame from ``source``; False if it is malformed."""
        if len(data) < 8 or source == GLOBAL:
            return False
        name = int.from_bytes(data[:8], "little")
        self.claims += 1
        old = self._by_name.pop(name, None)
        if old is not None and old != source:
            del self._by_address[old]
        if source == NULL_ADDRESS:
            return True
        holder = self._by_address.get(source)
        if holder is not None and holder != name:
            self.contentions += 1
            if holder < name:
                return True  # the holder defends; the claimer is left without this address
            del self._by_name[holder]
        self._by_address[source] = name
        self._by_name[name] = source
        return True


class Contest(NamedTuple):
    """A claim that disputes the engine's address (J1939-81 contention seen by a listener).

    ``kind`` is ``"claimed"`` (another NAME claimed the engine's address) or
    ``"cannot_claim"`` (the engine, or another NAME that says "engine #1",
    reported from the null address that it has no address).  ``engine_kept``
    says whether the tracker still takes the engine at ``address``.
    """

    kind: str
    address: int | None  # the disputed address (the engine's before the claim)
    claimer: int  # the NAME in the claim
    engine_name: int | None
    engine_kept: bool


def says_engine(name: int) -> bool:
    """True if a NAME's own fields say "engine #1" (function 0, function instance 0)."""
    fields = parse_name(name)
    return fields.function == 0 and fields.function_instance == 0


class EngineTracker:
    """The engine's current source address, following its NAME through address claims.

    ``engine_name`` pins the engine to one NAME.  Without it, the engine is the
    first NAME that says so itself (function 0 "engine", function instance 0),
    or, until one does, the NAME holding ``default_address`` (J1939's preferred
    address for engine #1 is 0).  Until any claim concerns the engine, its
    address is ``default_address``, so a bus (or a recording) without address
    claims still works.  :attr:`address` is ``None`` while the engine has no
    address, and then no frame counts as the engine's.

    Once the engine's NAME is known (pinned, or adopted from its own claim),
    it keeps its configured or last-known address until a claim concerns its
    NAME or that address: a listener that starts mid-trip has not seen the
    engine's claim, so the engine is taken to hold its address, and other
    nodes claiming other addresses never unassign it.  A claim on that address
    by another NAME is resolved as the ECUs resolve it (the lower NAME wins);
    it, and a "cannot claim" from the engine or from another NAME that says
    "engine #1", is a :class:`Contest` (:attr:`last_contest` after the call,
    :attr:`contests` in total).  Unpinned, the tracker cannot tell two NAMEs
    that both say "engine #1" apart: it keeps the first and reports the
    second as a contest, so only a pinned NAME is proof against a hijacker.
    """

    def __init__(self, default_address: int = 0, engine_name: int | None = None) -> None:
        self.table = AddressTable()
        self.default_address = default_address
        self.name = engine_name
        self._pinned = engine_name is not None  # by config or by the NAME's own function field
        self.address: int | None = default_address
        self.changes = 0
        self.contests = 0
        self.last_contest: Contest | None = None

    def on_claim(self, source: int, data: bytes) -> tuple[int | None, int | None] | None:
        """Apply an Address Claimed frame; returns ``(old, new)`` if the engine's address changed.

        :attr:`last_contest` is set when the claim disputes the engine's address,
        else ``None``.
        """
        self.last_contest = None
        if len(data) < 8 or source == GLOBAL:
            return None
        claimer = int.from_bytes(data[:8], "little")
        name, address = self.name, self.address
        if name is not None and address is not None and self.table.address_of(name) is None:
            # Not seen claiming since we started listening: it holds its address.
            self.table.assume(address, name)
        contest: str | None = None
        if source == NULL_ADDRESS:
            if claimer == name or says_engine(claimer):
                contest = "cannot_claim"
        elif source == address and name is not None and claimer != name:
            contest = "claimed"
        if not self.table.on_claim(source, data):
            return None
        if not self._pinned:
            if says_engine(claimer) and source != NULL_ADDRESS:
                self.name, self._pinned = claimer, True
            elif self.name is None:
                self.name = self.table.name_at(self.default_address)
        change: tuple[int | None, int | None] | None = None
        if self.name is not None:
            new = self.table.address_of(self.name)
            if new != self.address:
                change = (self.address, new)
                self.address = new
                self.changes += 1
        if contest is not None:
            self.contests += 1
            self.last_contest = Contest(
                contest, address, claimer, self.name, self.address is not None
            )
        return change


# The signals the pipeline decodes, each from one source address (see SignalSource).
SIGNALS = ("fuel_rate", "fuel_total", "engine_speed", "wheel_speed", "odometer")
# Signals that only an engine controller sends; "auto" takes them from the engine.
ENGINE_SIGNALS = frozenset({"fuel_rate", "fuel_total", "engine_speed"})
SourceRule = str | int  # "auto", "engine", "function:N" or a source address 0..253


def check_source_rule(rule: object) -> str | None:
    """The reason ``rule`` is not a source rule, or None if it is one."""
    if isinstance(rule, bool):
        return "must be 'auto', 'engine', 'function:N' or a source address 0..253"
    if isinstance(rule, int):
        return None if 0 <= rule <= 253 else "must be a J1939 source address 0..253"
    if rule in ("auto", "engine"):
        return None
    if isinstance(rule, str) and rule.startswith("function:"):
        n = rule.removeprefix("function:")
        if n.isdigit() and int(n) <= 255:
            return None
        return "function:N needs a NAME function code 0..255"
    return "must be 'auto', 'engine', 'function:N' or a source address 0..253"


def parse_source_rule(text: str) -> SourceRule:
    """A rule as typed on a command line ("71" is an address); ``ValueError`` if it is none."""
    rule: SourceRule = int(text) if text.isdigit() else text
    reason = check_source_rule(rule)
    if reason is not None:
        raise ValueError(f"{text!r}: {reason}")
    return rule


class SignalSource:
    """The one source address a signal is taken from, and who else sends it.

    The rule (:data:`SourceRule`) is configured per signal:

    * an address (0..253): frames from that address only;
    * ``"engine"``: the engine's address, following :class:`EngineTracker`;
    * ``"function:N"``: the address claimed by the NAME whose function field
      is N (the lowest such address), following it through claims; none until
      such a NAME has claimed;
    * ``"auto"`` (the default): ``"engine"`` for the engine's own signals
      (:data:`ENGINE_SIGNALS`); for the others, the first ECU heard sending
      the signal, kept for the rest of the run: the engine (followed as
      ``"engine"``) when that is the engine, else the NAME that claimed the
      address (followed by NAME), else the address.  On a bus where one ECU
      sends it, that ECU; where several do, the first heard, and the others
      are reported.

    Frames of the signal from any other address are counted per address in
    :attr:`others` and never used; :meth:`accepts` returns them as second
    senders the first time each is seen.
    """

    def __init__(self, signal: str, rule: SourceRule, engine: EngineTracker) -> None:
        reason = check_source_rule(rule)
        if reason is not None:
            raise ValueError(f"source of {signal}: {reason} (got {rule!r})")
        self.signal = signal
        self.rule = rule
        self._engine = engine
        self._mode: SourceRule = "engine" if rule == "auto" and signal in ENGINE_SIGNALS else rule
        self._name: int | None = None  # followed NAME, once "auto" settled on one
        self.accepted = 0
        self.others: dict[int, int] = {}

    @property
    def address(self) -> int | None:
        """The address frames are taken from now (None: none yet, or the ECU has none)."""
        mode = self._mode
        if mode == "engine":
            return self._engine.address
        if isinstance(mode, int):
            return mode
        table = self._engine.table
        if self._name is not None:
            return table.address_of(self._name)
        if isinstance(mode, str) and mode.startswith("function:"):
            return table.first_with_function(int(mode.removeprefix("function:")))
        return None  # "auto", before the first frame

    @property
    def settled(self) -> str:
        """How the current source was chosen, for people."""
        mode = self._mode
        if self.rule == "auto" and mode != "auto":
            how = "engine" if mode == "engine" else "first sender"
            return f"auto: {how}"
        return str(mode) if not isinstance(mode, int) else "configured address"

    def accepts(self, source: int) -> bool | int:
        """True if a frame from ``source`` is this signal's; else False, or ``source``
        itself (an int) the first time that address is seen sending it."""
        if self._mode == "auto":
            if source == self._engine.address:
                self._mode = "engine"
            else:
                self._mode = source
                name = self._engine.table.name_at(source)
                if name is not None:
                    self._mode, self._name = "name", name
        if source == self.address:
            self.accepted += 1
            return True
        n = self.others.get(source, 0)
        self.others[source] = n + 1
        return source if n == 0 else False


class AddressClaimer:
    """Claims and defends one source address for the device's own NAME (J1939-81).

    Frames to send are returned as ``(can_id, data)`` pairs; the caller sends
    them.  After :meth:`claim`, :meth:`ready` turns true once
    :data:`CLAIM_SETTLE_S` has passed without losing the address.  A contending
    claim with a lower NAME makes this device give the address up (it sends
    "cannot claim" from the null address and stays silent from then on); a
    higher one is answered by claiming again.  Not arbitrary-address-capable:
    it never looks for another address.
    """

    def __init__(self, name: int, address: int) -> None:
        if not 0 <= address <= 253:
            raise ValueError(f"source address {address} out of range 0..253")
        parse_name(name)  # range check
        self.name = name
        self.address = address
        self.lost = False
        self._claimed_at: float | None = None

    def _claim_frame(self) -> tuple[int, bytes]:
        source = NULL_ADDRESS if self.lost else self.address
        return make_id(PGN_ADDRESS_CLAIMED, source), self.name.to_bytes(8, "little")

    def claim(self, now: float) -> list[tuple[int, bytes]]:
        """(Re)start claiming, e.g. after the bus was (re)opened."""
        self._claimed_at = now
        return [self._claim_frame()]

    def ready(self, now: float) -> bool:
        return (
            not self.lost
            and self._claimed_at is not None
            and now - self._claimed_at >= CLAIM_SETTLE_S
        )

    def on_frame(
        self, now: float, pgn: int, source: int, destination: int, data: bytes
    ) -> list[tuple[int, bytes]]:
        """React to a received frame (parsed id fields); returns the frames to send."""
        if pgn == PGN_REQUEST and destination in (GLOBAL, self.address) and len(data) >= 3:
            if int.from_bytes(data[:3], "little") == PGN_ADDRESS_CLAIMED:
                return [self._claim_frame()]
            return []
        if pgn != PGN_ADDRESS_CLAIMED or source != self.address or self.lost or len(data) < 8:
            return []
        other = int.from_bytes(data[:8], "little")
        if other == self.name:
            return []  # our own claim, echoed
        if other < self.name:
            self.lost = True
            return [self._claim_frame()]
        self._claimed_at = now
        return [self._claim_frame()]
