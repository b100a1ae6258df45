"""The fleet database on SQLite and a real PostgreSQL: schema versions, migrations, the report.

PostgreSQL runs in a throwaway cluster (sim/pg_cluster.py); without its
binaries these tests skip, and fail under CNGMRV_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_report import DAY0, STEP, make_store, reading

from cngmrv.office import monitored, mrv, report
from cngmrv.office.fleetdb import (
    SCHEMA_VERSION,
    IngestDB,
    IngestError,
    ReadOnlyDB,
    SchemaMismatch,
)
from cngmrv.office.ingest import Ingest, register_device
from cngmrv.signed import keys


def _fleet_readings() -> dict[str, list[dict[str, Any]]]:
    """Three buses over two days: cross-check fields, a refill, an unsynced clock, midnight."""
    a, counter, tank = [], 1000.0, 80.0
    for i in range(1500):
        counter += 0.1 + (i % 7) * 0.013
        tank -= 0.05 * 1.02 + (i % 5) * 0.001
        if i == 700:
            tank += 40.0
        if i % 50 == 25:
            tank += 0.3  # the pressure sensor's jitter: a rise, but no refill
        a.append(
            reading(
                DAY0 + 20 * 3600 + i * STEP + 0.25,
                diesel_l=0.1 + (i % 3) * 0.01,
                lfc_total_l=round(counter * 2) / 2,  # the counter's 0.5 L steps
                gas_kg_events=0.05 * 1.2,
                tank_kg=tank,
                epoch=1 if i < 900 else 2,
            )
        )
    b = [
        reading(DAY0 + i * STEP, gas_cov=0.5 if i % 11 == 0 else 1.0, clock="free")
        for i in range(700)
    ]
    c = [reading(DAY0 + 86400 + i * STEP + 13.5, gas_kg=0.07) for i in range(400)]
    return {"bus-a": a, "bus-b": b, "bus-c": c}


def _load(target: str | Path, tmp: Path, skip: tuple[int, ...] = ()) -> None:
    """Every bus through the real ingest; bus-b's batches in ``skip`` are never sent."""
    db = IngestDB(target)
    ingest = Ingest(db)
    try:
        for dev, rs in _fleet_readings().items():
            kdir = tmp / f"k-{dev}"
            if not kdir.exists():
                keys.generate(kdir)
            register_device(db, dev, (kdir / keys.PUB_FILE).read_bytes())
            store_path = tmp / f"{dev}.sqlite"
            if not store_path.exists():
                make_store(store_path, keys.load_signer(kdir / keys.KEY_FILE), dev, rs, 97).close()
            con = sqlite3.connect(store_path)
            for seq, raw in con.execute("SELECT seq, bytes FROM batches ORDER BY seq"):
                if dev == "bus-b" and seq in skip:
                    continue
                status, body = ingest.accept(bytes(raw))
                assert status == 201, body
            con.close()
    finally:
        db.close()


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("generated_at", "source")}


PERIODS = [
    (None, None),
    ("2025-03-01", "2025-03-01"),  # whole days: answered from the sums alone
    ("2025-03-01T10:30:00", "2025-03-02T01:07:30"),  # cuts hours: those batches are decoded
]


def _both_ways(target: str | Path, m: mrv.Methodology) -> list[dict[str, Any]]:
    out = []
    for lo, hi in PERIODS:
        start = report.parse_when(lo) if lo else None
        end = report.parse_when(hi, end=True) if hi else None
        kept = report.build(target, m, start, end)
        again = report.build(target, m, start, end, recompute=True)
        assert kept.data["source"]["totals"] != again.data["source"]["totals"]
        assert _comparable(kept.data) == _comparable(again.data), (lo, hi)
        assert kept.hourly == again.hourly
        out.append(_comparable(kept.data))
    return out


