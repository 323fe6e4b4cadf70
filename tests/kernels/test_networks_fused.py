"""The networks with their fused ops switched on (`set_fused_ops`) against themselves with the ops off: the same
outputs and input gradients up to float rounding, with the fused ops really running (Triton, through the CPU
interpreter here), for ADM (GroupNorm+SiLU, scale-shift, attention) and DDPM++ (GroupNorm+SiLU)."""

import pytest
import torch

from cmfast import ops
from cmfast.kernels import group_norm_silu as K
from cmfast.kernels._common import interpreted
from cmfast.networks import ADMConfig, SongUNetConfig, build_network, set_fused_ops

pytest.importorskip("triton", reason="triton is not installed")

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
def test_fused_network_matches_the_reference(name, perturb, monkeypatch):
    if not torch.cuda.is_available() and not interpreted(K):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    config = CONFIGS[name]
    torch.manual_seed(0)
    net = perturb(build_network(config), scale=0.2).eval()
    channels = config.in_channels
    x = torch.randn(2, channels, 8, 8)
    noise = torch.tensor([-0.5, 0.7]) * (250 if name.startswith("adm") else 1)
    labels = torch.tensor([0, 2]) if config.num_classes else None

    def run(fused):
        set_fused_ops(net, fused)
        xi = x.clone().requires_grad_(True)
        out = net(xi, noise, labels)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return out.detach(), xi.grad

    calls = {"group_norm_silu": 0, "attention": 0}

    def spy(op):
        original = getattr(ops, op)
        return lambda *a, **k: calls.update({op: calls[op] + 1}) or original(*a, **k)

    with monkeypatch.context() as m:
        for op in calls:
            m.setattr(ops, op, spy(op))
        fused_out, fused_grad = run(True)
    ref_out, ref_grad = run(False)
    assert calls["group_norm_silu"], "the fused path did not call cmfast.ops"
    if name.startswith("adm"):
        assert calls["attention"], "ADM's attention did not go through cmfast.ops.attention"
    fused_backend = "ext" if not ops.extension.reason() else "triton"  # the C++ extension comes first when built
    assert ops.explain("group_norm_silu", torch.randn(1, 64, 3, 3), None, None).backend == fused_backend
    assert ref_out.abs().max() > 0.1
    torch.testing.assert_close(fused_out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-3, atol=1e-4)
