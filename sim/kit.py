"""The simulated kit firmware: the far side of the kit's serial link.

It speaks exactly the codec in ``cngmrv.drivers.kit_codec`` (the module a
real kit's MicroPython firmware would run) and behaves like a kit ECU:

* :class:`KitLogic` decides the mode the vehicle model runs in (it is the
  vehicle's ``ModeController``): dual-fuel, or diesel-only on low tank
  pressure (with hysteresis, so a refuel brings gas back), on a DPF
  regeneration, or fault mode while a scheduled fault is active.  A stuck
  sensor freezes what the kit reads, so its own decisions use the stuck value,
  as a real kit's would.
* :class:`KitFirmware` writes the streams to a file descriptor (a pty
  master): HELLO after boot and every 10 s, STATUS every 100 ms, one
  INJECTION frame per gas injection of a 6-cylinder four-stroke engine, MODE
  and FAULT on change.  It answers an agent's HELLO, and encodes at the
  agent's ``max_version`` once it has seen one.
* :class:`LinkFaults` damages the byte stream on its way out (corrupted
  bytes, noise bursts, truncated frames), and :meth:`KitFirmware.unplug` /
  :meth:`KitFirmware.replug` model the port going away.  :class:`KitCounts`
  is the simulator's own account of every frame's fate, which the agent's
  counters must match exactly.

Its tick is its own millisecond counter since "kit boot", not bus time.
"""

from __future__ import annotations

import math
import os
import random
import select
from dataclasses import dataclass, field
from typing import Any

from cngmrv.drivers import kit_codec as kc
from cngmrv.sim.vehicle import MODE_DIESEL, MODE_DUAL, MODE_FAULT, State

TICK_MS = 10  # the simulation's step (sim.ecu.TICK_S), in ms
STATUS_PERIOD_TICKS = 10  # 100 ms
STATUS_PHASE_TICKS = 3
HELLO_PERIOD_TICKS = 1000  # 10 s
CYLINDERS = 6
FIRING_ORDER = (1, 5, 3, 6, 2, 4)
KIT_ID = 0x00C0FFEE
FIRMWARE = (1, 4, 2)
INJ_FLOW = 2.5  # mg/(ms bar): the injector model announced in HELLO
INJ_DEAD_MS = 0.35
GAS_TOTAL_START_KG = 12000.0
# Faults that put the kit in fault mode; low tank pressure only means diesel.
FAULT_MODE_MASK = ~(1 << (kc.FAULT_LOW_TANK - 1)) & 0xFFFFFFFF


@dataclass(frozen=True)
class KitFaults:
    """Faults inside the kit: ``faults`` are (start s, duration s, fault code);
    ``stuck`` are (start s, duration s, sensor) with sensor ``tank_bar`` or
    ``gas_temp_c``, whose reading freezes at its value at the start."""

    faults: tuple[tuple[float, float, int], ...] = ()
    stuck: tuple[tuple[float, float, str], ...] = ()
    low_bar: float = 20.0  # diesel-only at or below this tank pressure
    resume_bar: float = 30.0  # dual-fuel again above this (after a refuel)


@dataclass(frozen=True)
class LinkFaults:
    """Damage on the wire, drawn from ``seed`` so a run is reproducible.

    ``corrupt_rate``: probability that a byte of a frame is replaced by
    another value. ``noise_rate``: probability that a burst of 1-16 random
    bytes precedes a frame. ``truncate_rate``: probability that a frame is cut
    after a random number of bytes (the rest is never sent).
    """

    corrupt_rate: float = 0.0
    noise_rate: float = 0.0
    truncate_rate: float = 0.0
    seed: int = 0


