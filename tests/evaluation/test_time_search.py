"""The greedy ternary search of time points, on functions whose minimum is known."""

import math

import pytest

from cmfast.evaluation.search import greedy_time_points, ternary_search


@pytest.mark.parametrize("lo, hi", [(0, 0), (0, 1), (0, 2), (3, 9), (1, 38), (5, 200)])
def test_ternary_search_finds_every_minimum(lo, hi):
    budget = 2 * math.log(hi - lo + 1, 1.5) + 4
    for target in range(lo, hi + 1):
        calls = []

        def f(i, target=target, calls=calls):
            calls.append(i)
            return (i - target) ** 2 + 0.5 * abs(i - target)

        best, value = ternary_search(f, lo, hi)
        assert best == target and value == 0
        assert len(calls) == len(set(calls)) <= budget, (target, calls)
        assert all(lo <= i <= hi for i in calls)


def test_ternary_search_plateaus_and_ties():
    best, value = ternary_search(lambda i: 1.0, 2, 11)
    assert 2 <= best <= 11 and value == 1.0
    valley = ternary_search(lambda i: max(0, abs(i - 20) - 3), 0, 39)  # minimum 0 on 17..23
    assert 17 <= valley[0] <= 23 and valley[1] == 0


def test_ternary_search_shares_its_memo_and_checks_bounds():
    memo = {}
    ternary_search(lambda i: (i - 4) ** 2, 0, 30, memo)
    calls = []
    ternary_search(lambda i: calls.append(i) or (i - 4) ** 2, 0, 30, memo)
    assert calls == []
    with pytest.raises(ValueError, match="lo <= hi"):
        ternary_search(lambda i: i, 5, 4)


def test_greedy_time_points_on_a_known_score():
    """Each point's best place is known and independent of the later ones, as the greedy search assumes."""
    steps = 40

    def score(ts):
        inner = ts[1:-1]
        targets = (22, 31)
        return sum((p - t) ** 2 for p, t in zip(inner, targets)) + 10 * (len(targets) - len(inner))

    assert greedy_time_points(score, steps, 1)[0] == (0, 39)
    ts2, value2, scored = greedy_time_points(score, steps, 2)
    assert ts2 == (0, 22, 39) and value2 == 10
    assert all(t[0] == 0 and t[-1] == 39 for t in scored)
    ts3, value3, _ = greedy_time_points(score, steps, 3)
    assert ts3 == (0, 22, 31, 39) and value3 == 0
    with pytest.raises(ValueError, match="too few"):
        greedy_time_points(score, 3, 3)
