"""MRV methodology: loading the parameter file and computing RE, PE and ER.

``ER = RE - PE`` in one of two forms, or both (``docs/mrv-methodology.md``):

- **A, energy substitution.**  ``RE`` is the emission had all the energy come
  from the diesel blend in force, ``PE`` what the blend and the gas really
  emitted, so ``ER = gas x NCV_gas x (EF_blend - EF_gas) - boundary terms``.
- **B, distance reference.**  ``RE = distance x SFC_ref x (emission per litre
  of the blend)``, with ``SFC_ref`` per bus (derived from its own diesel-only
  data) or per bus class; ``PE`` as in A.
- **both.**  Per bus and period ``RE`` is the lower and ``PE`` the higher of the
  two forms'.

Fuels count by energy: the diesel blend ("Solar" B30/B35/B40) is split by its
dated FAME share into fossil diesel and FAME, each with its own density, NCV
and emission factors; only the fossil CO2 counts (``biogenic_co2_counted``).

Everything here is pure: the only I/O is reading the TOML files in
:func:`load`.  Monitored quantities come in already made conservative by the
caller (the report): gas that was not measured is simply absent, form B gets
only the distance driven while both fuels were measured, and the gas a
cross-check or the dispenser records put lower comes in as ``gas_low_factor``.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import functools
import hashlib
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT = "jcm-id-dual-fuel-bus"
FORMS = ("A", "B", "both")
PARAMETER_SETS = ("central", "conservative")
MJ_PER_TJ = 1e6

# name -> (unit every methodology file must give it in, may the value be 0).
PARAMETERS: dict[str, tuple[str, bool]] = {
    "ncv_diesel": ("MJ/kg", False),
    "density_diesel": ("kg/L", False),
    "ef_co2_diesel": ("kg/TJ", False),
    "ef_ch4_diesel": ("kg/TJ", True),
    "ef_n2o_diesel": ("kg/TJ", True),
    "ncv_fame": ("MJ/kg", False),
    "density_fame": ("kg/L", False),
    "ef_co2_fame": ("kg/TJ", False),
    "ef_ch4_fame": ("kg/TJ", True),
    "ef_n2o_fame": ("kg/TJ", True),
    "biogenic_co2_counted": ("fraction", True),
    "ncv_gas": ("MJ/kg", False),
    "ef_co2_gas": ("kg/TJ", False),
    "ef_ch4_gas": ("kg/TJ", True),
    "ef_n2o_gas": ("kg/TJ", True),
    "gwp_ch4": ("kg CO2e/kg", False),
    "gwp_n2o": ("kg CO2e/kg", False),
    "compression_kwh_per_kg": ("kWh/kg", True),
    "grid_ef": ("kg CO2/kWh", True),
    "upstream_ch4_gas": ("kg/TJ", True),
}
SFC_UNIT = "L/km"
# Known 100-year GWP sets (CH4, N2O): a file naming one must use its values.
GWP_SETS: dict[str, tuple[float, float]] = {
    "AR4": (25.0, 298.0),
    "AR5": (28.0, 265.0),
}
_PARAM_KEYS = {"value", "unit", "source", "low", "high", "description", "option"}
_PARAM_KEYS_SFC = {"value", "unit", "source", "fame_share_vol", "description", "option"}
OPTIONS = (
    "A",
    "B",
    "C",
)  # JCM monitoring options: public data, transaction records, own measurement

_SECTIONS: dict[str, set[str]] = {
    "methodology": {
        "id", "name", "version", "form", "include_ch4_n2o", "base", "note", "gwp_set",
        "parameter_set",
    },
    "rounding": {"step_t_co2", "direction"},
    "monitoring": {
        "coverage_floor", "cross_check_tolerance", "refill_threshold_kg", "refill_match_window_s",
    },
    "boundary": {"include_compression", "include_upstream_leakage"},
    "parameters": set(PARAMETERS),
    "blend": set(),  # an array of tables, checked on its own
    "reference_consumption": set(),  # any class name
    "bus_reference": set(),  # any device id
    "engine_slip": set(),  # any engine type
    "monitored": set(),  # any monitored quantity
    "monitored_bus": set(),  # any device id: its own equipment, accuracy, calibration
    "ex_ante": {"per_bus_day", "source"},
    "buses": {"class", "engine", "default_class"},
}  # fmt: skip
_MONITORED_KEYS = {
    "description", "unit", "option", "source", "method", "frequency", "equipment",
    "accuracy", "last_calibration",
}  # fmt: skip
_EX_ANTE_KEYS = {"gas_kg", "diesel_l", "distance_km", "er_kg_co2"}


class MethodologyError(ValueError):
    """A methodology file is unreadable, incomplete or inconsistent; the message names
    the file and the key."""


@dataclass(frozen=True)
class Parameter:
    value: float
    unit: str
    source: str
    low: float | None = None
    high: float | None = None
    description: str = ""
    option: str = "A"
    fame_share_vol: float | None = None  # reference consumption only: the blend its litres were

    @property
    def ranged(self) -> bool:
        return self.low is not None and self.high is not None


@dataclass(frozen=True)
class BlendPeriod:
    """The FAME share by volume of the diesel sold from ``start`` (inclusive) to ``end``."""

    start: float  # epoch s
    end: float  # epoch s, math.inf for the open last entry
    fame_share_vol: float
    name: str
    source: str


@dataclass(frozen=True)
class SourceFile:
    """One file the methodology was read from: shipped name or path, and its SHA-256."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Methodology:
    """A validated methodology; build it with :func:`load` or :func:`from_mapping`."""

    id: str
    name: str
    version: str
    form: str
    include_ch4_n2o: bool
    gwp_set: str
    parameter_set: str
    include_compression: bool
    include_upstream_leakage: bool
    parameters: dict[str, Parameter]
    blend: tuple[BlendPeriod, ...]
    reference_consumption: dict[str, Parameter]  # bus class -> SFC_ref in L/km
    bus_reference: dict[str, Parameter]  # device id -> its own SFC_ref in L/km
    engine_slip: dict[str, Parameter]  # engine type -> measured CH4 factor of gas, kg/TJ
    bus_class: dict[str, str]
    bus_engine: dict[str, str]
    monitored_info: dict[str, dict[str, str]]
    monitored_bus: dict[str, dict[str, dict[str, str]]]  # device -> quantity -> overrides
    ex_ante: dict[str, float]
    ex_ante_source: str
    rounding_step_t: float
    coverage_floor: float
    cross_check_tolerance: float
    refill_threshold_kg: float
    refill_match_window_s: float
    files: tuple[SourceFile, ...] = ()
    # Parameter values that replace the file's (the conservative set, a sensitivity run).
    overrides: tuple[tuple[str, float], ...] = ()

    # -- parameter values ---------------------------------------------------

    def p(self, name: str) -> float:
        return self._values[name]

    # A methodology never changes once built, so what it derives is remembered: a fleet
    # report evaluates it for every bus, about a hundred times over (conservative set,
    # sensitivity).  Computed by the same operations, so the same floats.
    @functools.cached_property
    def _values(self) -> dict[str, float]:
        values = {k: p.value for k, p in self.parameters.items()}
        values.update(self.overrides)
        return values

    @functools.cached_property
    def _memo(self) -> dict[tuple[Any, ...], Any]:
        return {}

    def with_values(self, values: Mapping[str, float], **changes: Any) -> Methodology:
        """This methodology with some parameter values replaced (and fields changed)."""
        merged = dict(self.overrides)
        merged.update(values)
        return dataclasses.replace(self, overrides=tuple(sorted(merged.items())), **changes)

    def ranged(self) -> list[str]:
        return [k for k, p in self.parameters.items() if p.ranged]

    # -- fuels ----------------------------------------------------------------

    def _non_co2(self, fuel: str) -> float:
        if not self.include_ch4_n2o:
            return 0.0
        return self.p(f"ef_ch4_{fuel}") * self.p("gwp_ch4") + self.p(f"ef_n2o_{fuel}") * self.p(
            "gwp_n2o"
        )

    def ef_diesel_kg_per_mj(self) -> float:
        """Counted emission (CO2, or CO2e with CH4/N2O) per MJ of fossil diesel."""
        key = ("ef_diesel",)
        if key not in self._memo:
            self._memo[key] = (self.p("ef_co2_diesel") + self._non_co2("diesel")) / MJ_PER_TJ
        return self._memo[key]  # type: ignore[no-any-return]

    def ef_fame_kg_per_mj(self) -> float:
        """Counted emission per MJ of FAME: its CO2 times ``biogenic_co2_counted`` (0 by
        default), plus its CH4 and N2O."""
        key = ("ef_fame",)
        if key not in self._memo:
            co2 = self.p("ef_co2_fame") * self.p("biogenic_co2_counted")
            self._memo[key] = (co2 + self._non_co2("fame")) / MJ_PER_TJ
        return self._memo[key]  # type: ignore[no-any-return]

    def ef_gas_kg_per_mj(self, device_id: str | None = None) -> float:
        key = ("ef_gas", self.bus_engine.get(device_id or ""))
        if key not in self._memo:
            kg_per_tj = self.p("ef_co2_gas")
            if self.include_ch4_n2o:
                kg_per_tj += self.ch4_gas_kg_per_tj(device_id) * self.p("gwp_ch4")
                kg_per_tj += self.p("ef_n2o_gas") * self.p("gwp_n2o")
            self._memo[key] = kg_per_tj / MJ_PER_TJ
        return self._memo[key]  # type: ignore[no-any-return]

    def ch4_gas_kg_per_tj(self, device_id: str | None) -> float:
        """Methane slip: the bus's engine type's measured factor if configured, else
        ``ef_ch4_gas`` (shipped at the conservative end of IPCC's range)."""
        engine = self.bus_engine.get(device_id or "")
        if engine is not None:
            return self.engine_slip[engine].value
        return self.p("ef_ch4_gas")

    def boundary_kg_per_kg_gas(self) -> float:
        """Station compression electricity and upstream methane, per kg of gas (if included)."""
        key = ("boundary",)
        if key in self._memo:
            return self._memo[key]  # type: ignore[no-any-return]
        out = 0.0
        if self.include_compression:
            out += self.p("compression_kwh_per_kg") * self.p("grid_ef")
        if self.include_upstream_leakage:
            out += self.p("upstream_ch4_gas") * self.p("ncv_gas") / MJ_PER_TJ * self.p("gwp_ch4")
        self._memo[key] = out
        return out

    def blend_mj_per_l(self, fame_share: float) -> tuple[float, float]:
        """(fossil MJ, FAME MJ) in one litre of a blend with this FAME share by volume."""
        key = ("mj_per_l", fame_share)
        if key not in self._memo:
            fossil = (1.0 - fame_share) * self.p("density_diesel") * self.p("ncv_diesel")
            fame = fame_share * self.p("density_fame") * self.p("ncv_fame")
            self._memo[key] = (fossil, fame)
        return self._memo[key]  # type: ignore[no-any-return]

    def blend_kg_per_l(self, fame_share: float) -> float:
        """Counted emission of one litre of the blend."""
        key = ("kg_per_l", fame_share)
        if key not in self._memo:
            fossil, fame = self.blend_mj_per_l(fame_share)
            self._memo[key] = fossil * self.ef_diesel_kg_per_mj() + fame * self.ef_fame_kg_per_mj()
        return self._memo[key]  # type: ignore[no-any-return]

    def blend_kg_per_mj(self, fame_share: float) -> float:
        fossil, fame = self.blend_mj_per_l(fame_share)
        return self.blend_kg_per_l(fame_share) / (fossil + fame)

    def fame_share_at(self, t: float) -> float:
        """The FAME share by volume in force at epoch ``t``; MethodologyError outside the schedule."""
        i = bisect.bisect_right(self.blend, t, key=lambda b: b.start) - 1
        if i < 0 or t >= self.blend[i].end:
            when = dt.datetime.fromtimestamp(t, dt.UTC).isoformat()
            raise MethodologyError(f"no diesel blend in the [[blend]] schedule for {when}")
        return self.blend[i].fame_share_vol

    # -- buses ----------------------------------------------------------------

    def class_of(self, device_id: str) -> str | None:
        return self.bus_class.get(device_id)

    def uses_form_b(self) -> bool:
        return self.form in ("B", "both")

    def buses_without_reference(self, devices: Iterable[str]) -> list[str]:
        """Buses form B cannot compute: no own SFC_ref and no class (never defaulted)."""
        if not self.uses_form_b():
            return []
        return [d for d in devices if d not in self.bus_reference and d not in self.bus_class]

    def sfc_ref(self, device_id: str) -> Parameter:
        """Form B reference diesel consumption: the bus's own, else its class's."""
        if device_id in self.bus_reference:
            return self.bus_reference[device_id]
        cls = self.class_of(device_id)
        if cls is None:
            raise MethodologyError(
                f"bus {device_id!r} has no class in [buses.class] and no [bus_reference] "
                "for the form B reference consumption"
            )
        return self.reference_consumption[cls]

    def round_er_t(self, er_kg: float) -> float:
        """ER for issuance in t CO2: a positive ER rounded down to the rounding step; a
        negative (or zero) ER as it is, unrounded (there is nothing to issue)."""
        if er_kg <= 0:
            return er_kg / 1000.0
        step = self.rounding_step_t
        # The small epsilon keeps 86.4 / 0.1 style quotients from flooring one step too low.
        return math.floor(er_kg / 1000.0 / step + 1e-9) * step