@dataclass
class KitCounts:
    """The simulator's own account of every frame it generated.

    A frame is *intact* when its bytes arrive unchanged, complete with their
    delimiter, right after a 0x00 on the wire (or the start of a connection):
    exactly the frames a correct receiver must decode.  Every other frame is
    in exactly one of the other buckets.
    """

    frames: int = 0
    intact: int = 0
    corrupted: int = 0  # one or more of its own bytes changed
    truncated: int = 0
    glued: int = 0  # unchanged, but no delimiter before it (noise or damage before)
    unplugged: int = 0  # generated while the port was unplugged: never written
    wire_bytes: int = 0
    noise_bytes: int = 0
    corrupted_bytes: int = 0
    intact_by_type: dict[str, int] = field(default_factory=dict)
    first_intact: int | None = None
    last_intact: int | None = None

    @property
    def lost_between_intact(self) -> int:
        """Frames lost between the first and the last intact one: what seq gaps reveal."""
        if self.first_intact is None or self.last_intact is None:
            return 0
        return self.last_intact - self.first_intact + 1 - self.intact

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "intact": self.intact,
            "corrupted": self.corrupted,
            "truncated": self.truncated,
            "glued": self.glued,
            "unplugged": self.unplugged,
            "lost_between_intact": self.lost_between_intact,
            "wire_bytes": self.wire_bytes,
            "noise_bytes": self.noise_bytes,
            "corrupted_bytes": self.corrupted_bytes,
            "intact_by_type": dict(self.intact_by_type),
        }


class KitLogic:
    """The kit's mode decisions; plugs into the vehicle model as its ModeController.

    Pending MODE and FAULT messages are queued in :attr:`events` as
    ``(t, message fields)`` for the firmware to send.
    """

    def __init__(self, faults: KitFaults = KitFaults()) -> None:
        self.f = faults
        self.mode = MODE_DUAL
        self.reason = kc.REASON_NONE
        self.faults = 0
        self.low_tank = False
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._frozen: dict[str, float] = {}

    def sensor(self, name: str, t: float, value: float) -> float:
        """What the kit reads from sensor ``name`` whose true value is ``value``."""
        for start, length, which in self.f.stuck:
            if which == name and start <= t < start + length:
                return self._frozen.setdefault(name, value)
        self._frozen.pop(name, None)
        return value

    def __call__(self, t: float, tank_bar: float, dpf: bool) -> tuple[int, int]:
        tank = self.sensor("tank_bar", t, tank_bar)
        if tank <= self.f.low_bar:
            self.low_tank = True
        elif tank > self.f.resume_bar:
            self.low_tank = False
        want = 0
        for start, length, code in self.f.faults:
            if start <= t < start + length:
                want |= 1 << (code - 1)
        if self.low_tank:
            want |= 1 << (kc.FAULT_LOW_TANK - 1)
        changed = want ^ self.faults
        for code in range(1, 33):
            if changed & (1 << (code - 1)):
                active = 1 if want & (1 << (code - 1)) else 0
                self.events.append(
                    (t, {"type": "fault", "code": code, "active": active, "faults": want})
                )
        self.faults = want
        if want & FAULT_MODE_MASK:
            mode, reason = MODE_FAULT, kc.REASON_FAULT
        elif self.low_tank:
            mode, reason = MODE_DIESEL, kc.REASON_LOW_TANK
        elif dpf:
            mode, reason = MODE_DIESEL, kc.REASON_DPF_REGEN
        else:
            mode, reason = MODE_DUAL, kc.REASON_NONE
        if mode != self.mode:
            self.events.append(
                (t, {"type": "mode", "mode": mode, "previous": self.mode, "reason": reason})
            )
        self.mode, self.reason = mode, reason
        return mode, reason


