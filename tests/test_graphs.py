"""The CUDA-graph sampler (cmfast.graphs) against the eager sampler for the same noise; its CPU fallbacks.

The CUDA tests are skipped without a GPU; the fallback tests run everywhere."""

import numpy as np
import pytest
import torch

import cmfast
from cmfast.cli import main
from cmfast.graphs import GraphError, graph_sample, graph_unavailable_reason, graphed_sampler
from cmfast.networks import set_fused_ops

cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model(preset, device, autocast=None, seed=0):
    torch.manual_seed(seed)
    net = cmfast.build_network(preset)
    with torch.no_grad():  # non-zero output layers, so the network's output matters
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = cmfast.ConsistencyModel(net).to(device).eval()
    model.autocast_dtype = autocast
    return model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cpu_reason_and_error():
    model = _model("ddpmpp-tiny", "cpu")
    assert "CUDA" in graph_unavailable_reason(model)
    with pytest.raises(GraphError, match="need a CUDA device"):
        graph_sample(model, torch.randn(2, 3, 16, 16), [80.0])


def test_cli_graph_falls_back_with_a_message(tmp_path, capsys):
    args = ["sample", "--model", "digits-cd", "--num", "4", "--batch", "4", "--device", "cpu", "--no-progress"]
    main([*args, "--out", str(tmp_path / "eager")])
    main([*args, "--graph", "--out", str(tmp_path / "graph")])
    err = capsys.readouterr().err
    if not torch.cuda.is_available():
        assert "--graph" in err and "sampling eagerly" in err
    a, b = (np.load(tmp_path / d / "samples.npz")["images"] for d in ("eager", "graph"))
    assert (a == b).all()


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda)])
def test_cli_graph_on_cuda_matches_eager(tmp_path, capsys, _):
    """`cmfast sample --graph` end to end on a GPU, two steps: the saved images equal the eager command's."""
    args = ["sample", "--model", "digits-cd", "--num", "6", "--batch", "3", "--steps", "2", "--device", "cuda"]
    main([*args, "--no-progress", "--out", str(tmp_path / "eager")])
    main([*args, "--no-progress", "--graph", "--out", str(tmp_path / "graph")])
    assert "sampling eagerly" not in capsys.readouterr().err
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int) for d in ("eager", "graph"))
    assert a.shape[0] == 6 and np.abs(a - b).max() <= 1  # uint8 images; float rounding may move one level
    assert a.std() > 1


@pytest.mark.parametrize("preset", ["ddpmpp-tiny", "adm-tiny"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda)])
def test_graph_equals_eager(preset, steps, autocast, fused, _):
    model = _model(preset, "cuda", autocast)
    if fused:
        set_fused_ops(model.net)
    sigmas = cmfast.multistep_sigmas(steps, model.sigma_min, model.sigma_max)
    labels = torch.tensor([1, 7, 3], device="cuda") if preset.startswith("adm") else None
    outs = []
    for run in (cmfast.sample, graph_sample, graph_sample):  # the second graph call replays the cached graph
        gens = cmfast.generators_from_seeds([5, 6, 7])
        noise = cmfast.sampling.randn((3, 3, 16, 16), gens, device="cuda")
        outs.append(run(model, noise, sigmas, class_labels=labels, generator=gens))
    tol = dict(atol=1e-5, rtol=1e-5) if autocast is None else dict(atol=2e-2, rtol=0)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    assert torch.equal(outs[1], outs[2])
    assert outs[0].abs().max() > 0.05  # not a trivially zero image


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda)])
def test_graph_cache_and_in_place_weight_updates(_):
    model = _model("ddpmpp-tiny", "cuda")
    sampler = graphed_sampler(model, (2, 3, 16, 16), torch.float32, [80.0], False)
    assert graphed_sampler(model, (2, 3, 16, 16), torch.float32, [80.0], False) is sampler
    assert graphed_sampler(model, (3, 3, 16, 16), torch.float32, [80.0], False) is not sampler
    noise = torch.randn(2, 3, 16, 16, device="cuda")
    before = sampler(noise)
    with torch.no_grad():  # an optimizer or load_state_dict changes weights in place: the graph sees it
        for p in model.parameters():
            p.mul_(1.5)
    after = sampler(noise)
    torch.testing.assert_close(after, cmfast.sample(model, noise, [80.0]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)
    with pytest.raises(ValueError, match="captured for noise of shape"):
        sampler(torch.randn(1, 3, 16, 16, device="cuda"))
