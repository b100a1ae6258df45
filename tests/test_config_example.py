"""The documented example config, and refusals at start that name the key."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from cngmrv.agent import config
from cngmrv.signed import keys

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "agent.example.toml"


def test_example_covers_exactly_the_schema_keys() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    given = {f"{s}.{k}" for s, table in data.items() for k in table}
    schema = {f"{s}.{k}" for s, keys_ in config.SCHEMA.items() for k in keys_}
    assert given - schema == set(), "keys in the example that the agent does not know"
    assert schema - given == set(), "SCHEMA keys the example does not document"


def test_example_documents_every_key_with_a_comment_or_its_section() -> None:
    # Every key line carries a comment unless its name says it all, and the
    # required keys say so: the file is the reference a fleet engineer reads.
    text = EXAMPLE.read_text()
    for section, table in config.SCHEMA.items():
        for key, (_kind, default, _check) in table.items():
            if default is None:
                line = next(x for x in text.splitlines() if re.match(rf"{key}\s*=", x))
                assert "required" in line, f"{section}.{key} is required; the example must say so"


def test_example_is_a_valid_config() -> None:
    cfg = config.from_mapping(tomllib.loads(EXAMPLE.read_text()), EXAMPLE.parent)
    assert cfg.device_id == "bus-001"
    assert cfg.health.port == 9108 and cfg.service.log_format == "kv"
    assert cfg.clock.source == "ntp" and cfg.source_values["can"]["listen_only"]


def _write(tmp_path: Path, extra: str, key: str = "keys/device.key") -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(
        f'[device]\nid = "bus-1"\nkey_file = "{key}"\n[can]\ninterface = "virtual"\n'
        f'channel = "c"\n[store]\npath = "s.sqlite"\n' + extra
    )
    return p


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[health]\nport = "9108"\n', "health.port: expected int, got str"),
        ("[health]\nport = 70000\n", "health.port: must be a TCP port"),
        ("[service]\nstop_timeout_s = true\n", "service.stop_timeout_s: expected float"),
        ('[service]\nlog_format = "xml"\n', "service.log_format: must be one of 'kv', 'json'"),
        ('[clock]\nsorce = "gps"\n', "clock.sorce: unknown key"),
        ('[clock]\nsource = "gps"\n', "gps.port: required when clock.source = 'gps'"),
        ("[clock]\nmin_year = 1970\n", "clock.min_year: must be a year"),
        ("[sources]\nwheel_speed = 300\n", "sources.wheel_speed: must be a J1939 source address"),
        ('[sources]\nfuel_rate = "brakes"\n', "sources.fuel_rate: must be 'auto', 'engine'"),
        ('[sources]\nspeed = "auto"\n', "sources.speed: unknown key"),
        # Old code: an OverflowError traceback.
        ("quota_mb = 1e308\n", "store.quota_mb: must be 1..1048576 MB"),
    ],
)
def test_config_check_refuses_naming_the_key(
    tmp_path: Path, keydir: Path, cli, extra: str, message: str
) -> None:
    r = cli("config", "check", str(_write(tmp_path, extra)))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr, r.stderr


def test_missing_key_file_is_refused_naming_the_key(tmp_path: Path, cli) -> None:
    path = _write(tmp_path, "", key="nowhere/device.key")
    for args in (("config", "check", str(path)), ("run", "--config", str(path))):
        r = cli(*args)
        assert r.returncode == 2
        assert "device.key_file: key file not found" in r.stderr, r.stderr
    # Refused before anything starts: no store was created.
    assert not (tmp_path / "s.sqlite").exists()


def test_key_readable_by_others_is_refused_naming_the_key(
    tmp_path: Path, keydir: Path, cli
) -> None:
    os.chmod(keydir / keys.KEY_FILE, 0o644)
    path = _write(tmp_path, "")
    for args in (("config", "check", str(path)), ("run", "--config", str(path))):
        r = cli(*args)
        assert r.returncode == 2
        assert "device.key_file: key file" in r.stderr and "chmod 600" in r.stderr, r.stderr
    assert not (tmp_path / "s.sqlite").exists()


def test_config_check_accepts_a_good_file(tmp_path: Path, keydir: Path, cli) -> None:
    r = cli("config", "check", "--json", str(_write(tmp_path, "")))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["device"] == "bus-1"
    assert out["kid"] == keys.load_signer(keydir / keys.KEY_FILE).kid


def test_sources_reach_the_pipeline(tmp_path: Path) -> None:
    data = tomllib.loads(
        '[device]\nid = "b"\nkey_file = "k"\n[store]\npath = "s"\n'
        '[sources]\nwheel_speed = 11\nengine_speed = "function:0"\n'
    )
    cfg = config.from_mapping(data, tmp_path)
    assert cfg.pipeline.sources == {"wheel_speed": 11, "engine_speed": "function:0"}


@pytest.mark.parametrize("bad", ["x" * 129, "../x", "bus 7", "bus\\n7", ".x"])
def test_config_check_applies_the_one_device_id_rule(
    tmp_path: Path, keydir: Path, cli, bad: str
) -> None:
    # Old code passed a 129-character id, whose every batch batch.parse then refused.
    path = _write(tmp_path, "")
    path.write_text(path.read_text().replace('id = "bus-1"', f'id = "{bad}"'))
    r = cli("config", "check", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "device.id: device_id" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
