"""The methodology file and the ER formulas, against hand computations from docs/domain.md defaults."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cngmrv.office import mrv

BASE = '[methodology]\nbase = "jcm-id-dual-fuel-bus"\n'


def _project(tmp_path: Path, text: str, name: str = "project.toml") -> mrv.Methodology:
    p = tmp_path / name
    p.write_text(text)
    return mrv.load(p)


def _q(
    diesel_l: float = 0.0, gas_kg: float = 0.0, km: float = 0.0, fame: float = 0.0
) -> mrv.Monitored:
    return mrv.Monitored.single(diesel_l, gas_kg, km, km, fame)


# CO2 only over the shipped file: the blend arithmetic without the CH4/N2O terms.
CO2 = BASE + "include_ch4_n2o = false\n"
FOSSIL = '[[blend]]\nname = "B0"\nfrom = 2000-01-01\nfame_share_vol = 0.0\nsource = "test"\n'
CLASSES = '[buses.class]\n"bus" = "large"\n"bus-7" = "medium"\n"x" = "large"\n'


def test_shipped_defaults(tmp_path: Path) -> None:
    m = mrv.load()
    assert (m.id, m.version, m.form, m.include_ch4_n2o) == (
        "jcm-id-dual-fuel-bus",
        "2.0.0",
        "A",
        True,
    )
    assert (m.gwp_set, m.parameter_set) == ("AR5", "central")
    assert not m.include_compression and not m.include_upstream_leakage
    expected = {
        "ncv_diesel": 43.0, "density_diesel": 0.844, "ef_co2_diesel": 74100.0,
        "ncv_gas": 48.0, "ef_co2_gas": 56100.0, "ef_ch4_diesel": 3.9, "ef_n2o_diesel": 3.9,
        "ef_n2o_gas": 3.0, "ncv_fame": 37.2, "density_fame": 0.88, "biogenic_co2_counted": 0.0,
        # Methane slip at the upper end of IPCC's range (default 92), unless measured.
        "ef_ch4_gas": 1540.0,
    }  # fmt: skip
    assert {k: m.p(k) for k in expected} == expected
    assert all(p.source for p in m.parameters.values())
    assert m.files[0].name == "shipped:jcm-id-dual-fuel-bus" and len(m.files[0].sha256) == 64
    assert [(b.name, b.fame_share_vol) for b in m.blend][-3:] == [
        ("B30", 0.30), ("B35", 0.35), ("B40", 0.40),
    ]  # fmt: skip
    day = 86400.0
    b35 = datetime(2023, 8, 1, tzinfo=UTC).timestamp()
    b40 = datetime(2025, 1, 1, tzinfo=UTC).timestamp()
    assert m.fame_share_at(b35 - 1) == 0.30 and m.fame_share_at(b35) == 0.35
    assert m.fame_share_at(b40 - 1) == 0.35 and m.fame_share_at(b40 + 400 * day) == 0.40
    for b in m.blend:
        assert "assumed" in b.source or "2023-08-01" in b.source or "2025-01-01" in b.source
    with pytest.raises(mrv.MethodologyError, match="no diesel blend"):
        m.fame_share_at(datetime(2010, 1, 1, tzinfo=UTC).timestamp())


def test_form_a_100_kg_of_cng_on_fossil_diesel(tmp_path: Path) -> None:
    # 100 kg x 48.0 MJ/kg = 4,800 MJ; (74,100 - 56,100) kg/TJ = 18.0 g/MJ;
    # 4,800 MJ x 0.0180 kg/MJ = 86.4 kg CO2.
    e = mrv.emissions(_project(tmp_path, CO2), _q(gas_kg=100.0), "bus")
    assert e.er_kg == pytest.approx(86.4, rel=1e-12)


def test_form_a_re_and_pe_by_hand_with_diesel(tmp_path: Path) -> None:
    # 50 L diesel: 50 x 0.844 kg/L x 43.0 MJ/kg = 1,814.6 MJ.  100 kg gas: 4,800 MJ.
    # RE = (1,814.6 + 4,800) MJ x 0.0741 kg/MJ = 490.14186 kg (all energy from diesel)
    # PE = 1,814.6 x 0.0741 + 4,800 x 0.0561 = 134.46186 + 269.28 = 403.74186 kg
    # ER = 86.4 kg: diesel changes RE and PE alike under form A.
    m = _project(tmp_path, CO2)
    e = mrv.emissions(m, _q(diesel_l=50.0, gas_kg=100.0, km=123.0), "bus")
    assert e.re_kg == pytest.approx(490.14186, rel=1e-12)
    assert e.pe_kg == pytest.approx(403.74186, rel=1e-12)
    assert e.er_kg == pytest.approx(86.4, rel=1e-12)
    assert e.gas_energy_share == pytest.approx(4800 / 6614.6)


# A litre of blend, by hand: fossil (1 - s) x 0.844 x 43.0 = (1 - s) x 36.292 MJ,
# FAME s x 0.88 x 37.2 = s x 32.736 MJ; counted CO2 = fossil MJ x 0.0741 kg/MJ (FAME's is
# biogenic and counts zero).
#   B0:  36.292 MJ,                      2.6892372 kg -> 74.1 g/MJ
#   B30: 25.4044 + 9.8208  = 35.2252 MJ, 1.88246604 kg
#   B35: 23.5898 + 11.4576 = 35.0474 MJ, 1.74800418 kg
#   B40: 21.7752 + 13.0944 = 34.8696 MJ, 1.61354232 kg
BLENDS = {0.0: (36.292, 2.6892372), 0.30: (35.2252, 1.88246604),
          0.35: (35.0474, 1.74800418), 0.40: (34.8696, 1.61354232)}  # fmt: skip


@pytest.mark.parametrize("share", sorted(BLENDS))
def test_form_a_by_blend(tmp_path: Path, share: float) -> None:
    mj, kg = BLENDS[share]
    m = _project(tmp_path, CO2)
    # ER = 4,800 MJ x (kg / mj - 0.0561): B0 86.4, B30 -12.7637, B35 -29.8779, B40 -47.1667
    e = mrv.emissions(m, _q(diesel_l=50.0, gas_kg=100.0, fame=share), "bus")
    assert e.er_kg == pytest.approx(4800 * (kg / mj - 0.0561), rel=1e-12)
    assert e.er_kg == pytest.approx(
        {0.0: 86.4, 0.30: -12.7637278, 0.35: -29.8779313, 0.40: -47.1666653}[share], rel=1e-7
    )
    assert e.fossil_mj == pytest.approx(50 * (1 - share) * 36.292, rel=1e-12)
    assert e.biogenic_mj == pytest.approx(50 * share * 32.736, rel=1e-12)


@pytest.mark.parametrize("share", sorted(BLENDS))
def test_form_b_by_blend(tmp_path: Path, share: float) -> None:
    mj, kg = BLENDS[share]
    m = _project(tmp_path, CO2 + 'form = "B"\n' + CLASSES)
    # RE = 100 km x 0.40 L/km = 40 L of the blend in force; PE = 10 L + 20 kg gas (53.856 kg)
    # ER = 30 x kg - 53.856: B0 26.821116, B30 2.6179812, B35 -1.4158746, B40 -5.4497304
    e = mrv.emissions(m, _q(diesel_l=10.0, gas_kg=20.0, km=100.0, fame=share), "bus")
    assert e.re_kg == pytest.approx(40 * kg, rel=1e-12)
    assert e.pe_kg == pytest.approx(10 * kg + 53.856, rel=1e-12)
    assert e.er_kg == pytest.approx(
        {0.0: 26.821116, 0.30: 2.6179812, 0.35: -1.4158746, 0.40: -5.4497304}[share], rel=1e-9
    )


def test_form_b_reference_litres_count_by_their_own_blend(tmp_path: Path) -> None:
    m = _project(
        tmp_path,
        CO2 + 'form = "B"\n[bus_reference.bus]\nvalue = 0.40\nunit = "L/km"\n'
        'fame_share_vol = 0.0\nsource = "test: measured on B0"\n',
    )
    # 40 L of B0 = 1,451.68 MJ, burned now as B40 at 1.61354232 / 34.8696 kg/MJ:
    # RE = 1,451.68 x 0.0462735 = 67.17489 kg
    e = mrv.emissions(m, _q(km=100.0, fame=0.40), "bus")
    assert e.re_kg == pytest.approx(1451.68 * 1.61354232 / 34.8696, rel=1e-12)


def test_a_period_spanning_a_blend_change(tmp_path: Path) -> None:
    m = _project(tmp_path, CO2)
    q = mrv.Monitored((mrv.Part(0.35, 10.0, 50.0, 0.0, 0.0), mrv.Part(0.40, 10.0, 50.0, 0.0, 0.0)))
    # 2,400 MJ x (1.74800418 / 35.0474 - 0.0561) + 2,400 MJ x (1.61354232 / 34.8696 - 0.0561)
    # = -14.938965 - 23.583333 = -38.522298 kg
    e = mrv.emissions(m, q, "bus")
    assert e.er_kg == pytest.approx(
        2400 * (1.74800418 / 35.0474 - 0.0561) + 2400 * (1.61354232 / 34.8696 - 0.0561), rel=1e-12
    )
    assert e.er_kg == pytest.approx(-38.5222983, rel=1e-8)
    # At B0 the same gas gives 100 x 0.864 = 86.4 kg: the blend costs 124.92 kg.
    assert mrv.emissions(m, q.at_blend(0.0), "bus").er_kg == pytest.approx(86.4, rel=1e-12)
    # Form B over the same two parts, 50 km each at 0.40 L/km (20 L of each blend):
    # RE = 20 x 1.74800418 + 20 x 1.61354232 = 67.230930 kg
    # PE = 10 x 1.74800418 + 10 x 1.61354232 + 4,800 MJ x 0.0561 = 302.895465 kg
    b = _project(tmp_path, CO2 + 'form = "B"\n' + CLASSES, "b.toml")
    qb = mrv.Monitored(
        (mrv.Part(0.35, 10.0, 50.0, 50.0, 50.0), mrv.Part(0.40, 10.0, 50.0, 50.0, 50.0))
    )
    e = mrv.emissions(b, qb, "bus")
    assert e.re_kg == pytest.approx(67.23093, rel=1e-9)
    assert e.pe_kg == pytest.approx(302.895465, rel=1e-9)
    assert e.er_kg == pytest.approx(-235.664535, rel=1e-9)


def test_ch4_and_n2o_terms_by_hand(tmp_path: Path) -> None:
    m = _project(
        tmp_path,
        BASE
        + '[parameters.ef_ch4_gas]\nvalue = 92.0\nunit = "kg/TJ"\nsource = "IPCC default"\n'
        + FOSSIL,
    )
    # diesel: 74,100 + 28 x 3.9 + 265 x 3.9 = 74,100 + 109.2 + 1,033.5 = 75,242.7 kg CO2e/TJ
    # gas:    56,100 + 28 x 92  + 265 x 3   = 56,100 + 2,576 + 795    = 59,471.0 kg CO2e/TJ
    # 100 kg: 4,800 MJ x (75,242.7 - 59,471.0) / 1e6 = 4,800 x 0.0157717 = 75.70416 kg CO2e
    e = mrv.emissions(m, _q(gas_kg=100.0), "bus")
    assert e.er_kg == pytest.approx(75.70416, rel=1e-12)


def test_methane_slip_default_and_measured_per_engine(tmp_path: Path) -> None:
    m = _project(
        tmp_path,
        BASE + FOSSIL + '[engine_slip.wp10]\nvalue = 300.0\nunit = "kg/TJ"\n'
        'source = "PEMS, 2025-06, 3 buses"\noption = "C"\n[buses.engine]\n"bus-7" = "wp10"\n',
    )
    # Unmeasured: 1,540 kg CH4/TJ: gas 56,100 + 43,120 + 795 = 100,015 kg CO2e/TJ;
    # 4,800 MJ x (75,242.7 - 100,015) / 1e6 = -118.90704 kg
    assert mrv.emissions(m, _q(gas_kg=100.0), "bus").er_kg == pytest.approx(-118.90704)
    # Measured 300: gas 56,100 + 8,400 + 795 = 65,295; 4,800 x 9.9477 g/MJ = 47.74896 kg
    assert mrv.emissions(m, _q(gas_kg=100.0), "bus-7").er_kg == pytest.approx(47.74896)
    assert m.ch4_gas_kg_per_tj("bus-7") == 300.0 and m.ch4_gas_kg_per_tj("bus") == 1540.0


def test_boundary_terms_by_hand(tmp_path: Path) -> None:
    m = _project(
        tmp_path,
        CO2 + FOSSIL + "[boundary]\ninclude_compression = true\ninclude_upstream_leakage = true\n",
    )
    # per kg: 0.3 kWh x 0.87 kg/kWh = 0.261 kg; 100 kg CH4/TJ x 48 MJ x 1e-6 x 28 = 0.1344 kg
    # 100 kg gas: ER = 86.4 - 26.1 - 13.44 = 46.86 kg
    e = mrv.emissions(m, _q(gas_kg=100.0), "bus")
    assert e.pe_boundary_kg == pytest.approx(39.54, rel=1e-12)
    assert e.er_kg == pytest.approx(46.86, rel=1e-12)


def test_both_forms_take_the_lower_re(tmp_path: Path) -> None:
    m = _project(tmp_path, CO2 + 'form = "both"\n' + CLASSES + FOSSIL)
    # A: RE = (362.92 + 960) MJ x 0.0741 = 98.028372; B: RE = 107.569488 (40 L of B0)
    e = mrv.emissions(m, _q(diesel_l=10.0, gas_kg=20.0, km=100.0), "bus")
    assert (e.re_a_kg, e.re_b_kg) == (pytest.approx(98.028372), pytest.approx(107.569488))
    assert e.re_kg == pytest.approx(98.028372) and e.pe_kg == pytest.approx(80.748372)
    # 10 km: B's RE 10.7569488 is now the lower.
    e = mrv.emissions(m, _q(diesel_l=10.0, gas_kg=20.0, km=10.0), "bus")
    assert e.re_kg == pytest.approx(10.7569488)


def test_gas_factors_take_the_conservative_side(tmp_path: Path) -> None:
    fossil = _project(tmp_path, CO2 + FOSSIL, "f.toml")
    heavy = _project(tmp_path, CO2, "h.toml")
    q = mrv.Monitored((mrv.Part(0.0, 0.0, 100.0, 0.0, 0.0),), 0.9, 1.2)
    # Gas reduces emissions on B0: the lowest credible gas (90 kg) is credited.
    assert mrv.emissions(fossil, q, "bus").er_kg == pytest.approx(0.9 * 86.4)
    # On B40 a kg of gas raises them: the highest (120 kg).
    q40 = q.at_blend(0.40)
    assert mrv.emissions(heavy, q40, "bus").er_kg == pytest.approx(1.2 * -47.1666653, rel=1e-8)


def test_conservative_set_and_sensitivity(tmp_path: Path) -> None:
    m = _project(tmp_path, CO2 + FOSSIL)
    fleet = [("bus", _q(diesel_l=50.0, gas_kg=100.0))]
    c = mrv.conservative(m, fleet)
    assert c.parameter_set == "conservative" and c.include_compression and c.include_ch4_n2o
    # Lower fossil EF and NCV/density, higher gas EF, slip, compression, leakage: each lowers ER.
    assert c.p("ef_co2_diesel") == 72600.0 and c.p("ef_co2_gas") == 58300.0
    assert c.p("ef_ch4_gas") == 1540.0 and c.p("grid_ef") == 1.0
    assert c.p("compression_kwh_per_kg") == 0.5 and c.p("upstream_ch4_gas") == 420.0
    assert mrv.fleet_er(c, fleet) < mrv.fleet_er(m, fleet)
    for name in c.ranged():  # no single end moves it lower: a corner minimum
        p = c.parameters[name]
        for v in (p.low, p.high):
            assert mrv.fleet_er(c.with_values({name: v}), fleet) >= mrv.fleet_er(c, fleet) - 1e-9
    rows = mrv.sensitivity(m, fleet)
    assert rows[0]["swing_kg_co2"] == max(r["swing_kg_co2"] for r in rows)
    # ef_co2_gas: 4,800 MJ x (58,300 - 54,300) / 1e6 = 19.2 kg swing
    gas = next(r for r in rows if r["parameter"] == "ef_co2_gas")
    assert gas["swing_kg_co2"] == pytest.approx(19.2)
    by = {r["parameter"]: r for r in rows}
    # Boundary terms, off in this file, show their weight: switched on, 100 kg x 0.3 kWh x
    # 0.87 = 26.1 kg; grid_ef swung with its term on, 100 x 0.3 x (1.0 - 0.7) = 9.0 kg.
    assert by["include_compression"]["swing_kg_co2"] == pytest.approx(26.1)
    assert by["grid_ef"]["swing_kg_co2"] == pytest.approx(9.0) and by["grid_ef"]["with_term"]


@pytest.mark.parametrize(
    ("er_kg", "step", "expected"),
    [(86.4, 1.0, 0.0), (1999.9, 1.0, 1.0), (2000.0, 1.0, 2.0), (86.4, 0.001, 0.086),
     (86.4, 0.1, 0.0), (300.0, 0.1, 0.3), (-0.8, 1.0, -0.0008), (-1500.0, 1.0, -1.5)],
)  # fmt: skip
def test_rounding_down_only_positive_issuance(
    tmp_path: Path, er_kg: float, step: float, expected: float
) -> None:
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


def _blend(*entries: str) -> str:
    return "".join(f'[[blend]]\n{e}source = "test"\nfame_share_vol = 0.3\n' for e in entries)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + 'form = "C"\n', "methodology.form: must be one of A, B, both"),
        (BASE + "[parameters.ncv_gas]\nvalue = 48.0\nunit = \"MJ/m3\"\nsource = \"x\"\n",
         "parameters.ncv_gas.unit: must be 'MJ/kg'"),
        (BASE + "[parameters.ncv_gas]\nvalue = 0\n", "parameters.ncv_gas.value: must be > 0"),
        (BASE + "[parameters.ncv_gas]\nvalue = 51.0\n",
         "parameters.ncv_gas.value: 51 is outside its stated range 46.5..50.4"),
        (BASE + "[parameters.ncv_gass]\nvalue = 1\n", "parameters.ncv_gass: unknown key"),
        (BASE + "[parameters.ef_co2_gas]\nsource = \"\"\n", "parameters.ef_co2_gas.source"),
        (BASE + "[parameters.grid_ef]\nhigh = 2.0\nlow = 0.9\n",
         "parameters.grid_ef.value: 0.87 is outside its stated range 0.9..2"),
        (BASE + "[parameters.gwp_ch4]\nvalue = 25.0\n",
         "methodology.gwp_set 'AR5' has 28/265, the file gives 25/265"),
        (BASE + "[rounding]\ndirection = \"nearest\"\n", "only 'down' is supported"),
        (BASE + "[monitoring]\ncoverage_floor = 1.5\n", "coverage_floor: must be between"),
        (BASE + 'form = "B"\n[buses.class]\n"b" = "articulated"\n',
         "class 'articulated' of b has no [reference_consumption.articulated]"),
        (BASE + '[buses]\ndefault_class = "large"\n', "buses.default_class: no longer accepted"),
        (BASE + '[buses.engine]\n"b" = "x"\n', "engine type 'x' of b has no [engine_slip.x]"),
        (BASE + _blend("from = 2020-01-01\nto = 2021-01-01\n", "from = 2021-02-01\n"),
         "blend entry 2: gap after entry 1"),
        (BASE + _blend("from = 2020-01-01\nto = 2021-06-01\n", "from = 2021-02-01\n"),
         "blend entry 2: overlaps entry 1"),
        (BASE + _blend("from = 2020-01-01\n", "from = 2021-02-01\n"),
         "blend entry 1.to: missing (only the last entry may be open-ended)"),
        (BASE + _blend("from = \"2020\"\n"), "blend entry 1.from: must be a TOML date"),
        (BASE + "[[blend]]\nfrom = 2020-01-01\nfame_share_vol = 0.3\n",
         "blend entry 1.source: missing"),
        (BASE + "[[blend]]\nfrom = 2020-01-01\nfame_share_vol = 1.3\nsource = \"x\"\n",
         "blend entry 1.fame_share_vol: must be between 0 and 1"),
        ('[methodology]\nbase = "nope"\n', "no shipped methodology named 'nope'"),
        ("[methodology\n", "not valid TOML"),
        ("[tariffs]\nx = 1\n", "tariffs: unknown section"),
    ],
)  # fmt: skip
def test_bad_files_name_the_file_and_the_key(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "project.toml"
    p.write_text(text)
    with pytest.raises(mrv.MethodologyError, match=re.escape(message)) as e:
        mrv.load(p)
    assert str(p) in str(e.value) or "shipped" in str(e.value)


def test_a_missing_parameter_is_named_with_the_file(tmp_path: Path) -> None:
    p = _complete_without(tmp_path, "ef_co2_gas")
    with pytest.raises(mrv.MethodologyError) as e:
        mrv.load(p)
    assert str(e.value) == f"methodology {p}: parameters.ef_co2_gas: missing"


def test_a_complete_standalone_file_loads_without_base(tmp_path: Path) -> None:
    text = (Path(mrv.__file__).parent / "methodology" / f"{mrv.DEFAULT}.toml").read_text()
    p = tmp_path / "own.toml"
    p.write_text(text.replace('version = "2.0.0"', 'version = "3.0.0"'))
    m = mrv.load(p)
    assert m.version == "3.0.0" and len(m.files) == 1


def test_base_by_path_and_loops(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[methodology]\nbase = "b.toml"\n')
    (tmp_path / "b.toml").write_text('[methodology]\nbase = "a.toml"\n')
    with pytest.raises(mrv.MethodologyError, match="loops back"):
        mrv.load(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text(BASE + 'version = "9"\n')
    assert mrv.load(tmp_path / "a.toml").version == "9"
    with pytest.raises(mrv.MethodologyError, match="cannot read methodology"):
        mrv.load(tmp_path / "absent.toml")


def test_a_bus_without_class_has_no_form_b_reference(tmp_path: Path) -> None:
    m = _project(tmp_path, BASE + 'form = "B"\n' + CLASSES)
    assert m.buses_without_reference(["bus", "nobody", "x"]) == ["nobody"]
    with pytest.raises(mrv.MethodologyError, match="bus 'nobody' has no class"):
        mrv.emissions(m, _q(km=1.0), "nobody")
    assert mrv.load().buses_without_reference(["nobody"]) == []  # form A needs none


amounts = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@given(diesel=amounts, gas=amounts, km=amounts, share=st.sampled_from(sorted(BLENDS)))
def test_form_a_er_is_gas_times_the_factor_difference(
    diesel: float, gas: float, km: float, share: float
) -> None:
    m = mrv.load().with_values({}, include_ch4_n2o=False)
    mj, kg = BLENDS[share]
    e = mrv.emissions(m, _q(diesel, gas, km, share), "bus")
    assert e.er_kg == pytest.approx(gas * 48.0 * (kg / mj - 0.0561), rel=1e-9, abs=1e-6)
    assert e.re_kg - e.pe_kg == e.er_kg


@given(diesel=amounts, gas=amounts, km=amounts, less=st.floats(0.0, 1.0))
def test_less_measured_gas_never_raises_er_on_fossil_diesel(
    diesel: float, gas: float, km: float, less: float
) -> None:
    m = mrv.load().with_values({}, include_ch4_n2o=False)
    full = mrv.emissions(m, _q(diesel, gas, km), "bus").er_kg
    assert mrv.emissions(m, _q(diesel, gas * less, km), "bus").er_kg <= full + 1e-9


# Every form, with a bus on its own engine type and one on its own reference (of its own blend).
VARIANTS = {
    form: BASE
    + f'form = "{form}"\n'
    + '[engine_slip.wp10]\nvalue = 300.0\nunit = "kg/TJ"\nsource = "t"\n[buses.engine]\n"b2" = "wp10"\n'
    + '[bus_reference.b3]\nvalue = 0.35\nunit = "L/km"\nfame_share_vol = 0.3\nsource = "t"\n'
    + '[buses.class]\n"b0" = "large"\n"b1" = "medium"\n"b2" = "large"\n"b4" = "medium"\n'
    for form in ("A", "B", "both")
}


def _amount() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(0.0, 1e5), st.sampled_from([0.0, 1e-9, 3.3]))


@st.composite
def fleets(draw: st.DrawFn) -> list[tuple[str, mrv.Monitored]]:
    out = []
    for i in range(draw(st.integers(1, 5))):
        shares = draw(st.lists(st.sampled_from([0.0, 0.3, 0.35, 0.4]), max_size=3, unique=True))
        parts = tuple(
            mrv.Part(
                s,
                draw(_amount()),
                draw(_amount()),
                km := draw(_amount()),
                km * draw(st.floats(0, 1)),
            )
            for s in sorted(shares)
        )
        low = draw(st.sampled_from([1.0, 0.8, draw(st.floats(0.0, 1.0))]))
        high = draw(st.sampled_from([1.0, 1.25, draw(st.floats(1.0, 3.0))]))
        out.append((f"b{i}", mrv.Monitored(parts, low, high)))
    return out


@settings(max_examples=150, deadline=None)
@given(fleets(), st.sampled_from(sorted(VARIANTS)), st.data())
def test_the_fleet_columns_give_the_bus_by_bus_er_to_the_bit(
    tmp_path_factory: pytest.TempPathFactory,
    fleet: list[tuple[str, mrv.Monitored]],
    form: str,
    data: st.DataObject,
) -> None:
    m = _methodology(tmp_path_factory, form)
    columns = mrv.FleetColumns(m, fleet)
    # The variants the conservative set and the sensitivity evaluate: values and switches.
    names = m.ranged()
    for _ in range(4):
        values = {
            n: data.draw(st.sampled_from([m.parameters[n].low, m.parameters[n].high]))
            for n in data.draw(st.lists(st.sampled_from(names), max_size=4, unique=True))
        }
        switches = {
            k: data.draw(st.booleans())
            for k in ("include_compression", "include_upstream_leakage", "include_ch4_n2o")
        }
        v = m.with_values(values, **switches)
        by_bus = sum(mrv.emissions(v, q, dev).er_kg for dev, q in fleet)
        assert columns.er(v).hex() == float(by_bus).hex()
        assert mrv.fleet_er(v, fleet).hex() == float(by_bus).hex()


_LOADED: dict[str, mrv.Methodology] = {}


def _methodology(tmp_path_factory: pytest.TempPathFactory, form: str) -> mrv.Methodology:
    if form not in _LOADED:
        path = tmp_path_factory.mktemp("variants") / f"{form}.toml"
        path.write_text(VARIANTS[form])
        _LOADED[form] = mrv.load(path)
    return _LOADED[form]


def test_the_fleet_columns_refuse_another_methodology(tmp_path: Path) -> None:
    fleet = [("b0", _q(diesel_l=5.0, gas_kg=3.0))]
    columns = mrv.FleetColumns(mrv.load(), fleet)
    other = _project(tmp_path, BASE + 'form = "B"\n' + CLASSES.replace('"bus"', '"b0"'))
    with pytest.raises(ValueError, match="not a variant"):
        columns.er(other)
