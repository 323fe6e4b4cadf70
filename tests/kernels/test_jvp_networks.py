"""torch.func.jvp through whole networks with their fused ops on (`set_fused_ops`), as sCM's training takes it: the
JVP of F(x, c_noise) along (dx, dc_noise) against the same network's unfused JVP in float64, with the fused ops'
forward-mode rules really running; and, in the same step, a backward through the primal output against the unfused
gradients."""

import copy
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmfast import ops
from cmfast.kernels import attention as _attn
from cmfast.kernels import group_norm_silu as _gn
from cmfast.networks import build_network, network_config, set_fused_ops

# ddpmpp-digits8, and adm-tiny at 8 x 8 (attention at 4 x 4: two heads of 16 channels), which the interpreter runs fast
NETWORKS = {
    "ddpmpp-digits8": network_config("ddpmpp-digits8"),
    "adm-tiny8": dataclasses.replace(network_config("adm-tiny"), image_size=8, attention_resolutions=(4,)),
}


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("CMFAST_BACKEND", raising=False)


def count_jvps(monkeypatch, function, calls, name):
    """Count the calls of an autograd.Function's jvp (the fused forward-mode rules)."""
    original = function.jvp

    def jvp(ctx, *tangents):
        calls[name] += 1
        return original(ctx, *tangents)

    monkeypatch.setattr(function, "jvp", staticmethod(jvp))


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", NETWORKS)
def test_fused_network_jvp_matches_the_unfused_float64_jvp(name, where, perturb, monkeypatch):
    """where: the device of the fused network (the float64 reference runs on CPU)."""
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions, as the reference's
    config = NETWORKS[name]
    torch.manual_seed(0)
    net = perturb(build_network(config), scale=0.2).eval()
    R, C = config.resolution, config.in_channels
    if ops.explain("group_norm_silu", torch.randn(1, 64, 3, 3, device=where), None, None).backend == "torch":
        pytest.skip("no fused backend on this machine (no extension, no Triton interpreter)")
    g = torch.Generator().manual_seed(1)
    x, tx = torch.randn(2, C, R, R, generator=g), torch.randn(2, C, R, R, generator=g)
    noise, tnoise = torch.tensor([-0.5, 0.9]), torch.tensor([1.0, -0.7])
    if name.startswith("adm"):
        noise = noise * 250 + 500  # ADM takes timesteps
        tnoise = tnoise * 100
    labels = torch.tensor([3, 7]) if config.num_classes else None

    ref_net = set_fused_ops(copy.deepcopy(net).double(), False)
    with sdpa_kernel(SDPBackend.MATH):  # SDPA's fused kernels have no forward mode
        ref, tref = torch.func.jvp(lambda x, n: ref_net(x, n, labels), (x.double(), noise.double()),
                                   (tx.double(), tnoise.double()))  # fmt: skip
    weight = torch.linspace(-1, 1, ref.numel()).reshape(ref.shape)
    (ref * weight.double()).sum().backward()

    calls = {"group_norm_silu": 0, "attention": 0}
    count_jvps(monkeypatch, _gn.GroupNormSiLU, calls, "group_norm_silu")
    count_jvps(monkeypatch, _attn.Attention, calls, "attention")
    set_fused_ops(net.to(where), True)
    x, noise, tx, tnoise, weight = (t.to(where) for t in (x, noise, tx, tnoise, weight))
    labels = labels.to(where) if labels is not None else None
    with sdpa_kernel(SDPBackend.MATH):  # ADM's attention falls back to SDPA where no fused kernel runs
        out, tout = torch.func.jvp(lambda x, n: net(x, n, labels), (x, noise), (tx, tnoise))
    (out * weight).sum().backward()  # the loss backpropagates through the primal output of the same call
    out, tout = out.cpu(), tout.cpu()

    assert calls["group_norm_silu"] > 0, "the fused GroupNorm+SiLU forward-mode rule did not run"
    if name.startswith("adm") and ops.explain("attention", torch.randn(1, 48, 64, device=where), 1).backend != "torch":
        assert calls["attention"] > 0, "the fused attention forward-mode rule did not run"
    assert tref.abs().max() > 0.1 and ref.abs().max() > 0.1
    scale = tref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(tout.double(), tref, rtol=1e-4, atol=1e-4 * scale)
    # a bias right before a GroupNorm has a zero gradient: float32 leaves rounding there, so the bound is global
    grad_scale = max(p.grad.abs().max().item() for p in ref_net.parameters() if p.grad is not None)
    for (pname, p), p_ref in zip(net.named_parameters(), ref_net.parameters()):
        if p_ref.grad is None:
            assert p.grad is None, pname
            continue
        torch.testing.assert_close(p.grad.cpu().double(), p_ref.grad, rtol=1e-3, atol=1e-5 * grad_scale, msg=pname)
