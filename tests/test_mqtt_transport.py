"""Uploads over MQTT against a real broker: Debian's mosquitto, started on a free port on 127.0.0.1.

The uploader's core (queue, retry, backoff) is the one HTTP uses; only the
transport differs.  QoS 1: the broker's PUBACK is the batch's acknowledgement.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from upload_helpers import sealed_store

from cngmrv.agent import transport
from cngmrv.agent.upload import Uploader
from cngmrv.signed import batch, keys

mqtt = pytest.importorskip("paho.mqtt.client", reason="the mqtt extra (paho-mqtt) is needed")
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A mosquitto process listening on 127.0.0.1:``port`` only, anonymous, without persistence."""

    def __init__(self, workdir: Path, port: int) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (Debian package mosquitto)")
        self.port = port
        conf = workdir / f"mosquitto-{port}.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    err = self._proc.stderr.read() if self._proc.stderr else b""
                    self.stop()
                    raise RuntimeError(f"mosquitto did not start: {err!r}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class Subscriber:
    """Collects every message published under a topic filter, in arrival order."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._ready = threading.Event()
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self._client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *_: self._ready.set()
        self._client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()
        assert self._ready.wait(10), "subscription not confirmed"

    def wait_for(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, _free_port())
    yield b
    b.stop()


def test_the_mqtt_scheme_is_a_registered_transport() -> None:
    assert {"http", "https", "mqtt", "mqtts"} <= set(transport.schemes())
    assert transport.url_problem("mqtt://broker.example/fleet") is None
    problem = transport.url_problem("ftp://x")
    assert problem is not None and "installed upload transport" in problem


def test_every_batch_arrives_in_order_and_each_puback_marks_it_uploaded(
    broker: Broker, signer: keys.FileSigner, tmp_path: Path
) -> None:
    store = sealed_store(tmp_path, signer, 5)
    sub = Subscriber(broker.port, "fleet/batches/#")
    up = Uploader(store, f"mqtt://127.0.0.1:{broker.port}/fleet/batches", seed=1)
    up.start()
    up.notify()
    assert up.wait_idle(30), "uploader never drained"
    up.stop()
    sub.wait_for(5)
    sub.close()
    sent = [raw for _, raw in store.batches()]
    assert [raw for _, raw in sub.messages] == sent
    assert {t for t, _ in sub.messages} == {"fleet/batches/bus-7"}
    assert store.pending() == []
    assert up.uploaded == 5 and up.failures == 0
    # What arrived verifies as the device signed it.
    assert [batch.parse(raw).seq for _, raw in sub.messages] == [0, 1, 2, 3, 4]


def test_without_a_broker_the_batch_stays_pending_and_goes_when_the_broker_is_back(
    signer: keys.FileSigner, tmp_path: Path
) -> None:
    store = sealed_store(tmp_path, signer, 2)
    port = _free_port()
    t = transport.open_transport(f"mqtt://127.0.0.1:{port}", timeout=2.0)
    (_, first), (_, second) = store.batches()
    out = t.send(first)
    assert not out.acknowledged and out.retry and "connection failed" in out.detail
    broker = Broker(tmp_path, port)
    try:
        sub = Subscriber(port, f"{'cngmrv/batches'}/#")
        assert t.send(first).acknowledged
        assert t.send(second).acknowledged
        sub.wait_for(2)
        sub.close()
        assert [raw for _, raw in sub.messages] == [first, second]
        broker.stop()
        # The kept connection is gone with the broker: transient, never an acknowledgement.
        out = t.send(first)
        assert not out.acknowledged and out.retry
    finally:
        t.close()
        broker.stop()
