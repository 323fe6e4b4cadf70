"""The networks with their fused ops switched on (`set_fused_ops`) against themselves with the ops off: the same
outputs and input gradients up to float rounding, with the fused ops really running (Triton, through the CPU
interpreter here), for ADM (GroupNorm+SiLU, scale-shift, attention) and DDPM++ (GroupNorm+SiLU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed")

from cmfast.kernels import group_norm_silu as K  # noqa: E402
from conftest import perturb_  # noqa: E402

from cmfast import ops  # noqa: E402
from cmfast.networks import ADMConfig, SongUNetConfig, build_network, set_fused_ops  # noqa: E402

pytestmark = pytest.mark.triton

CONFIGS = {
    "adm": ADMConfig(
        image_size=8,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_head_channels=16,
        num_classes=3,
    ),
    "adm-no-scale-shift": ADMConfig(
        image_size=8,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_head_channels=32,
        use_scale_shift_norm=False,
    ),
    "ddpmpp": SongUNetConfig(
        img_resolution=8,
        in_channels=1,
        out_channels=1,
        model_channels=32,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_network_matches_the_reference(name):
    if not torch.cuda.is_available() and not ops._interpreted(K):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    config = CONFIGS[name]
    torch.manual_seed(0)
    net = perturb_(build_network(config), scale=0.2).eval()
    channels = config.in_channels
    x = torch.randn(2, channels, 8, 8)
    noise = torch.tensor([-0.5, 0.7]) * (250 if name.startswith("adm") else 1)
    labels = torch.tensor([0, 2]) if getattr(config, "num_classes", 0) else None

    def run(fused):
        set_fused_ops(net, fused)
        xi = x.clone().requires_grad_(True)
        out = net(xi, noise, labels)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), xi.grad

    calls = []
    original = ops.group_norm_silu
    ops.group_norm_silu = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        fused_out, fused_grad = run(True)
    finally:
        ops.group_norm_silu = original
    ref_out, ref_grad = run(False)
    assert calls, "the fused path did not call cmfast.ops"
    fused_backend = "cuda" if not ops._extension_reason() else "triton"  # the C++ extension comes first when built
    assert ops.explain("group_norm_silu", torch.randn(1, 64, 3, 3), None, None).backend == fused_backend
    assert ref_out.abs().max() > 0.1
    torch.testing.assert_close(fused_out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-3, atol=1e-4)
