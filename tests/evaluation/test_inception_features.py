"""The Inception path through torch-fidelity with a local weights file (random weights: this machine cannot
download the real ones), end to end to FID, IS, KID and precision/recall."""

import numpy as np
import pytest
import torch

fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")

from cmfast.evaluation.metrics import InceptionFeatures, compute_metrics, reference_from_images  # noqa: E402


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A state dict of the TF-Inception port with random weights, built without any download."""
    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def flush_denormals():
    """Random Inception weights drive activations into denormal floats, which are 10x slower on CPU."""
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def test_inception_features_from_a_local_file(random_weights, flush_denormals):
    space = InceptionFeatures(random_weights)
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)  # NHWC grayscale, as `cmfast sample` writes
    feats, logits = space(gray, batch=4)
    assert feats.shape == (6, 2048) and logits.shape == (6, 1008)
    rgb = np.repeat(gray, 3, axis=-1).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(space(rgb)[0], feats, rtol=1e-4, atol=1e-5)
    ref = reference_from_images(space, rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8), "noise")
    metrics = compute_metrics(feats, ref, logits=logits, kid_subsets=5)
    assert np.isfinite(metrics["fid"]) and metrics["is"] >= 1 and {"kid", "precision", "recall"} <= set(metrics)


def test_weights_that_are_not_a_state_dict_are_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable state dict"):
        InceptionFeatures(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match="do not fit"):
        InceptionFeatures(wrong)
