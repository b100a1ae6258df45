"""Transport protocol reassembly (cngmrv.drivers.tp), frame by frame, with hand-built traffic.

TP.CM and TP.DT payloads are written out byte by byte from J1939-21, not
produced by a helper of the code under test.
"""

from __future__ import annotations

import pytest

from cngmrv.agent.pipeline import Pipeline, PipelineConfig
from cngmrv.drivers import j1939
from cngmrv.drivers.tp import T1, T2, T3, TpMessage, TpReassembler

CM, DT = j1939.PGN_TP_CM, j1939.PGN_TP_DT


def bam(size: int, pgn: int) -> bytes:
    packets = (size + 6) // 7
    return bytes([32, size & 0xFF, size >> 8, packets, 0xFF]) + pgn.to_bytes(3, "little")


def rts(size: int, pgn: int, per_cts: int = 0xFF) -> bytes:
    packets = (size + 6) // 7
    return bytes([16, size & 0xFF, size >> 8, packets, per_cts]) + pgn.to_bytes(3, "little")


def cts(count: int, next_seq: int, pgn: int) -> bytes:
    return bytes([17, count, next_seq, 0xFF, 0xFF]) + pgn.to_bytes(3, "little")


def eom(size: int, pgn: int) -> bytes:
    return bytes([19, size & 0xFF, size >> 8, (size + 6) // 7, 0xFF]) + pgn.to_bytes(3, "little")


def abort(pgn: int, reason: int = 3) -> bytes:
    return bytes([255, reason, 0xFF, 0xFF, 0xFF]) + pgn.to_bytes(3, "little")


def packets(payload: bytes) -> list[bytes]:
    out = []
    for i in range(0, len(payload), 7):
        chunk = payload[i : i + 7]
        out.append(bytes([i // 7 + 1]) + chunk + b"\xff" * (7 - len(chunk)))
    return out


PAYLOAD_34 = bytes(range(1, 35))


def test_34_byte_bam_in_5_packets() -> None:
    tp = TpReassembler()
    frames = packets(PAYLOAD_34)
    assert len(frames) == 5 and frames[-1] == bytes([5, 29, 30, 31, 32, 33, 34, 0xFF])
    assert tp.feed(0.0, CM, 0x00, 255, bam(34, 0xFEE3)) is None
    out = [tp.feed(0.05 * (i + 1), DT, 0x00, 255, f) for i, f in enumerate(frames)]
    assert out[:4] == [None] * 4
    assert out[4] == TpMessage(0xFEE3, 0x00, 255, PAYLOAD_34, 0.25)
    assert tp.counters["completed"] == 1 and tp.counters["bam"] == 1
    assert tp.open_sessions == {}


def test_interleaved_bams_from_two_sources() -> None:
    tp = TpReassembler()
    a, b = bytes(range(100, 134)), bytes(range(200, 220))
    tp.feed(0.00, CM, 0x00, 255, bam(len(a), 0xFEE3))
    tp.feed(0.01, CM, 0x03, 255, bam(len(b), j1939.PGN_DM1))
    got = []
    pa, pb = packets(a), packets(b)
    for i in range(max(len(pa), len(pb))):
        for sa, ps in ((0x03, pb), (0x00, pa)):
            if i < len(ps):
                m = tp.feed(0.02 + 0.05 * i, DT, sa, 255, ps[i])
                if m is not None:
                    got.append(m)
    assert [(m.source, m.pgn, m.data) for m in got] == [
        (0x03, j1939.PGN_DM1, b),
        (0x00, 0xFEE3, a),
    ]
    assert tp.counters["completed"] == 2
    assert sum(v for k, v in tp.counters.items() if k not in ("completed", "bam")) == 0


def test_lost_packet_drops_the_session_and_never_stitches() -> None:
    tp = TpReassembler()
    first = packets(PAYLOAD_34)
    tp.feed(0.0, CM, 0x00, 255, bam(34, 0xFEE3))
    tp.feed(0.05, DT, 0x00, 255, first[0])
    tp.feed(0.10, DT, 0x00, 255, first[1])
    # Packet 3 is lost on the wire.
    assert tp.feed(0.20, DT, 0x00, 255, first[3]) is None
    assert tp.counters["sequence_gap"] == 1
    assert tp.feed(0.25, DT, 0x00, 255, first[4]) is None
    assert tp.counters["orphan_dt"] == 1
    # The next message from the same source arrives complete and is not mixed
    # with what was left of the first one.
    second = bytes(range(50, 84))
    tp.feed(1.0, CM, 0x00, 255, bam(34, 0xFEE3))
    out = [tp.feed(1.05 + 0.05 * i, DT, 0x00, 255, f) for i, f in enumerate(packets(second))]
    assert out[-1] is not None and out[-1].data == second
    assert tp.counters["completed"] == 1


def test_repeated_packet_drops_the_session() -> None:
    tp = TpReassembler()
    ps = packets(PAYLOAD_34)
    tp.feed(0.0, CM, 0x00, 255, bam(34, 0xFEE3))
    tp.feed(0.05, DT, 0x00, 255, ps[0])
    tp.feed(0.10, DT, 0x00, 255, ps[1])
    assert tp.feed(0.15, DT, 0x00, 255, ps[1]) is None
    assert tp.counters["duplicate"] == 1
    for i in range(2, 5):
        assert tp.feed(0.2 + 0.05 * i, DT, 0x00, 255, ps[i]) is None
    assert tp.counters["completed"] == 0


def test_transposed_packets_are_not_reordered() -> None:
    tp = TpReassembler()
    ps = packets(PAYLOAD_34)
    tp.feed(0.0, CM, 0x00, 255, bam(34, 0xFEE3))
    for i, f in enumerate([ps[0], ps[2], ps[1], ps[3], ps[4]]):
        assert tp.feed(0.05 * (i + 1), DT, 0x00, 255, f) is None
    assert tp.counters["sequence_gap"] == 1 and tp.counters["completed"] == 0


def test_new_announcement_replaces_an_unfinished_one() -> None:
    # python-can-j1939 issue 72: the end of message A is lost, message B starts;
    # A's first packets and B's last ones must never become one message.
    tp = TpReassembler()
    a = packets(bytes(range(1, 35)))
    b_data = bytes(range(101, 135))
    tp.feed(0.0, CM, 0x00, 255, bam(34, 0xFEE3))
    tp.feed(0.05, DT, 0x00, 255, a[0])
    tp.feed(0.10, DT, 0x00, 255, a[1])
    tp.feed(0.20, CM, 0x00, 255, bam(34, 0xFEE3))
    assert tp.counters["replaced"] == 1
    out = [tp.feed(0.25 + 0.05 * i, DT, 0x00, 255, f) for i, f in enumerate(packets(b_data))]
    assert out[-1] is not None and out[-1].data == b_data


def test_timeout_uses_the_monotonic_time_not_the_bus_timestamp() -> None:
    # Feed the pipeline: wall-clock timestamps ``t`` jump an hour back and then
    # forward in the middle of the BAM while the monotonic time advances 50 ms per
    # packet.  The DM1 must still come through...
    p = Pipeline(PipelineConfig())
    cm_id = j1939.make_id(CM, 0x00, 7, 255)
    dt_id = j1939.make_id(DT, 0x00, 7, 255)
    dm1 = bytes.fromhex("43ffd403097e900c14026102090161020c03")
    walls = [1000.0, 1000.05, 1000.10 - 3600, 1000.15 + 3600]
    monos = [50.0, 50.05, 50.10, 50.15]
    p.on_can(walls[0], cm_id, bam(18, j1939.PGN_DM1), monos[0])
    for f, wall, mono in zip(packets(dm1), walls[1:], monos[1:], strict=True):
        p.on_can(wall, dt_id, f, mono)
    assert p.stats.tp["completed"] == 1 and p.stats.tp["timeout"] == 0
    assert p.stats.dm1_changes == 1
    # ...and the other way round: timestamps 50 ms apart, but a whole second of
    # monotonic time between two packets (the reader was stalled): a timeout.
    q = Pipeline(PipelineConfig())
    q.on_can(2000.00, cm_id, bam(18, j1939.PGN_DM1), 80.0)
    q.on_can(2000.05, dt_id, packets(dm1)[0], 80.05)
    q.on_can(2000.10, dt_id, packets(dm1)[1], 80.05 + T1 + 0.25)
    assert q.stats.tp["timeout"] == 1 and q.stats.tp["completed"] == 0
    assert q.stats.dm1_changes == 0


def test_timeout_at_the_limit() -> None:
    tp = TpReassembler()
    ps = packets(PAYLOAD_34)
    tp.feed(10.0, CM, 0x00, 255, bam(34, 0xFEE3))
    for i in range(4):
        tp.feed(10.0 + T1 * (i + 1), DT, 0x00, 255, ps[i])  # exactly T1 apart: still in time
    assert tp.counters["timeout"] == 0
    assert tp.feed(10.0 + T1 * 5 + 0.001, DT, 0x00, 255, ps[4]) is None
    assert tp.counters["timeout"] == 1


def test_expire_sweeps_stalled_sessions_and_time_never_runs_backwards() -> None:
    tp = TpReassembler()
    tp.feed(5.0, CM, 0x01, 255, bam(34, 0xFEE3))
    tp.feed(5.0, CM, 0x02, 255, bam(34, 0xFEE3))
    assert tp.expire(4.0) == 0  # an earlier ``now`` is "no time passed"
    assert tp.expire(5.0 + T1) == 0
    assert tp.expire(5.0 + T1 + 0.01) == 2
    assert tp.counters["timeout"] == 2 and tp.open_sessions == {}


def test_rts_cts_session_between_two_other_nodes() -> None:
    tp = TpReassembler()
    data = bytes(range(40))
    ps = packets(data)  # 6 packets
    pgn = 0xFECA
    # Originator 0x00 -> responder 0xF9, two packets per CTS.
    assert tp.feed(0.0, CM, 0x00, 0xF9, rts(40, pgn, 2)) is None
    assert tp.feed(0.05, CM, 0xF9, 0x00, cts(2, 1, pgn)) is None
    tp.feed(0.10, DT, 0x00, 0xF9, ps[0])
    tp.feed(0.15, DT, 0x00, 0xF9, ps[1])
    # End of a block: the next CTS may come up to T3 later, more than T1.
    tp.feed(0.15 + T1 + 0.2, CM, 0xF9, 0x00, cts(2, 3, pgn))
    tp.feed(1.20, DT, 0x00, 0xF9, ps[2])
    tp.feed(1.25, DT, 0x00, 0xF9, ps[3])
    # The responder asks for packet 4 again (retransmission), then goes on.
    tp.feed(1.30, CM, 0xF9, 0x00, cts(2, 4, pgn))
    tp.feed(1.35, DT, 0x00, 0xF9, ps[3])
    tp.feed(1.40, DT, 0x00, 0xF9, ps[4])
    tp.feed(1.45, CM, 0xF9, 0x00, cts(1, 6, pgn))
    done = tp.feed(1.50, DT, 0x00, 0xF9, ps[5])
    assert done == TpMessage(pgn, 0x00, 0xF9, data, 1.50)
    assert tp.feed(1.55, CM, 0xF9, 0x00, eom(40, pgn)) is None
    assert tp.counters["completed"] == 1 and tp.counters["rts"] == 1
    assert tp.counters["timeout"] == 0 and tp.counters["orphan_cts"] == 1  # EoM after delivery


def test_rts_cts_waits_t2_after_cts_and_t3_for_the_first_cts() -> None:
    tp = TpReassembler()
    ps = packets(bytes(range(20)))
    tp.feed(0.0, CM, 0x00, 0x21, rts(20, 0xFE00))
    tp.feed(T3, CM, 0x21, 0x00, cts(3, 1, 0xFE00))  # CTS right at the T3 limit
    assert tp.counters["timeout"] == 0
    tp.feed(T3 + T2 + 0.01, DT, 0x00, 0x21, ps[0])  # first data too late
    assert tp.counters["timeout"] == 1


def test_abort_and_hold() -> None:
    tp = TpReassembler()
    tp.feed(0.0, CM, 0x00, 0x21, rts(20, 0xFE00))
    tp.feed(0.1, CM, 0x21, 0x00, cts(0, 1, 0xFE00))  # hold: wait for data up to T4
    tp.feed(0.2, CM, 0x21, 0x00, abort(0xFE00))
    assert tp.counters["aborted"] == 1 and tp.open_sessions == {}
    tp.feed(0.3, CM, 0x00, 0x21, abort(0xFE00))
    assert tp.counters["orphan_cts"] == 1


def test_concurrent_bam_and_rts_from_one_source() -> None:
    tp = TpReassembler()
    a, b = bytes(range(10, 30)), bytes(range(30, 60))
    tp.feed(0.0, CM, 0x00, 255, bam(len(a), 0xFEE3))
    tp.feed(0.0, CM, 0x00, 0x17, rts(len(b), 0xFECA))
    tp.feed(0.01, CM, 0x17, 0x00, cts(255, 1, 0xFECA))
    assert set(tp.open_sessions) == {(0x00, 0xFEE3), (0x00, 0xFECA)}
    got = {}
    for i in range(5):
        for dest, payload in ((255, a), (0x17, b)):
            ps = packets(payload)
            if i < len(ps):
                m = tp.feed(0.05 * (i + 1), DT, 0x00, dest, ps[i])
                if m:
                    got[m.pgn] = m.data
    assert got == {0xFEE3: a, 0xFECA: b}


@pytest.mark.parametrize(
    ("payload", "dest", "counter"),
    [
        (bytes([32, 34, 0, 4, 0xFF, 0xE3, 0xFE, 0]), 255, "bad_cm"),  # 34 bytes need 5 packets
        (bytes([32, 0xFA, 0x06, 0xFF, 0xFF, 0xE3, 0xFE, 0]), 255, "bad_cm"),  # 1786 bytes
        (bam(34, 0xFEE3), 0x21, "bad_cm"),  # a BAM sent to one address
        (rts(34, 0xFEE3), 255, "bad_cm"),  # an RTS sent to everyone
        (bytes([99, 0, 0, 0, 0, 0, 0, 0]), 255, "bad_cm"),  # unknown control byte
        (bam(34, 0xFEE3)[:7], 255, "short_frame"),
    ],
)
def test_malformed_announcements_are_counted(payload: bytes, dest: int, counter: str) -> None:
    tp = TpReassembler()
    tp.feed(0.0, CM, 0x00, dest, payload)
    assert tp.counters[counter] == 1
    assert tp.open_sessions == {}


def test_sessions_are_bounded() -> None:
    tp = TpReassembler(max_sessions=4)
    for sa in range(6):
        tp.feed(0.0 + sa * 0.01, CM, sa, 255, bam(34, 0xFEE3))
    assert len(tp.open_sessions) == 4
    assert tp.counters["evicted"] == 2
    assert set(tp.open_sessions) == {(sa, 0xFEE3) for sa in range(2, 6)}


def test_last_packet_shorter_than_needed_drops_the_session() -> None:
    tp = TpReassembler()
    tp.feed(0.0, CM, 0x00, 255, bam(10, 0xFEE3))
    tp.feed(0.05, DT, 0x00, 255, bytes([1, 1, 2, 3, 4, 5, 6, 7]))
    assert tp.feed(0.10, DT, 0x00, 255, bytes([2, 8, 9])) is None  # needs 3 bytes, has 2
    assert tp.counters["short_frame"] == 1 and tp.open_sessions == {}


def test_end_of_message_ack_before_the_last_packet_is_counted() -> None:
    tp = TpReassembler()
    ps = packets(bytes(range(20)))
    tp.feed(0.0, CM, 0x00, 0x21, rts(20, 0xFE00))
    tp.feed(0.1, CM, 0x21, 0x00, cts(3, 1, 0xFE00))
    tp.feed(0.2, DT, 0x00, 0x21, ps[0])
    tp.feed(0.3, DT, 0x00, 0x21, ps[1])  # packet 3 never reaches us
    assert tp.feed(0.5, CM, 0x21, 0x00, eom(20, 0xFE00)) is None
    assert tp.counters["incomplete"] == 1 and tp.open_sessions == {}