@dataclass(frozen=True)
class Part:
    """The monitored sums of the readings of one bus and period under one diesel blend."""

    fame_share: float
    diesel_l: float
    gas_kg: float
    distance_km: float
    distance_credited_km: float


@dataclass(frozen=True)
class Monitored:
    """What was measured for one bus over one period, already conservative.

    ``distance_credited_km`` is the distance driven while both fuels were
    measured; form B credits only that.  ``gas_low_factor`` (<= 1) and
    ``gas_high_factor`` (>= 1) are the lowest and highest credible gas as a
    share of the metered gas: the invoiced figure, a failed cross-check's, the
    uncovered time filled at the metered rate (see :func:`emissions`).
    """

    parts: tuple[Part, ...]
    gas_low_factor: float = 1.0
    gas_high_factor: float = 1.0

    @classmethod
    def single(
        cls,
        diesel_l: float,
        gas_kg: float,
        distance_km: float = 0.0,
        distance_credited_km: float | None = None,
        fame_share: float = 0.0,
    ) -> Monitored:
        credited = distance_km if distance_credited_km is None else distance_credited_km
        return cls((Part(fame_share, diesel_l, gas_kg, distance_km, credited),))

    @property
    def diesel_l(self) -> float:
        return sum(p.diesel_l for p in self.parts)

    @property
    def gas_kg(self) -> float:
        return sum(p.gas_kg for p in self.parts)

    def at_blend(self, fame_share: float) -> Monitored:
        # Built directly, not by dataclasses.replace: twice per bus and day of a fleet report.
        parts = tuple(
            Part(fame_share, p.diesel_l, p.gas_kg, p.distance_km, p.distance_credited_km)
            for p in self.parts
        )
        return Monitored(parts, self.gas_low_factor, self.gas_high_factor)


