"""Claims of docs/security.md that no other test file shows: what the ingest tells strangers.

Each test here is named in docs/security.md next to the claim it backs.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cngmrv.office.ingest import IngestServer, register_device
from cngmrv.signed import batch, keys

TOKEN = "operator-read-token-0123456789"


@pytest.fixture
def server(tmp_path: Path, keydir: Path) -> Iterator[IngestServer]:
    srv = IngestServer(tmp_path / "ingest.sqlite", read_token=TOKEN).start()
    register_device(srv.db, "bus-7", (keydir / keys.PUB_FILE).read_bytes())
    yield srv
    srv.stop()


def _get(srv: IngestServer, path: str, auth: str | None = None) -> tuple[int, dict]:
    host, port = urlsplit(srv.url).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path, headers={"Authorization": auth} if auth else {})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


def test_device_status_is_refused_to_strangers_alike_for_known_and_unknown_ids(
    server: IngestServer, signer: keys.FileSigner
) -> None:
    raw = batch.build(signer, "bus-7", 0, batch.ZERO_HASH, {"readings": [{"t0": 1.0}]})
    host, port = urlsplit(server.url).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/batches", body=raw)
    assert conn.getresponse().status == 201
    conn.close()
    # A stranger learns nothing, not even which ids exist.
    for auth in (None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x"):
        assert _get(server, "/v1/devices/bus-7", auth) == _get(server, "/v1/devices/bus-0", auth)
        status, body = _get(server, "/v1/devices/bus-7", auth)
        assert status == 401 and body["error"] == "unauthorized"
    status, body = _get(server, "/v1/devices/bus-7", f"Bearer {TOKEN}")
    assert status == 200 and body["last_seq"] == 0
    assert _get(server, "/v1/devices/bus-0", f"Bearer {TOKEN}")[0] == 404


def test_health_tells_strangers_only_ok(server: IngestServer) -> None:
    # A load balancer's answer: ok, the database's state and which worker answered; no counts.
    status, body = _get(server, "/v1/health")
    assert status == 200 and body["status"] == "ok"
    assert set(body) == {"status", "db", "pid"}
    status, body = _get(server, "/v1/health", f"Bearer {TOKEN}")
    assert status == 200 and "counts" in body


def test_without_a_read_token_device_status_is_off(tmp_path: Path, keydir: Path) -> None:
    srv = IngestServer(tmp_path / "ingest.sqlite").start()
    try:
        register_device(srv.db, "bus-7", (keydir / keys.PUB_FILE).read_bytes())
        for auth in (None, "Bearer ", "Bearer None"):
            assert _get(srv, "/v1/devices/bus-7", auth)[0] == 401
    finally:
        srv.stop()


def test_read_token_file_must_be_private(tmp_path: Path, cli) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o644)
    r = cli("ingest", "--db", str(tmp_path / "i.sqlite"), "--read-token-file", str(token))
    assert r.returncode == 2 and "chmod 600" in r.stderr, r.stderr


def test_every_test_the_threat_model_names_exists() -> None:
    # docs/security.md backs each claim with tests/FILE::function; a renamed test must not
    # leave a claim pointing at nothing.
    import ast
    import re

    root = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", (root / "docs/security.md").read_text()))
    assert len(named) > 20
    missing = []
    for path, func in sorted(named):
        tree = ast.parse((root / path).read_text())
        if not any(isinstance(n, ast.FunctionDef) and n.name == func for n in ast.walk(tree)):
            missing.append(f"{path}::{func}")
    assert not missing, missing
