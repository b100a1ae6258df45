"""MRV methodology: loading the parameter file and computing RE, PE and ER.

``ER = RE - PE`` in one of two forms (``docs/mrv-methodology.md``):

- **A, energy substitution.**  ``RE`` is the emission had all the energy come
  from diesel, ``PE`` what diesel and gas really emitted, so
  ``ER = gas x NCV_gas x (EF_diesel - EF_gas)``.
- **B, distance reference.**  ``RE = distance x SFC_ref x density x NCV_diesel
  x EF_diesel`` with ``SFC_ref`` per bus class, ``PE`` as in A.

Everything here is pure: the only I/O is reading the TOML files in
:func:`load`.  Monitored quantities come in already made conservative by the
caller (the report): gas that was not measured is simply absent, and form B
gets only the distance driven while both fuels were measured.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT = "jcm-id-dual-fuel-bus"
FORMS = ("A", "B")
MJ_PER_TJ = 1e6

# name -> unit every methodology file must give it in.
PARAMETERS: dict[str, str] = {
    "ncv_diesel": "MJ/kg",
    "density_diesel": "kg/L",
    "ef_co2_diesel": "kg/TJ",
    "ncv_gas": "MJ/kg",
    "ef_co2_gas": "kg/TJ",
    "ef_ch4_diesel": "kg/TJ",
    "ef_n2o_diesel": "kg/TJ",
    "ef_ch4_gas": "kg/TJ",
    "ef_n2o_gas": "kg/TJ",
    "gwp_ch4": "kg CO2e/kg",
    "gwp_n2o": "kg CO2e/kg",
}
# Zero is a legitimate value for these (no methane slip assumed, say); the rest must be > 0.
_MAY_BE_ZERO = {"ef_ch4_diesel", "ef_n2o_diesel", "ef_ch4_gas", "ef_n2o_gas"}
SFC_UNIT = "L/km"

_SECTIONS: dict[str, set[str]] = {
    "methodology": {"id", "name", "version", "form", "include_ch4_n2o", "base", "note"},
    "rounding": {"step_t_co2", "direction"},
    "monitoring": {"coverage_floor", "cross_check_tolerance", "refill_threshold_kg"},
    "parameters": set(PARAMETERS),
    "reference_consumption": set(),  # any class name
    "buses": {"default_class", "class"},
}


class MethodologyError(ValueError):
    """A methodology file is unreadable, incomplete or inconsistent; the message names
    the file and the key."""


@dataclass(frozen=True)
class Parameter:
    value: float
    unit: str
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
    parameters: dict[str, Parameter]
    reference_consumption: dict[str, Parameter]  # bus class -> SFC_ref in L/km
    default_class: str | None
    bus_class: dict[str, str]
    rounding_step_t: float
    coverage_floor: float
    cross_check_tolerance: float
    refill_threshold_kg: float
    files: tuple[SourceFile, ...] = ()

    def p(self, name: str) -> float:
        return self.parameters[name].value

    def ef_diesel_kg_per_mj(self) -> float:
        """CO2 (or CO2e with CH4/N2O) per MJ of diesel."""
        return self._ef("diesel")

    def ef_gas_kg_per_mj(self) -> float:
        return self._ef("gas")

    def _ef(self, fuel: str) -> float:
        kg_per_tj = self.p(f"ef_co2_{fuel}")
        if self.include_ch4_n2o:
            kg_per_tj += self.p(f"ef_ch4_{fuel}") * self.p("gwp_ch4")
            kg_per_tj += self.p(f"ef_n2o_{fuel}") * self.p("gwp_n2o")
        return kg_per_tj / MJ_PER_TJ

    def diesel_mj_per_l(self) -> float:
        return self.p("density_diesel") * self.p("ncv_diesel")

    def class_of(self, device_id: str) -> str | None:
        return self.bus_class.get(device_id, self.default_class)

    def sfc_ref_l_per_km(self, device_id: str) -> float:
        """Form B reference diesel consumption of this bus's class; MethodologyError if none."""
        cls = self.class_of(device_id)
        if cls is None:
            raise MethodologyError(
                f"bus {device_id!r} has no class ([buses.class] or buses.default_class) "
                "for the form B reference consumption"
            )
        if cls not in self.reference_consumption:
            raise MethodologyError(
                f"bus {device_id!r} is of class {cls!r}, which has no [reference_consumption.{cls}]"
            )
        return self.reference_consumption[cls].value

    def round_er_t(self, er_kg: float) -> float:
        """ER for issuance in t CO2: rounded down to the rounding step (floor, also below 0)."""
        step = self.rounding_step_t
        # The small epsilon keeps 86.4 / 0.1 style quotients from flooring one step too low.
        return math.floor(er_kg / 1000.0 / step + 1e-9) * step


