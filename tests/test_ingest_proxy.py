"""The shipped nginx config (deploy/office/nginx.conf) in front of a real ingest, over real TLS."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cngmrv.agent.http_transport import post_batch
from cngmrv.office.ingest import register_device, stored_batches
from cngmrv.office.ingest_serve import IngestServer
from cngmrv.signed import batch, keys
from cngmrv.sim.agent_process import free_tcp_port

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "office" / "nginx.conf"


def _nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if not found:
        pytest.skip("nginx is not installed (Debian package nginx): the proxy config is untested")
    return found


def _self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def proxied(
    tmp_path: Path, keydir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[IngestServer, str]]:
    nginx = _nginx()
    srv = IngestServer(tmp_path / "ingest.sqlite").start()
    register_device(srv.db, "bus-7", (keydir / keys.PUB_FILE).read_bytes())
    upstream_port = int(srv.url.split(":")[2].split("/")[0])
    cert, key = _self_signed(tmp_path)
    https, http = free_tcp_port(), free_tcp_port()
    site = (
        SHIPPED.read_text()
        .replace("127.0.0.1:8080", f"127.0.0.1:{upstream_port}")
        .replace("listen 443 ssl;", f"listen 127.0.0.1:{https} ssl;")
        .replace("listen 80;", f"listen 127.0.0.1:{http};")
        .replace("/etc/letsencrypt/live/ingest.example.org/fullchain.pem", str(cert))
        .replace("/etc/letsencrypt/live/ingest.example.org/privkey.pem", str(key))
    )
    site = "\n".join(line for line in site.splitlines() if "listen [::]" not in line)
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{\n access_log off;\n client_body_temp_path {tmp_path};\n"
        f" proxy_temp_path {tmp_path};\n include {tmp_path}/site.conf;\n}}\n"
    )
    check = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(
        [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        stderr=subprocess.DEVNULL,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the agent trusts the test's certificate
    base = f"https://127.0.0.1:{https}"
    ctx = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"{base}/v1/health", timeout=2, context=ctx):
                break
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                srv.stop()
                pytest.fail(f"nginx did not start: {(tmp_path / 'error.log').read_text()}")
            time.sleep(0.1)
    yield srv, base
    proc.terminate()
    proc.wait(10)
    srv.stop()


def test_batches_go_through_the_tls_proxy_and_its_limits_hold(
    proxied: tuple[IngestServer, str], signer: keys.FileSigner
) -> None:
    srv, base = proxied
    raw = batch.build(signer, "bus-7", 0, batch.ZERO_HASH, {"readings": [{"t0": 1.0}]})
    first = post_batch(f"{base}/v1/batches", raw)
    assert (first.status, first.detail) == (201, "stored")
    assert post_batch(f"{base}/v1/batches", raw).status == 200
    assert stored_batches(srv.db, "bus-7") == [(0, raw)]
    # Past the body limit nginx answers itself: the ingest never sees it.
    assert post_batch(f"{base}/v1/batches", b"\x00" * (65 * 1024)).status == 413
    assert srv.ingest.counts == {"stored": 1, "duplicate": 1}
    # The operator's endpoints are not public.
    for path in ("/metrics", "/v1/devices/bus-7"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}{path}", timeout=5)
        assert refused.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as other:
        urllib.request.urlopen(f"{base}/v1/batches", timeout=5)  # GET: POST only
    assert other.value.code == 403
