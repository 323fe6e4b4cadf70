"""The paper's search for the middle time points of multistep sampling (Section 4 of Song et al. 2023; official
scripts/ternary_search.py): greedy, one point at a time, each by ternary search over the Karras grid index,
minimising FID. Pure functions over a callable, so any score (and any test function) can be searched.
"""

from __future__ import annotations

from collections.abc import Callable


def ternary_search(f: Callable[[int], float], lo: int, hi: int, memo: dict[int, float] | None = None):
    """argmin of f over the integers lo..hi (inclusive) for a unimodal f; returns (argmin, f(argmin)).

    Each round compares f at the two inner thirds and drops the third that cannot hold the minimum; the last three
    or fewer candidates are compared directly (the smallest of them wins a tie). f is called at most once per index
    (`memo`, index -> value, records every call and may be shared between searches): about 2 log_1.5(n) calls.
    """
    if int(lo) != lo or int(hi) != hi or lo > hi:
        raise ValueError(f"ternary search needs integers lo <= hi, got lo={lo}, hi={hi}")
    memo = {} if memo is None else memo

    def value(i: int) -> float:
        if i not in memo:
            memo[i] = float(f(i))
        return memo[i]

    lo, hi = int(lo), int(hi)
    while hi - lo >= 3:
        m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if value(m1) < value(m2):
            hi = m2 - 1  # f rises at m2, so everything right of it is higher still
        else:
            lo = m1 + 1  # f(m1) >= f(m2): a minimum lies right of m1
    best = min(range(lo, hi + 1), key=lambda i: (value(i), i))
    return best, memo[best]


def greedy_time_points(score: Callable[[tuple[int, ...]], float], steps: int, num_steps: int):
    """Official-style time-point indices `ts` for `num_steps` evaluations on a Karras grid of `steps` points.

    ts always starts at 0 (sigma_max) and ends at steps - 1 (sigma_min, which only marks the end). The middle points
    are chosen greedily: the k-th by ternary search over (previous point, steps - 1), the earlier ones fixed, with
    score(ts) (e.g. FID, lower is better) as the objective. Returns (ts, its score, every scored ts -> score).
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    end = int(steps) - 1
    if end - 1 < num_steps - 1:
        raise ValueError(f"a grid of {steps} points has too few inner points for {num_steps} steps")
    scored: dict[tuple[int, ...], float] = {}

    def at(ts: tuple[int, ...]) -> float:
        if ts not in scored:
            scored[ts] = float(score(ts))
        return scored[ts]

    fixed: tuple[int, ...] = (0,)
    for _ in range(num_steps - 1):
        head = fixed
        point, _ = ternary_search(lambda p, head=head: at((*head, p, end)), fixed[-1] + 1, end - 1)
        fixed = (*fixed, point)
    ts = (*fixed, end)
    return ts, at(ts), scored
