"""Agent configuration: a TOML file, validated completely before anything starts.

Every key is declared once in :data:`SCHEMA` with its type, default and
check, so an unknown key, a wrong type or a bad value is reported with the
key's full name and the reason, and the agent never starts half-configured.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cngmrv.agent import transport
from cngmrv.agent.checks import address, j1939_name, nonnegative, one_of, positive
from cngmrv.agent.pipeline import FuelFactors, GasCalibration, PipelineConfig
from cngmrv.agent.recorder import RecorderConfig
from cngmrv.agent.source import ConfigProblem, Key, built, path_of, registered
from cngmrv.agent.transport import TIMEOUT_S
from cngmrv.agent.upload import BASE_S, CAP_S
from cngmrv.drivers.address import SIGNALS, check_source_rule
from cngmrv.signed import hsm
from cngmrv.signed.batch import device_id_problem
from cngmrv.signed.keys import Signer, SignerError, load_signer


class ConfigError(ValueError):
    """A config problem; the message starts with the offending key."""


def _url(v: Any) -> str | None:
    return None if v == "" else transport.url_problem(v)


MAX_QUOTA_MB = 1 << 20  # 1 TiB
MIB = 1024 * 1024
MAX_READINGS_PER_BATCH = 1800


def _fraction(v: Any) -> str | None:
    return None if 0 < v < 1 else "must be between 0 and 1"


def _buffer(v: Any) -> str | None:
    # A few seconds: longer means more readings lost per power cut.
    return None if 0 < v <= 60 else "must be > 0 and at most 60 seconds"


def _quota(v: Any) -> str | None:
    # An upper bound too: 1e308 MB would overflow the byte count (an OverflowError, not a
    # one-line error), and no SD card holds more than a few TB.
    return None if 1 <= v <= MAX_QUOTA_MB else f"must be 1..{MAX_QUOTA_MB} MB"


def _device_id(v: Any) -> str | None:
    # The one rule for device ids (signed/batch.py): a batch with another id is refused.
    return device_id_problem(v)


def _readings_per_batch(v: Any) -> str | None:
    # About 40 bytes a reading: 1800 readings stay far inside the batch size limit.
    return None if 1 <= v <= MAX_READINGS_PER_BATCH else f"must be 1..{MAX_READINGS_PER_BATCH}"


def _port(v: Any) -> str | None:
    return None if 0 <= v <= 65535 else "must be a TCP port 0..65535 (0 = any free port)"


def _year(v: Any) -> str | None:
    return None if 2000 <= v <= 2100 else "must be a year 2000..2100"


@dataclass(frozen=True)
class ServiceSettings:
    log_format: str = "kv"
    stop_timeout_s: float = 5.0


@dataclass(frozen=True)
class HealthSettings:
    enabled: bool = True
    port: int = 9108


@dataclass(frozen=True)
class ClockSettings:
    source: str = "ntp"
    gps_port: str = ""
    gps_baudrate: int = 9600
    gps_max_age_s: float = 5.0
    gps_tolerance_s: float = 1.0
    step_threshold_s: float = 1.0
    min_year: int = 2024


# The sources' own sections ([can], [kit], plug-ins'), declared by each source (agent/source.py).
SOURCES = registered()
if not {"can", "kit"} <= set(SOURCES):
    raise ImportError(
        "the cngmrv.sources entry points are missing: cngmrv is not installed (pip install -e .)"
    )

# section -> key -> (type, default, check); a default of None means required.
SCHEMA: dict[str, Mapping[str, Key]] = {
    "device": {
        "id": (str, None, _device_id),
        "key_file": (Path, "", None),  # required when signer.kind = "file"
    },
    # Where the device key lives: its file (device.key_file), or a PKCS#11 token.
    "signer": {
        "kind": (str, "file", one_of("file", "pkcs11")),
        "module": (str, "", None),  # the token's PKCS#11 module (.so), a path
        "token_label": (str, "", None),
        "key_label": (str, "", None),
        # The user PIN: a 0600 file, or an environment variable; never inline here.
        "pin_file": (str, "", None),
        "pin_env": (str, "", None),
    },
    **{name: cls.KEYS for name, cls in SOURCES.items()},
    "store": {
        "path": (Path, None, None),
        "buffer_s": (float, RecorderConfig.buffer_s, _buffer),
        "quota_mb": (float, RecorderConfig.quota_bytes / MIB, _quota),
        "alarm_fraction": (float, RecorderConfig.alarm_fraction, _fraction),
        "drop_fraction": (float, RecorderConfig.drop_fraction, _fraction),
    },
    "batch": {"readings_per_batch": (int, 60, _readings_per_batch)},
    "upload": {
        "url": (str, "", _url),
        "timeout_s": (float, TIMEOUT_S, positive),
        "backoff_base_s": (float, BASE_S, positive),
        "backoff_cap_s": (float, CAP_S, positive),
    },
    "pipeline": {
        "period_s": (float, PipelineConfig.period_s, positive),
        "can_max_gap_s": (float, PipelineConfig.can_max_gap_s, positive),
        "kit_max_gap_s": (float, PipelineConfig.kit_max_gap_s, positive),
        "engine_source_address": (int, PipelineConfig.engine_source_address, address),
        "kit_resync_s": (float, PipelineConfig.kit_resync_s, positive),
        "stale_s": (float, PipelineConfig.stale_s, positive),
        "kit_stuck_gas_kg": (float, PipelineConfig.kit_stuck_gas_kg, positive),
        "idle_max_kmh": (float, PipelineConfig.idle_max_kmh, nonnegative),
        "engine_running_rpm": (float, PipelineConfig.engine_running_rpm, positive),
        "engine_name": (str, "", j1939_name),  # the engine's J1939 NAME, hex ("" = find it)
    },
    # Where each signal comes from: "auto", "engine", "function:N" or an address (docs/can.md).
    "sources": {signal: (object, "auto", check_source_rule) for signal in SIGNALS},
    # Energy and CO2 factors (IPCC 2006 defaults; a project sets its own, e.g. for B40 diesel).
    "fuel": {
        "diesel_density_kg_per_l": (float, FuelFactors.diesel_density_kg_per_l, positive),
        "diesel_ncv_mj_per_kg": (float, FuelFactors.diesel_ncv_mj_per_kg, positive),
        "diesel_co2_kg_per_tj": (float, FuelFactors.diesel_co2_kg_per_tj, nonnegative),
        "gas_ncv_mj_per_kg": (float, FuelFactors.gas_ncv_mj_per_kg, positive),
        "gas_co2_kg_per_tj": (float, FuelFactors.gas_co2_kg_per_tj, nonnegative),
    },
    # Per-kit calibration of the event- and tank-based gas figures (assumed defaults).
    "gas": {
        "injector_k": (float, GasCalibration.injector_k, positive),
        "injector_dead_time_ms": (float, GasCalibration.injector_dead_time_ms, nonnegative),
        "tank_volume_m3": (float, GasCalibration.tank_volume_m3, positive),
        "tank_pressure_gauge": (bool, GasCalibration.tank_pressure_gauge, None),
        "r_j_per_kg_k": (float, GasCalibration.r_j_per_kg_k, positive),
        "p_pc_bar": (float, GasCalibration.p_pc_bar, positive),
        "t_pc_k": (float, GasCalibration.t_pc_k, positive),
        "refuel_min_kg": (float, GasCalibration.refuel_min_kg, positive),
    },
    "service": {
        "log_format": (
            str,
            ServiceSettings.log_format,
            one_of("kv", "json"),
        ),  # one line per event on stdout
        "stop_timeout_s": (
            float,
            ServiceSettings.stop_timeout_s,
            positive,
        ),  # SIGTERM to exit, upload drain included
    },
    "health": {
        "enabled": (bool, HealthSettings.enabled, None),
        "port": (int, HealthSettings.port, _port),  # always bound to 127.0.0.1
    },
    "clock": {
        "source": (str, ClockSettings.source, one_of("none", "ntp", "gps")),
        # The older names of gps.port and gps.baudrate, read when [gps] names no port.
        "gps_port": (str, ClockSettings.gps_port, None),
        "gps_baudrate": (int, ClockSettings.gps_baudrate, positive),
        "gps_max_age_s": (
            float,
            ClockSettings.gps_max_age_s,
            positive,
        ),  # an older fix no longer confirms the clock
        "gps_tolerance_s": (float, ClockSettings.gps_tolerance_s, positive),
        "step_threshold_s": (float, ClockSettings.step_threshold_s, positive),
        "min_year": (
            int,
            ClockSettings.min_year,
            _year,
        ),  # an earlier wall clock is a board booted without time
    },
}


@dataclass(frozen=True)
class SignerSettings:
    """The ``[signer]`` table: ``kind`` "file" signs with ``device.key_file``."""

    kind: str = "file"
    module: Path | None = None
    token_label: str = ""
    key_label: str = ""
    pin_file: Path | None = None
    pin_env: str = ""


@dataclass(frozen=True)
class Config:
    device_id: str
    key_file: Path | None
    store_path: Path
    readings_per_batch: int
    upload_url: str
    pipeline: PipelineConfig
    store_buffer_s: float = RecorderConfig.buffer_s
    store_quota_bytes: int = RecorderConfig.quota_bytes
    store_alarm_fraction: float = RecorderConfig.alarm_fraction
    store_drop_fraction: float = RecorderConfig.drop_fraction
    upload_timeout_s: float = TIMEOUT_S
    upload_backoff_base_s: float = BASE_S
    upload_backoff_cap_s: float = CAP_S
    service: ServiceSettings = ServiceSettings()
    health: HealthSettings = HealthSettings()
    clock: ClockSettings = ClockSettings()
    signer: SignerSettings = SignerSettings()
    # Every source's section (SOURCES), as validated; a plug-in source reads its own.
    source_values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _coerce(key: str, kind: type, value: Any, base: Path) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        # TOML has inf and nan; no setting here means either.
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a non-empty path string")
        return path_of(value, base)
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
    for cls in SOURCES.values():
        problem = cls.check(v)
        if problem is not None:
            raise ConfigError(f"{problem[0]}: {problem[1]}")
    settled, gaps = _sources(v, base)
    engine_name = v["pipeline.engine_name"]
    if v["store.drop_fraction"] <= v["store.alarm_fraction"]:
        raise ConfigError("store.drop_fraction: must be above store.alarm_fraction")
    if v["upload.backoff_cap_s"] < v["upload.backoff_base_s"]:
        raise ConfigError("upload.backoff_cap_s: must be at least upload.backoff_base_s")
    signer = _signer(v, base)
    return Config(
        device_id=v["device.id"],
        key_file=v["device.key_file"] or None,
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
            kit_stuck_gas_kg=v["pipeline.kit_stuck_gas_kg"],
            idle_max_kmh=v["pipeline.idle_max_kmh"],
            engine_running_rpm=v["pipeline.engine_running_rpm"],
            fuel=FuelFactors(**_section(v, "fuel")),
            gas=GasCalibration(**_section(v, "gas")),
            engine_name=int(engine_name, 16) if engine_name else None,
            sources={sig: rule for sig, rule in _section(v, "sources").items() if rule != "auto"},
            max_gap_s=gaps,
        ),
        store_buffer_s=v["store.buffer_s"],
        store_quota_bytes=int(v["store.quota_mb"] * MIB),
        store_alarm_fraction=v["store.alarm_fraction"],
        store_drop_fraction=v["store.drop_fraction"],
        upload_timeout_s=v["upload.timeout_s"],
        upload_backoff_base_s=v["upload.backoff_base_s"],
        upload_backoff_cap_s=v["upload.backoff_cap_s"],
        service=ServiceSettings(**_section(v, "service")),
        health=HealthSettings(**_section(v, "health")),
        clock=ClockSettings(**_section(v, "clock")),
        signer=signer,
        source_values=settled,
    )


def _sources(v: dict[str, Any], base: Path) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Each source's settled values, and the gap rules of the signals the sources feed.

    Refuses two sources feeding one integrator channel.
    """
    settled = {}
    for name, cls in SOURCES.items():
        try:
            settled[name] = cls.settle(name, v, base)
        except ConfigProblem as e:
            raise ConfigError(str(e)) from None
    feeder: dict[str, str] = {}
    gaps: dict[str, float] = {}
    for source in built(SOURCES, settled):
        for channel in source.feeds:
            if channel in feeder:
                raise ConfigError(
                    f"{source.name}: feeds {channel}, which {feeder[channel]} feeds already"
                    " (one source per channel)"
                )
            feeder[channel] = source.name
        gaps.update(source.max_gap_s)
    return settled, gaps


