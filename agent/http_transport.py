"""The HTTP(S) transport: one POST per batch to the ingest (``http``/``https`` URLs).

The ingest's answers map onto the core's rules (:mod:`cngmrv.agent.upload`):

- acknowledged: 201 ``stored`` or 200 ``duplicate`` JSON naming this batch
  (:func:`~cngmrv.agent.upload.acknowledgement_problem`); any other 2xx is transient;
- refused for good (parked): 400/409/413/422 with one of :data:`BATCH_REFUSALS`;
- the device refused (blocked, retried in order): 403 with one of :data:`DEVICE_REFUSALS`;
- transient: everything else (no connection, 5xx, 408, 429, a redirect, a proxy's
  page), honouring a ``Retry-After`` given in seconds.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from cngmrv.agent.transport import TIMEOUT_S, Outcome
from cngmrv.agent.upload import acknowledgement_problem

CONTENT_TYPE = "application/vnd.cngmrv.batch+msgpack"
MAX_ANSWER_BYTES = 64 * 1024

# The ingest's refusals of one batch: retrying the same bytes cannot succeed.
BATCH_REFUSALS = frozenset(
    {"malformed", "truncated", "noncanonical", "rejected", "conflict", "chain_broken", "bad_length"}
)
# The ingest's refusals of the device: every batch would get the same answer.
DEVICE_REFUSALS = frozenset({"unknown_device", "kid_mismatch"})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect is a captive portal or a misconfigured URL, never the ingest's answer.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


class HttpTransport:
    """POSTs each batch to one URL; keeps no connection between batches."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S) -> None:
        self.url = url
        self.timeout = timeout

    def send(self, raw: bytes) -> Outcome:
        return post_batch(self.url, raw, self.timeout)

    def close(self) -> None:
        pass


def post_batch(url: str, raw: bytes, timeout: float = TIMEOUT_S) -> Outcome:
    """POST one batch's exact bytes; classify the answer (see the module's policy)."""
    req = urllib.request.Request(
        url, data=raw, method="POST", headers={"Content-Type": CONTENT_TYPE}
    )
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            body = resp.read(MAX_ANSWER_BYTES)
            obj = _json(body)
            problem = (
                f"not JSON: {body[:60]!r}" if obj is None else acknowledgement_problem(obj, raw)
            )
            if problem:
                return Outcome(False, True, resp.status, f"not an acknowledgement: {problem}")
            return Outcome(True, False, resp.status, _detail(body))
    except urllib.error.HTTPError as e:
        try:
            body = e.read(MAX_ANSWER_BYTES)
        except OSError:
            body = b""
        code = _ingest_error(body)
        if code in BATCH_REFUSALS and e.code in (400, 409, 413, 422):
            return Outcome(False, False, e.code, code, refused=True)
        if code in DEVICE_REFUSALS and e.code == 403:
            return Outcome(False, False, e.code, code)
        # 5xx, 408, 429, 3xx and anything not in the ingest's words: transient.
        return Outcome(
            False,
            True,
            e.code,
            code or _detail(body),
            retry_after=_retry_after(e.headers.get("Retry-After")),
        )
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        # A dropped connection, a garbled status line (HTTPException) or a response
        # http.client refuses (ValueError): all transient, as far as we can tell.
        return Outcome(False, True, 0, f"connection failed: {getattr(e, 'reason', e)!r}")


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _ingest_error(body: bytes) -> str | None:
    obj = _json(body)
    err = None if obj is None else obj.get("error")
    return err if isinstance(err, str) else None


def _detail(body: bytes) -> str:
    obj = _json(body)
    if obj is not None:
        return str(obj.get("status") or obj.get("error") or obj)
    return body[:200].decode("utf-8", "replace")


def _retry_after(value: str | None) -> float | None:
    # Only the delay-seconds form: an HTTP date would need the server's clock to agree with ours.
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None
