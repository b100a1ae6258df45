"""The one chain walker (signed/chain.py): links, gaps and boot epochs, on real signed batches."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cngmrv.signed import batch, chain, keys


def _chain(signer: keys.FileSigner, epochs: list[int]) -> list[batch.Batch]:
    out, prev = [], batch.ZERO_HASH
    for seq, epoch in enumerate(epochs):
        raw = batch.build(signer, "bus-7", seq, prev, {}, {"boot_epoch": epoch})
        b = batch.parse(raw)
        out.append(b)
        prev = b.chain_id
    return out


def test_an_intact_chain_walks_clean(signer: keys.FileSigner) -> None:
    steps = list(chain.walk(_chain(signer, [1, 1, 2, 2])))
    assert all(s.chained and s.gap is None and s.epoch_from is None for s in steps)
    assert [s.before.seq if s.before else None for s in steps] == [None, 0, 1, 2]


def test_a_hole_is_a_gap_not_a_broken_link(signer: keys.FileSigner) -> None:
    bs = _chain(signer, [1] * 6)
    steps = list(chain.walk([bs[0], bs[1], bs[4], bs[5]]))
    assert [s.gap for s in steps] == [None, None, (2, 3), None]
    assert steps[2].before is None and steps[2].linked
    # Without the head, the missing head is a gap too; from the first read (salvage), it is not.
    assert next(chain.walk(bs[2:])).gap == (0, 1)
    assert next(chain.walk(bs[2:], start=None)).gap is None


def test_a_substituted_batch_breaks_the_link_after_it(signer: keys.FileSigner) -> None:
    bs = _chain(signer, [1, 1, 1])
    other = batch.parse(batch.build(signer, "bus-7", 1, bs[0].chain_id, {"x": 1}, {}))
    steps = list(chain.walk([bs[0], other, bs[2]]))
    assert [s.linked for s in steps] == [True, True, False]


def test_a_first_batch_must_carry_zero_bytes(signer: keys.FileSigner) -> None:
    b = batch.parse(batch.build(signer, "bus-7", 0, b"\1" * 32, {}))
    assert not chain.head_ok(b)
    assert not next(chain.walk([b])).chained


def test_a_boot_epoch_that_goes_back_is_named_with_the_highest_before(
    signer: keys.FileSigner,
) -> None:
    steps = list(chain.walk(_chain(signer, [1, 3, 2, 3])))
    assert [s.epoch_from for s in steps] == [None, None, 3, None]


@given(st.lists(st.integers(0, 40), max_size=30))
def test_holes_are_exactly_the_missing_sequences(seqs: list[int]) -> None:
    holes = chain.holes(seqs)
    missing = {s for a, b in holes for s in range(a, b + 1)}
    top = max(seqs, default=-1)
    assert missing == set(range(top + 1)) - set(seqs)
    assert all(a <= b for a, b in holes)


@pytest.mark.parametrize(("seq", "expected", "gap"), [(5, 5, None), (7, 5, (5, 6)), (3, 5, None)])
def test_gap_before(seq: int, expected: int, gap: tuple[int, int] | None) -> None:
    assert chain.gap_before(seq, expected) == gap
