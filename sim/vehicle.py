"""A simulated dual-fuel city bus on a BRT route: drive cycle, engine, kit, ground truth.

The model is simple but physical enough that the fuel rates move like a real
bus's: road load (rolling, aerodynamic, inertia) sets the wheel power, a
fixed engine efficiency turns it into fuel power, and the kit substitutes a
load-dependent share of that energy with gas (about 24 % at idle up to about
80 % at full load, docs/domain.md section 4).  Everything is a pure function
of the simulated time and the seed, so a run is reproducible.

Ground truth is integrated here on a fine step, from the continuous model,
not from the frames: it is what the agent's measurement is judged against.
It shares no code with the agent: the tank's gas follows the simulator's own
real-gas law (:mod:`cngmrv.sim.gas`), not the agent's.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from cngmrv.sim import gas

DIESEL_MJ_PER_L = 43.0 * 0.844  # IPCC NCV x default density (docs/domain.md section 2)
GAS_MJ_PER_KG = 48.0
G = 9.81


@dataclass(frozen=True)
class CityBusParams:
    """A loaded 12 m BRT bus with a retrofitted dual-fuel kit."""

    mass_kg: float = 14000.0
    crr: float = 0.008
    cda_m2: float = 6.5
    air_density: float = 1.2
    driveline_eff: float = 0.85
    engine_eff: float = 0.38
    idle_fuel_kw: float = 25.0  # fuel power at idle incl. air conditioning
    max_power_kw: float = 190.0
    idle_rpm: float = 650.0
    rpm_per_kmh: float = 32.0
    max_rpm: float = 2100.0
    sub_idle: float = 0.24
    sub_full: float = 0.80
    # Four cylinders' water volume; the gas in them is methane (cngmrv.sim.gas).
    tank_volume_m3: float = 0.44
    tank_start_bar: float = 200.0
    tank_low_bar: float = 20.0  # below this the kit falls back to diesel only
    gas_temp_c: float = 32.0
    # Refuelling: at the first stop with the tank below refuel_below_bar (0 = never).
    refuel_below_bar: float = 0.0
    refuel_to_bar: float = 200.0
    # Active DPF regeneration (engine ECU asks the kit for diesel only), as
    # (start s, duration s) windows of simulated time.
    dpf_regens: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Phase:
    start: float
    v0: float  # m/s at start
    accel: float  # m/s^2, constant over the phase


@dataclass
class DriveCycle:
    """Piecewise-constant acceleration: stops, dwell, acceleration, cruise, braking."""

    phases: list[Phase] = field(default_factory=list)

    @classmethod
    def brt(cls, duration: float, seed: int) -> DriveCycle:
        rng = random.Random(seed)
        phases: list[Phase] = []
        t = 0.0

        def add(length: float, v0: float, accel: float) -> None:
            nonlocal t
            phases.append(Phase(t, v0, accel))
            t += length

        add(rng.uniform(15, 30), 0.0, 0.0)  # leaving the depot: idle
        while t < duration:
            v_top = rng.uniform(30, 55) / 3.6
            a_up = rng.uniform(0.6, 1.1)
            a_down = rng.uniform(0.8, 1.3)
            add(v_top / a_up, 0.0, a_up)
            add(rng.uniform(200, 900) / v_top, v_top, 0.0)
            add(v_top / a_down, v_top, -a_down)
            # Dwell at a BRT stop, or a shorter wait at a light.
            add(rng.uniform(10, 40) if rng.random() < 0.7 else rng.uniform(5, 25), 0.0, 0.0)
        return cls(phases)

    def __post_init__(self) -> None:
        self._starts = [p.start for p in self.phases]

    def at(self, t: float) -> tuple[float, float]:
        """(speed m/s, acceleration m/s^2) at time t."""
        i = max(0, bisect.bisect_right(self._starts, t) - 1)
        p = self.phases[i]
        v = p.v0 + p.accel * (t - p.start)
        return max(v, 0.0), p.accel


MODE_DIESEL, MODE_DUAL, MODE_FAULT = 0, 1, 2
REASON_NONE, REASON_LOW_TANK, REASON_DPF_REGEN = 0, 1, 2

# Decides the kit's mode: (t, tank pressure in bar, DPF regenerating) -> (mode, reason).
# The simulated kit firmware plugs its own logic in here; the default is the
# plain low-tank rule.
ModeController = Callable[[float, float, bool], tuple[int, int]]


@dataclass(frozen=True)
class State:
    """The bus at one instant."""

    speed_kmh: float
    rpm: float
    load: float  # 0..1 of max power
    diesel_lph: float
    gas_kgph: float
    mode: int
    tank_bar: float
    gas_temp_c: float
    reason: int = REASON_NONE
    dpf_regen: bool = False
    sub_setpoint: float = 0.0  # the share of fuel energy the kit's map asks for, 0..1
    share: float = 0.0  # the share actually substituted, 0..1


class CityBus:
    """Steps the model forward and accumulates the ground truth."""

    def __init__(
        self, params: CityBusParams, cycle: DriveCycle, controller: ModeController | None = None
    ) -> None:
        self.p = params
        self.cycle = cycle
        self.controller = controller
        self.refuels: list[tuple[float, float]] = []  # (t, kg added)
        self._tank_kg = self._mass_at(params.tank_start_bar, self.gas_temp_k(0.0))
        self.truth_diesel_l = 0.0
        self.truth_gas_kg = 0.0
        self.truth_distance_km = 0.0
        self._last: tuple[float, State] | None = None

    def gas_temp_k(self, t: float) -> float:
        """The gas's temperature (tank and reducer alike in this model), drifting slowly."""
        return self.p.gas_temp_c + 1.5 * math.sin(t / 300.0) + 273.15

    @property
    def tank_kg(self) -> float:
        """The true gas mass in the tank now (after the last step), kg."""
        return self._tank_kg

    def _mass_at(self, bar: float, temp_k: float) -> float:
        # The simulator's own law, not the agent's: an error in either then shows
        # in the tank cross-check instead of cancelling out (cngmrv.sim.gas).
        return gas.gas_mass(bar, temp_k, self.p.tank_volume_m3)

    def tank_bar(self, t: float) -> float:
        """Absolute tank pressure holding the tank's gas mass at the gas temperature at ``t``."""
        return gas.pressure_bar(self._tank_kg, self.gas_temp_k(t), self.p.tank_volume_m3)

    def dpf_regen(self, t: float) -> bool:
        return any(start <= t < start + length for start, length in self.p.dpf_regens)

    def _default_mode(self, t: float, tank_bar: float, dpf: bool) -> tuple[int, int]:
        if tank_bar <= self.p.tank_low_bar:
            return MODE_DIESEL, REASON_LOW_TANK
        if dpf:
            return MODE_DIESEL, REASON_DPF_REGEN
        return MODE_DUAL, REASON_NONE

    def state(self, t: float) -> State:
        p = self.p
        v, a = self.cycle.at(t)
        force = p.mass_kg * a + p.mass_kg * G * p.crr + 0.5 * p.air_density * p.cda_m2 * v * v
        wheel_kw = max(0.0, force * v / 1000.0)
        engine_kw = min(wheel_kw / p.driveline_eff, p.max_power_kw)
        load = engine_kw / p.max_power_kw
        # Braking and coasting cut fuel to idle level (no fuel below idle demand).
        fuel_kw = p.idle_fuel_kw + engine_kw / p.engine_eff
        tank = self.tank_bar(t)
        dpf = self.dpf_regen(t)
        mode, reason = (self.controller or self._default_mode)(t, tank, dpf)
        setpoint = p.sub_idle + (p.sub_full - p.sub_idle) * load
        share = setpoint if mode == MODE_DUAL else 0.0
        mj_per_h = fuel_kw * 3.6
        speed_kmh = v * 3.6
        rpm = min(p.idle_rpm + p.rpm_per_kmh * speed_kmh * (1.0 if a >= 0 else 0.8), p.max_rpm)
        return State(
            speed_kmh=speed_kmh,
            rpm=rpm,
            load=load,
            diesel_lph=mj_per_h * (1.0 - share) / DIESEL_MJ_PER_L,
            gas_kgph=mj_per_h * share / GAS_MJ_PER_KG,
            mode=mode,
            tank_bar=tank,
            gas_temp_c=self.gas_temp_k(t) - 273.15,
            reason=reason,
            dpf_regen=dpf,
            sub_setpoint=setpoint,
            share=share,
        )

    def step(self, t: float) -> State:
        """State at t, adding the trapezoid since the previous step to the truth."""
        s = self.state(t)
        if self._last is not None:
            t0, s0 = self._last
            dt_h = (t - t0) / 3600.0
            self.truth_diesel_l += 0.5 * (s0.diesel_lph + s.diesel_lph) * dt_h
            gas = 0.5 * (s0.gas_kgph + s.gas_kgph) * dt_h
            self.truth_gas_kg += gas
            self._tank_kg = max(0.0, self._tank_kg - gas)
            self.truth_distance_km += 0.5 * (s0.speed_kmh + s.speed_kmh) * dt_h
        self._last = (t, s)
        p = self.p
        if p.refuel_below_bar > 0 and s.speed_kmh == 0.0 and s.tank_bar < p.refuel_below_bar:
            # A stop at a filling station; the pressure the kit sees jumps at the next step.
            added = max(0.0, self._mass_at(p.refuel_to_bar, self.gas_temp_k(t)) - self._tank_kg)
            self._tank_kg += added
            self.refuels.append((t, added))
        return s