@dataclass(frozen=True)
class Emissions:
    re_kg: float
    pe_kg: float
    er_kg: float
    fossil_mj: float
    biogenic_mj: float
    gas_mj: float
    gas_kg_credited: float  # the gas form A credited (form A and both); metered gas in form B
    pe_boundary_kg: float  # compression and upstream methane, within pe_kg
    re_a_kg: float | None
    re_b_kg: float | None

    @property
    def diesel_mj(self) -> float:
        return self.fossil_mj + self.biogenic_mj

    @property
    def gas_energy_share(self) -> float | None:
        total = self.diesel_mj + self.gas_mj
        return self.gas_mj / total if total > 0 else None


def emissions(m: Methodology, q: Monitored, device_id: str) -> Emissions:
    """RE, PE and ER (kg CO2 or CO2e) of one bus over one period.

    Form A takes, of the lowest and highest credible gas (``gas_low_factor``,
    ``gas_high_factor``), the one that gives the lower ER: the lowest while a kg
    of gas reduces emissions, the highest once it raises them (a heavy blend, or
    methane slip).  Form B's PE always burns the highest.
    """
    re, pe, f, fossil_mj, bio_mj, gas_kg, re_a, re_b = _balance(m, q, device_id)
    return Emissions(
        re_kg=re,
        pe_kg=pe,
        er_kg=re - pe,
        fossil_mj=fossil_mj,
        biogenic_mj=bio_mj,
        gas_mj=f * gas_kg * m.p("ncv_gas"),
        gas_kg_credited=f * gas_kg,
        pe_boundary_kg=f * gas_kg * m.boundary_kg_per_kg_gas(),
        re_a_kg=re_a if m.form != "B" else None,
        re_b_kg=re_b if m.form != "A" else None,
    )


