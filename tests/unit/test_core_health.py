from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vipd.core.health import Hysteresis, combine


def feed(h: Hysteresis, results: list[bool]) -> list[bool]:
    return [h.observe(ok) for ok in results]


def test_unknown_until_first_result() -> None:
    h = Hysteresis(rise=3, fall=3)
    assert h.up is None


@pytest.mark.parametrize("first", [True, False])
def test_first_result_sets_state_directly(first: bool) -> None:
    h = Hysteresis(rise=3, fall=3)
    assert h.observe(first) is True
    assert h.up is first


def test_goes_down_after_fall_failures() -> None:
    h = Hysteresis(rise=2, fall=3)
    assert feed(h, [True, False, False]) == [True, False, False]
    assert h.up is True
    assert h.observe(False) is True
    assert h.up is False


def test_goes_up_after_rise_successes() -> None:
    h = Hysteresis(rise=2, fall=3)
    assert feed(h, [False, True]) == [True, False]
    assert h.up is False
    assert h.observe(True) is True
    assert h.up is True


def test_agreeing_result_resets_the_opposite_streak() -> None:
    h = Hysteresis(rise=2, fall=3)
    feed(h, [True, False, False, True, False, False])
    assert h.up is True
    assert h.observe(False) is True
    assert h.up is False


def test_agreeing_results_report_no_change() -> None:
    h = Hysteresis(rise=1, fall=1)
    assert feed(h, [True, True, True]) == [True, False, False]


def test_rise_and_fall_of_one_follow_every_result() -> None:
    h = Hysteresis(rise=1, fall=1)
    results = [True, False, True, True, False]
    assert feed(h, results) == [True, True, True, False, True]
    assert h.up is False


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 2)])
def test_rejects_thresholds_below_one(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="rise and fall"):
        Hysteresis(rise=rise, fall=fall)


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], True),
        ([True], True),
        ([True, True], True),
        ([None], None),
        ([True, None], None),
        ([False], False),
        ([None, False], False),
        ([True, None, False], False),
    ],
)
def test_combine_is_an_and_with_unknown(states: list[bool | None], expected: bool | None) -> None:
    assert combine(states) is expected
    assert combine(iter(states)) is expected


@given(
    rise=st.integers(min_value=1, max_value=5),
    fall=st.integers(min_value=1, max_value=5),
    results=st.lists(st.booleans(), min_size=1, max_size=60),
)
def test_state_flips_exactly_on_the_nth_agreeing_result(
    rise: int, fall: int, results: list[bool]
) -> None:
    """Invariant: after the first result, the state changes to ``s`` exactly when the
    last ``rise`` (s=up) or ``fall`` (s=down) results were all ``s`` and the one before
    them was not; never on fewer, never later."""
    h = Hysteresis(rise=rise, fall=fall)
    for i, ok in enumerate(results):
        before = h.up
        changed = h.observe(ok)
        assert changed == (h.up != before)
        if i == 0:
            assert changed and h.up is ok
            continue
        need = rise if ok else fall
        window = results[max(0, i - need + 1) : i + 1]
        if len(window) == need and all(r == ok for r in window):
            assert h.up is ok
        if changed:
            assert h.up is ok
            assert i - need >= 0
            assert all(r == ok for r in window)
            assert results[i - need] != ok
