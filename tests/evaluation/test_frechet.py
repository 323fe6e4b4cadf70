"""The Frechet distance against closed forms and against torch-fidelity on the same features; saved statistics;
the library metrics on features whose answer is known."""

import numpy as np
import pytest
import torch

from cmfast.evaluation.frechet import (
    frechet_distance,
    gaussian_statistics,
    is_statistics_file,
    load_statistics,
    save_statistics,
)
from cmfast.evaluation.metrics import Reference, compute_metrics

fid_lib = pytest.importorskip("torch_fidelity.metric_fid")


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_closed_form_commuting_covariances():
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(0)
    d = 7
    q = random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_closed_form_general_2d():
    """Non-commuting 2x2 covariances: tr sqrt(M) for a 2x2 PSD M is sqrt(tr M + 2 sqrt(det M))."""
    s1 = np.array([[2.0, 0.7], [0.7, 0.5]])
    s2 = np.array([[0.3, -0.2], [-0.2, 1.4]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([-0.25, 0.75])
    m = s1 @ s2  # same eigenvalues as s1^(1/2) s2 s1^(1/2)
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-12)


def test_fitted_gaussians_approach_the_closed_form():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200_000, 3)) * [1.0, 2.0, 0.5]
    y = rng.standard_normal((200_000, 3)) * [1.5, 1.0, 0.5] + [1.0, 0.0, 0.0]
    expected = 1.0 + (1 - 1.5) ** 2 + (2 - 1) ** 2
    got = frechet_distance(*gaussian_statistics(x), *gaussian_statistics(y))
    assert got == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("n, d", [(500, 16), (40, 64)])  # the second: singular covariances (fewer samples than dims)
def test_matches_torch_fidelity_on_the_same_features(n, d):
    rng = np.random.default_rng(d)
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    b = rng.standard_normal((n + 13, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.2
    stats = [fid_lib.fid_features_to_statistics(torch.from_numpy(f)) for f in (a, b)]
    expected = fid_lib.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))
    mu, sigma = gaussian_statistics(a)
    np.testing.assert_allclose(mu, stats[0]["mu"], rtol=1e-12)
    np.testing.assert_allclose(sigma, stats[0]["sigma"], rtol=1e-10, atol=1e-14)
    assert ours == pytest.approx(expected, rel=1e-6)


def test_mismatched_statistics_are_refused():
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_statistics(np.zeros((1, 5)))


def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((50, 6))
    path = tmp_path / "ref.npz"
    save_statistics(path, feats, space="digits", name="test")
    mu, sigma, features, meta = load_statistics(path)
    ref_mu, ref_sigma = gaussian_statistics(feats)
    np.testing.assert_array_equal(mu, ref_mu)
    np.testing.assert_array_equal(sigma, ref_sigma)
    np.testing.assert_allclose(features, feats, rtol=1e-6)
    assert meta["space"] == "digits" and meta["format"] == "cmfast-feature-stats"
    assert is_statistics_file(path)
    np.savez(tmp_path / "images.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    assert not is_statistics_file(tmp_path / "images.npz")
    with pytest.raises(ValueError, match="no reference statistics"):
        load_statistics(tmp_path / "images.npz")


def test_library_metrics_on_known_features():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((400, 8))
    same = rng.standard_normal((400, 8))
    shifted = rng.standard_normal((400, 8)) + 3.0
    mu, sigma = gaussian_statistics(real)
    ref = Reference("real", "test", mu, sigma, real)
    near = compute_metrics(same, ref, logits=rng.standard_normal((400, 10)))
    far = compute_metrics(shifted, ref)
    assert near["fid"] < 0.5 < 60 < far["fid"]
    assert abs(near["kid"]) < 0.05 < far["kid"]
    assert near["precision"] > 0.8 and near["recall"] > 0.8
    assert far["precision"] < 0.05 and far["recall"] < 0.05
    assert 1 <= near["is"] < 10 and "is" not in far
    stats_only = compute_metrics(same, Reference("real", "test", mu, sigma, None))
    assert set(stats_only) == {"fid"} and stats_only["fid"] == pytest.approx(near["fid"])
