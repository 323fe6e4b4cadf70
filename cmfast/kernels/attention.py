"""Multi-head self-attention of the U-Nets' attention blocks, flash-style: forward and backward.

    out_h = softmax(q_h^T k_h / sqrt(D)) v_h^T,  per sample and head h, over the T positions

q, k and v are read straight from the qkv 1x1-convolution output (B, 3 H D, T) with the channels laid out as
(3, heads, head_dim), the released checkpoints' "3hd" layout (cmfast.networks.adm.qkv_attention): strided loads, no
transposed copies. The output is (B, H D, T), channels ordered (head, d), as the block's proj_out expects.

Forward: one program per (block of BLOCK_M queries, sample and head) streams the keys and values in blocks of BLOCK_N
with the online softmax (running max m and sum l, in float32 and base 2), so the T x T matrix never exists in memory.
It writes out and the float32 log-sum-exp lse of each query row, the only statistic the backward needs.
Backward (recomputing P = exp(S - lse) block by block): delta = rowsum(dO * O); one program per key block
accumulates dV = P^T dO and dK = scale dS^T Q, one per query block accumulates dQ = scale dS K, with
dS = P (dO V^T - delta). dq, dk and dv are written into one (B, 3 H D, T) tensor, the gradient of qkv.
Any T (the tail blocks are masked) and any head dim up to 256 (padded to a power of two of at least 16, masked).

Forward mode (JVP) along tq, tk, tv (the tangent of qkv), one pass over the keys per query block, with P known
exactly from the forward's lse (P = exp(S - lse), no running max):
    tS = scale (tQ K^T + Q tK^T),  tP = P * (tS - rowsum(P * tS)),
    tO = tP V + P tV = P tV + (P * tS) V - rowsum(P * tS) O.
One program per (block of BLOCK_M queries, sample and head) accumulates P tV, (P * tS) V, rowsum(P * tS) and O = P V
over the key blocks in float32 and writes tO once; like the forward, the T x T matrices never exist in memory. O is
recomputed rather than read because rowsum(P * tS) O must cancel against (P * tS) V to float32 accuracy (the stored O
is rounded to qkv's dtype); for 16-bit inputs P and P * tS enter the products as two-term sums for the same reason.

The registered op cmfast::attention (and cmfast::attention_backward, cmfast::attention_jvp) runs these kernels or
PyTorch, whichever backend cmfast.ops chose, with fake implementations for torch.compile; the C++/CUDA extension has no
attention kernel. Attention is the autograd.Function over it that carries the backward and the forward-mode rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import GRID_LIMIT, OFFSET_LIMIT, compute_dtype, dtype_reasons, jit, tl, triton

MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634

# --- 1. PyTorch reference -------------------------------------------------------------------------------------------


def attention_ref(qkv: Tensor, num_heads: int) -> Tensor:
    """What the unfused networks compute (adm.qkv_attention, layout "3hd"): qkv (B, 3 H D, T) with channels
    (3, heads, head_dim) -> (B, H D, T) with channels (head, d); softmax scale 1/sqrt(D)."""
    B, width, T = qkv.shape
    D = width // (3 * num_heads)
    q, k, v = (t.transpose(-1, -2) for t in qkv.reshape(B, 3, num_heads, D, T).unbind(1))
    out = F.scaled_dot_product_attention(q, k, v, scale=D**-0.5)
    return out.transpose(-1, -2).reshape(B, num_heads * D, T)


# --- 2. kernels ------------------------------------------------------------------------------------------------------


@jit
def _tile(Base, c0, t0, T, D, s_c, s_t, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Load channels c0 + d (d < D) at positions t0 + i (< T) of one sample as a [BLOCK_T, BLOCK_D] tile, or
    [BLOCK_D, BLOCK_T] when TRANSPOSED; 0 outside. Also returns the positions and their mask."""
    t = t0 + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    tmask, dmask = t < T, d < D
    if TRANSPOSED:
        x = tl.load(Base + (c0 + d)[:, None] * s_c + t[None, :] * s_t, mask=dmask[:, None] & tmask[None, :], other=0.0)
    else:
        x = tl.load(Base + (c0 + d)[None, :] * s_c + t[:, None] * s_t, mask=dmask[None, :] & tmask[:, None], other=0.0)
    return x, t, tmask


