"""The uploader's one plug-in seam: a transport that carries one batch and reports the answer.

Retry, backoff, the queue of pending batches and the rule of what counts as
an acknowledgement stay in the core (:mod:`cngmrv.agent.upload`); a transport
only moves one batch's exact bytes to the receiver and turns the receiver's
answer into an :class:`Outcome`.  Transports are registered in the
``cngmrv.transports`` entry-point group, one entry per URL scheme, naming a
factory ``(url, timeout_s) -> Transport``: HTTP(S) ships with the agent
(:mod:`cngmrv.agent.http_transport`), MQTT comes with the ``mqtt`` extra
(:mod:`cngmrv.agent.mqtt_transport`).  ``upload.url``'s scheme picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol
from urllib.parse import urlsplit

GROUP = "cngmrv.transports"
TIMEOUT_S = 10.0  # for one batch: connect, send and the receiver's answer


@dataclass(frozen=True)
class Outcome:
    """The receiver's answer to one batch."""

    acknowledged: bool  # the receiver holds this batch: safe to mark uploaded
    retry: bool  # a transient failure: try again later
    status: int
    detail: str
    refused: bool = False  # the receiver refused this batch for good: park it, go on
    retry_after: float | None = None  # seconds the receiver asked us to wait, if it did


class Transport(Protocol):
    """Carries one batch at a time; the uploader's thread is its only caller.

    ``send`` never raises for a network or receiver problem: it answers with
    an :class:`Outcome` (a transient failure when in doubt), so the core's
    retry and park rules apply to every transport alike.  ``close`` frees any
    connection it keeps between batches.
    """

    def send(self, raw: bytes) -> Outcome: ...

    def close(self) -> None: ...


class TransportFactory(Protocol):
    def __call__(self, url: str, timeout: float) -> Transport: ...


class TransportError(ValueError):
    """No transport is registered for a URL's scheme, or it cannot be loaded."""


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower()


def schemes() -> list[str]:
    """The URL schemes of every installed transport, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def _factory(url: str) -> TransportFactory:
    scheme = scheme_of(url)
    found = list(entry_points(group=GROUP, name=scheme)) if "://" in url else []
    if not found:
        raise TransportError(
            f"must be a URL of an installed upload transport ({', '.join(schemes()) or 'none'})"
        )
    try:
        factory: TransportFactory = found[0].load()
    except ImportError as e:
        raise TransportError(
            f"the {scheme!r} upload transport cannot be loaded ({e}): install its extra, "
            f"e.g. pip install 'cngmrv[{scheme.rstrip('s')}]'"
        ) from None
    return factory


def url_problem(url: str) -> str | None:
    """Why no installed transport can carry batches to ``url``, or None (nothing connects)."""
    try:
        _factory(url)
    except TransportError as e:
        return str(e)
    return None


def open_transport(url: str, timeout: float) -> Transport:
    """The registered transport for ``url``'s scheme, made for ``url``."""
    return _factory(url)(url, timeout)
