"""Address claims and NAMEs (cngmrv.drivers.address), and the pipeline following the engine by NAME."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.drivers import j1939
from cngmrv.drivers.address import (
    AddressClaimer,
    AddressTable,
    EngineTracker,
    Name,
    encode_name,
    parse_name,
)

CLAIM = j1939.PGN_ADDRESS_CLAIMED


def name_bytes(value: int) -> bytes:
    return value.to_bytes(8, "little")


# On-highway ECUs (industry group 1).  Engine #1: function 0, function instance 0,
# arbitrary-address capable (bit 63), which makes its NAME high.
ENGINE = 0x1234 | (341 << 21) | (0 << 40) | (1 << 60) | (1 << 63)
# A retarder (function 15), not arbitrary-address capable: its NAME is lower than the
# engine's, so it wins a contention for the same address.
RETARDER = 0x0042 | (16 << 21) | (15 << 40) | (1 << 60)
# A transmission (function 3), arbitrary-address capable: higher than both.
GEARBOX = 0x7777 | (512 << 21) | (3 << 40) | (1 << 60) | (1 << 63)


def test_name_fields_by_hand() -> None:
    # identity 0x1234, manufacturer 341, ECU instance 1, function instance 2,
    # function 0, vehicle system 1, instance 0, industry group 1 (on-highway), AAC.
    value = 0x1234 | 341 << 21 | 1 << 32 | 2 << 35 | 0 << 40 | 1 << 49 | 1 << 60 | 1 << 63
    n = parse_name(value)
    assert n == Name(0x1234, 341, 1, 2, 0, 0, 1, 0, 1, True)
    assert encode_name(n) == value


@given(st.integers(0, 2**64 - 1))
def test_name_round_trip(value: int) -> None:
    assert encode_name(parse_name(value)) == value


def test_name_range_checks() -> None:
    with pytest.raises(ValueError):
        parse_name(1 << 64)
    with pytest.raises(ValueError, match="function"):
        encode_name(Name(0, 0, 0, 0, 256, 0, 0, 0, 0, False))


def test_lower_name_wins_contention() -> None:
    table = AddressTable()
    assert table.on_claim(0x00, name_bytes(ENGINE))
    assert table.on_claim(0x00, name_bytes(RETARDER))  # lower NAME: takes address 0
    assert table.name_at(0x00) == RETARDER and table.address_of(ENGINE) is None
    assert table.on_claim(0x00, name_bytes(GEARBOX))  # higher NAME: the holder defends
    assert table.name_at(0x00) == RETARDER and table.address_of(GEARBOX) is None
    assert table.on_claim(0x05, name_bytes(ENGINE))
    assert table.address_of(ENGINE) == 0x05 and table.contentions == 2
    assert table.on_claim(254, name_bytes(RETARDER))  # "cannot claim": it has no address now
    assert table.name_at(0x00) is None
    assert not table.on_claim(0x01, b"\x00\x01")


def test_engine_tracker_follows_the_name() -> None:
    e = EngineTracker(default_address=0)
    assert e.address == 0  # no claim seen yet: the configured address
    assert e.on_claim(0x00, name_bytes(ENGINE)) is None  # engine #1 is where we expected
    assert e.name == ENGINE
    assert e.on_claim(0x00, name_bytes(RETARDER)) == (0x00, None)
    assert e.on_claim(0x05, name_bytes(ENGINE)) == (None, 0x05)
    assert e.on_claim(0x17, name_bytes(GEARBOX)) is None
    assert e.address == 0x05 and e.changes == 2


def test_engine_tracker_prefers_a_name_that_says_engine() -> None:
    # The gearbox happens to claim the configured address first; then the real
    # engine (function 0) claims another address: follow the engine.
    e = EngineTracker(default_address=0)
    e.on_claim(0x00, name_bytes(GEARBOX))
    assert e.name == GEARBOX and e.address == 0
    assert e.on_claim(0x01, name_bytes(ENGINE)) == (0x00, 0x01)
    assert e.name == ENGINE


def test_engine_tracker_pinned_by_config() -> None:
    e = EngineTracker(default_address=0, engine_name=GEARBOX)
    e.on_claim(0x00, name_bytes(ENGINE))
    # The pinned NAME has not claimed yet; the engine NAME at 0 is not it.
    assert e.address is None
    e.on_claim(0x03, name_bytes(GEARBOX))
    assert e.address == 0x03


def _lfe(rate: float) -> bytes:
    return j1939.encode(j1939.PGN_LFE, {"fuel_rate_lph": rate})


def test_pipeline_never_mixes_two_ecus_when_the_engine_changes_address() -> None:
    p = Pipeline(PipelineConfig())
    claim = {sa: j1939.make_id(CLAIM, sa) for sa in (0x00, 0x05)}
    lfe = {sa: j1939.make_id(j1939.PGN_LFE, sa) for sa in (0x00, 0x05)}
    p.on_can(999.9, claim[0x00], name_bytes(ENGINE))
    for i in range(100):  # 10 s at 10 L/h from the engine at SA 0
        p.on_can(1000.0 + i * 0.1, lfe[0x00], _lfe(10.0))
    # The retarder wins SA 0; the engine moves to SA 5.  From now on SA 0's
    # "fuel rate" (500 L/h) is someone else's and must be ignored.
    p.on_can(1010.0, claim[0x00], name_bytes(RETARDER))
    p.on_can(1010.05, claim[0x05], name_bytes(ENGINE))
    for i in range(100):
        t = 1010.1 + i * 0.1
        p.on_can(t, lfe[0x05], _lfe(10.0))
        p.on_can(t + 0.01, lfe[0x00], _lfe(500.0))
    readings = p.advance() + p.finish()
    total = sum(r["diesel_l"] for r in readings)
    # 1000.0 to 1020.0 at 10 L/h; the 0.2 s across the switch is the same ECU,
    # within the maximum gap, so it is covered too.
    assert total == pytest.approx(10.0 / 3600 * 20.0, rel=1e-9)
    assert p.stats.foreign_source == 100
    moves = [e for e in p.events if e["kind"] == "ENGINE_ADDRESS_CHANGED"]
    assert [(e["old"], e["new"]) for e in moves] == [(0x00, None), (None, 0x05)]
    assert moves[0]["name"] == f"{ENGINE:016x}"


def test_claimer_claims_defends_and_yields() -> None:
    c = AddressClaimer(name=GEARBOX, address=0x4A)
    [(can_id, data)] = c.claim(0.0)
    assert j1939.parse_id(can_id) == j1939.J1939Id(6, CLAIM, 0x4A, 255)
    assert data == name_bytes(GEARBOX)
    assert not c.ready(0.1) and c.ready(0.25)
    # A request for address claimed (to everyone) is answered with our claim.
    req = j1939.encode_request(CLAIM)
    assert c.on_frame(1.0, j1939.PGN_REQUEST, 0xF9, 255, req) == [(can_id, data)]
    # A higher NAME contends: we claim again and wait before transmitting.
    out = c.on_frame(2.0, CLAIM, 0x4A, 255, name_bytes(GEARBOX + 1))
    assert out == [(can_id, data)] and not c.ready(2.1) and c.ready(2.3)
    # A lower NAME contends: we give up, say so from the null address, stay quiet.
    [(lost_id, lost_data)] = c.on_frame(3.0, CLAIM, 0x4A, 255, name_bytes(ENGINE))
    assert j1939.parse_id(lost_id).source == 254 and lost_data == name_bytes(GEARBOX)
    assert c.lost and not c.ready(10.0)
