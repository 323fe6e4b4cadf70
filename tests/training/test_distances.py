"""Distances against hand computations; LPIPS in the package's random-backbone mode (nothing is downloaded)."""

import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmfast.training.distances import DISTANCES, LPIPSDistance, get_distance, l1, l2, l2_32, pseudo_huber


def test_l2_and_l1_hand_values():
    x = torch.tensor([[[[0.5, -0.5]]], [[[1.0, 0.0]]]])  # (2, 1, 1, 2)
    y = torch.tensor([[[[0.0, 0.0]]], [[[-1.0, 0.5]]]])
    torch.testing.assert_close(l2(x, y), torch.tensor([0.25, (4 + 0.25) / 2]))
    torch.testing.assert_close(l1(x, y), torch.tensor([0.5, (2 + 0.5) / 2]))
    with pytest.raises(ValueError, match="one shape"):
        l2(x, y[:1])


def test_l2_32_is_l2_at_32_and_averages_2x2_blocks_at_64():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    torch.testing.assert_close(l2_32(x, y), l2(x, y))
    x, y = torch.rand(3, 2, 64, 64, generator=g) * 2 - 1, torch.rand(3, 2, 64, 64, generator=g) * 2 - 1
    # halving bilinearly (half-pixel centres, no antialias) samples between pixel pairs: the mean of each 2x2 block
    torch.testing.assert_close(l2_32(x, y), l2(F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)))
    assert not torch.allclose(l2_32(x, y), l2(x, y), rtol=1e-2)