def test_kept_sums_and_recompute_agree_exactly_on_sqlite_and_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    sqlite_db = tmp_path / "ingest.sqlite"
    _load(sqlite_db, tmp_path, skip=(3,))
    _load(pg_url, tmp_path, skip=(3,))
    m = mrv.load()
    on_sqlite = _both_ways(sqlite_db, m)
    on_pg = _both_ways(pg_url, m)
    assert on_sqlite == on_pg
    full = on_sqlite[0]
    by = {b["device_id"]: b for b in full["buses"]}
    assert by["bus-b"]["batches"]["missing_seqs"] == [[3, 3]]
    assert by["bus-a"]["cross_checks"]["gas_tank_balance"]["refills"] == 1
    assert by["bus-a"]["boot_epochs"] == [1, 2]
    assert [d["date"] for d in by["bus-a"]["days"]] == ["2025-03-01", "2025-03-02"]
    # Against the per-reading sums, which both ways regroup: equal up to rounding.
    assert by["bus-c"]["gas_kg"] == pytest.approx(400 * 0.07)
    # A threshold under the tank's own steps classifies them otherwise: rows say so and
    # those batches are decoded, still agreeing exactly.
    strict = dataclasses.replace(m, refill_threshold_kg=0.1)
    assert (
        _both_ways(pg_url, strict)[0]["buses"][0]["cross_checks"]["gas_tank_balance"]["refills"] > 1
    )


def _old_database(path: Path, tmp: Path) -> None:
    """An ingest database as the cngmrv before schema versions wrote it."""
    _load(path, tmp)
    con = sqlite3.connect(path)
    con.executescript("DROP TABLE batch_runs; DROP TABLE schema_version;")
    con.close()


def test_an_older_database_is_refused_until_migrated(tmp_path: Path, cli: Callable) -> None:
    path = tmp_path / "old.sqlite"
    _old_database(path, tmp_path)
    with pytest.raises(SchemaMismatch, match=r"schema version 0, .* --migrate"):
        IngestDB(path)
    # Until migrated the report decodes every batch, with the same figures.
    assert report.build(path, mrv.load()).data["source"]["totals"].startswith("recomputed")
    r = cli("ingest", "--db", str(path), "--migrate")
    assert r.returncode == 0, r.stderr
    assert f"migrated from schema version 0 to schema version {SCHEMA_VERSION}" in r.stdout
    r = cli("ingest", "--db", str(path), "--migrate")
    assert "already at" in r.stdout
    IngestDB(path).close()
    _both_ways(path, mrv.load())


def test_a_newer_database_is_left_alone_with_one_line(
    tmp_path: Path, pg_url: str, cli: Callable
) -> None:
    db = IngestDB(pg_url)
    db.execute(
        "INSERT INTO schema_version(version, what, applied_at, by_cngmrv) VALUES(?, ?, ?, ?)",
        (SCHEMA_VERSION + 1, "from the future", 0.0, "9.9"),
    )
    db.close()
    for args in (["--migrate"], ["--port", "0"], ["--report"]):
        r = cli("ingest", "--db", pg_url, *args)
        assert r.returncode == 2, (args, r.stderr)
        (line,) = r.stderr.strip().splitlines()
        assert "written by a newer cngmrv" in line and "upgrade cngmrv" in line
    r = cli("report", "--db", pg_url)
    (line,) = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "newer cngmrv" in line
    db = IngestDB(pg_url, check_version=False)
    assert db.version() == SCHEMA_VERSION + 1
    assert db.one("SELECT count(*) FROM schema_version")[0] == SCHEMA_VERSION + 1
    db.close()


