"""One valid encoding per batch (docs/batch-format.md), through the real ingest and `cngmrv verify`.

Every re-encoding a relay can make without the device's key ((r, n-s), DER
with extra zeros or a long length, array16, a uint8 version, bin32, str8,
trailing bytes) is posted to a real IngestServer on 127.0.0.1 before and after
the genuine batch, and put beside or instead of it for the offline verifier.
None may store a second copy, raise an alarm or break the chain.  Stored
version-1 data stays valid under its legacy rules.
"""

from __future__ import annotations

import http.client
import json
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reencode import REENCODINGS, header_map16, high_s

from cngmrv.agent import cli
from cngmrv.agent.http_transport import post_batch
from cngmrv.agent.recorder import Recorder, RecorderConfig
from cngmrv.agent.store import Store
from cngmrv.office.ingest import MAX_BODY, IngestServer, register_device, stored_batches
from cngmrv.signed import batch, keys

DEV = "bus-C"


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, keys.FileSigner, list[bytes]]:
    """A real chain sealed by the recorder (readings, BOOT and STOP events)."""
    folder = tmp_path_factory.mktemp("dev")
    keys.generate(folder / "keys")
    signer = keys.load_signer(folder / "keys" / keys.KEY_FILE)
    rec = Recorder(folder / "store.sqlite", DEV, signer, RecorderConfig(readings_per_batch=5))
    rec.start()
    for i in range(30):
        rec.add([{"t0": 1000.0 + i, "dur": 1.0, "diesel_l": 0.001 * i}])
    rec.stop()
    rec.close()
    store = Store(folder / "store.sqlite", DEV)
    chain = [raw for _, raw in store.batches()]
    store.close()
    assert len(chain) >= 6
    return folder, signer, chain


@pytest.fixture
def ingest(
    tmp_path: Path, device: tuple[Path, keys.FileSigner, list[bytes]]
) -> Iterator[IngestServer]:
    srv = IngestServer(tmp_path / "ingest.sqlite").start()
    register_device(srv.db, DEV, (device[0] / "keys" / keys.PUB_FILE).read_bytes())
    yield srv
    srv.stop()


def _verify(
    capsys: pytest.CaptureFixture[str], files: dict[str, bytes], folder: Path, pub: Path
) -> tuple[int, dict]:
    shutil.rmtree(folder, ignore_errors=True)
    for name, raw in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(raw)
    with pytest.raises(SystemExit) as done:
        cli.main(["verify", str(folder), "--json", "--pubkey", f"{DEV}={pub}"])
    return int(done.value.code or 0), json.loads(capsys.readouterr().out)


def _codes(report: dict, severity: str = "bad") -> set[str]:
    return {f["code"] for f in report["findings"] if f["severity"] == severity}


def _alarms(srv: IngestServer) -> list[dict]:
    return srv.ingest.report(DEV)[0]["alarms"]


# -- the ingest ------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["reencoded_first", "genuine_first"])
@pytest.mark.parametrize("kind", sorted(REENCODINGS))
def test_a_reencoded_batch_never_stores_alarms_or_breaks_the_chain(
    ingest: IngestServer, device: tuple[Path, keys.FileSigner, list[bytes]], kind: str, order: str
) -> None:
    chain = device[2]
    for raw in chain[:3]:
        assert post_batch(ingest.url, raw).status == 201
    genuine = chain[3]
    fake = REENCODINGS[kind](genuine)
    assert fake != genuine
    posts = [fake, genuine] if order == "reencoded_first" else [genuine, fake]
    answers = [post_batch(ingest.url, raw) for raw in posts]
    by_raw = dict(zip((id(p) for p in posts), answers, strict=True))
    assert (by_raw[id(fake)].status, by_raw[id(fake)].detail) == (400, "noncanonical")
    assert (by_raw[id(genuine)].status, by_raw[id(genuine)].detail) == (201, "stored")
    # The next genuine batch still chains: nobody without the key can break it.
    assert post_batch(ingest.url, chain[4]).status == 201
    assert stored_batches(ingest.db, DEV) == list(enumerate(chain[:5]))
    assert _alarms(ingest) == []


def test_a_header_re_encoded_by_the_key_holder_is_refused_too(
    ingest: IngestServer, device: tuple[Path, keys.FileSigner, list[bytes]]
) -> None:
    _, signer, chain = device
    fake = header_map16(chain[0], signer)
    out = post_batch(ingest.url, fake)
    assert (out.status, out.detail) == (400, "noncanonical")
    assert post_batch(ingest.url, chain[0]).status == 201
    assert _alarms(ingest) == []


