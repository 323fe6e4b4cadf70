"""CT/iCT schedules against hand-computed values and the formulas of REFERENCE.md section 5."""

import math

import numpy as np
import pytest
import torch

from cmfast.sampling import karras_sigmas
from cmfast.training.schedules import (
    ct_num_scales,
    ct_target_ema,
    ema_rate,
    ict_num_scales,
    learning_rate,
    lognormal_index_probs,
)


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, 2),  # sqrt(4) = 2: ceil(1) + 1
        (1, 6),  # sqrt(0.001 * 22797 + 4) = 5.177: ceil(4.177) + 1
        (10, 16),  # sqrt(231.97) = 15.23
        (500, 107),  # sqrt(11402.5) = 106.78
        (999, 151),  # sqrt(22777.2) = 150.92: ceil(149.92) + 1
        (1000, 151),  # N(K) = s1 + 1
    ],
)
def test_ct_num_scales_hand_values(k, expected):
    assert ct_num_scales(k, 1000, 2, 150) == expected


def official_num_scales(k, K, s0, s1):
    """cm/script_util.py's expression (numpy), independent of cmfast."""
    scales = np.ceil(np.sqrt((k / K) * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1).astype(np.int32)
    return int(np.maximum(scales, 1)) + 1


@pytest.mark.parametrize("K, s0, s1", [(22797, 2, 150), (800000, 2, 150), (600000, 2, 200), (777, 3, 40)])
def test_ct_num_scales_matches_official_code_and_is_monotone(K, s0, s1):
    # K = 22797 = 151^2 - 2^2 puts exact squares (k = m^2 - 4) on the grid of k, where ceil is most fragile
    ks = sorted(set(np.linspace(0, K, 400).astype(int).tolist() + [m * m - 4 for m in range(2, 152) if m * m - 4 <= K]))
    ns = [ct_num_scales(k, K, s0, s1) for k in ks]
    assert ns == [official_num_scales(k, K, s0, s1) for k in ks]
    assert ns[0] == s0 and ns[-1] == s1 + 1
    assert all(b >= a for a, b in zip(ns, ns[1:]))


def test_ct_target_ema_variants():
    assert ct_target_ema(0, 1000, 2, 150, 0.9) == pytest.approx(0.9, rel=1e-14)  # exp(2 ln 0.9 / 2)
    assert ct_target_ema(0, 1000, 2, 150, 0.9, "official") == pytest.approx(0.81, rel=1e-14)  # mu0^2
    assert ct_target_ema(1000, 1000, 2, 150, 0.95) == pytest.approx(0.95 ** (2 / 151), rel=1e-14)
    assert ct_target_ema(1000, 1000, 2, 150, 0.95, "official") == pytest.approx(0.95 ** (2 / 150), rel=1e-14)
    for k in (1, 10, 500):  # mu(k) = exp(s0 ln(mu0) / N(k)), N(k) from the hand table above
        n = {1: 6, 10: 16, 500: 107}[k]
        assert ct_target_ema(k, 1000, 2, 150, 0.9) == pytest.approx(math.exp(2 * math.log(0.9) / n), rel=1e-14)
        assert ct_target_ema(k, 1000, 2, 150, 0.9, "official") == pytest.approx(0.9 ** (2 / (n - 1)), rel=1e-14)
    mus = [ct_target_ema(k, 1000, 2, 150, 0.9) for k in range(0, 1001, 50)]
    assert all(b >= a for a, b in zip(mus, mus[1:])) and mus[-1] < 1
    with pytest.raises(ValueError, match="variant"):
        ct_target_ema(0, 10, 2, 150, 0.9, "ema")
    with pytest.raises(ValueError, match="mu0"):
        ct_target_ema(0, 10, 2, 150, 1.0)


def test_ict_curriculum_stage_boundaries():
    # s1/s0 = 128, log2 = 7: K' = floor(400000 / 8) = 50000
    table = {0: 11, 49999: 11, 50000: 21, 99999: 21, 100000: 41, 150000: 81, 200000: 161, 250000: 321, 300000: 641}
    table.update({349999: 641, 350000: 1281, 399999: 1281, 400000: 1281, 10**12: 1281})
    assert {k: ict_num_scales(k, 400000) for k in table} == table
    # floor(150 / 10) = 15, log2(15) + 1 = 4.907: K' = floor(1000 / 4.907) = 203; 10 * 2^4 = 160 is capped at 150
    ks, ns = (0, 202, 203, 406, 609, 811, 812, 1000), [11, 11, 21, 41, 81, 81, 151, 151]
    assert [ict_num_scales(k, 1000, 10, 150) for k in ks] == ns
    assert [ict_num_scales(k, 4) for k in (0, 1, 5, 7)] == [11, 21, 321, 1281]  # K' = max(floor(4 / 8), 1) = 1


def test_schedules_reject_bad_iterations():
    with pytest.raises(ValueError, match="k must be"):
        ct_num_scales(-1, 10, 2, 150)
    with pytest.raises(ValueError, match="K must be"):
        ict_num_scales(0, 0)


def lognormal_mass(lo, hi, p_mean, p_std):
    """Mass of N(p_mean, p_std^2) on [ln lo, ln hi] by a fine trapezoid rule on the density."""
    u = np.linspace(math.log(lo), math.log(hi), 2001)
    pdf = np.exp(-((u - p_mean) ** 2) / (2 * p_std**2)) / (p_std * math.sqrt(2 * math.pi))
    return float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(u)))


