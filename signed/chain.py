"""The one walker of a device's chain: links, sequence gaps and boot epochs.

The rules a device's batches obey to one another, written once:

- the first batch (sequence 0) carries 32 zero bytes as ``prev_hash``;
- every other batch's ``prev_hash`` links to the batch one sequence before
  (:func:`cngmrv.signed.batch.links`: its batch id, or a version-1 file hash);
- sequences run from 0 without holes; a hole is a gap, never a broken link
  (across a missing batch the chain cannot be checked);
- ``boot_epoch`` only goes up.

The ingest checks one batch against its stored neighbours with :func:`head_ok`,
:func:`linked` and :func:`gap_before`; the offline audit (``cngmrv verify``), the
report's check of a device store and the store's salvage walk a device's batches
with :func:`walk`.  Each caller words and weighs a finding as its audience needs
(a 409, an audit finding, an excluded batch, the end of a salvage); the rules
themselves are only here.  Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cngmrv.signed.batch import ZERO_HASH, Batch, links

Gap = tuple[int, int]  # inclusive range of missing sequences


def head_ok(b: Batch) -> bool:
    """False only for a first batch (sequence 0) whose ``prev_hash`` is not 32 zero bytes."""
    return b.seq != 0 or b.header["prev_hash"] == ZERO_HASH


def linked(before: Batch, prev_hash: bytes) -> bool:
    """True when a successor's ``prev_hash`` links to ``before`` (the batch one sequence lower)."""
    return links(before, prev_hash)


def gap_before(seq: int, expected: int) -> Gap | None:
    """The sequences missing before ``seq`` when ``expected`` was the next one due, or None."""
    return (expected, seq - 1) if seq > expected else None


def holes(seqs: Iterable[int], start: int = 0) -> list[Gap]:
    """Every run of sequences missing among ``seqs`` (counted from ``start``), in order."""
    out: list[Gap] = []
    expected = start
    for seq in sorted(set(seqs)):
        gap = gap_before(seq, expected)
        if gap is not None:
            out.append(gap)
        expected = max(expected, seq + 1)
    return out


@dataclass(frozen=True)
class Step:
    """One batch as the walker met it, and what the chain rules say of it."""

    batch: Batch
    before: Batch | None  # the batch one sequence lower, when it was walked just before
    gap: Gap | None  # sequences missing between the previous batch walked and this one
    head_ok: bool  # see :func:`head_ok`
    linked: bool  # ``prev_hash`` links to ``before`` (True when there is no ``before``)
    epoch_from: int | None  # the highest boot_epoch so far, when this one is lower

    @property
    def chained(self) -> bool:
        """Both chain rules hold: a correct head and a link to the batch before."""
        return self.head_ok and self.linked


def walk(batches: Iterable[Batch], start: int | None = 0) -> Iterator[Step]:
    """Walk one device's batches in ascending sequence, one :class:`Step` per batch.

    ``start`` is the first sequence due (0: the chain's head; None: whichever
    sequence comes first, as when reading the remains of a damaged store).  A
    batch's ``before`` is the batch walked just before it when that one is
    exactly one sequence lower; after a gap there is none, and the link is not
    judged.  Boot epochs compare with the highest seen so far.  The caller
    orders the batches and gives one per sequence.
    """
    prev: Batch | None = None
    expected = start
    top_epoch = -1
    for b in batches:
        gap = None if expected is None else gap_before(b.seq, expected)
        before = prev if prev is not None and prev.seq == b.seq - 1 else None
        epoch = b.header.get("boot_epoch")
        epoch_from = None
        if isinstance(epoch, int):
            if epoch < top_epoch:
                epoch_from = top_epoch
            top_epoch = max(top_epoch, epoch)
        yield Step(
            b,
            before,
            gap,
            head_ok(b),
            before is None or linked(before, b.header["prev_hash"]),
            epoch_from,
        )
        prev = b
        expected = b.seq + 1 if expected is None else max(expected, b.seq + 1)