def test_a_duplicate_is_acknowledged_by_batch_id(
    ingest: IngestServer, device: tuple[Path, keys.FileSigner, list[bytes]]
) -> None:
    chain = device[2]
    status, first = ingest.ingest.accept(chain[0])
    again = ingest.ingest.accept(chain[0])
    assert status == 201 and again[0] == 200
    assert first["batch_id"] == again[1]["batch_id"] == batch.parse(chain[0]).batch_id.hex()
    assert (first["device_id"], first["seq"]) == (DEV, 0)


# -- cngmrv verify ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(REENCODINGS))
def test_verify_names_a_reencoded_batch_and_keeps_the_chain(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    device: tuple[Path, keys.FileSigner, list[bytes]],
    kind: str,
) -> None:
    folder, _, chain = device
    pub = folder / "keys" / keys.PUB_FILE
    files = {f"{i}.batch": raw for i, raw in enumerate(chain)}
    # Instead of the genuine batch: it is not a valid batch, but seq 4 still links.
    files["3.batch"] = REENCODINGS[kind](chain[3])
    code, report = _verify(capsys, files, tmp_path / "v", pub)
    assert code == 1 and _codes(report) == {"noncanonical"}
    assert "chain_broken" not in _codes(report) and report["ok"] == len(chain) - 1
    assert report["gaps"] == [] and _codes(report, "gap") == set()  # it occupies seq 3
    # Beside the genuine batch, in either order of the folders: a note, and the chain passes.
    for genuine_dir, copy_dir in (("a", "b"), ("b", "a")):
        files = {f"{genuine_dir}/{i}.batch": raw for i, raw in enumerate(chain)}
        files[f"{copy_dir}/3.batch"] = REENCODINGS[kind](chain[3])
        code, report = _verify(capsys, files, tmp_path / "v", pub)
        assert code == 0, report["findings"]
        assert _codes(report, "note") == {"noncanonical_copy"}
        assert report["ok"] == len(chain)


# -- version 1: stored legacy data ----------------------------------------------------------


def _v1_chain(signer: keys.FileSigner, n: int) -> list[bytes]:
    out: list[bytes] = []
    prev = batch.ZERO_HASH
    for seq in range(n):
        raw = batch.build(
            signer, DEV, seq, prev, {"readings": [{"t0": 1.0 + seq}]}, {"boot_epoch": 1}, version=1
        )
        out.append(raw)
        prev = batch.sha256(raw)  # the version-1 rule: the whole file's hash
    return out


@pytest.mark.parametrize("order", ["twin_first", "genuine_first"])
def test_v1_data_is_accepted_and_its_s_twin_is_a_duplicate(
    ingest: IngestServer, device: tuple[Path, keys.FileSigner, list[bytes]], order: str
) -> None:
    signer = device[1]
    v1 = _v1_chain(signer, 5)
    for raw in v1[:3]:
        assert post_batch(ingest.url, raw).status == 201
    twin = high_s(v1[3])  # valid under v1's rules: old signers wrote either s
    first, second = (twin, v1[3]) if order == "twin_first" else (v1[3], twin)
    assert post_batch(ingest.url, first).status == 201
    assert (post_batch(ingest.url, second).detail) == "duplicate"
    # Batch 4 chains to the genuine file's hash, whichever copy was stored.
    assert post_batch(ingest.url, v1[4]).status == 201
    # The device is upgraded: its first v2 batch continues the v1 chain.
    v2 = batch.build(signer, DEV, 5, batch.chain_id(v1[4]), {"readings": []})
    assert post_batch(ingest.url, v2).status == 201
    dev = ingest.ingest.report(DEV)[0]
    assert dev["alarms"] == [] and dev["batches"] == 6 and dev["legacy_v1"] == 5
    assert post_batch(ingest.url, REENCODINGS["array16"](v1[0])).detail == "noncanonical"


def test_verify_accepts_v1_data_and_counts_it(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    device: tuple[Path, keys.FileSigner, list[bytes]],
) -> None:
    folder, signer, _ = device
    v1 = _v1_chain(signer, 4)
    files = {f"{i}.batch": raw for i, raw in enumerate(v1)}
    files["2.batch"] = high_s(v1[2])  # the twin is in the folder; 3 links to the genuine file
    files["4.batch"] = batch.build(signer, DEV, 4, batch.chain_id(v1[3]), {"readings": []})
    code, report = _verify(capsys, files, tmp_path / "v", folder / "keys" / keys.PUB_FILE)
    assert code == 0, report["findings"]
    assert report["devices"][DEV]["legacy_v1"] == 4 and report["ok"] == 5