def _balance(
    m: Methodology, q: Monitored, device_id: str
) -> tuple[float, float, float, float, float, float, float, float]:
    """:func:`emissions`' arithmetic: (RE, PE, gas factor, fossil MJ, biogenic MJ, gas kg,
    form A's RE, form B's RE): the definition :class:`FleetColumns` repeats on a whole
    fleet at once."""
    ef_g = m.ef_gas_kg_per_mj(device_id)
    ncv_g = m.p("ncv_gas")
    per_kg_gas = ncv_g * ef_g + m.boundary_kg_per_kg_gas()
    fossil_mj = bio_mj = diesel_kg = gas_kg = 0.0
    re_a_diesel = re_a_gas = re_b = 0.0  # form A's RE: the diesel's, and per unit gas factor
    ref = m.sfc_ref(device_id) if m.uses_form_b() else None
    for part in q.parts:
        fossil, fame = m.blend_mj_per_l(part.fame_share)
        per_mj = m.blend_kg_per_mj(part.fame_share)
        fossil_mj += part.diesel_l * fossil
        bio_mj += part.diesel_l * fame
        diesel_kg += part.diesel_l * m.blend_kg_per_l(part.fame_share)
        gas_kg += part.gas_kg
        re_a_diesel += part.diesel_l * (fossil + fame) * per_mj
        re_a_gas += part.gas_kg * ncv_g * per_mj
        if ref is not None:
            # Litres of the reference's own blend, if stated, count by their energy.
            ref_mj_per_l = (
                sum(m.blend_mj_per_l(ref.fame_share_vol))
                if ref.fame_share_vol is not None
                else fossil + fame
            )
            re_b += part.distance_credited_km * ref.value * ref_mj_per_l * per_mj

    # Form A at the factor of the lower ER; the low one on a tie.
    low, high = q.gas_low_factor, q.gas_high_factor
    re_lo, pe_lo = re_a_diesel + low * re_a_gas, diesel_kg + low * gas_kg * per_kg_gas
    re_hi, pe_hi = re_a_diesel + high * re_a_gas, diesel_kg + high * gas_kg * per_kg_gas
    if re_lo - pe_lo <= re_hi - pe_hi:
        f_a, re_a, pe_a = low, re_lo, pe_lo
    else:
        f_a, re_a, pe_a = high, re_hi, pe_hi
    pe_b = diesel_kg + high * gas_kg * per_kg_gas
    if m.form == "A":
        re, pe, f = re_a, pe_a, f_a
    elif m.form == "B":
        re, pe, f = re_b, pe_b, high
    else:
        re, pe, f = min(re_a, re_b), max(pe_a, pe_b), max(f_a, high)
    return re, pe, f, fossil_mj, bio_mj, gas_kg, re_a, re_b


# -- the conservative set and sensitivity ---------------------------------------


def fleet_er(m: Methodology, fleet: Sequence[tuple[str, Monitored]]) -> float:
    """The fleet's ER: :func:`emissions`' ``er_kg`` of each bus, summed in fleet order."""
    return FleetColumns(m, fleet).er(m)


