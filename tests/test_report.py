"""``cngmrv report`` on real signed stores and a real ingest database, with known readings."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mrv_helpers import fossil_co2

from cngmrv.agent.store import Store
from cngmrv.office import mrv, report
from cngmrv.office.ingest import Ingest, open_db, register_device
from cngmrv.signed import batch, keys

DAY0 = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
STEP = 60.0  # one synthetic reading per minute keeps three days small


def reading(
    t0: float,
    diesel_l: float = 0.1,
    gas_kg: float = 0.05,
    km: float = 0.5,
    gas_cov: float = 1.0,
    **extra: Any,
) -> dict[str, Any]:
    """A reading shaped like the pipeline's, covering ``STEP`` s, gas covered ``gas_cov``."""
    r: dict[str, Any] = {
        "t0": t0,
        "dur": STEP,
        "epoch": 1,
        "clock": "synchronised",
        "diesel_l": diesel_l,
        "gas_kg": gas_kg * gas_cov,
        "distance_km": km,
        "cov": {"diesel_l": STEP, "gas_kg": STEP * gas_cov, "distance_km": STEP},
        "mode_s": {"diesel": 0.0, "dual": STEP * gas_cov, "fault": 0.0},
    }
    if gas_cov < 1.0:
        r["gaps"] = {"gas_kg": [1, STEP * (1 - gas_cov)]}
    r.update(extra)
    return r


def make_store(
    path: Path, signer: keys.FileSigner, device: str, readings: list[dict[str, Any]], per: int = 100
) -> Store:
    store = Store(path, device)
    store.add_readings(readings)
    while store.seal(signer, per) is not None:
        pass
    return store


def three_days(n_per_day: int = 1440, **kw: Any) -> list[dict[str, Any]]:
    return [reading(DAY0 + d * 86400 + i * STEP, **kw) for d in range(3) for i in range(n_per_day)]


@pytest.fixture
def store_db(tmp_path: Path, signer: keys.FileSigner) -> Path:
    path = tmp_path / "store.sqlite"
    make_store(path, signer, "bus-A", three_days()).close()
    return path


def _one_line_error(r) -> str:  # type: ignore[no-untyped-def]
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_store_totals_er_and_days_by_hand(store_db: Path) -> None:
    rep = report.build(store_db, fossil_co2())
    d = rep.data
    n = 3 * 1440
    # 4,320 readings x 0.05 kg = 216 kg gas; ER = 216 x 48.0 x 0.018 = 186.624 kg CO2
    assert d["gas_kg"] == pytest.approx(216.0)
    assert d["diesel_l"] == pytest.approx(n * 0.1)
    assert d["distance_km"] == pytest.approx(n * 0.5)
    assert d["er_kg_co2"] == pytest.approx(186.624)
    assert d["er_t_co2_rounded"] == 0.0
    assert d["re_kg_co2"] - d["pe_kg_co2"] == pytest.approx(d["er_kg_co2"])
    (bus,) = d["buses"]
    assert bus["device_id"] == "bus-A" and not bus["flagged"] and d["flagged"] == []
    assert bus["coverage"] == pytest.approx(1.0)
    assert bus["mode_h"]["dual"] == pytest.approx(72.0)
    assert [x["date"] for x in bus["days"]] == ["2025-03-01", "2025-03-02", "2025-03-03"]
    assert sum(x["er_kg_co2"] for x in bus["days"]) == pytest.approx(186.624)
    assert d["methodology"]["version"] == "2.0.0+fossil-co2" and d["methodology"]["form"] == "A"
    assert d["source"]["kind"] == "store"


