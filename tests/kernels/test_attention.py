"""Flash-style attention (cmfast.kernels.attention) against autograd of the float64 reference: the output and the
gradient of qkv, read from and written to the qkv convolution's (B, 3 H D, T) layout, for T not a multiple of the
blocks, one and several heads, head dims 16 to 256, batch 1 and 3; and agreement with adm.qkv_attention.

CPU runs go through Triton's interpreter (marker `triton`), CUDA runs use the networks' shapes (marker `cuda`).
Tolerance: the kernel's error against float64 is at most twice PyTorch's own error in the same dtype plus a floor.
"""

import pytest
import torch

from cmfast import ops
from cmfast.kernels import attention as K
from cmfast.kernels._common import interpreted
from cmfast.networks.adm import qkv_attention

triton = pytest.importorskip("triton", reason="triton is not installed")

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, heads, head_dim, T): T not a multiple of the blocks, batch 1 and 3, one and several heads
SHAPES = {
    "cpu": [(3, 3, 16, 37), (1, 1, 64, 70), (1, 2, 32, 5), (3, 1, 32, 64), (1, 1, 256, 40)],
    "cuda": [(3, 4, 64, 1024), (1, 1, 256, 256), (2, 1, 256, 1000), (1, 6, 64, 4096), (3, 2, 32, 333)],
}


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("CMFAST_BACKEND", raising=False)


def make_inputs(shape, dtype, device, seed=0, strided=False):
    """qkv (B, 3 H D, T) with peaked softmaxes (scores of std ~2), and an upstream gradient (B, H D, T). strided: qkv
    as a (B, T, 3 H D) tensor's transpose, so positions are not the fastest-moving dimension."""
    B, H, D, T = shape
    g = torch.Generator().manual_seed(seed)
    qkv = 1.4 * torch.randn(B, T, 3 * H * D, generator=g) + 0.2 * torch.randn(3 * H * D, generator=g)
    qkv = qkv.to(device, dtype).transpose(1, 2)
    if not strided:
        qkv = qkv.contiguous()
    return qkv, torch.randn(B, H * D, T, generator=g).to(device, dtype)


def run(qkv, dout, num_heads, backend, cast=None):
    """The output and the gradient of qkv through cmfast.ops (cast: e.g. torch.float64 for the reference)."""
    qkv = (qkv.to(cast) if cast is not None else qkv).detach().requires_grad_()
    out = ops.attention(qkv, num_heads, backend=backend)
    out.backward(dout.to(out.dtype))
    return {"out": out.detach(), "dqkv": qkv.grad}


@pytest.fixture
def check(poisoned_outputs, within_rule):
    """check(shape, dtype, device, seed=0, strided=False) for shape (B, heads, head_dim, T): the Triton backend's
    output and gradient of qkv against float64, within the rule."""
    assert_within_rule = within_rule(FLOOR)

    def check(shape, dtype, device, seed=0, strided=False):
        qkv, dout = make_inputs(shape, dtype, device, seed, strided)
        with poisoned_outputs():
            fused = run(qkv, dout, shape[1], "triton")
        ref = run(qkv, dout, shape[1], "torch", cast=torch.float64)
        low = run(qkv, dout, shape[1], "torch")
        for name, value in fused.items():
            assert value.dtype == dtype and value.shape == ref[name].shape, name
            assert_within_rule(value, ref[name], low[name], dtype, f"{name} of {shape} {dtype}")

    return check


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_gradients(device, dtype, check):
    for i, shape in enumerate(SHAPES[device]):
        check(shape, dtype, device, seed=i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_blocks_with_a_partial_tail(device, dtype, monkeypatch, check):
    """Small blocks so every loop runs several iterations, and the last block partly past T; qkv strided
    (positions not contiguous)."""
    monkeypatch.setattr(K, "_blocks", lambda block_d: (16, 16, 4, 1))
    check((3, 2, 16, 71), dtype, device, strided=True)
    monkeypatch.setattr(K, "_blocks", lambda block_d: (32, 32, 4, 2))
    check((1, 1, 32, 50), dtype, device, seed=1)


@pytest.mark.parametrize("blocks", [(16, 32, 4, 1), (32, 16, 4, 1), (64, 32, 4, 2)])
def test_unequal_blocks(device, blocks, monkeypatch, request, check):
    """Query and key blocks of different sizes. They pass in the interpreter but fail on CUDA with Triton 3.6, so the
    launcher keeps them equal; this test stays to find the cause. On CUDA it is a strict xfail: a pass there means
    the launcher may use unequal blocks again."""
    if device == "cuda":
        reason = "unequal query and key blocks fail on CUDA with Triton 3.6, not diagnosed (see attention._blocks)"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=True))
    monkeypatch.setattr(K, "_blocks", lambda block_d: blocks)
    check((2, 2, 32 if blocks[0] < 64 else 128, 71), torch.float32, device, strided=True)