def _signer(v: dict[str, Any], base: Path) -> SignerSettings:
    """The ``[signer]`` keys, with the checks that span several keys (paths are not opened)."""
    token_keys = ("module", "token_label", "key_label", "pin_file", "pin_env")
    if v["signer.kind"] == "file":
        if not v["device.key_file"]:
            raise ConfigError("device.key_file: required when signer.kind = 'file' (the default)")
        for k in token_keys:
            if v[f"signer.{k}"]:
                raise ConfigError(f"signer.{k}: only with signer.kind = 'pkcs11'")
        return SignerSettings()
    if v["device.key_file"]:
        raise ConfigError("device.key_file: must be empty when signer.kind = 'pkcs11'")
    for k in ("module", "token_label", "key_label"):
        if not v[f"signer.{k}"]:
            raise ConfigError(f"signer.{k}: required when signer.kind = 'pkcs11'")
    if bool(v["signer.pin_file"]) == bool(v["signer.pin_env"]):
        raise ConfigError(
            "signer.pin_file: give exactly one of signer.pin_file and signer.pin_env "
            "(the PIN never sits in this file)"
        )
    return SignerSettings(
        kind="pkcs11",
        module=path_of(v["signer.module"], base),
        token_label=v["signer.token_label"],
        key_label=v["signer.key_label"],
        pin_file=path_of(v["signer.pin_file"], base) if v["signer.pin_file"] else None,
        pin_env=v["signer.pin_env"],
    )