class FleetColumns:
    """A fleet's monitored sums as columns, one entry per bus, for its ER under many
    variants of one methodology (the conservative set and the sensitivity evaluate it
    some 80 times over).

    :meth:`er` is :func:`_balance`'s arithmetic (RE - PE per bus, summed in fleet
    order) done on every bus at once: the same float64 operations in the same order,
    and numpy's are IEEE's as Python's are, so the same floats to the last bit
    (tests/test_mrv.py holds it to the bus-by-bus sum).  ``m`` gives what the variants
    share: which buses have an engine type or a reference consumption of their own.
    """

    def __init__(self, m: Methodology, fleet: Sequence[tuple[str, Monitored]]) -> None:
        import numpy as np

        self._np = np
        devices = [dev for dev, _ in fleet]
        self._base = m
        self.size = len(fleet)
        self.low = np.array([q.gas_low_factor for _, q in fleet], dtype=np.float64)
        self.high = np.array([q.gas_high_factor for _, q in fleet], dtype=np.float64)
        # The blends in the fleet: each part's blend is an index into them.
        self.shares = sorted({p.fame_share for _, q in fleet for p in q.parts})
        where = {share: i for i, share in enumerate(self.shares)}
        slots = max((len(q.parts) for _, q in fleet), default=0)
        self.parts = []  # per slot: (present, blend, diesel L, gas kg, credited km)
        for k in range(slots):
            rows = [q.parts[k] if k < len(q.parts) else None for _, q in fleet]
            self.parts.append(
                (
                    np.array([p is not None for p in rows], dtype=bool),
                    np.array([where[p.fame_share] if p else 0 for p in rows], dtype=np.intp),
                    *(
                        np.array([getattr(p, f) if p else 0.0 for p in rows], dtype=np.float64)
                        for f in ("diesel_l", "gas_kg", "distance_credited_km")
                    ),
                )
            )
        # Each bus's engine type (its gas's methane slip): a representative device each.
        engines: dict[str | None, str] = {}
        for dev in devices:
            engines.setdefault(m.bus_engine.get(dev), dev)
        self.engines = list(engines.values())
        index = {e: i for i, e in enumerate(engines)}
        self.engine = np.array([index[m.bus_engine.get(dev)] for dev in devices], dtype=np.intp)
        self.refs: list[Parameter] = []
        self.ref = np.zeros(self.size, dtype=np.intp)
        if m.uses_form_b():
            seen: dict[int, int] = {}
            for i, dev in enumerate(devices):
                ref = m.sfc_ref(dev)
                if id(ref) not in seen:
                    seen[id(ref)] = len(self.refs)
                    self.refs.append(ref)
                self.ref[i] = seen[id(ref)]

    def er(self, m: Methodology) -> float:
        """The fleet's ER under ``m``, a variant of the methodology the columns were made
        with (:meth:`Methodology.with_values`): :func:`fleet_er`, to the last bit."""
        np = self._np
        base = self._base
        if (m.bus_engine, m.bus_reference, m.bus_class, m.form) != (
            base.bus_engine,
            base.bus_reference,
            base.bus_class,
            base.form,
        ):
            raise ValueError("FleetColumns.er: not a variant of the columns' methodology")
        ncv_g = m.p("ncv_gas")
        boundary = m.boundary_kg_per_kg_gas()
        per_kg_gas = np.array(
            [ncv_g * m.ef_gas_kg_per_mj(dev) + boundary for dev in self.engines], dtype=np.float64
        )[self.engine]
        table = [m.blend_mj_per_l(s) for s in self.shares]
        fossil_of = np.array([f for f, _ in table], dtype=np.float64)
        fame_of = np.array([b for _, b in table], dtype=np.float64)
        per_mj_of = np.array([m.blend_kg_per_mj(s) for s in self.shares], dtype=np.float64)
        kg_per_l_of = np.array([m.blend_kg_per_l(s) for s in self.shares], dtype=np.float64)
        form_b = m.uses_form_b()
        if form_b:
            ref_value = np.array([r.value for r in self.refs], dtype=np.float64)[self.ref]
            own = [r.fame_share_vol is not None for r in self.refs]
            ref_own = np.array(own, dtype=bool)[self.ref]
            ref_mj_of = np.array(
                [
                    sum(m.blend_mj_per_l(r.fame_share_vol)) if r.fame_share_vol is not None else 0.0
                    for r in self.refs
                ],
                dtype=np.float64,
            )[self.ref]
        zero = np.zeros(self.size, dtype=np.float64)
        diesel_kg, gas_kg, re_a_diesel, re_a_gas, re_b = (zero.copy() for _ in range(5))
        for present, blend, diesel, gas, credited in self.parts:
            fossil, fame, per_mj = fossil_of[blend], fame_of[blend], per_mj_of[blend]
            # A bus with fewer parts adds nothing in this slot (not even a zero).
            diesel_kg = np.where(present, diesel_kg + diesel * kg_per_l_of[blend], diesel_kg)
            gas_kg = np.where(present, gas_kg + gas, gas_kg)
            re_a_diesel = np.where(
                present, re_a_diesel + diesel * (fossil + fame) * per_mj, re_a_diesel
            )
            re_a_gas = np.where(present, re_a_gas + gas * ncv_g * per_mj, re_a_gas)
            if form_b:
                ref_mj = np.where(ref_own, ref_mj_of, fossil + fame)
                re_b = np.where(present, re_b + credited * ref_value * ref_mj * per_mj, re_b)
        low, high = self.low, self.high
        re_lo, pe_lo = re_a_diesel + low * re_a_gas, diesel_kg + low * gas_kg * per_kg_gas
        re_hi, pe_hi = re_a_diesel + high * re_a_gas, diesel_kg + high * gas_kg * per_kg_gas
        at_low = re_lo - pe_lo <= re_hi - pe_hi
        re_a, pe_a = np.where(at_low, re_lo, re_hi), np.where(at_low, pe_lo, pe_hi)
        if m.form == "A":
            re, pe = re_a, pe_a
        elif m.form == "B":
            re, pe = re_b, pe_hi
        else:  # Python's min() and max(): the first unless the second is below (above) it
            re, pe = np.where(re_b < re_a, re_b, re_a), np.where(pe_hi > pe_a, pe_hi, pe_a)
        # The bus-by-bus sum, in fleet order, as sum() adds Python floats.
        return float(sum((re - pe).tolist()))


def conservative(m: Methodology, fleet: Sequence[tuple[str, Monitored]]) -> Methodology:
    """Every ranged parameter at the end of its range that gives the lowest fleet ER, and
    both boundary terms included.

    The end is found by evaluation, not declared: which end is conservative depends on
    the sign of ``EF_blend - EF_gas`` (for ``ncv_gas``, say), which the blend can flip.
    One parameter at a time, repeated until none moves (a local, not a proven global,
    minimum over the corners; ER is near-linear in each parameter).
    """
    base = m.with_values(
        {}, include_compression=True, include_upstream_leakage=True, include_ch4_n2o=True
    )
    names = base.ranged()
    chosen = {n: base.p(n) for n in names}
    # A sweep re-evaluates corners an earlier one already did when nothing moved between.
    seen: dict[tuple[tuple[str, float], ...], float] = {}

    columns = FleetColumns(base, fleet)

    def er_at(values: dict[str, float]) -> float:
        key = tuple(sorted(values.items()))
        if key not in seen:
            seen[key] = columns.er(base.with_values(values))
        return seen[key]

    # ER is close to linear in each parameter, so a few sweeps settle; each sweep is 2n fleets.
    for _ in range(len(names) + 1):
        moved = False
        for n in names:
            p = base.parameters[n]
            assert p.low is not None and p.high is not None
            er_lo, er_hi = (er_at({**chosen, n: v}) for v in (p.low, p.high))
            v = p.low if er_lo <= er_hi else p.high
            moved |= v != chosen[n]
            chosen[n] = v
        if not moved:
            break
    return base.with_values(chosen, parameter_set="conservative")