@jit
def _store_tile(Base, x, c0, t0, T, D, s_c, s_t, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a [BLOCK_T, BLOCK_D] tile at channels c0 + d, positions t0 + i, within D and T."""
    t = t0 + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (d < D)[None, :] & (t < T)[:, None]
    tl.store(Base + (c0 + d)[None, :] * s_c + t[:, None] * s_t, x.to(Base.dtype.element_ty), mask=mask)


@jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32. UPCAST multiplies as float32, which is exact for bfloat16 products, as the
    tensor cores' bfloat16 products are: Triton 3.8's interpreter returns garbage for a bfloat16 tl.dot."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@jit
def _attn_fwd_kernel(
    QKV,  # (B, 3 H D, T) input: q, k, v of head h at channels h D + d, (H + h) D + d, (2 H + h) D + d
    Out,  # (B, H D, T) output, channel h D + d; written once
    Lse,  # (B H, T) float32 natural-log log-sum-exp of each query's scaled scores; written once
    T,
    H,
    D,
    s_b,  # qkv strides (sample, channel, position)
    s_c,
    s_t,
    o_b,  # out strides
    o_c,
    o_t,
    qk_scale,  # softmax scale times log2(e): the kernel works in base 2
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs, so they are not rounded to tf32
    UPCAST: tl.constexpr,  # multiply bfloat16 tiles as float32 (the interpreter's bfloat16 tl.dot is wrong)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    base = QKV + b.to(tl.int64) * s_b
    q, tq, qmask = _tile(base, h * D, pid_m * BLOCK_M, T, D, s_c, s_t, BLOCK_M, BLOCK_D, False)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, T, BLOCK_N):
        kT, _, kmask = _tile(base, (H + h) * D, start, T, D, s_c, s_t, BLOCK_N, BLOCK_D, True)
        s = _dot(q, kT, DOT_PRECISION, UPCAST) * qk_scale
        s = tl.where(kmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds at least one valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v, _, _ = _tile(base, (2 * H + h) * D, start, T, D, s_c, s_t, BLOCK_N, BLOCK_D, False)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_tile(Out + b.to(tl.int64) * o_b, acc, h * D, pid_m * BLOCK_M, T, D, o_c, o_t, BLOCK_M, BLOCK_D)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # base 2 to natural log: the op's lse is exact-math's
    tl.store(Lse + bh.to(tl.int64) * T + tq, lse, mask=qmask)


@jit
def _attn_bwd_delta_kernel(
    Out,  # (B, H D, T) forward output
    DOut,  # (B, H D, T) its gradient
    Delta,  # (B H, T) float32 rowsum(dO * O) per query; written once
    T,
    H,
    D,
    o_b,  # out strides
    o_c,
    o_t,
    do_b,  # dout strides
    do_c,
    do_t,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    o, t, tmask = _tile(Out + b.to(tl.int64) * o_b, h * D, pid_m * BLOCK_M, T, D, o_c, o_t, BLOCK_M, BLOCK_D, False)
    do, _, _ = _tile(DOut + b.to(tl.int64) * do_b, h * D, pid_m * BLOCK_M, T, D, do_c, do_t, BLOCK_M, BLOCK_D, False)
    tl.store(Delta + bh.to(tl.int64) * T + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=tmask)


@jit
def _attn_bwd_dkdv_kernel(
    QKV,  # (B, 3 H D, T) forward input, as in _attn_fwd_kernel
    DOut,  # (B, H D, T) gradient of the output
    Lse,  # (B H, T) float32 from the forward
    Delta,  # (B H, T) float32 from _attn_bwd_delta_kernel
    DQKV,  # (B, 3 H D, T) gradient of qkv: this kernel writes the k and v channels
    T,
    H,
    D,
    s_b,  # qkv strides
    s_c,
    s_t,
    do_b,  # dout strides
    do_c,
    do_t,
    g_b,  # dqkv strides
    g_c,
    g_t,
    sm_scale,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    base = QKV + b.to(tl.int64) * s_b
    dbase = DOut + b.to(tl.int64) * do_b
    k, _, kmask = _tile(base, (H + h) * D, pid_n * BLOCK_N, T, D, s_c, s_t, BLOCK_N, BLOCK_D, False)
    v, _, _ = _tile(base, (2 * H + h) * D, pid_n * BLOCK_N, T, D, s_c, s_t, BLOCK_N, BLOCK_D, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, T, BLOCK_M):
        qT, tq, qmask = _tile(base, h * D, start, T, D, s_c, s_t, BLOCK_M, BLOCK_D, True)
        lse = tl.load(Lse + bh.to(tl.int64) * T + tq, mask=qmask, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + bh.to(tl.int64) * T + tq, mask=qmask, other=0.0)
        sT = _dot(k, qT, DOT_PRECISION, UPCAST) * (sm_scale * 1.4426950408889634)
        pT = tl.where(kmask[:, None] & qmask[None, :], tl.exp2(sT - lse[None, :]), 0.0)
        do, _, _ = _tile(dbase, h * D, start, T, D, do_c, do_t, BLOCK_M, BLOCK_D, False)
        dv += _dot(pT.to(do.dtype), do, DOT_PRECISION, UPCAST)
        dpT = _dot(v, tl.trans(do), DOT_PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(dsT.to(qT.dtype), tl.trans(qT), DOT_PRECISION, UPCAST)
    gbase = DQKV + b.to(tl.int64) * g_b
    _store_tile(gbase, dk * sm_scale, (H + h) * D, pid_n * BLOCK_N, T, D, g_c, g_t, BLOCK_N, BLOCK_D)
    _store_tile(gbase, dv, (2 * H + h) * D, pid_n * BLOCK_N, T, D, g_c, g_t, BLOCK_N, BLOCK_D)


@jit
def _attn_bwd_dq_kernel(
    QKV,  # (B, 3 H D, T) forward input, as in _attn_fwd_kernel
    DOut,  # (B, H D, T) gradient of the output
    Lse,  # (B H, T) float32 from the forward
    Delta,  # (B H, T) float32 from _attn_bwd_delta_kernel
    DQKV,  # (B, 3 H D, T) gradient of qkv: this kernel writes the q channels
    T,
    H,
    D,
    s_b,
    s_c,
    s_t,
    do_b,
    do_c,
    do_t,
    g_b,
    g_c,
    g_t,
    sm_scale,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    base = QKV + b.to(tl.int64) * s_b
    q, tq, qmask = _tile(base, h * D, pid_m * BLOCK_M, T, D, s_c, s_t, BLOCK_M, BLOCK_D, False)
    do, _, _ = _tile(DOut + b.to(tl.int64) * do_b, h * D, pid_m * BLOCK_M, T, D, do_c, do_t, BLOCK_M, BLOCK_D, False)
    lse = tl.load(Lse + bh.to(tl.int64) * T + tq, mask=qmask, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * T + tq, mask=qmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, T, BLOCK_N):
        kT, _, kmask = _tile(base, (H + h) * D, start, T, D, s_c, s_t, BLOCK_N, BLOCK_D, True)
        vT, _, _ = _tile(base, (2 * H + h) * D, start, T, D, s_c, s_t, BLOCK_N, BLOCK_D, True)
        s = _dot(q, kT, DOT_PRECISION, UPCAST) * (sm_scale * 1.4426950408889634)
        p = tl.where(kmask[None, :] & qmask[:, None], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, vT, DOT_PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_PRECISION, UPCAST)
    _store_tile(DQKV + b.to(tl.int64) * g_b, dq * sm_scale, h * D, pid_m * BLOCK_M, T, D, g_c, g_t, BLOCK_M, BLOCK_D)


@jit
def _attn_jvp_kernel(
    QKV,  # (B, 3 H D, T) forward input, as in _attn_fwd_kernel
    TQKV,  # (B, 3 H D, T) its tangent, same channel layout, strides t_b, t_c, t_t
    Lse,  # (B H, T) float32 from the forward
    TOut,  # (B, H D, T) tangent of the output; written once
    T,
    H,
    D,
    s_b,  # qkv strides
    s_c,
    s_t,
    t_b,  # tqkv strides
    t_c,
    t_t,
    o_b,  # tout strides
    o_c,
    o_t,
    sm_scale,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,  # 16-bit inputs: P and P * tS as two-term sums in the products
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    base = QKV + b.to(tl.int64) * s_b
    tbase = TQKV + b.to(tl.int64) * t_b
    q, tq_pos, qmask = _tile(base, h * D, pid_m * BLOCK_M, T, D, s_c, s_t, BLOCK_M, BLOCK_D, False)
    tq, _, _ = _tile(tbase, h * D, pid_m * BLOCK_M, T, D, t_c, t_t, BLOCK_M, BLOCK_D, False)
    lse = tl.load(Lse + bh.to(tl.int64) * T + tq_pos, mask=qmask, other=0.0) * 1.4426950408889634
    qk_scale = sm_scale * 1.4426950408889634
    acc_tv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # P tV
    acc_v = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # (P * tS) V
    r = tl.zeros([BLOCK_M], tl.float32)  # rowsum(P * tS)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # O again, in float32
    for start in range(0, T, BLOCK_N):
        kT, _, kmask = _tile(base, (H + h) * D, start, T, D, s_c, s_t, BLOCK_N, BLOCK_D, True)
        tkT, _, _ = _tile(tbase, (H + h) * D, start, T, D, t_c, t_t, BLOCK_N, BLOCK_D, True)
        s = _dot(q, kT, DOT_PRECISION, UPCAST) * qk_scale
        p = tl.where(kmask[None, :] & qmask[:, None], tl.exp2(s - lse[:, None]), 0.0)
        ts = (_dot(tq, kT, DOT_PRECISION, UPCAST) + _dot(q, tkT, DOT_PRECISION, UPCAST)) * sm_scale
        pts = p * ts
        v, _, _ = _tile(base, (2 * H + h) * D, start, T, D, s_c, s_t, BLOCK_N, BLOCK_D, False)
        tv, _, _ = _tile(tbase, (2 * H + h) * D, start, T, D, t_c, t_t, BLOCK_N, BLOCK_D, False)
        # P and P * tS enter the products rounded to v's dtype; for 16-bit inputs their rounding remainders go
        # through a second product (two-term split), since rowsum(P * tS) O must cancel against (P * tS) V and P V
        # to float32 accuracy: one rounding of P or P * tS (or the stored O) there costs 4x PyTorch's error in bf16
        p_hi = p.to(v.dtype)
        pts_hi = pts.to(v.dtype)
        acc_tv += _dot(p_hi, tv, DOT_PRECISION, UPCAST)
        acc_o += _dot(p_hi, v, DOT_PRECISION, UPCAST)
        acc_v += _dot(pts_hi, v, DOT_PRECISION, UPCAST)
        if SPLIT:
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            pts_lo = (pts - pts_hi.to(tl.float32)).to(v.dtype)
            acc_tv += _dot(p_lo, tv, DOT_PRECISION, UPCAST)
            acc_o += _dot(p_lo, v, DOT_PRECISION, UPCAST)
            acc_v += _dot(pts_lo, v, DOT_PRECISION, UPCAST)
        r += tl.sum(pts, 1)
    obase = b.to(tl.int64) * o_b
    tout = acc_tv + acc_v - r[:, None] * acc_o
    _store_tile(TOut + obase, tout, h * D, pid_m * BLOCK_M, T, D, o_c, o_t, BLOCK_M, BLOCK_D)


# --- 3. launchers ----------------------------------------------------------------------------------------------------


def unsupported(qkv: Tensor, num_heads: int) -> list[str]:
    """Why the Triton kernels cannot take these inputs (empty when they can). Shapes are checked by cmfast.ops."""
    reasons = dtype_reasons({"qkv": qkv})
    B, width, T = qkv.shape
    head_dim = width // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} is above {MAX_HEAD_DIM}")
    if B * num_heads > GRID_LIMIT:
        reasons.append(f"{B} samples x {num_heads} heads are above the grid limit {GRID_LIMIT}")
    span = max((width - 1) * abs(qkv.stride(1)) + (T - 1) * abs(qkv.stride(2)) + 1, width * T)
    if span >= OFFSET_LIMIT or B * num_heads * T >= OFFSET_LIMIT:
        reasons.append(f"{width} x {T} elements per sample overflow the kernels' 32-bit offsets")
    return reasons


def _check(qkv: Tensor, num_heads: int) -> None:
    reasons = unsupported(qkv, num_heads)
    if reasons:
        raise ValueError("attention Triton kernels: " + "; ".join(reasons))


def _blocks(block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head dim: wide heads take smaller blocks and fewer
    pipeline stages so the tiles fit in registers and the prefetched key and value tiles in shared memory.

    Query and key blocks are kept equal: with unequal ones the CUDA tests fail under Triton 3.6 (the interpreter
    passes both), for a reason not found yet; tests/kernels/test_attention.py::test_unequal_blocks tracks it."""
    if block_d <= 64:
        return 64, 64, 4, 3
    if block_d <= 128:
        return 64, 64, 4, 2
    return 32, 32, 8, 1


def _meta(qkv: Tensor, head_dim: int) -> dict:
    """Launch parameters: blocks, warps and stages, and how the kernels multiply tiles of qkv's dtype."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _blocks(block_d)
    return dict(
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        UPCAST=qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu",  # CPU tensors run in the interpreter
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def attention_forward(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    """Launch the forward. qkv: (B, 3 H D, T), channels (3, heads, head_dim), any strides. Returns out (B, H D, T)
    in qkv's dtype, channels (head, d), and the float32 (B, H, T) log-sum-exp the backward needs."""
    _check(qkv, num_heads)
    B, width, T = qkv.shape
    H, D = num_heads, width // (3 * num_heads)
    out = torch.empty((B, H * D, T), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=qkv.device)
    if out.numel() == 0:
        return out, lse
    meta = _meta(qkv, D)
    _attn_fwd_kernel[(triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        qkv, out, lse, T, H, D, *qkv.stride(), *out.stride(), D**-0.5 * _LOG2E, **meta
    )
    return out, lse


def attention_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int) -> Tensor:
    """Launch the backward: the gradient of qkv, (B, 3 H D, T) in qkv's dtype, from dout (B, H D, T), the forward's
    input qkv, output out and float32 (B, H, T) lse. P is recomputed block by block from lse."""
    _check(qkv, num_heads)
    B, width, T = qkv.shape
    H, D = num_heads, width // (3 * num_heads)
    dqkv = torch.empty((B, width, T), dtype=qkv.dtype, device=qkv.device)
    if dqkv.numel() == 0:
        return dqkv
    meta = _meta(qkv, D)
    lse = lse.contiguous()
    delta = torch.empty((B, H, T), dtype=torch.float32, device=qkv.device)
    _attn_bwd_delta_kernel[(triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        out, dout, delta, T, H, D, *out.stride(), *dout.stride(), BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"]
    )
    args = (qkv, dout, lse, delta, dqkv, T, H, D, *qkv.stride(), *dout.stride(), *dqkv.stride(), D**-0.5)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, meta["BLOCK_N"]), B * H)](*args, **meta)
    _attn_bwd_dq_kernel[(triton.cdiv(T, meta["BLOCK_M"]), B * H)](*args, **meta)
    return dqkv


