"""Agent configuration: a TOML file, validated completely before anything starts.

Every key is declared once in :data:`SCHEMA` with its type, default and
check, so an unknown key, a wrong type or a bad value is reported with the
key's full name and the reason, and the agent never starts half-configured.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cngmrv.agent.pipeline import PipelineConfig


class ConfigError(ValueError):
    """A config problem; the message starts with the offending key."""


Check = Callable[[Any], str | None]  # returns the reason a value is bad, or None


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _address(v: Any) -> str | None:
    return None if 0 <= v <= 253 else "must be a J1939 source address 0..253"


def _url(v: Any) -> str | None:
    return None if v == "" or v.startswith(("http://", "https://")) else "must be an http(s) URL"


def _nonempty(v: Any) -> str | None:
    return None if v.strip() else "must not be empty"


def _fraction(v: Any) -> str | None:
    return None if 0 < v < 1 else "must be between 0 and 1"


def _buffer(v: Any) -> str | None:
    # A few seconds: longer means more readings lost per power cut.
    return None if 0 < v <= 60 else "must be > 0 and at most 60 seconds"


def _quota(v: Any) -> str | None:
    return None if v >= 1 else "must be at least 1 MB"


# section -> key -> (type, default, check); a default of None means required.
SCHEMA: dict[str, dict[str, tuple[type, Any, Check | None]]] = {
    "device": {
        "id": (str, None, _nonempty),
        "key_file": (Path, None, None),
    },
    "can": {
        "interface": (str, "socketcan", _nonempty),
        "channel": (str, "can0", _nonempty),
        "listen_only": (bool, True, None),
        "queue_size": (int, 65536, _positive),
    },
    "kit": {
        "port": (str, "", None),
        "baudrate": (int, 115200, _positive),
    },
    "store": {
        "path": (Path, None, None),
        "buffer_s": (float, 10.0, _buffer),
        "quota_mb": (float, 1024.0, _quota),
        "alarm_fraction": (float, 0.8, _fraction),
        "drop_fraction": (float, 0.95, _fraction),
    },
    "batch": {"readings_per_batch": (int, 60, _positive)},
    "upload": {
        "url": (str, "", _url),
        "timeout_s": (float, 10.0, _positive),
        "backoff_base_s": (float, 2.0, _positive),
        "backoff_cap_s": (float, 900.0, _positive),
    },
    "pipeline": {
        "period_s": (float, 1.0, _positive),
        "can_max_gap_s": (float, 1.0, _positive),
        "kit_max_gap_s": (float, 1.0, _positive),
        "engine_source_address": (int, 0, _address),
        "kit_resync_s": (float, 10.0, _positive),
        "stale_s": (float, 5.0, _positive),
    },
}


@dataclass(frozen=True)
class Config:
    device_id: str
    key_file: Path
    can_interface: str
    can_channel: str
    can_listen_only: bool
    can_queue_size: int
    kit_port: str
    kit_baudrate: int
    store_path: Path
    readings_per_batch: int
    upload_url: str
    pipeline: PipelineConfig
    store_buffer_s: float = 10.0
    store_quota_bytes: int = 1 << 30
    store_alarm_fraction: float = 0.8
    store_drop_fraction: float = 0.95
    upload_timeout_s: float = 10.0
    upload_backoff_base_s: float = 2.0
    upload_backoff_cap_s: float = 900.0


def _coerce(key: str, kind: type, value: Any, base: Path) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    # bool is an int in Python; a TOML `true` for a count is a mistake, not a 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def from_mapping(data: Mapping[str, Any], base: Path) -> Config:
    """Validate a parsed TOML document; raises ConfigError naming the key."""
    values: dict[str, Any] = {}
    for section in data:
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(SCHEMA)})")
        if not isinstance(data[section], Mapping):
            raise ConfigError(f"{section}: must be a table")
    for section, keys in SCHEMA.items():
        given = data.get(section, {})
        for key in given:
            if key not in keys:
                raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(keys)})")
        for key, (kind, default, check) in keys.items():
            full = f"{section}.{key}"
            if key not in given:
                if default is None:
                    raise ConfigError(f"{full}: required")
                values[full] = default
                continue
            value = _coerce(full, kind, given[key], base)
            reason = check(value) if check else None
            if reason:
                raise ConfigError(f"{full}: {reason} (got {given[key]!r})")
            values[full] = value
    v = values
    if v["store.drop_fraction"] <= v["store.alarm_fraction"]:
        raise ConfigError("store.drop_fraction: must be above store.alarm_fraction")
    if v["upload.backoff_cap_s"] < v["upload.backoff_base_s"]:
        raise ConfigError("upload.backoff_cap_s: must be at least upload.backoff_base_s")
    return Config(
        device_id=v["device.id"],
        key_file=v["device.key_file"],
        can_interface=v["can.interface"],
        can_channel=v["can.channel"],
        can_listen_only=v["can.listen_only"],
        can_queue_size=v["can.queue_size"],
        kit_port=v["kit.port"],
        kit_baudrate=v["kit.baudrate"],
        store_path=v["store.path"],
        readings_per_batch=v["batch.readings_per_batch"],
        upload_url=v["upload.url"],
        pipeline=PipelineConfig(
            period_s=v["pipeline.period_s"],
            can_max_gap_s=v["pipeline.can_max_gap_s"],
            kit_max_gap_s=v["pipeline.kit_max_gap_s"],
            engine_source_address=v["pipeline.engine_source_address"],
            kit_resync_s=v["pipeline.kit_resync_s"],
            stale_s=v["pipeline.stale_s"],
        ),
        store_buffer_s=v["store.buffer_s"],
        store_quota_bytes=int(v["store.quota_mb"] * 1024 * 1024),
        store_alarm_fraction=v["store.alarm_fraction"],
        store_drop_fraction=v["store.drop_fraction"],
        upload_timeout_s=v["upload.timeout_s"],
        upload_backoff_base_s=v["upload.backoff_base_s"],
        upload_backoff_cap_s=v["upload.backoff_cap_s"],
    )


def load(path: Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_mapping(data, path.resolve().parent)
