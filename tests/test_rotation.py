"""Key rotation and revocation: through the chain, out of band, and a stolen key refused.

The four cases docs/security.md lists under key rotation and revocation,
each through the real recorder and store on the bus side, the real ingest
(HTTP on 127.0.0.1 where the answer matters) and ``cngmrv verify`` as a
subprocess.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cngmrv.agent.recorder import Recorder, RecorderConfig
from cngmrv.agent.store import Store
from cngmrv.agent.upload import post_batch
from cngmrv.office.ingest import Ingest, IngestServer, register_device, register_key
from cngmrv.signed import batch, keys

DEV = "bus-9"


def _signer(folder: Path) -> keys.FileSigner:
    keys.generate(folder)
    return keys.load_signer(folder / keys.KEY_FILE)


def _reading(i: int) -> dict[str, Any]:
    return {"t0": 1000.0 + i, "dur": 1.0, "diesel_l": 0.001 * (i % 7)}


@pytest.fixture
def rotated(tmp_path: Path) -> Iterator[tuple[list[bytes], int, Path, Path]]:
    """A bus that rotates from key A to key B mid-chain: (batches, rotation seq, A.pub, B.pub)."""
    old, new = _signer(tmp_path / "a"), _signer(tmp_path / "b")
    rec = Recorder(tmp_path / "store.sqlite", DEV, old, RecorderConfig(readings_per_batch=5))
    rec.start()
    for i in range(12):
        rec.add([_reading(i)])
    announced = rec.rotate(new)
    for i in range(12, 24):
        rec.add([_reading(i)])
    rec.stop()
    rec.close()
    store = Store(tmp_path / "store.sqlite", DEV)
    raws = [raw for _, raw in store.batches()]
    store.close()
    yield raws, announced.seq, tmp_path / "a" / keys.PUB_FILE, tmp_path / "b" / keys.PUB_FILE


@pytest.fixture
def server(tmp_path: Path) -> Iterator[IngestServer]:
    srv = IngestServer(tmp_path / "ingest.sqlite").start()
    yield srv
    srv.stop()


def _kid(raw: bytes) -> str:
    return str(batch.parse(raw).header["kid"])


def _alarms(srv: IngestServer) -> list[dict[str, Any]]:
    return Ingest(srv.db).report(DEV)[0]["alarms"]


def _export(raws: list[bytes], folder: Path) -> Path:
    folder.mkdir()
    for raw in raws:
        (folder / f"{batch.parse(raw).seq}.batch").write_bytes(raw)
    return folder


def test_a_rotation_mid_chain_is_followed_by_the_ingest_and_verify(
    rotated: tuple[list[bytes], int, Path, Path], server: IngestServer, tmp_path: Path, cli
) -> None:
    raws, at, a_pub, b_pub = rotated
    kid_a, kid_b = (keys.kid_of(keys.load_public_key(p)) for p in (a_pub, b_pub))
    assert {_kid(r) for r in raws[: at + 1]} == {kid_a}
    assert {_kid(r) for r in raws[at + 1 :]} == {kid_b} and len(raws) > at + 2
    # The ingest knows only key A; it learns B from the chain itself.
    register_device(server.db, DEV, a_pub.read_bytes())
    assert [post_batch(server.url, r).status for r in raws] == [201] * len(raws)
    report = Ingest(server.db).report(DEV)[0]
    assert report["signed_by"] == [[kid_a, 0, at], [kid_b, at + 1, len(raws) - 1]]
    assert [(k["kid"], k["valid_from"], k["valid_until"]) for k in report["keys"]] == [
        (kid_a, 0, at),
        (kid_b, at + 1, None),
    ]
    assert report["alarms"] == []
    # verify, trusting only key A, follows the chain to B and shows which key signed what.
    r = cli("verify", str(_export(raws, tmp_path / "out")), "--pubkey", f"{DEV}={a_pub}", "--json")
    assert r.returncode == 0, r.stdout
    assert json.loads(r.stdout)["devices"][DEV]["key_ranges"] == [
        [kid_a, 0, at],
        [kid_b, at + 1, len(raws) - 1],
    ]


def test_a_revoked_keys_later_batches_are_refused_and_filed_as_alarms(
    tmp_path: Path, server: IngestServer, cli
) -> None:
    signer = _signer(tmp_path / "k")
    pub = tmp_path / "k" / keys.PUB_FILE
    register_device(server.db, DEV, pub.read_bytes())
    raws, prev = [], batch.ZERO_HASH
    for seq in range(6):
        raws.append(batch.build(signer, DEV, seq, prev, {"readings": [_reading(seq)]}))
        prev = batch.chain_id(raws[-1])
    for raw in raws[:5]:
        assert post_batch(server.url, raw).status == 201
    db = str(tmp_path / "ingest.sqlite")
    # The operator revokes the key from batch 3: the stored 3 and 4 become alarms, 5 is refused.
    r = cli("ingest", "--db", db, "--revoke", f"{DEV}={signer.kid}@3")
    assert r.returncode == 0, r.stderr
    assert "2 stored batches" in r.stderr
    out = post_batch(server.url, raws[5])
    assert (out.status, out.acknowledged) == (403, False)
    assert "key_not_valid" in out.detail
    kinds = [(a["seq"], a["kind"]) for a in _alarms(server)]
    assert kinds == [(3, "revoked_key"), (4, "revoked_key"), (5, "key_not_valid")]
    # Batches before the revocation are still fine.
    assert post_batch(server.url, raws[2]).status == 200
    # verify, trusting the ingest's registry, flags the stored batches past the revocation,
    # and shows the ingest's alarms (the refused batch 5 is only there).
    v = cli("verify", "--db", db, "--registry", db, "--json")
    assert v.returncode == 1
    bad = [
        (f["code"], f["seq"]) for f in json.loads(v.stdout)["findings"] if f["severity"] == "bad"
    ]
    assert bad == [
        ("key_not_valid", 3),
        ("key_not_valid", 4),
        ("ingest_alarm", 3),
        ("ingest_alarm", 4),
        ("ingest_alarm", 5),
    ], bad


def test_a_key_revoked_from_a_time_refuses_what_it_signed_after_by_either_clock(
    tmp_path: Path, server: IngestServer, cli
) -> None:
    signer = _signer(tmp_path / "k")
    register_device(server.db, DEV, (tmp_path / "k" / keys.PUB_FILE).read_bytes())
    # Device clock: batch n starts at 1000 + n, except batch 2, dated in 2096, and batch 6,
    # a thief's, dated back to 1000.
    dated = {2: 4e9, 6: 1000.0}
    raws, prev = [], batch.ZERO_HASH
    for seq in range(7):
        reading = {**_reading(seq), "t0": dated.get(seq, 1000.0 + seq)}
        raws.append(batch.build(signer, DEV, seq, prev, {"readings": [reading]}))
        prev = batch.chain_id(raws[-1])
    for raw in raws[:3]:
        assert post_batch(server.url, raw).status == 201
    when = datetime.now(UTC)
    time.sleep(0.05)
    for raw in raws[3:5]:
        assert post_batch(server.url, raw).status == 201
    db = str(tmp_path / "ingest.sqlite")
    r = cli("ingest", "--db", db, "--revoke", f"{DEV}={signer.kid}@{when.isoformat()}")
    assert r.returncode == 0, r.stderr
    # Batch 2 is after by the device's clock, 3 and 4 by the ingest's.
    assert "from batch 2" in r.stderr and "3 stored batches" in r.stderr
    for raw in raws[5:]:
        out = post_batch(server.url, raw)
        assert (out.status, "key_not_valid" in out.detail) == (403, True)
    kinds = [(a["seq"], a["kind"]) for a in _alarms(server)]
    assert kinds == [
        (2, "revoked_key"),
        (3, "revoked_key"),
        (4, "revoked_key"),
        (5, "key_not_valid"),
        (6, "key_not_valid"),
    ]
    assert post_batch(server.url, raws[1]).status == 200


def test_a_revocation_time_in_the_past_covers_every_batch_stored_since(
    tmp_path: Path, server: IngestServer, cli
) -> None:
    # All five stored now, their device times long ago: a time in the past by the ingest's
    # clock (a stolen key noticed late) catches every batch stored since.
    signer = _signer(tmp_path / "k")
    register_device(server.db, DEV, (tmp_path / "k" / keys.PUB_FILE).read_bytes())
    prev = batch.ZERO_HASH
    for seq in range(5):
        raw = batch.build(signer, DEV, seq, prev, {"readings": [_reading(seq)]})
        prev = batch.chain_id(raw)
        assert post_batch(server.url, raw).status == 201
    db = str(tmp_path / "ingest.sqlite")
    r = cli("ingest", "--db", db, "--revoke", f"{DEV}={signer.kid}@2000-01-01T07:00:00+07:00")
    assert r.returncode == 0, r.stderr
    assert "from batch 0" in r.stderr and "5 stored batches" in r.stderr
    bad = cli("ingest", "--db", db, "--revoke", f"{DEV}={signer.kid}@2000-01-01T07:00:00")
    assert bad.returncode != 0 and "needs its zone" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_stolen_old_key_used_after_rotation_is_refused_with_an_alarm(
    rotated: tuple[list[bytes], int, Path, Path], server: IngestServer, tmp_path: Path, cli
) -> None:
    raws, at, a_pub, _ = rotated
    register_device(server.db, DEV, a_pub.read_bytes())
    for r in raws:
        assert post_batch(server.url, r).status == 201
    # The thief copied key A before the rotation and signs the next batch with it.
    thief = keys.load_signer(tmp_path / "a" / keys.KEY_FILE)
    forged = batch.build(
        thief, DEV, len(raws), batch.chain_id(raws[-1]), {"readings": [_reading(99)]}
    )
    out = post_batch(server.url, forged)
    assert out.status == 403 and "key_not_valid" in out.detail
    alarms = _alarms(server)
    assert [(a["seq"], a["kind"]) for a in alarms] == [(len(raws), "key_not_valid")]
    # verify refuses it too, naming why, while the genuine chain still verifies.
    folder = _export([*raws, forged], tmp_path / "out")
    r = cli("verify", str(folder), "--pubkey", f"{DEV}={a_pub}", "--json")
    assert r.returncode == 1
    bad = [f for f in json.loads(r.stdout)["findings"] if f["severity"] == "bad"]
    assert [(f["code"], f["seq"]) for f in bad] == [("key_not_valid", len(raws))], bad


def test_a_rotation_in_a_batch_that_never_arrives_is_a_gap_then_recovered_out_of_band(
    rotated: tuple[list[bytes], int, Path, Path], server: IngestServer, tmp_path: Path, cli
) -> None:
    raws, at, a_pub, b_pub = rotated
    register_device(server.db, DEV, a_pub.read_bytes())
    for r in raws[:at]:
        assert post_batch(server.url, r).status == 201
    # Batch `at` (the announcement) is lost; key B's batches are not trusted yet.
    after = raws[at + 1 :]
    assert {post_batch(server.url, r).status for r in after} == {403}
    assert _alarms(server) == []  # an unknown key is a refusal, not a tamper alarm
    # The operator registers key B out of band (cngmrv ingest --register DEV=B.pub@SEQ),
    # from the batch after the lost one; the bus's blocked uploads then go through.
    assert register_key(server.db, DEV, b_pub.read_bytes(), at + 1) == _kid(after[0])
    outs = [post_batch(server.url, r) for r in after]
    assert [o.status for o in outs] == [201] * len(after)
    assert Ingest(server.db).report(DEV)[0]["gaps"] == [[at, at]]
    # The lost batch turns up later: it fills the gap, and its announcement agrees.
    assert post_batch(server.url, raws[at]).status == 201
    report = Ingest(server.db).report(DEV)[0]
    assert report["gaps"] == [] and report["alarms"] == []
    # verify with the ingest's registry follows the out-of-band key too.
    db = str(tmp_path / "ingest.sqlite")
    v = cli("verify", "--db", db, "--registry", db, "--json")
    assert v.returncode == 0, v.stdout
    # And key A, ended by the registration, can no longer sign past the lost batch.
    thief = keys.load_signer(tmp_path / "a" / keys.KEY_FILE)
    forged = batch.build(thief, DEV, len(raws), batch.chain_id(raws[-1]), {"readings": []})
    assert post_batch(server.url, forged).status == 403


def test_rotate_key_on_the_command_line_hands_a_stopped_agents_chain_over(
    tmp_path: Path, cli
) -> None:
    _signer(tmp_path / "a")
    _signer(tmp_path / "b")
    for name, key in (("old.toml", "a"), ("new.toml", "b")):
        (tmp_path / name).write_text(
            f'[device]\nid = "{DEV}"\nkey_file = "{key}/device.key"\n[can]\ninterface = "virtual"\n'
            'channel = "c"\n[store]\npath = "store.sqlite"\n[batch]\nreadings_per_batch = 5\n'
        )
    old = keys.load_signer(tmp_path / "a" / keys.KEY_FILE)
    rec = Recorder(tmp_path / "store.sqlite", DEV, old, RecorderConfig(readings_per_batch=5))
    rec.start()
    rec.add([_reading(i) for i in range(7)])
    rec.stop()
    rec.close()
    r = cli(
        "rotate-key", "--config", str(tmp_path / "old.toml"), "--to", str(tmp_path / "new.toml")
    )
    assert r.returncode == 0, r.stderr
    assert "announces key" in r.stdout
    a_pub = tmp_path / "a" / keys.PUB_FILE
    v = cli(
        "verify", "--db", str(tmp_path / "store.sqlite"), "--pubkey", f"{DEV}={a_pub}", "--json"
    )
    assert v.returncode == 0, v.stdout
    ranges = json.loads(v.stdout)["devices"][DEV]["key_ranges"]
    b_kid = keys.kid_of(keys.load_public_key(tmp_path / "b" / keys.PUB_FILE))
    assert [k for k, _, _ in ranges] == [old.kid, b_kid]  # the STOP after it is B's


@pytest.mark.parametrize("recompute", [False, True])
def test_the_report_names_each_keys_range_and_leaves_out_a_revoked_keys_batches(
    rotated_report: tuple[Path, int], recompute: bool
) -> None:
    from mrv_helpers import fossil_co2

    from cngmrv.office import report

    path, announced = rotated_report
    d = report.build(path, fossil_co2(), recompute=recompute).data
    (bus,) = d["buses"]
    trace = bus["batches"]
    # Key A signed 0..announced (the rotation's batch), B the rest; B was revoked from
    # announced + 3 after everything was stored: those are left out, with the reason, in
    # both ways of summing.
    (a, first_a, last_a), (b, first_b, last_b) = trace["signed_by"]
    assert a != b and (first_a, last_a, first_b, last_b) == (
        0,
        announced,
        announced + 1,
        announced + 2,
    )
    excluded = sorted(int(k.split()[-1]) for k in trace["excluded"])
    assert excluded == list(range(announced + 3, 11)), trace["excluded"]
    assert all(
        "revoked" in " ".join(v) or "key_not_valid" in " ".join(v) or "outside" in " ".join(v)
        for v in trace["excluded"].values()
    ), trace["excluded"]
    assert bus["flagged"]
    # Each reading holds 0.05 kg gas: the left-out batches' readings are not in the total.
    db = sqlite3.connect(path)
    counted = sum(
        batch.parse(bytes(raw)).n_readings or 0
        for seq, raw in db.execute("SELECT seq, bytes FROM batches")
        if seq not in excluded
    )
    db.close()
    assert counted < 80 and d["gas_kg"] == pytest.approx(counted * 0.05)


@pytest.fixture
def rotated_report(tmp_path: Path) -> tuple[Path, int]:
    """An ingest database: key A for batches 0..3, rotated to B (announced in 3), B revoked
    from 6 after 0..7 were stored; ten report-shaped readings a batch."""
    from test_report import DAY0, STEP, reading

    from cngmrv.office.ingest import open_db, revoke_key

    a, b = _signer(tmp_path / "a"), _signer(tmp_path / "b")
    rec = Recorder(tmp_path / "store.sqlite", DEV, a, RecorderConfig(readings_per_batch=10))
    rec.start()
    rows = [reading(DAY0 + i * STEP) for i in range(80)]
    for r in rows[:30]:
        rec.add([r])
    # 30 readings sealed as 0..2; the rotation seals what is buffered (none) and announces B.
    announced = rec.rotate(b).seq
    for r in rows[30:]:
        rec.add([r])
    rec.stop()
    rec.close()
    store = Store(tmp_path / "store.sqlite", DEV)
    raws = [raw for _, raw in store.batches()]
    store.close()
    db_path = tmp_path / "ingest.sqlite"
    db = open_db(db_path)
    register_device(db, DEV, (tmp_path / "a" / keys.PUB_FILE).read_bytes())
    ing = Ingest(db)
    for raw in raws:
        assert ing.accept(raw)[0] == 201
    revoke_key(db, DEV, b.kid, announced + 3)
    db.close()
    return db_path, announced