def attention_jvp(qkv: Tensor, tqkv: Tensor, lse: Tensor, num_heads: int) -> Tensor:
    """Launch the forward-mode kernel: the tangent of the output, (B, H D, T) in qkv's dtype, along tqkv (like qkv,
    any strides), from the forward's float32 (B, H, T) lse."""
    _check(qkv, num_heads)
    B, width, T = qkv.shape
    H, D = num_heads, width // (3 * num_heads)
    tout = torch.empty((B, H * D, T), dtype=qkv.dtype, device=qkv.device)
    if tout.numel() == 0:
        return tout
    meta = _meta(qkv, D)
    # four tiles stream per key block (k, tk, v, tv), twice the forward's: fewer pipeline stages keep the prefetched
    # ones within shared memory (one stage for float32 heads above 64)
    wide = qkv.element_size() == 4 and meta["BLOCK_D"] > 64
    meta["num_stages"] = 1 if wide else max(1, meta["num_stages"] - 1)
    tqkv = tqkv.to(qkv.dtype)
    _attn_jvp_kernel[(triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        qkv, tqkv, lse.contiguous(), tout, T, H, D, *qkv.stride(), *tqkv.stride(), *tout.stride(), D**-0.5,
        SPLIT=qkv.element_size() == 2, **meta,
    )  # fmt: skip
    return tout


# --- 4. registered op ------------------------------------------------------------------------------------------------


def attention_backward_torch(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int) -> Tensor:
    """The kernels' backward in PyTorch (float32, float64 for float64), materializing the T x T scores: the
    registered op's torch implementation, for opcheck and as the kernels' specification."""
    compute = compute_dtype(qkv.dtype)
    B, width, T = qkv.shape
    H, D = num_heads, width // (3 * num_heads)
    q, k, v = qkv.to(compute).reshape(B, 3, H, D, T).unbind(1)  # (B, H, D, T)
    do, o = (t.to(compute).reshape(B, H, D, T) for t in (dout, out))
    p = torch.exp(torch.einsum("bhdi,bhdj->bhij", q, k) * D**-0.5 - lse.to(compute)[..., None])
    dv = torch.einsum("bhij,bhdi->bhdj", p, do)
    dp = torch.einsum("bhdi,bhdj->bhij", do, v)
    ds = p * (dp - (do * o).sum(2)[..., None])
    dq = torch.einsum("bhij,bhdj->bhdi", ds, k) * D**-0.5
    dk = torch.einsum("bhij,bhdi->bhdj", ds, q) * D**-0.5
    return torch.stack((dq, dk, dv), 1).reshape(B, width, T).to(qkv.dtype)


def attention_lse_torch(qkv: Tensor, num_heads: int) -> Tensor:
    """The (B, H, T) log-sum-exp of each query's scaled scores, in float32 (float64 for float64)."""
    compute = compute_dtype(qkv.dtype)
    B, width, T = qkv.shape
    D = width // (3 * num_heads)
    q, k, _ = qkv.to(compute).reshape(B, 3, num_heads, D, T).unbind(1)
    return torch.logsumexp(torch.einsum("bhdi,bhdj->bhij", q, k) * D**-0.5, dim=-1)


@torch.library.custom_op("cmfast::attention", mutates_args=())
def _attention_op(qkv: Tensor, num_heads: int, backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse); lse is the (B, H, T) log-sum-exp of each query's scaled scores, which the backward reuses.
    backend: "triton" or "torch"."""
    if backend == "triton":
        return attention_forward(qkv, num_heads)
    return attention_ref(qkv, num_heads).contiguous(), attention_lse_torch(qkv, num_heads)


@_attention_op.register_fake
def _(qkv, num_heads, backend):
    B, width, T = qkv.shape
    out = qkv.new_empty((B, width // 3, T))
    return out, qkv.new_empty((B, num_heads, T), dtype=compute_dtype(qkv.dtype))


@torch.library.custom_op("cmfast::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, backend: str) -> Tensor:
    """The gradient of qkv, (B, 3 H D, T) in qkv's dtype."""
    if backend == "triton":
        return attention_backward(dout, qkv, out, lse, num_heads)
    return attention_backward_torch(dout, qkv, out, lse, num_heads)


@_attention_backward_op.register_fake
def _(dout, qkv, out, lse, num_heads, backend):
    return qkv.new_empty(qkv.shape)


def attention_jvp_torch(qkv: Tensor, tqkv: Tensor, lse: Tensor, num_heads: int) -> Tensor:
    """The kernel's forward-mode rule in PyTorch (float32, float64 for float64), materializing the T x T scores and
    recomputing O = P V: the registered JVP's torch implementation and the kernel's specification."""
    compute = compute_dtype(qkv.dtype)
    B, width, T = qkv.shape
    H, D = num_heads, width // (3 * num_heads)
    q, k, v = qkv.to(compute).reshape(B, 3, H, D, T).unbind(1)  # (B, H, D, T)
    tq, tk, tv = tqkv.to(compute).reshape(B, 3, H, D, T).unbind(1)
    p = torch.exp(torch.einsum("bhdi,bhdj->bhij", q, k) * D**-0.5 - lse.to(compute)[..., None])
    ts = (torch.einsum("bhdi,bhdj->bhij", tq, k) + torch.einsum("bhdi,bhdj->bhij", q, tk)) * D**-0.5
    pts = p * ts
    o = torch.einsum("bhij,bhdj->bhdi", p, v)
    tout = (
        torch.einsum("bhij,bhdj->bhdi", p, tv) + torch.einsum("bhij,bhdj->bhdi", pts, v) - pts.sum(-1)[:, :, None] * o
    )
    return tout.reshape(B, H * D, T).to(qkv.dtype)


@torch.library.custom_op("cmfast::attention_jvp", mutates_args=())
def _attention_jvp_op(qkv: Tensor, tqkv: Tensor, lse: Tensor, num_heads: int, backend: str) -> Tensor:
    """The tangent of the output along tqkv, (B, H D, T) in qkv's dtype; backend: "triton" or "torch"."""
    if backend == "triton":
        return attention_jvp(qkv, tqkv, lse, num_heads)
    return attention_jvp_torch(qkv, tqkv, lse, num_heads)


@_attention_jvp_op.register_fake
def _(qkv, tqkv, lse, num_heads, backend):
    B, width, T = qkv.shape
    return qkv.new_empty((B, width // 3, T))


def _setup_context(ctx, inputs, output):
    qkv, num_heads, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.backend = num_heads, backend


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return torch.ops.cmfast.attention_backward(dout, qkv, out, lse, ctx.num_heads, ctx.backend), None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


class Attention(torch.autograd.Function):
    """cmfast::attention with its backward and its forward-mode rule: apply(qkv, num_heads, backend, jvp_backend) ->
    (out, lse), lse not differentiable. backend runs the forward and the backward, jvp_backend the tangent (cmfast.ops
    chooses both; an exception there is raised when a JVP is taken)."""

    @staticmethod
    def forward(qkv, num_heads, backend, jvp_backend):
        return torch.ops.cmfast.attention(qkv, num_heads, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, num_heads, backend, jvp_backend = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(qkv, out, lse)
        ctx.save_for_forward(qkv, lse)
        ctx.num_heads, ctx.backend, ctx.jvp_backend = num_heads, backend, jvp_backend

    @staticmethod
    def backward(ctx, dout, dlse):
        return (*_backward(ctx, dout, dlse), None)

    @staticmethod
    def jvp(ctx, tqkv, *_):
        if isinstance(ctx.jvp_backend, Exception):  # the backend asked for has no forward-mode kernel here
            raise ctx.jvp_backend
        qkv, lse = ctx.saved_tensors
        return torch.ops.cmfast.attention_jvp(qkv, tqkv, lse, ctx.num_heads, ctx.jvp_backend), None
