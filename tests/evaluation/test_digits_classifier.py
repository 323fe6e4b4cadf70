"""The shipped digits classifier: its accuracy, deterministic features, and the training command's determinism."""

import numpy as np
import pytest
import torch

from cmfast.data import load_digits
from cmfast.evaluation.classifier import accuracy, load_classifier, prepare, save_classifier, train_classifier
from cmfast.evaluation.frechet import frechet_distance, gaussian_statistics
from cmfast.evaluation.metrics import DigitsFeatures


@pytest.fixture(scope="module")
def test_split():
    return load_digits(8, "test")


def test_shipped_classifier_accuracy(test_split):
    model, record = load_classifier()
    acc = accuracy(model, prepare(test_split.images), test_split.labels)
    assert acc >= 0.97 and acc == pytest.approx(record["test_accuracy"], abs=1e-6)
    assert record["seed"] == 0 and record["dtype"] == "fp16"
    assert sum(p.numel() for p in model.parameters()) < 250_000  # < 0.5 MB in fp16


def test_features_are_deterministic(test_split):
    images = test_split.images
    a, logits_a = DigitsFeatures()(images)
    b, logits_b = DigitsFeatures()(images.permute(0, 2, 3, 1).numpy(), batch=7)  # NHWC, another batch size
    assert a.shape == (300, 64) and logits_a.shape == (300, 10)
    np.testing.assert_array_equal(a, DigitsFeatures()(images)[0])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-5)
    # the shipped weights pin the digits FID scale: the train split against the test split
    train, _ = DigitsFeatures()(load_digits(8, "train").images)
    floor = frechet_distance(*gaussian_statistics(train), *gaussian_statistics(a))
    assert floor == pytest.approx(0.19823, rel=1e-3)


def test_larger_digits_are_averaged_down(test_split):
    big = test_split.images.repeat_interleave(2, -1).repeat_interleave(2, -2)  # 16x16, each pixel a 2x2 block
    torch.testing.assert_close(prepare(big), prepare(test_split.images))
    with pytest.raises(ValueError, match="1-channel"):
        prepare(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="8x8, 16x16"):
        prepare(torch.zeros(2, 1, 12, 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        prepare(torch.zeros(2, 1, 8, 8))


def test_training_is_deterministic(tmp_path):
    m1, r1 = train_classifier(steps=6, batch=16, seed=3, progress=False)
    m2, r2 = train_classifier(steps=6, batch=16, seed=3, progress=False)
    for (k, v1), v2 in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(v1, v2, rtol=0, atol=0, msg=k)
    assert r1 == r2
    save_classifier(m1, tmp_path / "c.safetensors", r1)
    loaded, record = load_classifier(tmp_path / "c.safetensors")
    x = prepare(load_digits(8, "test").images[:10])
    torch.testing.assert_close(loaded.features(x), m1.features(x), rtol=0, atol=0)
    assert record == r1
    with pytest.raises(ValueError, match="no such classifier"):
        load_classifier(tmp_path / "missing.safetensors")
