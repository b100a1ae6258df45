"""The methodology file and the ER formulas, against hand computations from docs/domain.md defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.office import mrv

BASE = '[methodology]\nbase = "jcm-id-dual-fuel-bus"\n'


def _project(tmp_path: Path, text: str, name: str = "project.toml") -> mrv.Methodology:
    p = tmp_path / name
    p.write_text(text)
    return mrv.load(p)


def _q(diesel_l: float = 0.0, gas_kg: float = 0.0, km: float = 0.0) -> mrv.Monitored:
    return mrv.Monitored(diesel_l, gas_kg, km, km)


def test_shipped_defaults_are_the_ipcc_values() -> None:
    m = mrv.load()
    assert (m.id, m.form, m.include_ch4_n2o) == ("jcm-id-dual-fuel-bus", "A", False)
    expected = {
        "ncv_diesel": 43.0, "density_diesel": 0.844, "ef_co2_diesel": 74100.0,
        "ncv_gas": 48.0, "ef_co2_gas": 56100.0, "ef_ch4_diesel": 3.9, "ef_n2o_diesel": 3.9,
        "ef_ch4_gas": 92.0, "ef_n2o_gas": 3.0,
    }  # fmt: skip
    assert {k: m.p(k) for k in expected} == expected
    assert all(p.source for p in m.parameters.values())
    assert m.files[0].name == "shipped:jcm-id-dual-fuel-bus" and len(m.files[0].sha256) == 64


def test_form_a_100_kg_of_cng_by_hand() -> None:
    # 100 kg x 48.0 MJ/kg = 4,800 MJ; (74,100 - 56,100) kg/TJ = 18.0 g/MJ;
    # 4,800 MJ x 0.0180 kg/MJ = 86.4 kg CO2.
    e = mrv.emissions(mrv.load(), _q(gas_kg=100.0), "bus")
    assert e.er_kg == pytest.approx(86.4, rel=1e-12)


def test_form_a_re_and_pe_by_hand_with_diesel() -> None:
    # 50 L diesel: 50 x 0.844 kg/L x 43.0 MJ/kg = 1,814.6 MJ.  100 kg gas: 4,800 MJ.
    # RE = (1,814.6 + 4,800) MJ x 0.0741 kg/MJ = 490.14186 kg (all energy from diesel)
    # PE = 1,814.6 x 0.0741 + 4,800 x 0.0561 = 134.46186 + 269.28 = 403.74186 kg
    # ER = 86.4 kg: diesel changes RE and PE alike under form A.
    e = mrv.emissions(mrv.load(), _q(diesel_l=50.0, gas_kg=100.0, km=123.0), "bus")
    assert e.re_kg == pytest.approx(490.14186, rel=1e-12)
    assert e.pe_kg == pytest.approx(403.74186, rel=1e-12)
    assert e.er_kg == pytest.approx(86.4, rel=1e-12)
    # gas energy share 4,800 / 6,614.6
    assert e.gas_energy_share == pytest.approx(4800 / 6614.6)


def test_form_b_by_hand(tmp_path: Path) -> None:
    m = _project(tmp_path, BASE + 'form = "B"\n')
    # RE: 100 km x 0.40 L/km (large bus) = 40 L x 0.844 = 33.76 kg x 43.0 = 1,451.68 MJ
    #     x 0.0741 kg/MJ = 107.569488 kg
    # PE: 10 L diesel = 10 x 0.844 x 43.0 = 362.92 MJ x 0.0741 = 26.892372 kg
    #     20 kg gas = 960 MJ x 0.0561 = 53.856 kg; PE = 80.748372 kg
    # ER = 107.569488 - 80.748372 = 26.821116 kg
    e = mrv.emissions(m, _q(diesel_l=10.0, gas_kg=20.0, km=100.0), "bus")
    assert e.re_kg == pytest.approx(107.569488, rel=1e-12)
    assert e.pe_kg == pytest.approx(80.748372, rel=1e-12)
    assert e.er_kg == pytest.approx(26.821116, rel=1e-12)


def test_form_b_medium_bus_class(tmp_path: Path) -> None:
    m = _project(tmp_path, BASE + 'form = "B"\n[buses.class]\n"bus-7" = "medium"\n')
    # 100 km x 0.2857 L/km = 28.57 L x 0.844 = 24.11308 kg x 43.0 = 1,036.86244 MJ
    #     x 0.0741 kg/MJ = 76.831506804 kg
    e = mrv.emissions(m, _q(km=100.0), "bus-7")
    assert e.re_kg == pytest.approx(76.831506804, rel=1e-12)
    assert m.class_of("bus-7") == "medium" and m.class_of("other") == "large"


def test_form_b_credits_only_the_covered_distance(tmp_path: Path) -> None:
    m = _project(tmp_path, BASE + 'form = "B"\n')
    full = mrv.emissions(m, mrv.Monitored(10.0, 20.0, 100.0, 100.0), "bus")
    part = mrv.emissions(m, mrv.Monitored(10.0, 20.0, 100.0, 90.0), "bus")
    # 10 km not credited: 10 x 0.40 x 0.844 x 43.0 x 0.0741 = 10.7569488 kg less RE.
    assert full.er_kg - part.er_kg == pytest.approx(10.7569488, rel=1e-9)


def test_ch4_and_n2o_terms_by_hand(tmp_path: Path) -> None:
    m = _project(tmp_path, BASE + "include_ch4_n2o = true\n")
    # diesel: 74,100 + 28 x 3.9 + 265 x 3.9 = 74,100 + 109.2 + 1,033.5 = 75,242.7 kg CO2e/TJ
    # gas:    56,100 + 28 x 92  + 265 x 3   = 56,100 + 2,576 + 795    = 59,471.0 kg CO2e/TJ
    # 100 kg: 4,800 MJ x (75,242.7 - 59,471.0) / 1e6 = 4,800 x 0.0157717 = 75.70416 kg CO2e
    e = mrv.emissions(m, _q(gas_kg=100.0), "bus")
    assert e.er_kg == pytest.approx(75.70416, rel=1e-12)


def test_b40_diesel_factor_is_a_project_parameter(tmp_path: Path) -> None:
    m = _project(
        tmp_path,
        BASE + 'version = "1.0.0+b40"\n[parameters.ef_co2_diesel]\nvalue = 44460.0\n'
        'unit = "kg/TJ"\nsource = "74,100 x 0.60 fossil share of B40"\n',
    )
    # 4,800 MJ x (44,460 - 56,100) / 1e6 = 4,800 x -0.01164 = -55.872 kg: against a
    # B40 baseline whose biogenic CO2 counts zero, gas substitution raises CO2.
    e = mrv.emissions(m, _q(gas_kg=100.0), "bus")
    assert e.er_kg == pytest.approx(-55.872, rel=1e-12)
    assert m.version == "1.0.0+b40" and m.p("ncv_gas") == 48.0  # the rest from the base
    assert [f.name for f in m.files] == [str(tmp_path / "project.toml"), "shipped:" + mrv.DEFAULT]
    assert m.round_er_t(e.er_kg) == -1.0  # rounded down, also below zero


@pytest.mark.parametrize(
    ("er_kg", "step", "expected"),
    [(86.4, 1.0, 0.0), (1999.9, 1.0, 1.0), (2000.0, 1.0, 2.0), (86.4, 0.001, 0.086),
     (86.4, 0.1, 0.0), (300.0, 0.1, 0.3)],
)  # fmt: skip
def test_rounding_down(tmp_path: Path, er_kg: float, step: float, expected: float) -> None:
    m = _project(tmp_path, BASE + f"[rounding]\nstep_t_co2 = {step}\n")
    assert m.round_er_t(er_kg) == pytest.approx(expected)


def _complete_without(tmp_path: Path, key: str) -> Path:
    """The shipped file with one parameter table removed, as a standalone project file."""
    text = (Path(mrv.__file__).parent / "methodology" / f"{mrv.DEFAULT}.toml").read_text()
    head, sep, rest = text.partition(f"[parameters.{key}]\n")
    assert sep
    rest = rest.split("\n\n", 1)[1]
    p = tmp_path / "standalone.toml"
    p.write_text(head + rest)
    return p


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + 'form = "C"\n', "methodology.form: must be one of A, B"),
        (BASE + "[parameters.ncv_gas]\nvalue = 48.0\nunit = \"MJ/m3\"\nsource = \"x\"\n",
         "parameters.ncv_gas.unit: must be 'MJ/kg'"),
        (BASE + "[parameters.ncv_gas]\nvalue = 0\n", "parameters.ncv_gas.value: must be > 0"),
        (BASE + "[parameters.ncv_gass]\nvalue = 1\n", "parameters.ncv_gass: unknown key"),
        (BASE + "[parameters.ef_co2_gas]\nsource = \"\"\n", "parameters.ef_co2_gas.source"),
        (BASE + "[rounding]\ndirection = \"nearest\"\n", "only 'down' is supported"),
        (BASE + "[monitoring]\ncoverage_floor = 1.5\n", "coverage_floor: must be between"),
        (BASE + 'form = "B"\n[buses]\ndefault_class = "articulated"\n',
         "class 'articulated' of (default) has no [reference_consumption.articulated]"),
        ('[methodology]\nbase = "nope"\n', "no shipped methodology named 'nope'"),
        ("[methodology\n", "not valid TOML"),
        ("[tariffs]\nx = 1\n", "tariffs: unknown section"),
    ],
)  # fmt: skip
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(mrv.MethodologyError, match=re.escape(message)):
        _project(tmp_path, text)


def test_a_missing_parameter_is_named_with_the_file(tmp_path: Path) -> None:
    p = _complete_without(tmp_path, "ef_co2_gas")
    with pytest.raises(mrv.MethodologyError) as e:
        mrv.load(p)
    assert str(e.value) == f"methodology {p}: parameters.ef_co2_gas: missing"


def test_a_complete_standalone_file_loads_without_base(tmp_path: Path) -> None:
    text = (Path(mrv.__file__).parent / "methodology" / f"{mrv.DEFAULT}.toml").read_text()
    p = tmp_path / "own.toml"
    p.write_text(text.replace('version = "1.0.0"', 'version = "2.0.0"'))
    m = mrv.load(p)
    assert m.version == "2.0.0" and len(m.files) == 1


def test_base_by_path_and_loops(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[methodology]\nbase = "b.toml"\n')
    (tmp_path / "b.toml").write_text('[methodology]\nbase = "a.toml"\n')
    with pytest.raises(mrv.MethodologyError, match="loops back"):
        mrv.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(BASE + 'version = "9"\n')
    assert mrv.load(tmp_path / "a.toml").version == "9"
    with pytest.raises(mrv.MethodologyError, match="cannot read methodology"):
        mrv.load(tmp_path / "absent.toml")


def test_unknown_bus_class_for_form_b(tmp_path: Path) -> None:
    m = _project(tmp_path, BASE + 'form = "B"\n[buses]\ndefault_class = "large"\n')
    m2 = mrv.Methodology(**{**m.__dict__, "default_class": None})
    with pytest.raises(mrv.MethodologyError, match="bus 'x' has no class"):
        mrv.emissions(m2, _q(km=1.0), "x")


amounts = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@given(diesel=amounts, gas=amounts, km=amounts)
def test_form_a_er_is_gas_times_the_factor_difference(diesel: float, gas: float, km: float) -> None:
    m = mrv.load()
    e = mrv.emissions(m, _q(diesel, gas, km), "bus")
    assert e.er_kg == pytest.approx(gas * 48.0 * 0.018, rel=1e-9, abs=1e-6)
    assert e.re_kg - e.pe_kg == e.er_kg


@given(diesel=amounts, gas=amounts, km=amounts, less=st.floats(0.0, 1.0))
def test_less_measured_gas_never_raises_er_in_form_a(
    diesel: float, gas: float, km: float, less: float
) -> None:
    m = mrv.load()
    full = mrv.emissions(m, _q(diesel, gas, km), "bus").er_kg
    assert mrv.emissions(m, _q(diesel, gas * less, km), "bus").er_kg <= full + 1e-9
