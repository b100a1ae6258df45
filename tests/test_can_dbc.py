"""Extra signals from a user DBC (cngmrv.drivers.dbc) and their place in readings and config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cngmrv.agent import config
from cngmrv.agent.builtin_sources import CanBus
from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.agent.source import configured
from cngmrv.drivers import j1939
from cngmrv.drivers.can_source import SourceSettings
from cngmrv.drivers.dbc import DbcError, DbcSignals


def _shared_data() -> Path:
    env = os.environ.get("CNGMRV_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


CSS_DBC = _shared_data() / "css-electronics" / "CSS-Electronics-SAE-J1939-DEMO.dbc"

# A fleet's own DBC: a proprietary PGN 0xFF10 from the kit ECU at SA 0x17 (fields
# of every width the range rules treat differently), a 16-byte message sent by
# the transport protocol (placeholder SA 0xFE: from the engine), and an 11-bit
# message that J1939 decoding must skip.  Identifiers carry bit 31 (extended).
FLEET_DBC = """VERSION ""

NS_ :

BS_:

BU_:

BO_ 2566852631 KIT_STATUS: 8 Vector__XXX
 SG_ Mode : 0|2@1+ (1,0) [0|3] "" Vector__XXX
 SG_ Stage : 2|4@1+ (1,0) [0|15] "" Vector__XXX
 SG_ TankPressure : 8|8@1+ (1,0) [0|250] "bar" Vector__XXX
 SG_ ReducerTemp : 16|12@1+ (0.1,-40) [-40|369.5] "degC" Vector__XXX
 SG_ Trim : 32|8@1- (1,0) [-128|127] "%" Vector__XXX
 SG_ GasFlow : 40|16@1+ (0.05,0) [0|3212.75] "kg/h" Vector__XXX

BO_ 2566853118 LONG_REPORT: 16 Vector__XXX
 SG_ Counter : 96|32@1+ (1,0) [0|4211081215] "" Vector__XXX

BO_ 1280 KIT_11BIT: 8 Vector__XXX
 SG_ Raw : 0|8@1+ (1,0) [0|255] "" Vector__XXX