def test_every_figure_traces_to_the_batches(store_db: Path) -> None:
    d = report.build(store_db, fossil_co2()).data
    db = sqlite3.connect(store_db)
    rows = db.execute("SELECT seq, sha256 FROM batches ORDER BY seq").fetchall()
    db.close()
    t = d["buses"][0]["batches"]
    assert (t["first_seq"], t["last_seq"], t["count"]) == (0, len(rows) - 1, len(rows))
    assert t["first_sha256"] == bytes(rows[0][1]).hex()
    assert t["last_sha256"] == bytes(rows[-1][1]).hex()
    assert t["set_sha256"] == hashlib.sha256(b"".join(bytes(r[1]) for r in rows)).hexdigest()
    # 1,440 readings a day in batches of 100: day 2 starts inside batch 14.
    day2 = d["buses"][0]["days"][1]["batches"]
    assert (day2["first_seq"], day2["last_seq"]) == (14, 28)


def test_period_dates_are_inclusive_utc_days(store_db: Path) -> None:
    m = fossil_co2()
    start, end = report.parse_when("2025-03-02"), report.parse_when("2025-03-02", end=True)
    d = report.build(store_db, m, start, end).data
    assert [x["date"] for x in d["buses"][0]["days"]] == ["2025-03-02"]
    assert d["gas_kg"] == pytest.approx(72.0)
    half = report.parse_when("2025-03-03T12:00:00+00:00")
    assert report.build(store_db, m, half).data["gas_kg"] == pytest.approx(36.0)
    with pytest.raises(report.ReportError, match="no readings between 2025-04-01"):
        report.build(store_db, m, report.parse_when("2025-04-01"), report.parse_when("2025-04-30"))
    with pytest.raises(report.ReportError, match="not a date"):
        report.parse_when("yesterday")


def test_uncovered_gas_adds_nothing_and_the_bus_is_flagged(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    rs = three_days()
    for r in rs[1000:1100]:  # 100 minutes with half the gas time uncovered
        r.update(reading(r["t0"], gas_cov=0.5))
    path = tmp_path / "s.sqlite"
    make_store(path, signer, "bus-A", rs).close()
    d = report.build(path, fossil_co2()).data
    bus = d["buses"][0]
    # 4,220 x 0.05 + 100 x 0.025 = 213.5 kg: nothing is filled in for the uncovered half.
    assert bus["gas_kg"] == pytest.approx(213.5)
    assert bus["coverage_by_channel"]["gas_kg"] == pytest.approx(1 - 50 / 4320)
    assert bus["uncovered_s"]["gas_kg"] == pytest.approx(3000.0)
    assert bus["gaps"]["gas_kg"] == {"count": 100, "longest_s": 30.0}
    assert bus["mode_h"]["unknown"] == pytest.approx(50 / 60)
    assert bus["flagged"] and "gas_kg coverage 98.84 %" in bus["flags"][0]
    assert d["flagged"] == ["bus-A"]
    # A lower floor accepts it.
    assert report.build(path, fossil_co2(), coverage_floor=0.98).data["flagged"] == []


def test_form_b_does_not_credit_distance_without_gas(
    tmp_path: Path, signer: keys.FileSigner
) -> None:
    rs = [reading(DAY0 + i * STEP, gas_cov=0.0 if i < 10 else 1.0) for i in range(100)]
    path = tmp_path / "s.sqlite"
    make_store(path, signer, "bus-A", rs).close()
    m = fossil_co2('form = "B"\n', '[buses.class]\n"bus-A" = "large"\n')
    bus = report.build(path, m).data["buses"][0]
    assert bus["distance_km"] == pytest.approx(50.0)
    assert bus["distance_credited_km"] == pytest.approx(45.0)
    # RE = 45 km x 0.40 x 0.844 x 43.0 x 0.0741 = 48.4062696 kg
    assert bus["re_kg_co2"] == pytest.approx(48.4062696)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    covs=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=5, max_size=5),
    form=st.sampled_from(["A", "B"]),
)
def test_less_coverage_never_raises_er(
    tmp_path_factory: pytest.TempPathFactory, signer: keys.FileSigner, covs: list[float], form: str
) -> None:
    tmp = tmp_path_factory.mktemp("cov")
    # With no gas covered at all there is no metered rate to fill a gap at: that bus is
    # flagged under the coverage floor (test_no_gas_coverage_is_flagged_not_filled).
    assume(any(c > 0 for c in covs))
    m = mrv.load()  # the shipped defaults: B40, methane slip at IPCC's upper end
    if form != "A":
        proj = tmp / "m.toml"
        proj.write_text(
            f'[methodology]\nbase = "jcm-id-dual-fuel-bus"\nform = "{form}"\n'
            '[buses.class]\n"b" = "large"\n'
        )
        m = mrv.load(proj)
    full = [reading(DAY0 + i * STEP) for i in range(5)]
    part = [reading(DAY0 + i * STEP, gas_cov=c) for i, c in enumerate(covs)]
    make_store(tmp / "full.sqlite", signer, "b", full).close()
    make_store(tmp / "part.sqlite", signer, "b", part).close()
    full_d = report.build(tmp / "full.sqlite", m).data
    part_d = report.build(tmp / "part.sqlite", m).data
    assert part_d["er_kg_co2"] <= full_d["er_kg_co2"] + 1e-9
    # Also per day (the readings all fall on one day here).
    day_full, day_part = full_d["buses"][0]["days"][0], part_d["buses"][0]["days"][0]
    assert day_part["er_kg_co2"] <= day_full["er_kg_co2"] + 1e-9