def test_a_server_stops_writing_when_a_newer_cngmrv_migrates_under_it(
    tmp_path: Path, pg_url: str, signer: keys.FileSigner, keydir: Path
) -> None:
    import json
    import urllib.error
    import urllib.request

    from cngmrv.office.ingest import IngestServer
    from cngmrv.signed import batch

    server = IngestServer(pg_url).start()
    try:
        register_device(server.db, "bus-x", (keydir / keys.PUB_FILE).read_bytes())
        raw = batch.build(signer, "bus-x", 0, batch.ZERO_HASH, {"readings": [reading(DAY0)]})
        other = IngestDB(pg_url)
        other.execute(
            "INSERT INTO schema_version(version, what, applied_at, by_cngmrv) VALUES(?, ?, ?, ?)",
            (SCHEMA_VERSION + 1, "a newer cngmrv", 0.0, "9.9"),
        )
        other.close()
        req = urllib.request.Request(server.url, data=raw, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 503 and e.value.headers["Retry-After"]
        assert "newer cngmrv" in json.loads(e.value.read())["reason"]
        assert server.db.one("SELECT count(*) FROM batches")[0] == 0
    finally:
        server.stop()


def test_wrong_or_unreachable_database_urls_get_one_line(
    tmp_path: Path, pg_url: str, cli: Callable
) -> None:
    bad = [
        pg_url.replace("/t", "/nosuchdb_t", 1),  # the server is there, the database is not
        f"postgresql://postgres:secret@/db?host={tmp_path}&port=1",  # nothing listens there
        "postgresql://postgres@[bad",  # not a URL
    ]
    for url in bad:
        for cmd in (["ingest", "--db", url, "--port", "0"], ["report", "--db", url]):
            r = cli(*cmd, timeout=60)
            assert r.returncode == 2, (cmd, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
            assert "secret" not in r.stderr
            assert "cannot" in lines[0] or "invalid" in lines[0], lines[0]


def test_a_report_over_a_period_without_data_says_so(tmp_path: Path, pg_url: str) -> None:
    _load(pg_url, tmp_path)
    quiet = datetime(2024, 1, 1, tzinfo=UTC)
    with pytest.raises(report.ReportError, match=r"^no readings between 2024-01-01.* in post"):
        report.build(pg_url, mrv.load(), quiet, quiet.replace(month=2))


def test_migrations_on_postgresql_backfill_the_sums(tmp_path: Path, pg_url: str) -> None:
    _load(pg_url, tmp_path)
    db = IngestDB(pg_url)
    n = db.one("SELECT count(*) FROM batch_runs")[0]
    # Back to a schema version 1 database: no sums, alarms without batch id and repeats.
    db.execute("DROP TABLE batch_runs")
    db.execute("ALTER TABLE alarms DROP COLUMN batch_id")
    db.execute("ALTER TABLE alarms DROP COLUMN repeats")
    db.execute("DELETE FROM schema_version WHERE version >= 2")
    db.close()
    with pytest.raises(SchemaMismatch, match="schema version 1"):
        IngestDB(pg_url)
    IngestDB(pg_url, migrate=True).close()
    db = IngestDB(pg_url)
    assert db.version() == SCHEMA_VERSION
    assert db.one("SELECT count(*) FROM batch_runs")[0] == n
    assert db.one("SELECT count(*) FROM alarms WHERE repeats = 1 AND batch_id IS NULL")
    db.close()
    _both_ways(pg_url, mrv.load())


@pytest.mark.parametrize("change", ["21:30:00", "21:00:00"])
def test_a_blend_change_inside_a_stored_hour_agrees_with_recompute(
    tmp_path: Path, change: str
) -> None:
    # The ingest's sums hold no blend: the report labels each stored hour with the blend in
    # force, and decodes the batches of an hour that a change of blend cuts (21:30), or a
    # run that straddles it (21:00, an hour's first instant).
    project = tmp_path / "blend.toml"
    project.write_text(
        '[methodology]\nbase = "jcm-id-dual-fuel-bus"\nversion = "2.0.0+blend-test"\n'
        f'[[blend]]\nname = "B0"\nfrom = 2000-01-01\nto = 2025-03-01T{change}Z\n'
        'fame_share_vol = 0.0\nsource = "test"\n'
        f'[[blend]]\nname = "B40"\nfrom = 2025-03-01T{change}Z\nfame_share_vol = 0.4\n'
        'source = "test"\n'
    )
    m = mrv.load(project)
    db = tmp_path / "ingest.sqlite"
    _load(db, tmp_path)
    full = _both_ways(db, m)[0]
    by = {b["device_id"]: b for b in full["buses"]}
    shares = [p["fame_share_vol"] for p in by["bus-a"]["blend_parts"]]
    assert shares == [0.0, 0.4]
    assert [p["fame_share_vol"] for p in by["bus-c"]["blend_parts"]] == [0.4]


def _in_processes(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Make every fleet report gather in ``n`` processes; the list counts the times it did."""
    calls: list[int] = []
    parallel = monitored._kept_in_parallel

    def counted(db: ReadOnlyDB, slices: list[list[str]], args: Any) -> monitored.Totals:
        calls.append(len(slices))
        return parallel(db, slices, args)

    monkeypatch.setattr(monitored, "processes_for", lambda devices: n)
    monkeypatch.setattr(monitored, "_kept_in_parallel", counted)
    return calls


def test_gathering_in_several_processes_changes_no_bit(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite_db = tmp_path / "ingest.sqlite"
    _load(sqlite_db, tmp_path, skip=(3,))
    _load(pg_url, tmp_path, skip=(3,))
    m = mrv.load()
    serial = {target: _both_ways(target, m) for target in (sqlite_db, pg_url)}
    for n in (2, 3):
        with monkeypatch.context() as mp:
            calls = _in_processes(mp, n)
            for target in (sqlite_db, pg_url):
                # Each period's kept-sums report (the recompute is never split) in n slices.
                assert _both_ways(target, m) == serial[target]
            assert calls == [n] * 2 * len(PERIODS)
    # One bus is never split.
    calls = _in_processes(monkeypatch, 3)
    one = report.build(pg_url, m, bus="bus-b")
    assert calls == [] and [b["device_id"] for b in one.data["buses"]] == ["bus-b"]


def test_an_error_in_another_process_is_the_reports_error(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bus-c drives on 2 March, after the schedule's only blend: its process (the last
    # slice, not this one) finds no blend for its readings.
    project = tmp_path / "short.toml"
    project.write_text(
        '[methodology]\nbase = "jcm-id-dual-fuel-bus"\nversion = "2.0.0+short"\n'
        '[[blend]]\nname = "B0"\nfrom = 2000-01-01\nto = 2025-03-02T00:00:00Z\n'
        'fame_share_vol = 0.0\nsource = "test"\n'
    )
    _load(pg_url, tmp_path)
    calls = _in_processes(monkeypatch, 3)
    with pytest.raises(report.ReportError, match=r"no diesel blend .* for 2025-03-02"):
        report.build(pg_url, mrv.load(project))
    assert calls == [3]


def test_a_gathering_process_that_dies_is_named(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    _load(pg_url, tmp_path)
    _in_processes(monkeypatch, 3)
    # A process killed before it answers (out of memory, say): the report stops and says which.
    monkeypatch.setattr(monitored, "_answer", lambda *args: os._exit(9))
    with pytest.raises(IngestError, match=r"gathering bus-b\.\.bus-b ended without an answer"):
        report.build(pg_url, mrv.load())


def _send_late(target: str | Path, tmp: Path, seq: int) -> None:
    """bus-b's batch ``seq`` (held back by ``_load(skip=...)``) through the real ingest now."""
    con = sqlite3.connect(tmp / "bus-b.sqlite")
    (raw,) = con.execute("SELECT bytes FROM batches WHERE seq = ?", (seq,)).fetchone()
    con.close()
    db = IngestDB(target)
    try:
        status, body = Ingest(db).accept(bytes(raw))
        assert status == 201, body
    finally:
        db.close()


def _counts(db: ReadOnlyDB) -> tuple[int, int]:
    batches = db.all("SELECT count(*) FROM batches")[0][0]
    runs = db.all("SELECT count(*) FROM batch_runs")[0][0]
    return int(batches), int(runs)


def test_a_report_reads_one_moment_while_the_ingest_stores(tmp_path: Path, pg_url: str) -> None:
    """A batch stored between two of a report's queries is in neither, not in one of them:
    the sums and the hashes they name come from one snapshot (and, on PostgreSQL, every
    gathering process joins it)."""
    for target in (tmp_path / "ingest.sqlite", pg_url):
        _load(target, tmp_path, skip=(3,))
        reading = ReadOnlyDB(target)
        try:
            before = _counts(reading)
            snapshot = reading.snapshot()
            _send_late(target, tmp_path, 3)
            assert _counts(reading) == before
            if target == pg_url:
                assert snapshot is not None
                joined = ReadOnlyDB(target, snapshot)
                try:
                    assert _counts(joined) == before
                finally:
                    joined.close()
            else:
                assert snapshot is None
        finally:
            reading.close()
        fresh = ReadOnlyDB(target)
        try:
            assert _counts(fresh)[0] == before[0] + 1
        finally:
            fresh.close()
    with pytest.raises(ValueError, match="snapshot id"):
        ReadOnlyDB(pg_url, "1'; DROP TABLE batches; --")