"""


@pytest.fixture
def fleet_dbc(tmp_path: Path) -> Path:
    p = tmp_path / "fleet.dbc"
    p.write_text(FLEET_DBC)
    return p


def test_messages_are_matched_by_pgn_and_source(fleet_dbc: Path) -> None:
    d = DbcSignals(fleet_dbc)
    assert d.pgns == {0xFF10, 0xFF11}
    assert d.messages[0xFF10].source == 0x17 and d.messages[0xFF11].source is None
    assert d.skipped == ["KIT_11BIT"]


def test_j1939_ranges_apply_to_dbc_signals(fleet_dbc: Path) -> None:
    d = DbcSignals(fleet_dbc)
    # Mode 01, stage 10, 200 bar, 1000 raw (60.0 degC), trim -3, 20 kg/h (raw 400).
    ok = bytes([0b101001, 200, 0xE8, 0x03, 0xFD, 0x90, 0x01, 0xFF])
    assert d.decode(0xFF10, ok) == pytest.approx(
        {
            "KIT_STATUS.Mode": 1.0,
            "KIT_STATUS.Stage": 10.0,
            "KIT_STATUS.TankPressure": 200.0,
            "KIT_STATUS.ReducerTemp": 60.0,
            "KIT_STATUS.Trim": -3.0,
            "KIT_STATUS.GasFlow": 20.0,
        }
    )
    # Mode 11 (n/a), stage 14 (error), 0xFE (error), 12-bit all ones (n/a), trim -1
    # (signed: no J1939 codes), flow 0xFB00 (reserved range).
    bad = bytes([0b111011, 0xFE, 0xFF, 0x0F, 0xFF, 0x00, 0xFB, 0xFF])
    out = d.decode(0xFF10, bad)
    assert out == {
        "KIT_STATUS.Mode": None,
        "KIT_STATUS.Stage": None,
        "KIT_STATUS.TankPressure": None,
        "KIT_STATUS.ReducerTemp": None,
        "KIT_STATUS.Trim": -1.0,
        "KIT_STATUS.GasFlow": None,
    }
    assert d.decode(0xFEF1, bytes(8)) == {}
    with pytest.raises(DbcError, match="KIT_STATUS"):
        d.decode(0xFF10, b"\x01\x02")


def test_css_dbc_against_the_builtin_table() -> None:
    if not CSS_DBC.is_file():
        pytest.skip(f"DBC not found at {CSS_DBC}")
    d = DbcSignals(CSS_DBC)
    assert d.messages[j1939.PGN_EEC1].source is None
    for raw in (0, 6400, 0xFAFF, 0xFB00, 0xFE00, 0xFFFF):
        data = bytes([0xFF, 0xFF, 0xFF, raw & 0xFF, raw >> 8, 0xFF, 0xFF, 0xFF])
        ours = d.decode(j1939.PGN_EEC1, data)["EEC1.EngineSpeed"]
        assert ours == j1939.decode(j1939.PGN_EEC1, data)["engine_speed_rpm"]


def test_bad_dbc_files(tmp_path: Path) -> None:
    with pytest.raises(DbcError, match="cannot load"):
        DbcSignals(tmp_path / "absent.dbc")
    (tmp_path / "junk.dbc").write_text("BO_ this is not a dbc")
    with pytest.raises(DbcError, match="cannot load"):
        DbcSignals(tmp_path / "junk.dbc")
    twice = FLEET_DBC.replace("BO_ 2566853118 LONG_REPORT", "BO_ 2566852862 LONG_REPORT")
    (tmp_path / "twice.dbc").write_text(twice)  # 0x98FF10FE: PGN 0xFF10 again
    with pytest.raises(DbcError, match="share PGN"):
        DbcSignals(tmp_path / "twice.dbc")


def test_readings_carry_window_means_of_the_extra_signals(fleet_dbc: Path) -> None:
    p = Pipeline(PipelineConfig(), dbc=DbcSignals(fleet_dbc))
    kit = j1939.make_id(0xFF10, 0x17)
    impostor = j1939.make_id(0xFF10, 0x18)
    lfe = j1939.make_id(j1939.PGN_LFE, 0x00)
    for i in range(30):
        t = 1000.0 + i * 0.1
        pressure = 200 - i // 10  # 200, 199, 198 bar in the three seconds
        p.on_can(t, kit, bytes([1, pressure, 0xE8, 0x03, 0, 0x90, 0x01, 0xFF]))
        p.on_can(t + 0.01, impostor, bytes([1, 50, 0xE8, 0x03, 0, 0x90, 0x01, 0xFF]))
        p.on_can(t + 0.02, lfe, j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": 10.0}))
    readings = p.advance() + p.finish()
    by_t0 = {r["t0"]: r["extra"] for r in readings}
    assert by_t0[1000.0]["KIT_STATUS.TankPressure"] == 200.0
    assert by_t0[1001.0]["KIT_STATUS.TankPressure"] == 199.0
    assert by_t0[1002.0]["KIT_STATUS.TankPressure"] == 198.0
    assert p.stats.extra["KIT_STATUS.TankPressure"][0] == 30  # the impostor's never counted


def test_multi_packet_dbc_message_from_the_engine(fleet_dbc: Path) -> None:
    p = Pipeline(PipelineConfig(), dbc=DbcSignals(fleet_dbc))
    payload = bytes(12) + (123456).to_bytes(4, "little")
    cm = j1939.make_id(j1939.PGN_TP_CM, 0x00, 7)
    dt = j1939.make_id(j1939.PGN_TP_DT, 0x00, 7)
    p.on_can(5.0, cm, bytes([32, 16, 0, 3, 0xFF, 0x11, 0xFF, 0x00]))
    for i in range(3):
        chunk = payload[7 * i : 7 * i + 7]
        p.on_can(5.05 + 0.05 * i, dt, bytes([i + 1]) + chunk + b"\xff" * (7 - len(chunk)))
    assert p.stats.extra["LONG_REPORT.Counter"] == [1, 123456.0, 123456.0, 123456.0]
    # Extra signals ride on the readings the integrated channels produce.
    p.on_can(5.5, j1939.make_id(j1939.PGN_LFE, 0x00), j1939.encode(j1939.PGN_LFE, {}))
    [r] = p.finish()
    assert r["extra"] == {"LONG_REPORT.Counter": 123456.0}


def _cfg(tmp_path: Path, can_section: dict) -> config.Config:
    return config.from_mapping(
        {
            "device": {"id": "bus-1", "key_file": "k"},
            "can": can_section,
            "store": {"path": "s.sqlite"},
        },
        tmp_path,
    )


def _can_settings(cfg: config.Config) -> SourceSettings:
    """What the CAN source builds its reader with, among the configured sources."""
    sources = configured(cfg)
    can_bus = next(s for s in sources if isinstance(s, CanBus))
    return can_bus.settings(sources)


def test_config_dbc_adds_its_pgns_to_the_kernel_filters(tmp_path: Path, fleet_dbc: Path) -> None:
    cfg = _cfg(tmp_path, {"dbc": fleet_dbc.name})
    assert cfg.source_values["can"]["dbc"] == fleet_dbc
    pgns = _can_settings(cfg).pgns
    assert pgns is not None and {0xFF10, 0xFF11} <= pgns
    assert _can_settings(_cfg(tmp_path, {"filters": False})).pgns is None
    (tmp_path / "bad.dbc").write_text("BO_ nonsense")
    with pytest.raises(config.ConfigError, match=r"^can\.dbc: cannot load"):
        _cfg(tmp_path, {"dbc": "bad.dbc"})