# Ranged parameters that act only through a boundary term, and the switch of that term.
BOUNDARY_OF = {
    "compression_kwh_per_kg": "include_compression",
    "grid_ef": "include_compression",
    "upstream_ch4_gas": "include_upstream_leakage",
}


def sensitivity(m: Methodology, fleet: Sequence[tuple[str, Monitored]]) -> list[dict[str, Any]]:
    """Fleet ER with each ranged parameter at its low and high end, the others as in ``m``,
    and with each boundary term switched on; sorted by the larger swing first.

    A parameter of a boundary term that ``m`` leaves out is swung with its term
    included (``with_term``), so its weight shows; the term's own row is its switch.
    """
    columns = FleetColumns(m, fleet)
    central = columns.er(m)
    rows: list[dict[str, Any]] = []
    for n in m.ranged():
        p = m.parameters[n]
        assert p.low is not None and p.high is not None
        switch = BOUNDARY_OF.get(n)
        mm = m if switch is None or getattr(m, switch) else m.with_values({}, **{switch: True})
        er_lo = columns.er(mm.with_values({n: p.low}))
        er_hi = columns.er(mm.with_values({n: p.high}))
        rows.append(
            {
                "parameter": n,
                "unit": p.unit,
                "value": m.p(n),
                "low": p.low,
                "high": p.high,
                "er_kg_co2_at_low": er_lo,
                "er_kg_co2_at_high": er_hi,
                "er_kg_co2": central,
                "swing_kg_co2": abs(er_hi - er_lo),
                "with_term": mm is not m,
            }
        )
    for switch in sorted(set(BOUNDARY_OF.values())):
        on, off = (columns.er(m.with_values({}, **{switch: v})) for v in (True, False))
        rows.append(
            {
                "parameter": switch,
                "unit": "off/on",
                "value": float(getattr(m, switch)),
                "low": 0.0,
                "high": 1.0,
                "er_kg_co2_at_low": off,
                "er_kg_co2_at_high": on,
                "er_kg_co2": central,
                "swing_kg_co2": abs(on - off),
                "with_term": False,
            }
        )
    rows.sort(key=lambda r: -r["swing_kg_co2"])
    return rows


# -- loading -----------------------------------------------------------------


def _shipped(name: str) -> tuple[str, bytes]:
    res = resources.files("cngmrv.office").joinpath("methodology", f"{name}.toml")
    if not res.is_file():
        raise MethodologyError(f"no shipped methodology named {name!r}")
    return f"shipped:{name}", res.read_bytes()