def _ingest_fleet(tmp_path: Path, buses: dict[str, list[dict[str, Any]]]) -> Path:
    """Every bus's batches through the real ingest verification into one database."""
    path = tmp_path / "ingest.sqlite"
    db = open_db(path)
    ingest = Ingest(db)
    for dev, rs in buses.items():
        kdir = tmp_path / dev
        keys.generate(kdir)
        signer = keys.load_signer(kdir / keys.KEY_FILE)
        register_device(db, dev, (kdir / keys.PUB_FILE).read_bytes())
        store = make_store(tmp_path / f"{dev}.sqlite", signer, dev, rs)
        for _, raw in store.batches():
            status, body = ingest.accept(raw)
            assert status == 201, body
        store.close()
    db.close()
    return path


@pytest.fixture
def fleet_db(tmp_path: Path) -> Path:
    return _ingest_fleet(
        tmp_path,
        {
            "bus-1": three_days(n_per_day=120),
            "bus-2": three_days(n_per_day=120, gas_kg=0.1),
            "bus-3": [reading(DAY0 + i * STEP, gas_cov=0.0 if i < 60 else 1.0) for i in range(360)],
        },
    )


def test_fleet_from_the_ingest_database(fleet_db: Path) -> None:
    d = report.build(fleet_db, fossil_co2()).data
    assert d["source"]["kind"] == "ingest"
    by = {b["device_id"]: b for b in d["buses"]}
    assert list(by) == ["bus-1", "bus-2", "bus-3"]
    assert by["bus-1"]["gas_kg"] == pytest.approx(18.0)
    assert by["bus-2"]["gas_kg"] == pytest.approx(36.0)
    assert by["bus-3"]["gas_kg"] == pytest.approx(15.0)
    # (18 + 36 + 15) kg x 48.0 x 0.018 = 59.616 kg
    assert d["er_kg_co2"] == pytest.approx(59.616)
    assert d["er_kg_co2"] == pytest.approx(sum(b["er_kg_co2"] for b in d["buses"]))
    assert d["flagged"] == ["bus-3"]
    assert all(b["batches"]["signatures"] == report.SIGNATURES for b in by.values())
    one = report.build(fleet_db, fossil_co2(), bus="bus-2").data
    assert [b["device_id"] for b in one["buses"]] == ["bus-2"] and one["gas_kg"] == pytest.approx(
        36.0
    )
    with pytest.raises(
        report.ReportError, match=r"unknown bus 'bus-9' .*known: bus-1, bus-2, bus-3"
    ):
        report.build(fleet_db, fossil_co2(), bus="bus-9")


