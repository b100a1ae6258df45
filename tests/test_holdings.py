"""The one reader of what an ingest database or a device store holds (signed/archive.Holdings):
the same devices, keys and batches from SQLite and from PostgreSQL, for the report, the
monitored totals and ``cngmrv export``/``verify`` alike.

PostgreSQL runs in a throwaway cluster (the ``pg_url`` fixture); with
CNGMRV_REQUIRE_POSTGRES=1 a machine without one fails instead of skipping.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from test_report import DAY0, STEP, make_store, reading

from cngmrv.office import report
from cngmrv.office.fleetdb import IngestDB, ReadOnlyDB
from cngmrv.office.ingest import Ingest, register_device, register_key
from cngmrv.signed import archive, keys

BUSES = {"bus-1": 7, "bus-2": 5}  # readings' batches each bus seals (3 readings a batch)


def _key(tmp: Path, name: str) -> Path:
    kdir = tmp / f"k-{name}"
    if not kdir.exists():
        keys.generate(kdir)
    return kdir


def _stores(tmp: Path) -> dict[str, Path]:
    """Each bus's signed store, made once and loaded into every database below."""
    out = {}
    for dev, n in BUSES.items():
        path = tmp / f"{dev}.sqlite"
        if not path.exists():
            signer = keys.load_signer(_key(tmp, dev) / keys.KEY_FILE)
            rs = [reading(DAY0 + i * STEP) for i in range(3 * n)]
            make_store(path, signer, dev, rs, 3).close()
        out[dev] = path
    return out


def _fill(target: str | Path, tmp: Path) -> None:
    """Both buses through the real ingest (bus-2 without its batch 2); bus-2 also trusts a
    second key from sequence 4 on; bus-3 is registered and has sent nothing."""
    db = IngestDB(target)
    ingest = Ingest(db)
    try:
        for dev, path in _stores(tmp).items():
            register_device(db, dev, (_key(tmp, dev) / keys.PUB_FILE).read_bytes())
            con = sqlite3.connect(path)
            for seq, raw in con.execute("SELECT seq, bytes FROM batches ORDER BY seq"):
                if (dev, seq) != ("bus-2", 2):
                    status, body = ingest.accept(bytes(raw))
                    assert status == 201, body
            con.close()
        register_key(db, "bus-2", (_key(tmp, "bus-2b") / keys.PUB_FILE).read_bytes(), 4)
        register_device(db, "bus-3", (_key(tmp, "bus-3") / keys.PUB_FILE).read_bytes())
    finally:
        db.close()


def _read(db: archive.Queries) -> dict[str, Any]:
    held = archive.Holdings(db, "the database")
    devices = held.devices()
    return {
        "kind": held.kind,
        "devices": devices,
        "keys": held.keys(),
        "ranges": {d: sorted(r, key=lambda k: k[1]) for d, r in held.key_ranges().items()},
        "rows": {d: held.batches(d) for d in devices},
    }


def _on(target: str | Path) -> dict[str, Any]:
    db = ReadOnlyDB(target)
    try:
        return _read(db)
    finally:
        db.close()


def test_one_reader_gives_the_same_holdings_from_sqlite_and_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    sqlite_db = tmp_path / "ingest.sqlite"
    _fill(sqlite_db, tmp_path)
    _fill(pg_url, tmp_path)
    with archive.ReadOnlySQLite(sqlite_db) as db:
        bus_side = _read(db)
    on_sqlite, on_pg = _on(sqlite_db), _on(pg_url)
    assert on_sqlite == bus_side
    assert on_pg == on_sqlite

    assert on_pg["kind"] == "ingest"
    assert on_pg["devices"] == ["bus-1", "bus-2", "bus-3"]
    assert set(on_pg["keys"]) == {"bus-1", "bus-2", "bus-3"}
    pems = (
        (_key(tmp_path, "bus-2") / keys.PUB_FILE).read_bytes(),
        (_key(tmp_path, "bus-2b") / keys.PUB_FILE).read_bytes(),
    )
    assert on_pg["ranges"]["bus-2"] == [(pems[0], 0, 3), (pems[1], 4, None)]
    # The exact bytes each bus signed, every one held and in order; bus-3 holds none.
    for dev, path in _stores(tmp_path).items():
        con = sqlite3.connect(path)
        signed = [(int(s), bytes(b)) for s, b in con.execute("SELECT seq, bytes FROM batches")]
        con.close()
        assert on_pg["rows"][dev] == [r for r in signed if (dev, r[0]) != ("bus-2", 2)]
    assert on_pg["rows"]["bus-3"] == []

    # The report reads both through it: the same buses, batches and outcome.
    def outcome(target: str | Path) -> list[tuple[Any, ...]]:
        kind, devices = report.read_source(target)
        assert kind == "ingest"
        return [(d.device_id, d.rows, [b.seq for b in d.ok], d.missing) for d in devices]

    assert outcome(pg_url) == outcome(sqlite_db)
    assert outcome(pg_url)[1][3] == [(2, 2)]


def test_a_device_store_is_one_device_without_keys(tmp_path: Path) -> None:
    path = _stores(tmp_path)["bus-1"]
    with archive.ReadOnlySQLite(path) as db:
        held = _read(db)
    assert held == _on(path)
    assert held["kind"] == "store"
    assert held["devices"] == ["bus-1"] and held["keys"] == {} and held["ranges"] == {}
    assert [s for s, _ in held["rows"]["bus-1"]] == list(range(BUSES["bus-1"]))
    with archive.ReadOnlySQLite(path) as db:
        assert archive.Holdings(db, path).batches("bus-9") == []
    assert archive.read_batches(path, "bus-9") == []
    assert [(d, s) for d, s, _ in archive.read_batches(path)] == [
        ("bus-1", s) for s in range(BUSES["bus-1"])
    ]