def _parse(label: str, data: bytes) -> dict[str, Any]:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise MethodologyError(f"methodology {label}: not valid TOML: {e}") from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load(path: Path | None = None) -> Methodology:
    """The shipped default, or a project file (which may name a ``base`` to override).

    A file with ``[methodology] base = NAME`` is merged key by key over the
    shipped methodology NAME (or over a file, if NAME ends in ``.toml``,
    relative to this file); a file without ``base`` must be complete.  An
    array (the ``[[blend]]`` schedule) replaces the base's whole.
    """
    files: list[SourceFile] = []
    if path is None:
        label, raw = _shipped(DEFAULT)
    else:
        label = str(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise MethodologyError(f"cannot read methodology {path}: {e.strerror}") from None
    data = _parse(label, raw)
    files.append(SourceFile(label, hashlib.sha256(raw).hexdigest()))
    current = label
    while isinstance(data.get("methodology"), Mapping) and "base" in data["methodology"]:
        base = data["methodology"]["base"]
        if not isinstance(base, str) or not base:
            raise MethodologyError(f"methodology {current}: methodology.base must be a name")
        if base.endswith(".toml"):
            here = Path(current).parent if not current.startswith("shipped:") else Path()
            base_path = here / base
            try:
                base_label, base_raw = str(base_path), base_path.read_bytes()
            except OSError as e:
                raise MethodologyError(
                    f"methodology {current}: cannot read base {base_path}: {e.strerror}"
                ) from None
        else:
            base_label, base_raw = _shipped(base)
        if any(f.name == base_label for f in files):
            raise MethodologyError(f"methodology {current}: base {base!r} loops back")
        files.append(SourceFile(base_label, hashlib.sha256(base_raw).hexdigest()))
        own = {k: v for k, v in data["methodology"].items() if k != "base"}
        data = _merge(_parse(base_label, base_raw), {**data, "methodology": own})
        current = base_label
    return from_mapping(data, label, tuple(files))


def _number(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise MethodologyError(f"{where}: expected a finite number, got {v!r}")
    return float(v)


def _text(where: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise MethodologyError(f"{where}: must be a non-empty string")
    return v


def _parameter(
    where: str, v: Any, unit: str, may_be_zero: bool, keys: set[str] = _PARAM_KEYS
) -> Parameter:
    if not isinstance(v, Mapping):
        raise MethodologyError(f"{where}: must be a table {{value, unit, source}}")
    for k in v:
        if k not in keys:
            raise MethodologyError(f"{where}.{k}: unknown key (known: {', '.join(sorted(keys))})")
    for k in ("value", "unit", "source"):
        if k not in v:
            raise MethodologyError(f"{where}.{k}: missing")
    value = _number(f"{where}.value", v["value"])
    if value < 0 or (value == 0 and not may_be_zero):
        raise MethodologyError(f"{where}.value: must be {'>= 0' if may_be_zero else '> 0'}")
    if v["unit"] != unit:
        raise MethodologyError(f"{where}.unit: must be {unit!r}, got {v['unit']!r}")
    if not isinstance(v["source"], str) or not v["source"].strip():
        raise MethodologyError(f"{where}.source: must say where the value comes from")
    low = high = None
    if "low" in v or "high" in v:
        if "low" not in v or "high" not in v:
            raise MethodologyError(f"{where}: a range needs both low and high")
        low, high = _number(f"{where}.low", v["low"]), _number(f"{where}.high", v["high"])
        if not low <= value <= high:
            raise MethodologyError(
                f"{where}.value: {value:g} is outside its stated range {low:g}..{high:g}"
            )
        if low < 0 or (low == 0 and not may_be_zero):
            raise MethodologyError(f"{where}.low: must be {'>= 0' if may_be_zero else '> 0'}")
    if unit == "fraction" and value > 1.0:
        raise MethodologyError(f"{where}.value: a fraction must be between 0 and 1")
    option = v.get("option", "A")
    if option not in OPTIONS:
        raise MethodologyError(f"{where}.option: must be one of A, B, C, got {option!r}")
    share = None
    if "fame_share_vol" in v:
        share = _number(f"{where}.fame_share_vol", v["fame_share_vol"])
        if not 0.0 <= share <= 1.0:
            raise MethodologyError(f"{where}.fame_share_vol: must be between 0 and 1")
    return Parameter(
        value, unit, v["source"], low, high, str(v.get("description", "")), option, share
    )


def _epoch(where: str, v: Any) -> float:
    # A bare date is UTC midnight; a date-time may carry the local offset (+07:00).
    if isinstance(v, dt.datetime):
        return (v if v.tzinfo else v.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(v, dt.date):
        return dt.datetime(v.year, v.month, v.day, tzinfo=dt.UTC).timestamp()
    raise MethodologyError(f"{where}: must be a TOML date (2025-01-01) or date-time, got {v!r}")


def _blend(entries: Any) -> tuple[BlendPeriod, ...]:
    if not isinstance(entries, list) or not entries:
        raise MethodologyError("blend: missing (a [[blend]] schedule of the diesel's FAME share)")
    out: list[BlendPeriod] = []
    for i, e in enumerate(entries, 1):
        where = f"blend entry {i}"
        if not isinstance(e, Mapping):
            raise MethodologyError(f"{where}: must be a table")
        known = {"from", "to", "fame_share_vol", "name", "source"}
        for k in e:
            if k not in known:
                raise MethodologyError(
                    f"{where}.{k}: unknown key (known: {', '.join(sorted(known))})"
                )
        for k in ("from", "fame_share_vol", "source"):
            if k not in e:
                raise MethodologyError(f"{where}.{k}: missing")
        start = _epoch(f"{where}.from", e["from"])
        last = i == len(entries)
        if "to" not in e and not last:
            raise MethodologyError(f"{where}.to: missing (only the last entry may be open-ended)")
        end = _epoch(f"{where}.to", e["to"]) if "to" in e else math.inf
        if end <= start:
            raise MethodologyError(f"{where}: 'to' is not after 'from'")
        share = _number(f"{where}.fame_share_vol", e["fame_share_vol"])
        if not 0.0 <= share <= 1.0:
            raise MethodologyError(f"{where}.fame_share_vol: must be between 0 and 1, got {share}")
        source = _text(f"{where}.source", e["source"])
        if out:
            prev = out[-1]
            if start < prev.end:
                raise MethodologyError(
                    f"{where}: overlaps entry {i - 1} (starts {e['from']}, before its end)"
                )
            if start > prev.end:
                raise MethodologyError(
                    f"{where}: gap after entry {i - 1} (entry {i - 1} ends before {e['from']})"
                )
        out.append(BlendPeriod(start, end, share, str(e.get("name", f"{share:.0%}")), source))
    return tuple(out)


def from_mapping(
    data: Mapping[str, Any], label: str = "<mapping>", files: tuple[SourceFile, ...] = ()
) -> Methodology:
    """Validate a parsed (and merged) methodology; errors name ``label`` and the key."""
    try:
        return _validated(data, files)
    except MethodologyError as e:
        raise MethodologyError(f"methodology {label}: {e}") from None


def _validated(data: Mapping[str, Any], files: tuple[SourceFile, ...]) -> Methodology:
    def fail(msg: str) -> MethodologyError:
        return MethodologyError(msg)

    for section, value in data.items():
        if section not in _SECTIONS:
            raise fail(f"{section}: unknown section (known: {', '.join(_SECTIONS)})")
        if section == "blend":
            continue
        if not isinstance(value, Mapping):
            raise fail(f"{section}: must be a table")
        allowed = _SECTIONS[section]
        if allowed:
            for k in value:
                if k not in allowed:
                    raise fail(f"{section}.{k}: unknown key (known: {', '.join(sorted(allowed))})")

    def get(section: str, key: str) -> Any:
        table = data.get(section, {})
        if key not in table:
            raise fail(f"{section}.{key}: missing")
        return table[key]

    def flag(section: str, key: str) -> bool:
        v = get(section, key)
        if not isinstance(v, bool):
            raise fail(f"{section}.{key}: must be true or false")
        return v

    def share(section: str, key: str) -> float:
        v = _number(f"{section}.{key}", get(section, key))
        if not 0.0 <= v <= 1.0:
            raise fail(f"{section}.{key}: must be between 0 and 1, got {v}")
        return v

    form = _text("methodology.form", get("methodology", "form"))
    if form not in FORMS:
        raise fail(f"methodology.form: must be one of {', '.join(FORMS)}, got {form!r}")
    pset = get("methodology", "parameter_set")
    if pset not in PARAMETER_SETS:
        raise fail(f"methodology.parameter_set: must be one of {', '.join(PARAMETER_SETS)}")
    if get("rounding", "direction") != "down":
        raise fail("rounding.direction: only 'down' is supported (issuance never rounds up)")
    buses = data.get("buses", {})
    if "default_class" in buses:
        raise fail(
            "buses.default_class: no longer accepted (a bus with no class was silently "
            "given one); list every bus under [buses.class]"
        )
    step = _number("rounding.step_t_co2", get("rounding", "step_t_co2"))
    refill = _number("monitoring.refill_threshold_kg", get("monitoring", "refill_threshold_kg"))
    window = _number("monitoring.refill_match_window_s", get("monitoring", "refill_match_window_s"))
    params = {
        name: _parameter(f"parameters.{name}", get("parameters", name), unit, zero)
        for name, (unit, zero) in PARAMETERS.items()
    }
    gwp_set = _text("methodology.gwp_set", get("methodology", "gwp_set"))
    if gwp_set in GWP_SETS and GWP_SETS[gwp_set] != (
        params["gwp_ch4"].value,
        params["gwp_n2o"].value,
    ):
        ch4, n2o = GWP_SETS[gwp_set]
        raise fail(
            f"parameters.gwp_ch4/gwp_n2o: methodology.gwp_set {gwp_set!r} has {ch4:g}/{n2o:g}, "
            f"the file gives {params['gwp_ch4'].value:g}/{params['gwp_n2o'].value:g}"
        )
    sfc = {
        str(cls): _parameter(f"reference_consumption.{cls}", v, SFC_UNIT, False, _PARAM_KEYS_SFC)
        for cls, v in data.get("reference_consumption", {}).items()
    }
    own = {
        str(dev): _parameter(f"bus_reference.{dev}", v, SFC_UNIT, False, _PARAM_KEYS_SFC)
        for dev, v in data.get("bus_reference", {}).items()
    }
    slip = {
        str(kind): _parameter(f"engine_slip.{kind}", v, "kg/TJ", True)
        for kind, v in data.get("engine_slip", {}).items()
    }
    classes = buses.get("class", {})
    if not isinstance(classes, Mapping) or not all(isinstance(v, str) for v in classes.values()):
        raise fail("buses.class: must map device ids to class names")
    for device, cls in classes.items():
        if cls not in sfc:
            raise fail(
                f"buses.class: class {cls!r} of {device} has no [reference_consumption.{cls}]"
            )
    engines = buses.get("engine", {})
    if not isinstance(engines, Mapping) or not all(isinstance(v, str) for v in engines.values()):
        raise fail("buses.engine: must map device ids to engine types")
    for device, kind in engines.items():
        if kind not in slip:
            raise fail(
                f"buses.engine: engine type {kind!r} of {device} has no [engine_slip.{kind}]"
            )

    def described(where: str, table: Any) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        if not isinstance(table, Mapping):
            raise fail(f"{where}: must be a table")
        for name, v in table.items():
            if not isinstance(v, Mapping):
                raise fail(f"{where}.{name}: must be a table")
            for k in v:
                if k not in _MONITORED_KEYS:
                    raise fail(
                        f"{where}.{name}.{k}: unknown key (known: {', '.join(sorted(_MONITORED_KEYS))})"
                    )
            out[str(name)] = {k: str(x) for k, x in v.items()}
        return out

    info = described("monitored", data.get("monitored", {}))
    per_bus = {
        str(dev): described(f"monitored_bus.{dev}", v)
        for dev, v in data.get("monitored_bus", {}).items()
    }
    ex = data.get("ex_ante", {})
    ex_ante: dict[str, float] = {}
    if ex:
        per = ex.get("per_bus_day", {})
        if not isinstance(per, Mapping):
            raise fail("ex_ante.per_bus_day: must be a table")
        for k, v in per.items():
            if k not in _EX_ANTE_KEYS:
                raise fail(f"ex_ante.per_bus_day.{k}: unknown key")
            ex_ante[k] = _number(f"ex_ante.per_bus_day.{k}", v)
        _text("ex_ante.source", ex.get("source"))
    if step <= 0:
        raise fail("rounding.step_t_co2: must be > 0")
    if refill <= 0:
        raise fail("monitoring.refill_threshold_kg: must be > 0")
    if window <= 0:
        raise fail("monitoring.refill_match_window_s: must be > 0")
    return Methodology(
        id=_text("methodology.id", get("methodology", "id")),
        name=_text("methodology.name", get("methodology", "name")),
        version=_text("methodology.version", get("methodology", "version")),
        form=form,
        include_ch4_n2o=flag("methodology", "include_ch4_n2o"),
        gwp_set=gwp_set,
        parameter_set=pset,
        include_compression=flag("boundary", "include_compression"),
        include_upstream_leakage=flag("boundary", "include_upstream_leakage"),
        parameters=params,
        blend=_blend(data.get("blend")),
        reference_consumption=sfc,
        bus_reference=own,
        engine_slip=slip,
        bus_class={str(k): str(v) for k, v in classes.items()},
        bus_engine={str(k): str(v) for k, v in engines.items()},
        monitored_info=info,
        monitored_bus=per_bus,
        ex_ante=ex_ante,
        ex_ante_source=str(ex.get("source", "")),
        rounding_step_t=step,
        coverage_floor=share("monitoring", "coverage_floor"),
        cross_check_tolerance=share("monitoring", "cross_check_tolerance"),
        refill_threshold_kg=refill,
        refill_match_window_s=window,
        files=files,
    )