@dataclass(frozen=True)
class Monitored:
    """What was measured for one bus over one period, already conservative.

    ``distance_credited_km`` is the distance driven while both fuels were
    measured; form B credits only that (form A does not use distance).
    """

    diesel_l: float
    gas_kg: float
    distance_km: float
    distance_credited_km: float


@dataclass(frozen=True)
class Emissions:
    re_kg: float
    pe_kg: float
    er_kg: float
    diesel_mj: float
    gas_mj: float

    @property
    def gas_energy_share(self) -> float | None:
        total = self.diesel_mj + self.gas_mj
        return self.gas_mj / total if total > 0 else None


def emissions(m: Methodology, q: Monitored, device_id: str) -> Emissions:
    """RE, PE and ER (kg CO2 or CO2e) of one bus over one period."""
    diesel_mj = q.diesel_l * m.diesel_mj_per_l()
    gas_mj = q.gas_kg * m.p("ncv_gas")
    ef_d, ef_g = m.ef_diesel_kg_per_mj(), m.ef_gas_kg_per_mj()
    pe = diesel_mj * ef_d + gas_mj * ef_g
    if m.form == "A":
        re = (diesel_mj + gas_mj) * ef_d
    else:
        re = q.distance_credited_km * m.sfc_ref_l_per_km(device_id) * m.diesel_mj_per_l() * ef_d
    return Emissions(re, pe, re - pe, diesel_mj, gas_mj)


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
    relative to this file); a file without ``base`` must be complete.
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


def _parameter(where: str, v: Any, unit: str, may_be_zero: bool) -> Parameter:
    if not isinstance(v, Mapping):
        raise MethodologyError(f"{where}: must be a table {{value, unit, source}}")
    for k in v:
        if k not in ("value", "unit", "source"):
            raise MethodologyError(f"{where}.{k}: unknown key (known: value, unit, source)")
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
    return Parameter(value, unit, v["source"])


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

    def text(section: str, key: str) -> str:
        v = get(section, key)
        if not isinstance(v, str) or not v.strip():
            raise fail(f"{section}.{key}: must be a non-empty string")
        return v

    def share(section: str, key: str) -> float:
        v = _number(f"{section}.{key}", get(section, key))
        if not 0.0 <= v <= 1.0:
            raise fail(f"{section}.{key}: must be between 0 and 1, got {v}")
        return v

    form = text("methodology", "form")
    if form not in FORMS:
        raise fail(f"methodology.form: must be one of {', '.join(FORMS)}, got {form!r}")
    ch4 = get("methodology", "include_ch4_n2o")
    if not isinstance(ch4, bool):
        raise fail("methodology.include_ch4_n2o: must be true or false")
    if get("rounding", "direction") != "down":
        raise fail("rounding.direction: only 'down' is supported (issuance never rounds up)")
    try:
        step = _number("rounding.step_t_co2", get("rounding", "step_t_co2"))
        refill = _number("monitoring.refill_threshold_kg", get("monitoring", "refill_threshold_kg"))
        params = {
            name: _parameter(
                f"parameters.{name}", get("parameters", name), unit, name in _MAY_BE_ZERO
            )
            for name, unit in PARAMETERS.items()
        }
        sfc = {
            str(cls): _parameter(f"reference_consumption.{cls}", v, SFC_UNIT, False)
            for cls, v in data.get("reference_consumption", {}).items()
        }
    except MethodologyError as e:
        raise fail(str(e)) from None
    if step <= 0:
        raise fail("rounding.step_t_co2: must be > 0")
    if refill <= 0:
        raise fail("monitoring.refill_threshold_kg: must be > 0")
    buses = data.get("buses", {})
    default_class = buses.get("default_class")
    if default_class is not None and not isinstance(default_class, str):
        raise fail("buses.default_class: must be a string")
    classes = buses.get("class", {})
    if not isinstance(classes, Mapping) or not all(isinstance(v, str) for v in classes.values()):
        raise fail("buses.class: must map device ids to class names")
    for device, cls in [("(default)", default_class), *classes.items()]:
        if form == "B" and cls is not None and cls not in sfc:
            raise fail(f"buses: class {cls!r} of {device} has no [reference_consumption.{cls}]")
    return Methodology(
        id=text("methodology", "id"),
        name=text("methodology", "name"),
        version=text("methodology", "version"),
        form=form,
        include_ch4_n2o=ch4,
        parameters=params,
        reference_consumption=sfc,
        default_class=default_class,
        bus_class={str(k): str(v) for k, v in classes.items()},
        rounding_step_t=step,
        coverage_floor=share("monitoring", "coverage_floor"),
        cross_check_tolerance=share("monitoring", "cross_check_tolerance"),
        refill_threshold_kg=refill,
        files=files,
    )
