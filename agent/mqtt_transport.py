"""The MQTT transport (``mqtt``/``mqtts`` URLs; the ``mqtt`` extra installs paho-mqtt).

``mqtt://[user:password@]host[:port]/topic/prefix`` publishes each batch's
exact bytes with QoS 1 to ``<prefix>/<device_id>`` (prefix ``cngmrv/batches``
when the URL has no path).  The broker's PUBACK is the batch's
acknowledgement: the broker holds it from then on, and whatever consumes the
topic (an ingest bridge) owns delivery onwards.  ``mqtts`` adds TLS checked
against the system's CAs (port 8883 unless given).

Mapping onto the core's rules (:mod:`cngmrv.agent.upload`):

- acknowledged: the PUBACK arrived within the timeout;
- the device refused (blocked, retried in order, never skipped): the broker
  refused the connection (bad credentials, not authorised);
- transient: everything else (no connection, a dropped connection, no PUBACK
  in time).  The same batch is sent again, so a consumer sees a batch at
  least once and must treat a repeat (same device, sequence and batch id) as
  the ingest does: a duplicate.

MQTT 3.1.1 has no per-message refusal: a broker that denies a topic still
sends the PUBACK (mosquitto does), so the broker's ACL must allow the prefix.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from cngmrv.agent.transport import TIMEOUT_S, Outcome
from cngmrv.signed import batch

DEFAULT_PREFIX = "cngmrv/batches"
KEEPALIVE_S = 60


class MqttTransport:
    """Publishes batches over one kept MQTT connection, made again after any failure."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme.lower() == "mqtts"
        if not parts.hostname:
            raise ValueError(f"MQTT URL without a host: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (8883 if self.tls else 1883)
        self.prefix = parts.path.strip("/") or DEFAULT_PREFIX
        self._user = None if parts.username is None else unquote(parts.username)
        self._password = None if parts.password is None else unquote(parts.password)
        self.timeout = timeout
        self._client: mqtt.Client | None = None

    def send(self, raw: bytes) -> Outcome:
        try:
            client = self._connected()
        except _Refused as e:
            return Outcome(False, False, 0, f"broker refused the connection: {e}")
        except (OSError, TimeoutError, ValueError) as e:
            self.close()
            return Outcome(False, True, 0, f"connection failed: {e!r}")
        topic = f"{self.prefix}/{batch.parse(raw).device_id}"
        info = client.publish(topic, raw, qos=1)
        try:
            info.wait_for_publish(self.timeout)
        except (ValueError, RuntimeError) as e:
            # paho raises when the message cannot go out (the connection dropped meanwhile).
            self.close()
            return Outcome(False, True, 0, f"publish failed: {e}")
        if not info.is_published():
            self.close()
            return Outcome(False, True, 0, f"no PUBACK within {self.timeout:g} s")
        return Outcome(True, False, 0, "puback")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _connected(self) -> mqtt.Client:
        if self._client is not None and self._client.is_connected():
            return self._client
        self.close()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, clean_session=True
        )
        client.connect_timeout = self.timeout
        if self._user is not None:
            client.username_pw_set(self._user, self._password)
        if self.tls:
            client.tls_set()
        answered = threading.Event()
        outcome: list[Any] = []

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            outcome.append(reason)
            answered.set()

        client.on_connect = on_connect
        client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
        client.loop_start()
        self._client = client
        if not answered.wait(self.timeout):
            raise TimeoutError(f"no CONNACK from {self.host}:{self.port}")
        if outcome[0].is_failure:
            self.close()
            raise _Refused(str(outcome[0]))
        return client


class _Refused(Exception):
    """The broker answered the connection with a refusal (its reason is the message)."""