class KitFirmware:
    """Writes kit frames to ``fd`` (a pty master, or any writable fd), one tick at a time."""

    def __init__(
        self,
        fd: int,
        logic: KitLogic | None = None,
        link: LinkFaults = LinkFaults(),
        boot_tick_ms: int = 5000,
        injection_events: bool = True,
        boot: bool = True,
    ) -> None:
        """``boot=False`` holds the kit's first words (its boot HELLO) until :meth:`boot`."""
        self._fd: int | None = fd
        self.logic = logic or KitLogic()
        self.link = link
        self._boot_ms = boot_tick_ms  # the kit booted a little before the sim started
        self._injection = injection_events
        self._rng = random.Random(link.seed)
        self._seq = 0
        self.version = kc.PROTOCOL_VERSION
        self.counts = KitCounts()
        self.frames_sent = 0  # frames generated, whatever became of them
        self.agent_hellos = 0
        self._clean = True
        self._rx = kc.FrameDecoder()
        self._phase = 0.0
        self._next_injector = 0
        self._pulses: list[float] = []
        self._gas_total = GAS_TOTAL_START_KG
        self._last_t: float | None = None
        self._last_flow = 0.0
        if boot:
            self.boot()

    def boot(self) -> None:
        """Announce the kit: a delimiter, then HELLO at the sim's time 0."""
        # A leading delimiter tells a receiver holding a stale partial frame to drop it.
        self._write_raw(b"\x00")
        self._hello(0)

    # -- the port ---------------------------------------------------------

    @property
    def unplugged(self) -> bool:
        return self._fd is None

    def unplug(self) -> None:
        """The port is gone: frames are still generated (seq runs on) but never written."""
        self._fd = None

    def replug(self, fd: int) -> None:
        """The port is back on a new fd. A receiver resynchronises on reconnecting."""
        self._fd = fd
        self._clean = True
        self._rx.resync()

    # -- one simulation tick ------------------------------------------------

    def tick(self, i: int, s: State) -> None:
        t = i * TICK_MS / 1000.0
        self._read_agent(i)
        self._integrate(t, s)
        for t_ev, fields in self.logic.events:
            self._send(fields, t_ev)
        self.logic.events.clear()
        if self._injection and self.version >= 2:
            self._injections(t, s)
        if i % STATUS_PERIOD_TICKS == STATUS_PHASE_TICKS:
            self._status(t, s)
        if i % HELLO_PERIOD_TICKS == 0 and i:
            self._hello(t)

    def _tick_ms(self, t: float) -> int:
        return (self._boot_ms + int(math.floor(t * 1000.0 + 1e-6))) & 0xFFFFFFFF

    def _integrate(self, t: float, s: State) -> None:
        if self._last_t is not None:
            self._gas_total += 0.5 * (self._last_flow + s.gas_kgph) * (t - self._last_t) / 3600.0
        self._last_t, self._last_flow = t, s.gas_kgph

    def _status(self, t: float, s: State) -> None:
        lg = self.logic
        fields: dict[str, Any] = {
            "type": "status",
            "mode": s.mode,
            "tank_bar": round(lg.sensor("tank_bar", t, s.tank_bar), 2),
            "gas_temp_c": round(lg.sensor("gas_temp_c", t, s.gas_temp_c), 1),
            "gas_flow_kgph": min(s.gas_kgph, 65.534),
        }
        if self.version >= 2:
            pulses, self._pulses = self._pulses, []
            flags = (kc.FLAG_DPF_REGEN if s.dpf_regen else 0) | kc.FLAG_ENGINE_RUNNING
            if s.mode == MODE_DUAL:
                flags |= kc.FLAG_SOLENOID_OPEN
            fields.update(
                reason=s.reason,
                flags=flags,
                faults=lg.faults,
                sub_set_pct=round(200 * s.sub_setpoint) / 2,
                sub_act_pct=round(200 * s.share) / 2,
                regulator_bar=round(self._rail_bar(s), 3),
                rpm=s.rpm,
                map_kpa=round(100.0 + 150.0 * s.load, 1),
                pulse_ms=sum(pulses) / len(pulses) if pulses else 0.0,
                gas_total_kg=self._gas_total,
            )
        self._send(fields, t)

    @staticmethod
    def _rail_bar(s: State) -> float:
        return 3.2 - 0.01 * s.gas_kgph  # the regulator sags a little under flow

    def _injections(self, t: float, s: State) -> None:
        if s.mode != MODE_DUAL or s.gas_kgph <= 0 or s.rpm <= 0:
            return
        rate = s.rpm / 120.0 * CYLINDERS  # injections per second, four-stroke
        old = self._phase
        self._phase += rate * TICK_MS / 1000.0
        n = int(self._phase)
        self._phase -= n
        if not n:
            return
        mass_mg = min(s.gas_kgph / 3.6 / rate * 1000.0, 655.34)
        rail = self._rail_bar(s)
        temp = s.gas_temp_c
        flow = INJ_FLOW * rail * math.sqrt(293.15 / (temp + 273.15))
        pulse = round(mass_mg / flow + INJ_DEAD_MS, 3)
        for k in range(1, n + 1):
            t_ev = t - TICK_MS / 1000.0 + (k - old) / rate
            ms = math.floor(t_ev * 1000.0 + 1e-6)
            offset_us = min(999, max(0, int(round((t_ev * 1000.0 - ms) * 1000.0))))
            injector = FIRING_ORDER[self._next_injector]
            self._next_injector = (self._next_injector + 1) % CYLINDERS
            self._pulses.append(pulse)
            self._send(
                {
                    "type": "injection",
                    "injector": injector,
                    "offset_us": offset_us,
                    "pulse_ms": pulse,
                    "rail_bar": round(rail, 3),
                    "gas_temp_c": round(temp, 1),
                    "mass_mg": round(mass_mg, 2),
                },
                ms / 1000.0,
            )

    def _hello(self, t: float) -> None:
        if self.version < 2:
            return
        self._send(
            {
                "type": "hello",
                "role": kc.ROLE_KIT,
                "max_version": kc.PROTOCOL_VERSION,
                "kit_id": KIT_ID,
                "fw_major": FIRMWARE[0],
                "fw_minor": FIRMWARE[1],
                "fw_patch": FIRMWARE[2],
                "status_period_ms": STATUS_PERIOD_TICKS * TICK_MS,
                "injectors": CYLINDERS,
                "inj_flow": INJ_FLOW,
                "inj_dead_ms": INJ_DEAD_MS,
                "capabilities": kc.CAP_STATUS_V2 | kc.CAP_INJECTION | kc.CAP_HELLO_REPLY,
            },
            t,
        )

    def _read_agent(self, i: int) -> None:
        fd = self._fd
        if fd is None or not select.select([fd], [], [], 0)[0]:
            return
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        for msg in self._rx.feed(data):
            if msg["type"] == "hello" and msg.get("role") == kc.ROLE_AGENT:
                self.agent_hellos += 1
                agent_max = msg.get("max_version")
                if isinstance(agent_max, int):
                    self.version = max(1, min(kc.PROTOCOL_VERSION, agent_max))
                self._hello(i * TICK_MS / 1000.0)

    # -- frames on the wire ---------------------------------------------------

    def _send(self, fields: dict[str, Any], t: float) -> None:
        msg = dict(fields)
        msg["version"] = self.version
        msg["seq"] = self._seq
        msg["tick_ms"] = self._tick_ms(t)
        if self.version < 2:
            if msg["type"] != "status":
                return
            msg = {k: v for k, v in msg.items() if k in _V1_STATUS_KEYS}
        frame = kc.encode_message(msg)
        self._seq = (self._seq + 1) & 0xFFFF
        self.frames_sent += 1
        self._emit(frame, str(msg["type"]))

    def _emit(self, frame: bytes, kind: str) -> None:
        c = self.counts
        index = c.frames
        c.frames += 1
        if self._fd is None:
            c.unplugged += 1
            return
        lf, rng = self.link, self._rng
        if lf.noise_rate and rng.random() < lf.noise_rate:
            noise = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            c.noise_bytes += len(noise)
            self._write_raw(noise)
        clean = self._clean
        truncated = bool(lf.truncate_rate) and rng.random() < lf.truncate_rate
        own = bytearray(frame[: rng.randrange(1, len(frame))] if truncated else frame)
        corrupted = 0
        if lf.corrupt_rate:
            for j in range(len(own)):
                if rng.random() < lf.corrupt_rate:
                    own[j] ^= rng.randrange(1, 256)
                    corrupted += 1
        c.corrupted_bytes += corrupted
        self._write_raw(bytes(own))
        if truncated:
            c.truncated += 1
        elif corrupted:
            c.corrupted += 1
        elif not clean:
            c.glued += 1
        else:
            c.intact += 1
            c.intact_by_type[kind] = c.intact_by_type.get(kind, 0) + 1
            if c.first_intact is None:
                c.first_intact = index
            c.last_intact = index

    def _write_raw(self, data: bytes) -> None:
        if not data or self._fd is None:
            return
        self.counts.wire_bytes += len(data)
        self._clean = data[-1] == 0
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]


_V1_STATUS_KEYS = {
    "type",
    "version",
    "seq",
    "tick_ms",
    "mode",
    "tank_bar",
    "gas_temp_c",
    "gas_flow_kgph",
}