def test_pseudo_huber_hand_values_and_limits():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0, 0, 0, 0], y[0, 1, 2, 3] = 3.0, 4.0  # ||x - y|| = 5
    y[1, 2, 1, 1] = 1.0
    c = 0.00054 * math.sqrt(48)
    expected = torch.tensor([math.sqrt(25 + c * c) - c, math.sqrt(1 + c * c) - c])
    torch.testing.assert_close(pseudo_huber(x, y), expected)
    torch.testing.assert_close(pseudo_huber(x, y, c=2.0), torch.tensor([math.sqrt(29) - 2, math.sqrt(5) - 2]))
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 3, 8, 8, generator=g)
    small = a + 1e-5 * torch.randn(a.shape, generator=g)
    c = 0.00054 * math.sqrt(3 * 64)
    sq = (a - small).square().sum(dim=(1, 2, 3))
    torch.testing.assert_close(pseudo_huber(a.double(), small.double()), (sq / (2 * c)).double(), rtol=1e-2, atol=0)
    far = a + torch.randn(a.shape, generator=g)
    norm = (a - far).square().sum(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(pseudo_huber(a, far), norm, rtol=2 * c / norm.min().item(), atol=0)


def test_get_distance_names_and_errors():
    assert get_distance("l2") is l2 and get_distance("l1") is l1 and get_distance("l2-32") is l2_32
    x, y = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(get_distance("pseudo-huber", c=1.0)(x, y), torch.tensor([math.sqrt(5) - 1]))
    with pytest.raises(ValueError, match="l2, l1, l2-32, lpips, lpips-alex, pseudo-huber"):
        get_distance("l3")
    with pytest.raises(ValueError, match="no options"):
        get_distance("l2", c=1.0)
    assert set(DISTANCES) == {"l2", "l1", "l2-32", "lpips", "lpips-alex", "pseudo-huber"}


# --- LPIPS -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alex():
    torch.manual_seed(0)
    return LPIPSDistance("alex", pretrained_backbone=False)


def images(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def test_lpips_zero_for_identical_positive_otherwise(alex):
    x, y = images(0, (3, 3, 16, 16)), images(1, (3, 3, 16, 16))
    d = alex(x, y)
    assert d.shape == (3,) and bool((d > 0).all())
    torch.testing.assert_close(alex(x, x), torch.zeros(3))


def test_lpips_upsamples_small_images_to_224_and_takes_minus_one_to_one(alex):
    seen = []
    hook = alex.lpips.net.slice1.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        x, y = images(2, (2, 3, 16, 16)), images(3, (2, 3, 16, 16))
        d = alex(x, y)
        assert seen == [(224, 224), (224, 224)]
        # the package's own convention for images in [-1, 1] is normalize=False
        up = [F.interpolate(t, size=224, mode="bilinear") for t in (x, y)]
        torch.testing.assert_close(d, alex.lpips(*up).reshape(-1), rtol=1e-5, atol=1e-7)
        seen.clear()
        alex(images(4, (1, 3, 256, 256)), images(5, (1, 3, 256, 256)))
        assert seen == [(256, 256), (256, 256)]
    finally:
        hook.remove()


def test_lpips_one_channel_is_repeated(alex):
    x, y = images(6, (2, 1, 12, 12)), images(7, (2, 1, 12, 12))
    torch.testing.assert_close(alex(x, y), alex(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))
    with pytest.raises(ValueError, match="1- or 3-channel"):
        alex(images(8, (1, 2, 8, 8)), images(9, (1, 2, 8, 8)))


def test_lpips_is_frozen_but_passes_gradients_to_inputs(alex):
    x = images(10, (2, 3, 16, 16)).requires_grad_()
    y = images(11, (2, 3, 16, 16))
    alex(x, y).sum().backward()
    assert x.grad is not None and bool(x.grad.isfinite().all()) and float(x.grad.abs().sum()) > 0
    assert all(not p.requires_grad and p.grad is None for p in alex.parameters())
    parent = nn.ModuleDict({"d": alex}).train()  # a trainer's .train() must not switch on LPIPS's dropout
    assert not alex.training and not any(m.training for m in alex.modules())
    torch.testing.assert_close(alex(x, y), alex(x, y), rtol=0, atol=0)
    assert parent.training


def test_lpips_vgg_default_runs():
    torch.manual_seed(1)
    d = get_distance("lpips", pretrained_backbone=False)
    assert isinstance(d, LPIPSDistance) and d.net_name == "vgg"
    x, y = images(12, (1, 3, 8, 8)), images(13, (1, 3, 8, 8))
    dxy, dxx = d(torch.cat([x, x]), torch.cat([y, x]))
    assert float(dxy) > 0 and float(dxx) == 0


def test_lpips_avg_pooling_replaces_max_pooling():
    torch.manual_seed(2)
    plain = LPIPSDistance("alex", pretrained_backbone=False)
    torch.manual_seed(2)
    avg = LPIPSDistance("alex", pretrained_backbone=False, avg_pooling=True)
    assert any(isinstance(m, nn.MaxPool2d) for m in plain.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in avg.modules())
    assert sum(isinstance(m, nn.AvgPool2d) for m in avg.modules()) == 2  # alexnet's pools inside slices 2 and 3
    x, y = images(14, (2, 3, 16, 16)), images(15, (2, 3, 16, 16))
    assert not torch.allclose(plain(x, y), avg(x, y))


def test_lpips_backbone_from_local_file(tmp_path, alex):
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, p in alex.lpips.net.named_parameters():  # "slice2.3.weight" -> torchvision's "features.3.weight"
        state["features." + name.split(".", 1)[1]] = torch.randn(p.shape, generator=g)
    state["classifier.1.weight"] = torch.randn(4, 4, generator=g)  # a whole-model state dict: ignored
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    d = LPIPSDistance("alex", backbone_path=str(path))
    for name, p in d.lpips.net.named_parameters():
        torch.testing.assert_close(p, state["features." + name.split(".", 1)[1]], rtol=0, atol=0)
    assert not torch.allclose(d(images(16, (1, 3, 8, 8)), images(17, (1, 3, 8, 8))), torch.zeros(1))
    torch.save({k.removeprefix("features."): v for k, v in state.items()}, path)  # a `features` state dict
    d2 = LPIPSDistance("alex", backbone_path=str(path))
    torch.testing.assert_close(dict(d2.named_parameters()), dict(d.named_parameters()), rtol=0, atol=0)
    del state["features.3.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features\.3\.weight.*torchvision alexnet"):
        LPIPSDistance("alex", backbone_path=str(path))
    with pytest.raises(RuntimeError, match="cannot read"):
        LPIPSDistance("alex", backbone_path=str(tmp_path / "missing.pth"))


def test_lpips_offline_error_names_the_remedies(monkeypatch):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as info:
        LPIPSDistance("alex")
    message = str(info.value)
    assert "\n" not in message and "backbone_path" in message and "pretrained_backbone=False" in message
    assert "alexnet-owt" in message  # the file to fetch
    with pytest.raises(ValueError, match="unknown LPIPS network"):
        LPIPSDistance("squeeze", pretrained_backbone=False)


def test_lpips_offline_is_one_line_on_the_command_line(monkeypatch, tmp_path, capsys):
    import torchvision.models._api as tv_api

    from cmfast.cli import main

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    argv = ["train-ct", "--distance", "lpips", "--steps", "1", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot get the ImageNet" in err and err.count("\n") == 1 and "Traceback" not in err
