"""The reading contract (cngmrv.signed.reading): its one check, fuzzed, and the office's use of it."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cngmrv.office import monitored
from cngmrv.signed import batch, keys, reading

GOOD: dict[str, Any] = {
    "t0": 1_700_000_000.0,
    "dur": 1.0,
    "diesel_l": 0.001,
    "gas_kg": 0.0005,
    "distance_km": 0.01,
    "cov": {"diesel_l": 1.0, "gas_kg": 1.0, "distance_km": 1.0},
    "mode_s": {"dual": 1.0},
}


def test_a_good_reading_and_unknown_fields_pass() -> None:
    assert reading.problem(GOOD) is None
    # A newer agent's field is ignored, never an error: an older office still sums it.
    assert reading.problem({**GOOD, "from_a_newer_agent": [1, 2]}) is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"diesel_l": None}, "'diesel_l' is not a finite number"),
        ({"gas_kg": math.nan}, "'gas_kg' is not a finite number"),
        ({"distance_km": True}, "'distance_km' is not a finite number"),
        ({"dur": -1.0}, "'dur' is negative"),
        ({"cov": [1.0]}, "'cov' is not a map"),
        ({"cov": {"gas_kg": -2.0}}, "cov['gas_kg']"),
    ],
)
def test_each_bad_field_gets_its_reason(change: dict[str, Any], words: str) -> None:
    why = reading.problem({**GOOD, **change})
    assert why is not None and words in why


def test_a_missing_field_is_named() -> None:
    for name in reading.REQUIRED:
        bad = {k: v for k, v in GOOD.items() if k != name}
        assert reading.problem(bad) == f"reading has no {name!r}"


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from([*reading.FIELDS, "x"]),
            st.one_of(
                st.none(),
                st.booleans(),
                st.floats(allow_nan=True, allow_infinity=True),
                st.integers(),
                st.text(max_size=5),
                st.dictionaries(st.text(max_size=8), st.floats(), max_size=3),
                st.lists(st.floats(), max_size=3),
            ),
        ),
        st.lists(st.integers(), max_size=3),
        st.text(max_size=10),
    )
)
def test_problem_fuzz_answers_a_reason_or_none_and_never_raises(r: Any) -> None:
    why = reading.problem(r)
    assert why is None or isinstance(why, str)


def test_the_office_sums_no_malformed_reading_and_says_why(tmp_path: Any) -> None:
    keys.generate(tmp_path)
    signer = keys.load_signer(tmp_path / keys.KEY_FILE)
    raw = batch.build(
        signer, "bus-1", 0, batch.ZERO_HASH, {"readings": [GOOD, {**GOOD, "gas_kg": "5"}]}
    )
    with pytest.raises(ValueError, match="'gas_kg' is not a finite number"):
        monitored.runs_of(batch.parse(raw))
    good = batch.build(signer, "bus-1", 0, batch.ZERO_HASH, {"readings": [GOOD]})
    (run,) = monitored.runs_of(batch.parse(good))
    assert run.sums.gas_kg == pytest.approx(0.0005)
