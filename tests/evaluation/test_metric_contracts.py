"""Contracts of the metrics code that need no real weights: the Inception weights are unpickled once and safely,
KID's spread and precision/recall are reported only where they mean something, the split follows the dataset, and
tune-steps' progress bar has a total that bounds the search."""

import random
import types

import numpy as np
import pytest
import torch

from cmfast.cli.evaluate import search_budget
from cmfast.evaluation import metrics
from cmfast.evaluation.metrics import InceptionFeatures, Reference, compute_metrics, resolve_split
from cmfast.evaluation.search import ternary_search

pytest.importorskip("torch_fidelity")


class FakeExtractor:
    """Stands in for torch-fidelity's FeatureExtractorInceptionV3, which torch.loads its weights_path unsafely."""

    paths: list = []

    def __init__(self, name, features, feature_extractor_weights_path=None):
        FakeExtractor.paths.append(feature_extractor_weights_path)
        self.state = torch.load(feature_extractor_weights_path, weights_only=False)

    def to(self, device):
        return self


@pytest.fixture
def fake_fidelity(monkeypatch):
    """torch.load spied on, and torch-fidelity's extractor replaced by FakeExtractor; yields the torch.load calls."""
    real_fidelity, real_load = metrics._fidelity, torch.load
    calls = []

    def spy_load(path, *args, **kwargs):
        calls.append((str(path), kwargs.get("weights_only")))
        return real_load(path, *args, **kwargs)

    def fidelity(module):
        if module == "feature_extractor_inceptionv3":
            return types.SimpleNamespace(FeatureExtractorInceptionV3=FakeExtractor)
        return real_fidelity(module)

    FakeExtractor.paths = []
    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(metrics, "_fidelity", fidelity)
    return calls


def test_inception_weights_are_unpickled_once_and_safely(tmp_path, fake_fidelity):
    state = {"conv.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.randn(7)}
    user = tmp_path / "weights.pth"
    torch.save(state, user)
    features = InceptionFeatures(user)
    assert [c for c in fake_fidelity if c[0] == str(user)] == [(str(user), True)]
    (private,) = FakeExtractor.paths
    assert private != str(user) and not (tmp_path / private).exists()  # a private copy, removed after use
    assert features.model.state.keys() == state.keys()
    assert all(torch.equal(features.model.state[k], v) for k, v in state.items())


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_inception_weights_with_objects_are_refused_before_torch_fidelity(tmp_path, fake_fidelity):
    user = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1), "evil": Payload()}, user)
    with pytest.raises(ValueError, match="not a readable state dict") as err:
        InceptionFeatures(user)
    assert "\n" not in str(err.value) and FakeExtractor.paths == []


def features(n, seed, d=6):
    return np.random.default_rng(seed).normal(size=(n, d))


def reference(n):
    x = features(n, 1)
    return Reference("ref", "digits", x.mean(0), np.cov(x, rowvar=False), x)


def test_kid_std_is_null_when_a_subset_is_a_whole_set():
    assert compute_metrics(features(30, 0), reference(30))["kid_std"] is None
    assert compute_metrics(features(30, 0), reference(50), kid_subset_size=30)["kid_std"] is None
    spread = compute_metrics(features(40, 0), reference(50), kid_subset_size=20)["kid_std"]
    assert spread is not None and spread > 0


def test_precision_and_recall_need_more_points_than_neighbours():
    out = compute_metrics(features(3, 0), reference(20), neighborhood=3)
    assert out["precision"] is None and out["recall"] is None and np.isfinite(out["fid"])
    out = compute_metrics(features(4, 0), reference(20), neighborhood=3)
    assert out["precision"] is not None


def test_the_split_applies_to_the_built_in_digits_only(tmp_path):
    assert resolve_split(None, None) == "test" and resolve_split("digits8", None) == "test"
    assert resolve_split("digits-rgb16", "train") == "train"
    assert resolve_split(str(tmp_path), None) == "all" and resolve_split(str(tmp_path), "train") == "all"
    assert resolve_split(str(tmp_path), "test") == "test"  # refused by the loader, once the path is known to exist
    with pytest.raises(ValueError, match="no such file"):
        resolve_split(str(tmp_path / "missing.npz"), None)


@pytest.mark.parametrize("grid", [3, 4, 5, 6, 7, 10, 17, 40, 41, 100])
def test_tune_steps_budget_bounds_the_ternary_search(grid):
    rng = random.Random(grid)
    for _ in range(20):
        values, calls = [rng.random() for _ in range(grid)], []
        ternary_search(lambda i, values=values, calls=calls: calls.append(i) or values[i], 1, grid - 2)
        assert len(calls) <= search_budget(grid)
    assert search_budget(grid) <= 2 * grid