def _section(values: Mapping[str, Any], section: str) -> dict[str, Any]:
    return {k: values[f"{section}.{k}"] for k in SCHEMA[section]}


def token_key(cfg: Config) -> hsm.TokenKey:
    """The ``[signer]`` table as a :class:`cngmrv.signed.hsm.TokenKey`, its PIN read.

    Raises ConfigError naming the key when the PIN cannot be had.
    """
    s = cfg.signer
    if s.kind != "pkcs11" or s.module is None:
        raise ConfigError("signer.kind: not 'pkcs11'")
    try:
        pin = hsm.read_pin_file(s.pin_file) if s.pin_file else hsm.pin_from_env(s.pin_env)
    except hsm.TokenError as e:
        raise ConfigError(f"signer.{e.part}: {e}") from None
    return hsm.TokenKey(s.module, s.token_label, s.key_label, pin)


def open_signer(cfg: Config) -> Signer:
    """The signer the config names, opened and checked; raises ConfigError naming the key.

    Done at start (and by ``cngmrv config check``) so a missing key, a key file
    others can read, a wrong token, key label or PIN stops the agent before it
    opens a bus.
    """
    if cfg.signer.kind == "file":
        if cfg.key_file is None:
            raise ConfigError("device.key_file: required when signer.kind = 'file' (the default)")
        try:
            return load_signer(cfg.key_file)
        except SignerError as e:
            raise ConfigError(f"device.key_file: {e}") from None
    ref = token_key(cfg)
    try:
        return hsm.Pkcs11Signer(ref)
    except hsm.TokenError as e:
        raise ConfigError(f"signer.{e.part}: {e}") from None
    except SignerError as e:
        raise ConfigError(f"signer: {e}") from None


def load(path: Path) -> Config:
    """Read and validate a TOML config file (the key itself: :func:`open_signer`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_mapping(data, path.resolve().parent)