@pytest.mark.parametrize("n, p_mean, p_std", [(11, -1.1, 2.0), (41, -1.1, 2.0), (18, 0.4, 0.7)])
def test_lognormal_index_probs_match_integrated_density(n, p_mean, p_std):
    descending = karras_sigmas(n)
    probs = lognormal_index_probs(descending, p_mean, p_std)
    assert probs.shape == (n - 1,) and probs.dtype == torch.float64
    assert float(probs.sum()) == pytest.approx(1, abs=1e-12)
    mass = [lognormal_mass(float(descending[j + 1]), float(descending[j]), p_mean, p_std) for j in range(n - 1)]
    expected = torch.tensor(mass, dtype=torch.float64) / sum(mass)
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-9)
    # entry i belongs to the pair (sigmas[i], sigmas[i+1]) whatever the order
    torch.testing.assert_close(lognormal_index_probs(descending.flip(0), p_mean, p_std), probs.flip(0))


def test_lognormal_index_probs_favour_the_mode():
    probs = lognormal_index_probs(karras_sigmas(1281))
    upper = karras_sigmas(1281)[:-1]
    peak = float(upper[int(probs.argmax())])
    assert 0.05 < peak < 0.5  # ln(sigma) ~ N(-1.1, 2^2) has its mode at sigma = exp(-1.1) = 0.33 (a sign slip: 3.0)
    with pytest.raises(ValueError, match="two positive"):
        lognormal_index_probs(torch.tensor([1.0]))


def test_ema_warmup_forgets_the_initial_weights_as_its_closed_form_says():
    """With warm-up the share of the initial weights left after k updates is prod_j (1 + j) / (10 + j) =
    9! k! / (k + 9)! until the rate caps it; without, rate^k."""
    k, rate = 300, 0.999
    share_warm = math.prod(ema_rate(rate, j, warmup=True) for j in range(k))
    closed = math.exp(math.lgamma(10) + math.lgamma(k + 1) - math.lgamma(k + 10))
    assert share_warm == pytest.approx(closed, rel=1e-9)
    assert math.prod(ema_rate(rate, j) for j in range(k)) == pytest.approx(rate**k, rel=1e-12)
    assert ema_rate(rate, 10**6, warmup=True) == rate  # capped by the configured rate late in a run
    with pytest.raises(ValueError, match="k must be >= 0"):
        ema_rate(rate, -1, warmup=True)


@pytest.mark.parametrize(
    "k, K, decay, expected",
    [
        (0, 10, 0.0, 1.0),  # no decay: constant
        (9, 10, 0.0, 1.0),
        (4, 10, 0.5, 1.0),  # before the last half: the base rate
        (5, 10, 0.5, 1.0),  # (10 - 5) / 5
        (6, 10, 0.5, 0.8),  # (10 - 6) / 5
        (9, 10, 0.5, 0.2),  # the last step: 1 / (0.5 * 10)
        (0, 4, 1.0, 1.0),  # decay over the whole run: (K - k) / K
        (3, 4, 1.0, 0.25),
        (12, 10, 0.5, 0.0),  # past the end of the run (a run resumed beyond K without growing it)
    ],
)
def test_learning_rate_hand_values(k, K, decay, expected):
    assert learning_rate(2e-3, k, K, decay) == pytest.approx(2e-3 * expected, rel=1e-12)


def test_learning_rate_refuses_bad_arguments():
    with pytest.raises(ValueError, match="decay fraction"):
        learning_rate(1e-3, 0, 10, 1.5)
    with pytest.raises(ValueError, match="k must be >= 0"):
        learning_rate(1e-3, -1, 10, 0.5)