@pytest.mark.parametrize("head_dim", [24, 128, 256])
def test_wide_and_irregular_head_dims(device, head_dim, check):
    """DDPM++'s one 256-channel head, each block configuration, and a head dim that is not a power of two (padded
    and masked)."""
    check((1, 1, head_dim, 70 if device == "cpu" else 777), torch.float32, device)


def test_matches_adm_qkv_attention(device):
    """What the unfused ADM attention block computes (layout "3hd"), output and gradient."""
    qkv, dout = make_inputs((3, 3, 16, 37) if device == "cpu" else (2, 4, 64, 1024), torch.float32, device)
    fused = run(qkv, dout, 3 if device == "cpu" else 4, "triton")
    x = qkv.detach().requires_grad_()
    out = qkv_attention(x, 3 if device == "cpu" else 4, "3hd")
    out.backward(dout)
    torch.testing.assert_close(fused["out"], out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused["dqkv"], x.grad, atol=1e-5, rtol=1e-5)


def test_broadcast_upstream_gradient(device):
    """out.sum() hands the backward a stride-0 gradient, which the kernels read in place."""
    qkv, _ = make_inputs((2, 2, 16, 21), torch.float32, device)
    x, y = qkv.detach().requires_grad_(), qkv.detach().requires_grad_()
    ops.attention(x, 2, backend="triton").sum().backward()
    qkv_attention(y, 2).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)


# --- dispatch and registration ---------------------------------------------------------------------------------------


def test_reasons_and_fallback():
    qkv = torch.randn(2, 3 * 512, 4, dtype=torch.float64)
    choice = ops.explain("attention", qkv, 1)
    assert choice.backend == "torch"
    assert choice.skipped["ext"] == (ops.extension.reason() or "cmfast._C has no CPU kernel for attention")
    if triton is not None:
        assert "torch.float64" in choice.skipped["triton"] and "head dim 512" in choice.skipped["triton"]
    with pytest.raises(ops.BackendError, match="head dim 512"):
        ops.attention(qkv.float(), 1, backend="triton")
    torch.testing.assert_close(ops.attention(qkv, 2), qkv_attention(qkv, 2))
    with pytest.raises(ValueError, match="do not split"):
        ops.attention(torch.randn(1, 10, 4), 2)
    with pytest.raises(ValueError, match="must be"):
        ops.attention(torch.randn(1, 6, 2, 2), 1)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck(backend):
    if backend == "triton" and not interpreted(K):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    qkv, dout = make_inputs((3, 2, 16, 11), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.cmfast.attention.default, (qkv.requires_grad_(), 2, backend))
    out, lse = torch.ops.cmfast.attention(qkv.detach(), 2, backend)
    torch.library.opcheck(torch.ops.cmfast.attention_backward.default, (dout, qkv.detach(), out, lse, 2, backend))


def test_registered_torch_backward_matches_autograd_of_the_reference():
    qkv, dout = make_inputs((3, 2, 16, 11), torch.float64, "cpu")
    x = qkv.detach().requires_grad_()
    torch.ops.cmfast.attention(x, 2, "torch")[0].backward(dout)
    y = qkv.detach().requires_grad_()
    K.attention_ref(y, 2).backward(dout)
    torch.testing.assert_close(x.grad, y.grad)


def test_torch_compile_traces_the_op():
    if not interpreted(K):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    qkv, dout = make_inputs((1, 2, 16, 9), torch.float32, "cpu")
    compiled = torch.compile(lambda x: ops.attention(x, 2, backend="triton"), backend="aot_eager", fullgraph=True)
    x = qkv.detach().requires_grad_()
    out = compiled(x)
    out.backward(dout)
    y = qkv.detach().requires_grad_()
    qkv_attention(y, 2).backward(dout)
    torch.testing.assert_close(out.detach(), qkv_attention(qkv, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-5)
