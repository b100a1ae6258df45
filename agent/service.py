"""Running under systemd: readiness and watchdog notifications, journald logs, SIGTERM.

The sd_notify protocol is a few datagrams on the unix socket systemd names in
``$NOTIFY_SOCKET`` ("@" first means the abstract namespace), so it is done
here over the socket rather than with a library.  With ``Type=notify`` the
unit is started once ``READY=1`` arrives; with ``WatchdogSec=`` systemd sets
``$WATCHDOG_USEC`` and restarts the agent when no ``WATCHDOG=1`` arrives in
that time.  The ping comes from the main loop itself (:meth:`Service.tick`
after each poll), so a loop that hangs is restarted while a thread that
merely lives on is not mistaken for health.

Logs go to stdout, one line per record, as ``key=value`` pairs or one JSON
object (journald stores either line as the message; ``json`` is for a log
shipper that parses fields).

:func:`run` is ``cngmrv run``: SIGTERM or SIGINT stops the loop, the agent
seals and flushes (:meth:`Agent.close`, upload drain bounded by
``service.stop_timeout_s``) and the process exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from cngmrv.agent.config import Config, ConfigError

log = logging.getLogger("cngmrv.service")

_PAIR = re.compile(r"(\w+)=('[^']*'|\"[^\"]*\"|\S+)")
# A whole message of such pairs; anything else is a library's own sentence.
_PAIRS = re.compile(r"\w+=(?:'[^']*'|\"[^\"]*\"|\S+)(?: +\w+=(?:'[^']*'|\"[^\"]*\"|\S+))*")


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; False when not run by systemd.

    Never raises: a notification that cannot be delivered must not stop the
    agent (systemd then restarts it for the missing ping, which is right).
    """
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), addr)
    except OSError as e:
        log.warning("event=notify_failed state=%s error=%r", state.split("=")[0], str(e))
        return False
    return True


def watchdog_period(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when not asked.

    ``$WATCHDOG_PID``, when set, must be this process: a child that inherited
    the environment is not the one systemd watches.
    """
    e = os.environ if env is None else env
    pid = e.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(e.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Service:
    """The systemd side of a running agent: READY, watchdog pings from the loop, STOPPING."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if env is None else env)
        self.period = watchdog_period(self._env)
        self._next_ping = 0.0
        self.pings = 0

    def ready(self, status: str = "") -> None:
        notify("READY=1" + (f"\nSTATUS={status}" if status else ""), self._env)

    def tick(self) -> None:
        """Call from the main loop after each pass; pings the watchdog when due."""
        if self.period is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + self.period
            if notify("WATCHDOG=1", self._env):
                self.pings += 1

    def stopping(self) -> None:
        notify("STOPPING=1", self._env)


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… <message>``; messages are already ``event=… key=…``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        msg = record.getMessage()
        if not _PAIRS.fullmatch(msg):
            # python-can and other libraries log plain sentences ("Created a socket"):
            # quoted as one value, so every journal line still parses as key=value.
            msg = "msg=" + json.dumps(msg)
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} {msg}"
        )
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the message's ``key=value`` pairs as fields."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        for k, v in _PAIR.findall(msg):
            out.setdefault(k, v.strip("'\""))
        out["msg"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(fmt: str, verbose: bool = False) -> None:
    """Send every record to stdout, one line each, in ``fmt`` ("kv" or "json")."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def run(cfg: Config, verbose: bool = False) -> int:
    """``cngmrv run``: the agent as a service, until SIGTERM/SIGINT or a replay's end."""
    from cngmrv.agent.health import HealthServer
    from cngmrv.agent.runtime import Agent

    configure_logging(cfg.service.log_format, verbose)
    service = Service()
    health = None
    if cfg.health.enabled:
        try:
            health = HealthServer(cfg.health.port)
        except OSError as e:
            raise ConfigError(
                f"health.port: cannot listen on 127.0.0.1:{cfg.health.port}: {e.strerror}"
            ) from None
    try:
        agent = Agent(cfg)
    except BaseException:
        if health is not None:
            health.stop()
        raise
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("event=stop_requested signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    clean = False
    try:
        agent.start()
        if health is not None:
            health.start(agent)
            log.info("event=health_listening url=%s", health.url)
        service.ready(f"epoch {agent.boot_epoch}")
        log.info(
            "event=ready watchdog_s=%s", "off" if service.period is None else f"{service.period:g}"
        )
        refresh = health.refresh if health is not None else None

        def tick() -> None:
            service.tick()
            if refresh is not None:
                refresh()

        agent.run(stop, tick=tick)
        clean = True
    finally:
        service.stopping()
        started = time.monotonic()
        # The upload drain gets what is left of the stop budget after sealing.
        agent.close(upload_timeout=max(0.0, cfg.service.stop_timeout_s - 1.0))
        if health is not None:
            health.stop()
        log.info(
            "event=stopped clean=%s close_s=%.3f",
            "true" if clean else "false",
            time.monotonic() - started,
        )
    return 0
