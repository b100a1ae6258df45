"""The conservative methodology through the report: blends by date, classes, dispenser records, the workbook,
sfc-ref, on real signed stores and a real ingest database, against hand computations."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mrv_helpers import fossil_co2, fossil_co2_file
from test_report import STEP, _ingest_fleet, make_store, reading

from cngmrv.office import mrv, refills, report
from cngmrv.signed import keys

NEW_YEAR = datetime(2025, 1, 1, tzinfo=UTC).timestamp()  # B35 -> B40 in the shipped schedule
CO2_SHIPPED_BLENDS = '[methodology]\nbase = "jcm-id-dual-fuel-bus"\ninclude_ch4_n2o = false\n'


def _store(
    tmp_path: Path, signer: keys.FileSigner, rs: list[dict[str, Any]], dev: str = "bus-A"
) -> Path:
    path = tmp_path / f"{dev}.sqlite"
    make_store(path, signer, dev, rs).close()
    return path


def _co2_shipped_blends(tmp_path: Path, extra: str = "") -> mrv.Methodology:
    p = tmp_path / "co2.toml"
    p.write_text(CO2_SHIPPED_BLENDS + extra)
    return mrv.load(p)


# -- blends ------------------------------------------------------------------------


def test_a_period_spanning_a_blend_change(tmp_path: Path, signer: keys.FileSigner) -> None:
    # 60 readings before 2025-01-01 (B35), 60 after (B40); each 0.1 L, 0.05 kg gas.
    rs = [reading(NEW_YEAR + (i - 60) * STEP) for i in range(120)]
    d = report.build(_store(tmp_path, signer, rs), _co2_shipped_blends(tmp_path)).data
    bus = d["buses"][0]
    # 3 kg gas per side = 144 MJ each:
    # 144 x (1.74800418 / 35.0474 - 0.0561) + 144 x (1.61354232 / 34.8696 - 0.0561)
    # = -0.896338 - 1.415000 = -2.311338 kg; at B0: 6 kg x 0.864 = 5.184 kg
    want = 144 * (1.74800418 / 35.0474 - 0.0561) + 144 * (1.61354232 / 34.8696 - 0.0561)
    assert bus["er_kg_co2"] == pytest.approx(want, rel=1e-9)
    assert bus["er_kg_co2_at_b0"] == pytest.approx(5.184, rel=1e-9)
    assert d["blend_effect_kg_co2"] == pytest.approx(want - 5.184, rel=1e-9)
    assert bus["fame_share_vol"] == pytest.approx(0.375)
    # Fossil 6 x 23.5898 + 6 x 21.7752 MJ; biogenic 6 x 11.4576 + 6 x 13.0944 MJ
    assert bus["fossil_diesel_mj"] == pytest.approx(6 * 23.5898 + 6 * 21.7752)
    assert bus["biogenic_diesel_mj"] == pytest.approx(6 * 11.4576 + 6 * 13.0944)
    days = {x["date"]: x for x in bus["days"]}
    assert days["2024-12-31"]["fame_share_vol"] == 0.35
    assert days["2025-01-01"]["fame_share_vol"] == 0.40
    assert days["2025-01-01"]["er_kg_co2"] == pytest.approx(
        144 * (1.61354232 / 34.8696 - 0.0561), rel=1e-9
    )
    assert [b["name"] for b in d["methodology"]["blend"]][-2:] == ["B35", "B40"]


def test_a_reading_outside_the_blend_schedule_is_refused(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    rs = [reading(datetime(2012, 5, 1, tzinfo=UTC).timestamp() + i * STEP) for i in range(3)]
    with pytest.raises(
        report.ReportError, match="no diesel blend in the \\[\\[blend\\]\\] schedule"
    ):
        report.build(_store(tmp_path, signer, rs), mrv.load())


def test_negative_er_is_reported_as_it_is(tmp_path: Path, signer: keys.FileSigner) -> None:
    rs = [reading(NEW_YEAR + i * STEP, gas_kg=0.01) for i in range(2)]
    d = report.build(_store(tmp_path, signer, rs), _co2_shipped_blends(tmp_path)).data
    # 0.02 kg x 48 x (1.61354232 / 34.8696 - 0.0561) = -0.0094333 kg: not -1 t
    assert d["er_kg_co2"] == pytest.approx(0.96 * (1.61354232 / 34.8696 - 0.0561), rel=1e-9)
    assert d["er_t_co2_rounded"] == pytest.approx(d["er_kg_co2"] / 1000)
    assert -1e-5 < d["er_t_co2_rounded"] < 0


def test_signed_co2_kg_is_never_used(tmp_path: Path, signer: keys.FileSigner) -> None:
    plain = [reading(NEW_YEAR + i * STEP) for i in range(10)]
    odd = [reading(NEW_YEAR + i * STEP, co2_kg={"diesel": 1e6, "gas": -1e6}) for i in range(10)]
    m = mrv.load()
    a = report.build(_store(tmp_path, signer, plain, "a"), m).data
    b = report.build(_store(tmp_path, signer, odd, "b"), m).data
    for k in ("re_kg_co2", "pe_kg_co2", "er_kg_co2"):
        assert a[k] == b[k]


# -- classes and forms ----------------------------------------------------------------


def test_a_bus_with_no_class_is_refused_with_the_list(tmp_path: Path) -> None:
    db = _ingest_fleet(
        tmp_path, {f"bus-{i}": [reading(NEW_YEAR + j * STEP) for j in range(5)] for i in (1, 2, 3)}
    )
    m = fossil_co2('form = "both"\n', '[buses.class]\n"bus-2" = "medium"\n')
    with pytest.raises(report.ReportError) as e:
        report.build(db, m)
    assert str(e.value).endswith("none for 2: bus-1, bus-3")
    # Form A does not use classes; the report lists none.
    assert [b["class"] for b in report.build(db, fossil_co2()).data["buses"]] == [None] * 3


def test_both_forms_take_the_lower_re_per_bus(tmp_path: Path, signer: keys.FileSigner) -> None:
    rs = [reading(NEW_YEAR + i * STEP) for i in range(100)]  # 10 L, 5 kg, 50 km
    m = fossil_co2('form = "both"\n', '[buses.class]\n"bus-A" = "large"\n')
    bus = report.build(_store(tmp_path, signer, rs), m).data["buses"][0]
    # A: (362.92 + 240) MJ x 0.0741 = 44.676372; B: 20 L x 2.6892372 = 53.784744
    assert bus["re_a_kg_co2"] == pytest.approx(44.676372)
    assert bus["re_b_kg_co2"] == pytest.approx(53.784744)
    assert bus["re_kg_co2"] == pytest.approx(44.676372)
    assert bus["er_kg_co2"] == pytest.approx(5 * 0.864)


# -- cross-checks and dispenser records -----------------------------------------------


def test_a_failed_gas_cross_check_lowers_the_credited_gas(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    rs = [reading(NEW_YEAR + i * STEP, gas_kg_events=0.04) for i in range(100)]
    bus = report.build(_store(tmp_path, signer, rs), fossil_co2()).data["buses"][0]
    assert bus["cross_checks"]["gas_injection_events"]["status"] == "disagree"
    # 5 kg metered, 4 kg by injection events: 4 kg credited, 4 x 0.864 = 3.456 kg
    assert bus["gas_kg_credited"] == pytest.approx(4.0)
    assert bus["er_kg_co2"] == pytest.approx(3.456)
    assert any("credited gas lowered to 80.00 %" in f for f in bus["flags"])


DAY = datetime(2025, 3, 1, tzinfo=UTC).timestamp()


def _tank_readings(n: int = 120, refill_at: int = 60, first: float = DAY) -> list[dict[str, Any]]:
    """0.05 kg a reading out of a 100 kg tank, a 50 kg refill seen in reading ``refill_at``."""
    rs = []
    for i in range(n):
        extra: dict[str, Any] = {"tank_kg": 100 - 0.05 * (i + 1) + (50 if i >= refill_at else 0)}
        if i == refill_at:
            extra.update(refuel_kg=50.0, refuels=1)
        rs.append(reading(first + i * STEP, **extra))
    return rs


HEAD = "time,device_id,station,kg,invoice_id\n"


def _refills(tmp_path: Path, rows: str) -> refills.RefillSet:
    p = tmp_path / "refills.csv"
    p.write_text(HEAD + rows)
    return refills.read(p)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def test_tank_rises_merge_into_refills_and_noise_is_left_out() -> None:
    rises = [(100.0, 30.0), (160.0, 28.5), (1000.0, 0.03), (5000.0, 40.0)]
    assert refills.refills_seen(rises, 2.0) == [(100.0, 58.5), (5000.0, 40.0)]


def test_dispenser_records_that_match(tmp_path: Path, signer: keys.FileSigner) -> None:
    path = _store(tmp_path, signer, _tank_readings())
    rec = _refills(tmp_path, f"{_iso(DAY + 60 * STEP + 40)},bus-A,SPBG 1,50.0,INV-1\n")
    bus = report.build(path, fossil_co2(), refills=rec).data["buses"][0]
    check = bus["cross_checks"]["dispenser_records"]
    # opening 100 + invoiced 50 - closing (150 - 6) = 6 kg = the metered gas
    assert check["check"] == pytest.approx(6.0) and check["status"] == "agree"
    assert check["mismatches"] == [] and not check["flagged"]
    assert bus["gas_kg_credited"] == pytest.approx(6.0)


def test_a_missing_invoice_lowers_the_credited_gas(tmp_path: Path, signer: keys.FileSigner) -> None:
    path = _store(tmp_path, signer, _tank_readings())
    rec = _refills(tmp_path, f"{_iso(DAY - 86400)},bus-A,SPBG 1,40.0,INV-0\n")
    bus = report.build(path, fossil_co2(), refills=rec).data["buses"][0]
    check = bus["cross_checks"]["dispenser_records"]
    # No invoice for the 50 kg seen: 100 + 0 - 144 < 0, so nothing is vouched for.
    assert check["check"] == 0.0 and check["flagged"]
    assert any(
        m.startswith("refill seen at 2025-03-01T01:00:00Z (+50.00 kg") for m in check["mismatches"]
    )
    assert any("INV-0" in m and "no refill seen" in m for m in check["mismatches"])
    assert bus["gas_kg_credited"] == 0.0 and bus["er_kg_co2"] == pytest.approx(0.0)


def test_a_short_invoice_and_a_double_entry(tmp_path: Path, signer: keys.FileSigner) -> None:
    path = _store(tmp_path, signer, _tank_readings())
    row = f"{_iso(DAY + 60 * STEP)},bus-A,SPBG 1,47.0,INV-1\n"
    rec = _refills(tmp_path, row + row)
    assert len(rec.refills) == 1 and len(rec.doubles) == 1
    bus = report.build(path, fossil_co2(), refills=rec).data["buses"][0]
    check = bus["cross_checks"]["dispenser_records"]
    # 100 + 47 - 144 = 3 kg vouched for, of 6 metered: 3 kg credited, 3 x 0.864
    assert check["check"] == pytest.approx(3.0) and check["status"] == "disagree"
    assert bus["er_kg_co2"] == pytest.approx(3 * 0.864)
    assert "invoice INV-1 entered twice (rows 2 and 3), counted once" in check["mismatches"]
    assert any("the tank rose 50.00 kg, invoiced 47 kg (INV-1)" in m for m in check["mismatches"])


def test_a_refill_straddling_midnight_counts_where_the_tank_shows_it(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    # 60 readings before midnight, 60 after; the tank shows the refill in the first reading
    # of the new day, the invoice is stamped 20 s before midnight.
    first = DAY + 86400 - 60 * STEP
    path = _store(tmp_path, signer, _tank_readings(first=first))
    rec = _refills(tmp_path, f"{_iso(DAY + 86400 - 20)},bus-A,SPBG 1,50.0,INV-1\n")
    bus = report.build(path, fossil_co2(), refills=rec).data["buses"][0]
    days = {x["date"]: x for x in bus["days"]}
    # Each day vouches for its own 3 kg: day 1 = 100 - 97 (no invoice), day 2 = 97 + 50 - 144.
    assert days["2025-03-01"]["gas_kg_credited"] == pytest.approx(3.0)
    assert days["2025-03-02"]["gas_kg_credited"] == pytest.approx(3.0)
    assert bus["cross_checks"]["dispenser_records"]["mismatches"] == []


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("yesterday,bus-A,S,5,I1\n", "row 2: time 'yesterday' is not an ISO 8601 date-time"),
        ("2025-03-01T10:00,bus-A,S,-5,I1\n", "row 2: kg must be a positive number, got '-5'"),
        ("2025-03-01T10:00,bus-A,S,lots,I1\n", "row 2: kg 'lots' is not a number"),
        ("2025-03-01T10:00,bus-A,S,5\n", "row 2: 4 fields, the header has 5"),
        ("2025-03-01T10:00,bus-A,S,5,\n", "row 2: invoice_id is empty"),
        ("2025-03-01T10:00,bus-A,S,5,I1\n2025-03-01T11:00,bus-A,S,6,I1\n",
         "row 3: invoice_id 'I1' already on row 2 with different content"),
    ],
)  # fmt: skip
def test_bad_refill_rows_name_the_file_and_row(tmp_path: Path, rows: str, message: str) -> None:
    with pytest.raises(refills.RefillError) as e:
        _refills(tmp_path, rows)
    assert str(e.value) == f"refills {tmp_path / 'refills.csv'}, {message}"


def test_a_bad_refill_header(tmp_path: Path) -> None:
    p = tmp_path / "r.csv"
    p.write_text("when,bus,kg\n")
    with pytest.raises(refills.RefillError, match=re.escape(f"refills {p}, row 1: the header")):
        refills.read(p)


# -- conservative set, sensitivity ---------------------------------------------------


def test_the_conservative_switch_and_the_sensitivity_table(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    path = _store(tmp_path, signer, [reading(DAY + i * STEP) for i in range(100)])
    m = mrv.load()
    central = report.build(path, m).data
    cons = report.build(path, m, conservative_set=True).data
    assert cons["methodology"]["parameter_set"] == "conservative"
    assert cons["methodology"]["boundary"] == {
        "include_compression": True, "include_upstream_leakage": True,
    }  # fmt: skip
    assert cons["er_kg_co2"] < central["er_kg_co2"]
    s = central["sensitivity"]
    assert s["er_kg_co2_central"] == pytest.approx(central["er_kg_co2"])
    assert s["er_kg_co2_conservative"] == pytest.approx(cons["er_kg_co2"])
    # On B40 with 1,540 kg/TJ of slip, the slip factor moves ER most.
    assert s["parameters"][0]["parameter"] == "ef_ch4_gas"


# -- the workbook ------------------------------------------------------------------------


def _fleet_for_workbook(tmp_path: Path) -> Path:
    span = [reading(NEW_YEAR + (i - 30) * STEP) for i in range(90)]
    return _ingest_fleet(
        tmp_path,
        {
            "bus-1": span,
            "bus-2": [
                reading(NEW_YEAR + i * STEP, gas_kg=0.2, gas_kg_events=0.15) for i in range(50)
            ],
            "bus-3": [reading(NEW_YEAR + i * STEP, gas_cov=0.5) for i in range(40)],
        },
    )


WB_PROJECT = (
    '[methodology]\nbase = "jcm-id-dual-fuel-bus"\nform = "both"\n'
    '[engine_slip.wp10]\nvalue = 300.0\nunit = "kg/TJ"\nsource = "PEMS test"\noption = "C"\n'
    '[bus_reference.bus-3]\nvalue = 0.35\nunit = "L/km"\nfame_share_vol = 0.3\n'
    'source = "test baseline"\n'
    '[buses.class]\n"bus-1" = "large"\n"bus-2" = "medium"\n[buses.engine]\n"bus-2" = "wp10"\n'
    '[ex_ante.per_bus_day]\ngas_kg = 100.0\ner_kg_co2 = 50.0\n[ex_ante]\nsource = "PDD test"\n'
    '[monitored_bus.bus-1.gas_kg]\nequipment = "kit SN 0042"\nlast_calibration = "2025-06-01"\n'
)


def _evaluate(path: Path) -> tuple[Any, Any]:
    openpyxl = pytest.importorskip("openpyxl")
    from xlsx_eval import Evaluator

    wb = openpyxl.load_workbook(path)
    return wb, Evaluator(wb)


def _totals(wb: Any, ev: Any) -> dict[str, dict[str, float]]:
    ws = wb["Calculation"]
    head = [c.value for c in ws[1]]
    out = {}
    for row in ws.iter_rows(min_row=2):
        if row[1].value in ("total", "fleet"):
            r = row[0].row
            out[row[0].value] = {
                k: ev.value("Calculation", f"{row[head.index(col)].column_letter}{r}")
                for k, col in (("re", "RE kg"), ("pe", "PE kg"), ("er", "ER kg"))
            }
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


@pytest.mark.parametrize("conservative", [False, True])
def test_the_workbook_recomputes_the_report(tmp_path: Path, conservative: bool) -> None:
    db = _fleet_for_workbook(tmp_path)
    proj = tmp_path / "wb.toml"
    proj.write_text(WB_PROJECT)
    rep = report.build(db, mrv.load(proj), conservative_set=conservative)
    from cngmrv.office import workbook

    out = tmp_path / "report.xlsx"
    workbook.write(rep, out)
    wb, ev = _evaluate(out)
    got = _totals(wb, ev)
    d = rep.data
    for b in d["buses"]:
        g = got[b["device_id"]]
        assert _close(g["re"], b["re_kg_co2"]) and _close(g["pe"], b["pe_kg_co2"]), b["device_id"]
        assert _close(g["er"], b["er_kg_co2"])
    assert _close(got["*"]["er"], d["er_kg_co2"])
    # Every RE, PE, ER cell is a formula, not a pasted value.
    ws = wb["Calculation"]
    totals = [r for r in ws.iter_rows(min_row=2) if r[1].value in ("total", "fleet")]
    assert len(totals) == 4
    for r in totals:
        assert all(isinstance(c.value, str) and c.value.startswith("=") for c in r[-3:])
    # The parameter sheet carries the monitoring-plan columns and the batch trace.
    ps = wb["Parameters"]
    head = [c.value for c in ps[1]]
    for col in ("monitoring option", "source", "method", "frequency", "equipment id",
                "accuracy", "last calibration", "batch range", "batch set sha256"):  # fmt: skip
        assert col in head
    rows = {r[0].value: r for r in ps.iter_rows(min_row=2)}
    gas1 = rows["gas_kg bus-1"]
    assert gas1[head.index("monitoring option")].value == "C"
    assert gas1[head.index("batch set sha256")].value == d["buses"][0]["batches"]["set_sha256"]
    assert gas1[head.index("equipment id")].value == "kit SN 0042"
    assert gas1[head.index("last calibration")].value == "2025-06-01"
    assert rows["gas_kg bus-2"][head.index("equipment id")].value == "not configured"
    ex = wb["Ex-ante vs ex-post"]
    # bus-1 spans midnight: 2 + 1 + 1 bus-days; ex-ante 100 kg gas and 50 kg ER a bus-day.
    assert ex["A3"].value == "gas_kg" and ex["C2"].value == 4
    assert ev.value("Ex-ante vs ex-post", "D3") == 400.0
    assert ex["A4"].value == "er_kg_co2" and ev.value("Ex-ante vs ex-post", "D4") == 200.0
    assert _close(ev.value("Ex-ante vs ex-post", "E4"), d["er_kg_co2"])


def test_changing_a_parameter_in_the_workbook_recomputes_er(tmp_path: Path) -> None:
    db = _fleet_for_workbook(tmp_path)
    proj = tmp_path / "wb.toml"
    proj.write_text(WB_PROJECT)
    from cngmrv.office import workbook

    out = tmp_path / "report.xlsx"
    workbook.write(report.build(db, mrv.load(proj)), out)
    wb, ev = _evaluate(out)
    rows = {r[0].value: r[0].row for r in wb["Parameters"].iter_rows(min_row=2)}
    # Slip at IPCC's default, and form A, in the sheet and in a project file.
    ev.set("Parameters", f"C{rows['ef_ch4_gas']}", 92.0)
    ev.set("Parameters", f"C{rows['form']}", "A")
    proj2 = tmp_path / "wb2.toml"
    proj2.write_text(
        WB_PROJECT.replace('form = "both"', 'form = "A"')
        + '[parameters.ef_ch4_gas]\nvalue = 92.0\nunit = "kg/TJ"\nsource = "IPCC default"\n'
    )
    d = report.build(db, mrv.load(proj2)).data
    got = _totals(wb, ev)
    assert _close(got["*"]["er"], d["er_kg_co2"])
    for b in d["buses"]:
        assert _close(got[b["device_id"]]["er"], b["er_kg_co2"]), b["device_id"]


def test_cli_writes_the_workbook(
    tmp_path: Path, signer: keys.FileSigner, cli: Callable[..., Any]
) -> None:
    path = _store(tmp_path, signer, [reading(DAY + i * STEP) for i in range(10)])
    out = tmp_path / "r.xlsx"
    r = cli("report", "--db", str(path), "--format", "xlsx", "--out", str(out), "--conservative")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:2] == b"PK"


# -- sfc-ref ---------------------------------------------------------------------------------


def test_sfc_ref_from_the_bus_own_diesel_only_data(
    tmp_path: Path, signer: keys.FileSigner, cli: Callable[..., Any]
) -> None:
    # 300 diesel-only readings in March 2025 (B40): 0.15 L and 0.5 km each = 0.30 L/km.
    rs = [
        reading(DAY + i * STEP, diesel_l=0.15, gas_kg=0.0, mode_s={"diesel": STEP, "dual": 0.0})
        for i in range(300)
    ]
    path = _store(tmp_path, signer, rs)
    proj = tmp_path / "project.toml"
    proj.write_text('# our fleet\n[methodology]\nbase = "jcm-id-dual-fuel-bus"\nform = "B"\n')
    r = cli("sfc-ref", "--db", str(path), "--bus", "bus-A", "--from", "2025-03-01",
            "--to", "2025-03-01", "--methodology", str(proj))  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = proj.read_text()
    assert text.startswith("# our fleet\n")
    ref = tomllib.loads(text)["bus_reference"]["bus-A"]
    assert ref["value"] == pytest.approx(0.30) and ref["fame_share_vol"] == 0.4
    assert "300 diesel-only readings of bus-A" in ref["source"] and "150.000 km" in ref["source"]
    m = mrv.load(proj)
    assert m.sfc_ref("bus-A").value == pytest.approx(0.30)
    # Too short a baseline is refused, and the file is left alone.
    r = cli("sfc-ref", "--db", str(path), "--bus", "bus-A", "--from", "2025-03-01",
            "--to", "2025-03-01", "--methodology", str(proj), "--min-km", "500")  # fmt: skip
    assert r.returncode == 2 and "only 150.0 km of diesel-only driving" in r.stderr
    assert proj.read_text() == text


def test_refill_csv_via_cli(
    tmp_path: Path, signer: keys.FileSigner, cli: Callable[..., Any]
) -> None:
    path = _store(tmp_path, signer, _tank_readings())
    bad = tmp_path / "bad.csv"
    bad.write_text(HEAD + "2025-03-01T10:00,bus-A,S,0,I1\n")
    r = cli(
        "report", "--db", str(path), "--refills", str(bad), "--methodology", str(fossil_co2_file())
    )
    assert r.returncode == 2
    assert f"refills {bad}, row 2: kg must be a positive number" in r.stderr


# -- fuzz ------------------------------------------------------------------------------------

_FIELD = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["2025-03-01T10:00", "2025-03-01T10:00+07:00", "bus-A", "5", "-1", "nan",
                     "inf", "1e309", "", " ", '"', "I1", "\x00", "a\rb"]),
)  # fmt: skip


@given(
    header=st.one_of(st.just(list(refills.COLUMNS)), st.lists(_FIELD, max_size=6)),
    rows=st.lists(st.lists(_FIELD, max_size=6), max_size=6),
    junk=st.text(max_size=40),
)
def test_refill_parser_fuzz(header: list[str], rows: list[list[str]], junk: str) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    for text in (buf.getvalue(), buf.getvalue() + junk, junk):
        try:
            out = refills.parse(text, "fuzz.csv")
        except refills.RefillError as e:
            assert str(e).startswith("refills fuzz.csv")
            continue
        for r in out.refills:
            assert r.kg > 0 and math.isfinite(r.kg) and r.invoice_id and r.device_id


def test_libreoffice_recomputes_the_workbook_as_the_report(tmp_path: Path) -> None:
    """A real spreadsheet program, not only our evaluator: LibreOffice loads the workbook
    (no cached values in it), recalculates and saves; its values match the JSON."""
    import shutil
    import subprocess

    soffice = shutil.which("soffice")
    if soffice is None:
        pytest.skip("LibreOffice (soffice) not installed: apt-get install libreoffice-calc-nogui")
    openpyxl = pytest.importorskip("openpyxl")
    from cngmrv.office import workbook

    db = _fleet_for_workbook(tmp_path)
    proj = tmp_path / "wb.toml"
    proj.write_text(WB_PROJECT)
    rep = report.build(db, mrv.load(proj), conservative_set=True)
    src = tmp_path / "in" / "report.xlsx"
    src.parent.mkdir()
    workbook.write(rep, src)
    out = tmp_path / "out"
    subprocess.run(
        [soffice, f"-env:UserInstallation=file://{tmp_path / 'lo-profile'}", "--headless",
         "--calc", "--convert-to", "xlsx", "--outdir", str(out), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    ws = openpyxl.load_workbook(out / "report.xlsx", data_only=True)["Calculation"]
    head = [c.value for c in ws[1]]
    by = {b["device_id"]: b for b in rep.data["buses"]} | {"*": rep.data}
    seen = 0
    for row in ws.iter_rows(min_row=2):
        if row[1].value in ("total", "fleet"):
            want = by[row[0].value]
            for col, key in (
                ("RE kg", "re_kg_co2"),
                ("PE kg", "pe_kg_co2"),
                ("ER kg", "er_kg_co2"),
            ):
                assert _close(row[head.index(col)].value, want[key]), (row[0].value, col)
            seen += 1
    assert seen == 4


def test_sfc_ref_from_imported_records(tmp_path: Path, cli: Callable[..., Any]) -> None:
    rec = tmp_path / "records.csv"
    # June 2024 (B35): 2 days in the period, 1 outside; 90 L / 300 km = 0.30 L/km
    rec.write_text(
        "date,distance_km,diesel_l\n2024-06-01,100,30\n2024-06-02,200,60\n2024-07-01,50,40\n"
    )
    proj = tmp_path / "project.toml"
    proj.write_text('[methodology]\nbase = "jcm-id-dual-fuel-bus"\n')
    r = cli("sfc-ref", "--records", str(rec), "--bus", "bus-9", "--from", "2024-06-01",
            "--to", "2024-06-30", "--methodology", str(proj))  # fmt: skip
    assert r.returncode == 0, r.stderr
    ref = mrv.load(proj).sfc_ref("bus-9")
    assert ref.value == pytest.approx(0.30) and ref.fame_share_vol == 0.35
    assert "2 days of bus-9" in ref.source and "records.csv" in ref.source
    rec.write_text("date,distance_km,diesel_l\n2024-06-01,100,thirty\n")
    r = cli("sfc-ref", "--records", str(rec), "--bus", "bus-9", "--from", "2024-06-01",
            "--to", "2024-06-30", "--methodology", str(proj))  # fmt: skip
    assert r.returncode == 2 and f"records {rec}, row 2: not a date and two numbers" in r.stderr
