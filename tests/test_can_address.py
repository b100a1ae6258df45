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


# A service tool (function 129 in industry group 0, "off-board diagnostic tool"), claiming 0xF9.
SERVICE_TOOL = 0x0099 | (77 << 21) | (129 << 40) | (1 << 63)
# Another NAME whose fields also say "engine #1", lower than the engine's (no AAC bit).
HIJACKER_LOW = 0x0001 | (1 << 21) | (0 << 40) | (1 << 60)
# The same, higher than the engine's (a larger manufacturer code, AAC bit set).
HIJACKER_HIGH = 0x0001 | (2000 << 21) | (0 << 40) | (1 << 60) | (1 << 63)


def test_a_pinned_engine_keeps_its_address_when_other_nodes_claim_mid_trip() -> None:
    # The agent starts mid-trip: the engine claimed before it listened.
    e = EngineTracker(default_address=0, engine_name=ENGINE)
    assert e.on_claim(0xF9, name_bytes(SERVICE_TOOL)) is None
    assert e.on_claim(0x03, name_bytes(GEARBOX)) is None
    assert e.address == 0 and e.changes == 0 and e.contests == 0 and e.last_contest is None


def test_a_pinned_engine_moves_when_its_own_name_claims_elsewhere() -> None:
    e = EngineTracker(default_address=0, engine_name=ENGINE)
    e.on_claim(0xF9, name_bytes(SERVICE_TOOL))
    assert e.on_claim(0x05, name_bytes(ENGINE)) == (0, 5)
    assert e.on_claim(0x17, name_bytes(GEARBOX)) is None and e.address == 5
    # The address it left is free: another node taking it is no contest.
    assert e.on_claim(0x00, name_bytes(RETARDER)) is None and e.contests == 0


@pytest.mark.parametrize("pinned", [True, False])
def test_a_hijacker_with_a_lower_engine_name_is_a_contest(pinned: bool) -> None:
    e = EngineTracker(default_address=0, engine_name=ENGINE if pinned else None)
    if not pinned:
        e.on_claim(0x00, name_bytes(ENGINE))  # unpinned: the engine's own claim names it
    assert e.on_claim(0x00, name_bytes(HIJACKER_LOW)) == (0, None)
    c = e.last_contest
    assert c is not None and c.kind == "claimed" and c.address == 0
    assert c.claimer == HIJACKER_LOW and c.engine_name == ENGINE and not c.engine_kept
    # The real engine answers "cannot claim" from the null address: a contest too.
    assert e.on_claim(254, name_bytes(ENGINE)) is None
    assert e.last_contest is not None and e.last_contest.kind == "cannot_claim"
    assert e.contests == 2 and e.address is None and e.name == ENGINE


@pytest.mark.parametrize("pinned", [True, False])
def test_a_hijacker_with_a_higher_engine_name_loses_but_is_reported(pinned: bool) -> None:
    e = EngineTracker(default_address=0, engine_name=ENGINE if pinned else None)
    if not pinned:
        e.on_claim(0x00, name_bytes(ENGINE))
    assert e.on_claim(0x00, name_bytes(HIJACKER_HIGH)) is None
    c = e.last_contest
    assert c is not None and c.kind == "claimed" and c.engine_kept
    assert e.address == 0 and e.contests == 1


def test_unpinned_mid_trip_a_second_engine_name_cannot_go_unnoticed() -> None:
    # Mid-trip and unpinned, the first claim at 0 cannot be told from the engine's
    # own; the real engine's "cannot claim" that follows is what gives it away.
    e = EngineTracker(default_address=0)
    assert e.on_claim(0x00, name_bytes(HIJACKER_LOW)) is None
    assert e.last_contest is None and e.name == HIJACKER_LOW
    e.on_claim(254, name_bytes(ENGINE))
    c = e.last_contest
    assert c is not None and c.kind == "cannot_claim" and c.claimer == ENGINE
    assert e.contests == 1


def _ccvs(kmh: float) -> bytes:
    return j1939.encode(j1939.PGN_CCVS, {"wheel_speed_kmh": kmh})


def _mid_trip_run(engine_name: int | None) -> Pipeline:
    """20 s of an engine at SA 0 (10 L/h, 50 km/h) that claimed before the log began;
    a service tool claims 0xF9 at 10 s."""
    p = Pipeline(PipelineConfig(engine_name=engine_name))
    lfe, ccvs = j1939.make_id(j1939.PGN_LFE, 0), j1939.make_id(j1939.PGN_CCVS, 0)
    for i in range(201):
        t = 1000.0 + i * 0.1
        if i == 100:
            p.on_can(t - 0.05, j1939.make_id(CLAIM, 0xF9), name_bytes(SERVICE_TOOL))
        p.on_can(t, lfe, _lfe(10.0))
        p.on_can(t + 0.01, ccvs, _ccvs(50.0))
    return p


def test_a_pinned_engine_mid_trip_counts_every_frame_after_another_nodes_claim() -> None:
    totals = {}
    for pinned in (ENGINE, None):
        p = _mid_trip_run(pinned)
        readings = p.advance() + p.finish()
        totals[pinned] = (
            sum(r["diesel_l"] for r in readings),
            sum(r["distance_km"] for r in readings),
        )
        assert p.stats.foreign_source == 0
        assert p.engine.address == 0
    assert totals[ENGINE][0] == pytest.approx(10.0 / 3600 * 20.0, rel=1e-9)
    assert totals[ENGINE][1] == pytest.approx(50.0 / 3600 * 20.0, rel=1e-9)
    assert totals[ENGINE] == pytest.approx(totals[None], rel=1e-12)


def test_pipeline_reports_a_contest_as_an_event_and_a_counter() -> None:
    p = Pipeline(PipelineConfig(engine_name=ENGINE))
    p.on_can(10.0, j1939.make_id(CLAIM, 0), name_bytes(HIJACKER_LOW))
    p.on_can(10.2, j1939.make_id(CLAIM, 254), name_bytes(ENGINE))
    p.on_can(10.3, j1939.make_id(j1939.PGN_LFE, 0), _lfe(10.0))  # the hijacker's, now
    contests = [e for e in p.events if e["kind"] == "ENGINE_ADDRESS_CONTESTED"]
    assert [(e["contest"], e["address"], e["engine_kept"]) for e in contests] == [
        ("claimed", 0, False),
        ("cannot_claim", None, False),
    ]
    assert contests[0]["claimer"] == f"{HIJACKER_LOW:016x}"
    assert contests[0]["name"] == f"{ENGINE:016x}"
    assert p.stats.engine_address_contests == 2 and p.stats.foreign_source == 1
