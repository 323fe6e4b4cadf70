"""The CD-step suite's own code paths: its SDPA baseline computes the networks' attention (against float64 formulas)
on unit-stride q/k/v, its CPU peak-memory measure counts what a call allocates, and its ratios are against the best
row of each baseline group. Run with `pytest bench/test_bench_cd_step.py` (`make bench` runs benchmarks only)."""

import math

import pytest
import torch

import cmfast
from bench.cd_step import summary
from bench.common import step_peak_bytes
from bench.sampling import sdpa_attention
from cmfast.networks import adm, song_unet


def softmax_attention_f64(q, k, v):
    """out[n, :, i] = sum_j softmax_j(q[n, :, i] . k[n, :, j] / sqrt(C)) v[n, :, j]; q, k, v: (N, C, L) float64."""
    weights = (q.transpose(1, 2) @ k / math.sqrt(q.shape[1])).softmax(dim=-1)  # (N, Lq, Lk)
    return v @ weights.transpose(1, 2)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Every call of F.scaled_dot_product_attention, as the unit strides of its q, k, v."""
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append(tuple(t.stride(-1) for t in (q, k, v)))
        return original(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_swapped_ddpmpp_attention_is_the_networks_attention(sdpa_calls):
    g = torch.Generator().manual_seed(0)
    # (N, C, 3, L) unbound on dim 2, as UNetBlock.self_attention hands q, k, v over: none of them unit-stride in L
    q, k, v = torch.randn(3, 5, 3, 7, generator=g, dtype=torch.float64).unbind(2)
    expected = softmax_attention_f64(q, k, v)
    own = song_unet.attention(q, k, v)
    with sdpa_attention():
        swapped = song_unet.attention(q, k, v)
    torch.testing.assert_close(own, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(swapped, expected, rtol=1e-12, atol=1e-12)
    assert sdpa_calls == [(1, 1, 1)]
    song_unet.attention(q, k, v)  # the swap is undone on leaving: the einsum again
    assert len(sdpa_calls) == 1


def test_swapped_attention_keeps_the_digits_network_and_its_gradient(sdpa_calls):
    torch.manual_seed(0)
    model = cmfast.ConsistencyModel(cmfast.build_network("ddpmpp-digits8")).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.3, 2.0, 40.0], dtype=torch.float64)

    def output_and_grad():
        xi = x.clone().requires_grad_(True)
        out = model(xi, sigma)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum(), xi)
        return out.detach(), grad

    own = output_and_grad()
    assert not sdpa_calls
    with sdpa_attention():
        swapped = output_and_grad()
    assert sdpa_calls and all(strides == (1, 1, 1) for strides in sdpa_calls)
    for a, b in zip(own, swapped):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_adm_attention_is_sdpa_on_unit_stride_inputs(sdpa_calls, memory_format):
    batch, heads, head_dim, h, w = 2, 3, 4, 3, 5
    g = torch.Generator().manual_seed(1)
    qkv_image = torch.randn(batch, 3 * heads * head_dim, h, w, generator=g, dtype=torch.float64)
    qkv = qkv_image.contiguous(memory_format=memory_format).reshape(batch, 3 * heads * head_dim, h * w)
    out = adm.qkv_attention(qkv, heads, "3hd")
    assert sdpa_calls == [(1, 1, 1)]
    q, k, v = qkv.reshape(batch, 3, heads, head_dim, h * w).unbind(1)  # channels (3, heads, head_dim)
    expected = softmax_attention_f64(*(t.reshape(batch * heads, head_dim, h * w) for t in (q, k, v)))
    torch.testing.assert_close(out, expected.reshape(batch, heads * head_dim, h * w), rtol=1e-12, atol=1e-12)


def test_step_peak_bytes_counts_what_the_call_adds_at_its_peak():
    mib = 2**20
    kept = torch.empty(8 * mib, dtype=torch.uint8)  # allocated before the call: not counted

    def call():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a  # 3 MiB live, then 2
        c = torch.empty(3 * mib, dtype=torch.uint8)  # 5 MiB live: the peak
        del b, c
        return torch.empty(mib // 2, dtype=torch.uint8)

    peak = step_peak_bytes(call, "cpu")
    assert 5 * mib <= peak < 5 * mib + 4096, peak
    assert kept.numel() == 8 * mib


def test_summary_ratios_are_against_each_groups_best_row():
    case = dict(model="m", batch=4, distance="l2")
    rows = [
        {**case, "variant": "eager-nchw", "group": "eager", "ms": 30.0},
        {**case, "variant": "eager-cl", "group": "eager", "ms": 20.0},
        {**case, "variant": "compile-a", "group": "compile", "ms": 16.0},
        {**case, "variant": "compile-b", "group": "compile", "ms": 12.0},
        {**case, "variant": "cmfast-fused-eager", "group": None, "ms": 10.0},
        {**case, "variant": "cmfast", "group": None, "skipped": "not run: a CUDA graph needs a CUDA device"},
        {**case, "distance": "lpips", "variant": "eager-nchw", "group": "eager", "ms": 100.0},
    ]
    out = {(r["distance"], r["variant"]): r for r in summary(rows)}
    assert out["l2", "eager-cl"]["baseline"] == "eager" and out["l2", "eager-cl"]["x_eager"] == 1.0
    assert out["l2", "eager-nchw"]["x_eager"] == pytest.approx(20 / 30) and out["l2", "eager-nchw"]["baseline"] is None
    assert out["l2", "compile-b"]["baseline"] == "compile"
    assert out["l2", "cmfast-fused-eager"]["x_eager"] == pytest.approx(2.0)
    assert out["l2", "cmfast-fused-eager"]["x_compile"] == pytest.approx(1.2)
    assert out["l2", "cmfast"]["note"].startswith("not run") and out["l2", "cmfast"]["x_eager"] is None
    assert out["lpips", "eager-nchw"]["x_eager"] == 1.0 and out["lpips", "eager-nchw"]["x_compile"] is None