def test_a_batch_altered_in_the_database_is_left_out_and_flagged(fleet_db: Path) -> None:
    kept_before = report.build(fleet_db, fossil_co2()).data["buses"][0]
    db = sqlite3.connect(fleet_db)
    raw = bytes(
        db.execute("SELECT bytes FROM batches WHERE device_id='bus-1' AND seq=1").fetchone()[0]
    )
    b = batch.parse(raw)
    payload = b.payload()
    payload["readings"][0]["gas_kg"] = 1000.0  # someone "corrects" a reading after the fact
    forged = batch.packb(
        [batch.MAGIC, batch.VERSION, b.header_bytes, batch.packb(payload), b.signature]
    )
    db.execute("UPDATE batches SET bytes=? WHERE device_id='bus-1' AND seq=1", (forged,))
    db.commit()
    db.close()
    # The ingest's per-batch sums were taken from the bytes it verified on arrival:
    # bytes altered since do not move them.  The audit's --recompute finds the change.
    kept = report.build(fleet_db, fossil_co2()).data["buses"][0]
    assert kept["gas_kg"] == kept_before["gas_kg"] and kept["batches"] == kept_before["batches"]
    bus = report.build(fleet_db, fossil_co2(), recompute=True).data["buses"][0]
    # Batch 1 (100 readings) fails its payload hash and is left out.  Batch 2 is
    # still the device's own signed work (its prev_hash names the original batch
    # 1), so it counts.
    assert set(bus["batches"]["excluded"]) == {"batch_seq 1"}
    assert bus["gas_kg"] == pytest.approx(0.05 * (360 - 100))
    assert bus["flagged"] and any("failed verification" in f for f in bus["flags"])


def test_cross_checks_when_the_fields_exist(tmp_path: Path, signer: keys.FileSigner) -> None:
    rs = []
    counter, tank = 1000.0, 80.0
    for i in range(600):
        counter += 0.1
        tank -= 0.05 * 1.02
        if i == 300:
            tank += 40.0  # a refill
        rs.append(
            reading(DAY0 + i * STEP, lfc_total_l=counter, gas_kg_events=0.05 * 1.2, tank_kg=tank)
        )
    path = tmp_path / "s.sqlite"
    make_store(path, signer, "bus-A", rs).close()
    bus = report.build(path, fossil_co2()).data["buses"][0]
    c = bus["cross_checks"]
    assert c["diesel_lfc_counter"]["ratio"] == pytest.approx(1.0)
    assert c["diesel_lfc_counter"]["status"] == "agree"
    assert c["gas_injection_events"]["ratio"] == pytest.approx(1.2)
    assert c["gas_injection_events"]["flagged"]
    assert c["gas_tank_balance"]["ratio"] == pytest.approx(1.02)
    assert c["gas_tank_balance"]["refills"] == 1 and not c["gas_tank_balance"]["flagged"]
    assert "cross-check gas_injection_events: ratio 1.200" in bus["flags"]


def test_cross_checks_absent_are_not_available(store_db: Path) -> None:
    c = report.build(store_db, fossil_co2()).data["buses"][0]["cross_checks"]
    assert {k: v["status"] for k, v in c.items()} == dict.fromkeys(
        ("diesel_lfc_counter", "gas_injection_events", "gas_tank_balance"), "not available"
    )