# -- the canonical check, as properties -------------------------------------------------------

_ENC = {
    # (shortest, alternatives) for the parts of an envelope
    "array": [
        lambda n: bytes([0x90 | n]),
        lambda n: b"\xdc" + n.to_bytes(2, "big"),
        lambda n: b"\xdd" + n.to_bytes(4, "big"),
    ],
    "uint": [
        lambda v: bytes([v]),
        lambda v: b"\xcc" + bytes([v]),
        lambda v: b"\xcd" + v.to_bytes(2, "big"),
        lambda v: b"\xce" + v.to_bytes(4, "big"),
        lambda v: b"\xcf" + v.to_bytes(8, "big"),
    ],
}


def _bin(b: bytes, width: int) -> bytes:
    tags = {1: b"\xc4", 2: b"\xc5", 4: b"\xc6"}
    return tags[width] + len(b).to_bytes(width, "big") + b


def _shortest_bin_width(n: int) -> int:
    return 1 if n < 256 else 2 if n < 65536 else 4


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arr=st.integers(0, 2),
    ver=st.integers(0, 4),
    widths=st.tuples(*[st.sampled_from([1, 2, 4])] * 3),
    str8=st.booleans(),
)
def test_only_the_shortest_envelope_parses(
    device: tuple[Path, keys.FileSigner, list[bytes]],
    arr: int,
    ver: int,
    widths: tuple[int, int, int],
    str8: bool,
) -> None:
    raw = device[2][1]
    magic, version, header, payload, sig = msgpack.unpackb(raw, raw=False)
    parts = (header, payload, sig)
    enc = (
        _ENC["array"][arr](5)
        + ((b"\xd9\x0c" if str8 else b"\xac") + magic.encode())
        + _ENC["uint"][ver](version)
        + b"".join(
            _bin(p, max(w, _shortest_bin_width(len(p)))) for p, w in zip(parts, widths, strict=True)
        )
    )
    canonical = (
        arr == 0
        and ver == 0
        and not str8
        and all(
            max(w, _shortest_bin_width(len(p))) == _shortest_bin_width(len(p))
            for p, w in zip(parts, widths, strict=True)
        )
    )
    if canonical:
        assert enc == raw and batch.parse(enc).raw == raw
    else:
        with pytest.raises(batch.NonCanonicalError):
            batch.parse(enc)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    extra=st.dictionaries(
        st.text(st.characters(codec="ascii", categories=["Ll"]), min_size=1, max_size=8).filter(
            lambda k: k not in batch.REQUIRED_HEADER + batch.DERIVED_HEADER
        ),
        st.one_of(
            st.integers(-(2**63), 2**64 - 1),
            st.floats(allow_nan=False),
            st.text(max_size=40),
            st.binary(max_size=40),
            st.booleans(),
        ),
        max_size=5,
    )
)
def test_every_built_batch_is_canonical_and_low_s(
    device: tuple[Path, keys.FileSigner, list[bytes]], extra: dict
) -> None:
    signer = device[1]
    raw = batch.build(signer, DEV, 7, batch.ZERO_HASH, {"readings": [{"t0": 1.0}]}, extra)
    b = batch.parse(raw)
    assert batch.packb(b.header) == b.header_bytes
    assert decode_dss_signature(b.signature)[1] <= keys.P256_ORDER // 2
    assert batch.check(b, keys.public_key_from_pem(signer.public_pem())) == []
    with pytest.raises(batch.NonCanonicalError, match="high s"):
        batch.parse(high_s(raw))


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_parse_fuzz_never_crashes_and_accepts_only_canonical_bytes(
    device: tuple[Path, keys.FileSigner, list[bytes]], data: st.DataObject
) -> None:
    base = data.draw(st.sampled_from(device[2][:3]))
    raw = bytearray(base)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        at = data.draw(st.integers(0, len(raw)))
        if op == "flip" and at < len(raw):
            raw[at] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[at : at + data.draw(st.integers(1, 8))]
        else:
            raw = raw[:at]
    try:
        b = batch.parse(bytes(raw))
    except batch.BatchFormatError as e:
        assert e.code in ("malformed", "truncated", "noncanonical")
        return
    # Whatever parses is in its one valid form.
    assert (
        batch.packb([batch.MAGIC, b.version, b.header_bytes, b.payload_bytes, b.signature]) == raw
    )