def test_cli_json_csv_and_html(store_db: Path, tmp_path: Path, cli: Callable[..., Any]) -> None:
    r = cli(
        "report",
        "--db",
        str(store_db),
        "--from",
        "2025-03-01",
        "--to",
        "2025-03-02",
        "--format",
        "json",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for k in ("re_kg_co2", "pe_kg_co2", "er_kg_co2", "gas_kg", "diesel_l", "distance_km"):
        assert isinstance(d[k], float), k
    assert d["methodology"]["name"] and d["methodology"]["version"] == "2.0.0"
    assert d["buses"][0]["coverage"] == pytest.approx(1.0)
    assert d["gas_kg"] == pytest.approx(144.0)
    r = cli("report", "--db", str(store_db), "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["scope"] for x in rows] == ["day", "day", "day", "bus", "fleet"]
    # The shipped defaults (B40 since 2025-01-01, slip at 1,540 kg CH4/TJ, AR5), by hand:
    # gas 56,100 + 28 x 1,540 + 265 x 3 = 100,015 kg CO2e/TJ;
    # a litre of B40: 0.6 x 0.844 x 43.0 = 21.7752 MJ fossil x 75.2427 g/MJ = 1.638414 kg,
    #   0.4 x 0.88 x 37.2 = 13.0944 MJ FAME x 1.1427 g/MJ (CH4, N2O) = 0.014963 kg;
    #   1.653377 kg / 34.8696 MJ = 47.4164 g/MJ;
    # 216 kg x 48.0 MJ/kg x (47.4164 - 100.015) g/MJ = -545.34 kg.
    assert float(rows[-1]["er_kg_co2"]) == pytest.approx(-545.3432, rel=1e-6)
    assert rows[0]["first_seq"] == "0" and len(rows[0]["set_sha256"]) == 64
    out = tmp_path / "r.html"
    r = cli("report", "--db", str(store_db), "--format", "html", "--out", str(out))
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert page.count("src='data:image/png;base64,") == 4
    assert "<script" not in page and "http" not in page.split("<body>", 1)[1]


def test_cli_errors_are_one_line(
    store_db: Path, fleet_db: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    line = _one_line_error(cli("report", "--db", str(store_db), "--from", "2026-01-01"))
    assert "no readings since 2026-01-01T00:00:00Z in" in line
    line = _one_line_error(cli("report", "--db", str(fleet_db), "--bus", "bus-9"))
    assert "unknown bus 'bus-9'" in line
    bad = tmp_path / "m.toml"
    text = (Path(mrv.__file__).parent / "methodology" / f"{mrv.DEFAULT}.toml").read_text()
    bad.write_text(text.replace("[parameters.ncv_gas]\nvalue = 48.0\n", "[parameters.ncv_gas]\n"))
    line = _one_line_error(cli("report", "--db", str(store_db), "--methodology", str(bad)))
    assert line.endswith(f"methodology {bad}: parameters.ncv_gas.value: missing")
    line = _one_line_error(cli("report", "--db", str(tmp_path / "none.sqlite")))
    assert "no such database file" in line
    line = _one_line_error(cli("report", "--db", str(store_db), "--to", "2025-13-01"))
    assert "not a date" in line


def test_a_store_batch_altered_after_sealing_is_left_out(store_db: Path) -> None:
    db = sqlite3.connect(store_db)
    raw = bytes(db.execute("SELECT bytes FROM batches WHERE seq=3").fetchone()[0])
    b = batch.parse(raw)
    payload = b.payload()
    payload["readings"][5]["gas_kg"] = 50.0
    forged = batch.packb(
        [batch.MAGIC, batch.VERSION, b.header_bytes, batch.packb(payload), b.signature]
    )
    db.execute("UPDATE batches SET bytes=? WHERE seq=3", (forged,))
    db.execute("DELETE FROM batches WHERE seq=7")
    db.commit()
    db.close()
    bus = report.build(store_db, fossil_co2()).data["buses"][0]
    t = bus["batches"]
    # 3 fails its payload hash; 4 still links to 3's header (the chain runs over batch ids).
    assert set(t["excluded"]) == {"batch_seq 3"}
    assert t["missing_seqs"] == [[7, 7]]
    assert bus["gas_kg"] == pytest.approx(0.05 * (4320 - 200))
    assert t["signatures"].startswith("not checked")
    assert any("missing: 7" in f for f in bus["flags"])