@given(st.binary(max_size=2000))
def test_parse_fuzz_of_arbitrary_bytes(raw: bytes) -> None:
    try:
        batch.parse(raw)
    except batch.BatchFormatError:
        pass


# -- bounded unpacking (section 5: memory blow-up) -------------------------------------------


def test_a_body_of_empty_maps_is_refused_without_building_them() -> None:
    """Old code unpacked every element first: ~80 MB of dicts for 1 MiB of ``[{}, {}, ...]``."""
    n = MAX_BODY - 5
    body = b"\xdd" + n.to_bytes(4, "big") + b"\x80" * n
    tracemalloc.start()
    try:
        with pytest.raises(batch.BatchFormatError):
            batch.parse(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_the_ingest_body_limit_fits_real_batches_and_no_more(
    ingest: IngestServer, device: tuple[Path, keys.FileSigner, list[bytes]]
) -> None:
    assert MAX_BODY == batch.MAX_BATCH_BYTES == 256 * 1024
    assert max(len(raw) for raw in device[2]) < MAX_BODY // 20
    # Old limit: 16 MiB, each byte of which the ingest read and unpacked.  The answer
    # comes from the headers alone, before any of the body is read.
    host, port = urlsplit(ingest.url).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/batches")
    conn.putheader("Content-Length", str(MAX_BODY + 1))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()


def test_a_store_upgraded_in_the_field_continues_its_v1_chain(
    tmp_path: Path, device: tuple[Path, keys.FileSigner, list[bytes]]
) -> None:
    """The old agent sealed version-1 batches; the new one seals version 2 on top of them."""
    from cngmrv.agent.recorder import Recorder
    from cngmrv.agent.store import read_head

    folder, signer, _ = device
    path = tmp_path / "store.sqlite"
    store = Store(path, DEV)
    v1 = _v1_chain(signer, 3)
    for seq, raw in enumerate(v1):
        store.import_batch(seq, raw, uploaded=False)
    store.close()
    rec = Recorder(path, DEV, signer, RecorderConfig(readings_per_batch=2))
    rec.start()
    # The head file mirrors the chain id: the last v1 file's hash until a v2 batch exists.
    head = read_head(path)
    assert head is not None and head.next_seq >= 4
    for i in range(4):
        rec.add([{"t0": 100.0 + i, "dur": 1.0}])
    rec.stop()
    rec.close()
    store = Store(path, DEV)
    chain = [raw for _, raw in store.batches()]
    store.close()
    parsed = [batch.parse(raw) for raw in chain]
    assert [p.version for p in parsed[:3]] == [1, 1, 1] and {p.version for p in parsed[3:]} == {2}
    assert parsed[3].header["prev_hash"] == batch.sha256(v1[2])
    head = read_head(path)
    assert head is not None and head.prev_hash == parsed[-1].batch_id
    pub = keys.public_key_from_pem(signer.public_pem())
    report = batch.audit(
        [(f"{i}.batch", raw) for i, raw in enumerate(chain)], batch.KeyRing.of([(DEV, pub)])
    )
    assert report.passed, report.findings
    assert report.devices[DEV].legacy_v1 == 3


def test_a_rewrapped_v1_batch_an_old_ingest_stored_neither_conflicts_nor_breaks_the_chain(
    ingest: IngestServer, device: tuple[Path, keys.FileSigner, list[bytes]]
) -> None:
    signer = device[1]
    v1 = _v1_chain(signer, 5)
    for raw in v1[:3]:
        assert post_batch(ingest.url, raw).status == 201
    # The ingest before format 2 took any msgpack container: it stored a relay's array16.
    rewrapped = REENCODINGS["array16"](v1[3])
    ingest.db.execute(
        "INSERT INTO batches(device_id, seq, sha256, prev_hash, bytes, received_at) "
        "VALUES(?, 3, ?, ?, ?, 0)",
        (DEV, batch.sha256(rewrapped), batch.sha256(v1[2]), rewrapped),
    )
    assert post_batch(ingest.url, v1[3]).detail == "duplicate"
    assert post_batch(ingest.url, v1[4]).status == 201  # links to the canonical v1 file
    assert _alarms(ingest) == []
