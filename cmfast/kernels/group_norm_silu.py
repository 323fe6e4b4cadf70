"""GroupNorm + SiLU, GroupNorm alone and ADM's scale-shift form in one fused op: forward and backward.

    y = act(xhat a + t),  xhat = (x - mean_g) rstd_g,  a = weight (1 + scale),  t = bias (1 + scale) + shift

act is SiLU (or the identity for silu=False); scale and shift are ADM's per-(sample, channel) embedding terms
(0 without the scale-shift form), so this is norm(x) * (1 + scale) + shift then SiLU. Statistics and arithmetic are
float32 whatever x's dtype (float32, bfloat16 or float16), and y is rounded once. x is (B, C, *spatial), NCHW-
contiguous or channels_last; a group is C / G channels by H x W positions, addressed as a [BLOCK_C, BLOCK_P] tile.

Three forward paths, picked by the launcher from the layout and the group's padded size:
- fused: one program per (sample, group) holds the whole group: x is read once, y written once (and mean, rstd).
- flat (NCHW, groups too big for one tile): a group is one contiguous span, which one program walks twice in
  FLAT_BLOCK steps, statistics merged step by step with Chan et al.'s parallel-variance formula, then normalize and
  write: x is read twice (the second time mostly from L2), y written once, no channel padding.
- split (channels_last, groups too big for one tile): a group is cut into chunks of H x W. A first kernel writes each
  chunk's mean and centred sum of squares, they are merged with Chan et al.'s formula in float32, and a second kernel
  normalizes: x is read twice, y written once.
The backward has the fused and split paths. With dz = dy act'(xhat a + t) and the per-(sample, channel) sums
sum_a = sum over H x W of dz xhat and sum_b = sum over H x W of dz, it computes
dx = rstd (dz a - mean_g(dz a) - xhat mean_g(dz a xhat)), the group means being sum_c a sum_b / n and
sum_c a sum_a / n, and from the sums the parameter gradients (summed over the batch for weight and bias):
dweight = sum_a (1 + scale), dbias = sum_b (1 + scale), dscale = sum_a weight + sum_b bias, dshift = sum_b.

Forward mode (JVP) along tangents tx, tweight, tbias, tscale, tshift, from the forward's mean and rstd:
    tmean = mean_g(tx),  trstd = -rstd^2 mean_g(xhat tx)  (sum_g (x - mean) = 0),
    txhat = rstd (tx - mean_g(tx) - xhat mean_g(xhat tx)),
    ta = tweight (1 + scale) + weight tscale,  tt = tbias (1 + scale) + bias tscale + tshift,
    ty = act'(z) (txhat a + xhat ta + tt),  z = xhat a + t,  silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))).
ta and tt are (B, C) and made in PyTorch; the kernels take the two group means of tx and xhat tx in the same program
as ty when the group fits in one tile (x and tx read once, ty written once), else from a partial-sums kernel first.

The registered op cmfast::group_norm_silu (and cmfast::group_norm_silu_backward, cmfast::group_norm_silu_jvp) runs the
C++/CUDA extension, these kernels or PyTorch, whichever backend cmfast.ops chose, with fake implementations for
torch.compile. GroupNormSiLU is the autograd.Function over it that carries the backward and the forward-mode rule
(torch.library.custom_op takes no forward-mode rule), for torch.func.jvp and torch.autograd.forward_ad.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    GRID_LIMIT,
    OFFSET_LIMIT,
    compute_dtype,
    dtype_reasons,
    ext_has_kernel,
    jit,
    memory_format,
    per_sample_numel,
    tl,
)

MAX_FUSED_FWD = 32768  # padded group elements one forward program holds (16 warps: 64 float32 per thread)
MAX_FUSED_BWD = 16384  # the backward keeps x, dy and dz live, so it splits earlier
CHUNK = 4096  # padded elements per program in the split path
FLAT_BLOCK, FLAT_WARPS = 2048, 8  # the NCHW looped forward's step and warps
# NCHW groups too big for one tile take the looped forward; below that the one-tile path is faster (measured in
# bench/README.md), so the looped one only replaces the split path's three passes.
FLAT_ABOVE = MAX_FUSED_FWD
FORWARD_PATHS = ("auto", "flat", "tile")  # the launcher's `path`: "flat" and "tile" force one (benchmarks, tests)
MAX_CHANNELS_PER_GROUP = 4096

# --- 1. PyTorch reference -------------------------------------------------------------------------------------------


def group_norm_silu_ref(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int = 32,
    eps: float = 1e-5,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
) -> Tensor:
    """What the unfused networks compute: GroupNorm in float32 (ADM's GroupNorm32) cast back to x's dtype, then
    `* (1 + scale) + shift` and SiLU in x's dtype. x: (B, C, *spatial); weight, bias: (C,); scale, shift: B x C
    values (e.g. (B, C, 1, 1))."""
    compute = compute_dtype(x.dtype)
    w = weight.to(compute) if weight is not None else None
    b = bias.to(compute) if bias is not None else None
    h = F.group_norm(x.to(compute), num_groups, w, b, eps).to(x.dtype)
    if scale is not None:
        shape = (*x.shape[:2], *[1] * (x.dim() - 2))
        h = h * (1 + scale.reshape(shape)) + shift.reshape(shape)
    return F.silu(h) if silu else h


# --- 2. kernels ------------------------------------------------------------------------------------------------------


@jit
def _tile(pid, chunk, G, cpg, HW, stride_b, stride_c, stride_p, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Sample b, channels c, the channel mask, and offsets and mask of chunk `chunk` of group pid % G."""
    b = pid // G
    ci = tl.arange(0, BLOCK_C)
    c = (pid % G) * cpg + ci
    p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = ci < cpg
    mask = cmask[:, None] & (p < HW)[None, :]
    offs = b.to(tl.int64) * stride_b + c[:, None] * stride_c + p[None, :] * stride_p
    return b, c, cmask, offs, mask


@jit
def _channel_affine(W, Bias, Scale, Shift, b, c, cmask, ss_b, ss_c, st_b, st_c, HAS_SCALE_SHIFT: tl.constexpr):
    """Per-channel a = weight (1 + scale) and t = bias (1 + scale) + shift (0 on masked channels)."""
    a = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    t = tl.load(Bias + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE_SHIFT:
        s1 = 1.0 + tl.load(Scale + b * ss_b + c * ss_c, mask=cmask, other=0.0).to(tl.float32)
        a = a * s1
        t = t * s1 + tl.load(Shift + b * st_b + c * st_c, mask=cmask, other=0.0).to(tl.float32)
    return a, t


@jit
def _gn_fwd_kernel(
    X,  # (B, C, HW) input, element (b, c, p) at b stride_b + c stride_c + p stride_p
    Y,  # output, same layout, written once
    W,  # (C,) weight
    Bias,  # (C,) bias
    Scale,  # (B, C) ADM scale at b ss_b + c ss_c; read only when HAS_SCALE_SHIFT
    Shift,  # (B, C) ADM shift at b st_b + c st_c; read only when HAS_SCALE_SHIFT
    Mean,  # (B, G) float32 group means: written when COMPUTE_STATS, else read
    Rstd,  # (B, G) float32 reciprocal standard deviations, likewise
    HW,
    G,
    cpg,  # channels per group
    stride_b,
    stride_c,
    stride_p,
    ss_b,
    ss_c,
    st_b,
    st_c,
    eps,
    COMPUTE_STATS: tl.constexpr,  # the program holds the whole group (fused path)
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)  # b * G + g
    b, c, cmask, offs, mask = _tile(pid, tl.program_id(1), G, cpg, HW, stride_b, stride_c, stride_p, BLOCK_C, BLOCK_P)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if COMPUTE_STATS:
        n = cpg * HW
        mean = tl.sum(x) / n
        xc = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc) / n + eps)
        tl.store(Mean + pid, mean)
        tl.store(Rstd + pid, rstd)
    else:
        mean = tl.load(Mean + pid)
        rstd = tl.load(Rstd + pid)
        xc = x - mean
    a, t = _channel_affine(W, Bias, Scale, Shift, b, c, cmask, ss_b, ss_c, st_b, st_c, HAS_SCALE_SHIFT)
    z = xc * rstd * a[:, None] + t[:, None]
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


@jit
def _gn_fwd_flat_kernel(
    X,  # (B, C, HW) NCHW-contiguous input: group pid is the n = cpg HW elements from pid n on
    Y,  # output, same layout, written once
    W,  # (C,) weight
    Bias,  # (C,) bias
    Scale,  # (B, C) ADM scale at b ss_b + c ss_c; read only when HAS_SCALE_SHIFT
    Shift,  # (B, C) ADM shift at b st_b + c st_c; read only when HAS_SCALE_SHIFT
    Mean,  # (B, G) float32 group means, written once
    Rstd,  # (B, G) float32 reciprocal standard deviations, written once
    HW,
    G,
    cpg,
    ss_b,
    ss_c,
    st_b,
    st_c,
    eps,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per (sample, group) walks the group's contiguous span twice in BLOCK-element steps: statistics
    (each step's mean and M2 merged by Chan et al.'s formula), then normalize and write. No channel padding, small
    tiles (so many programs per SM), and the second read mostly hits L2: the group was just read."""
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    n = cpg * HW
    base = pid.to(tl.int64) * n
    mean = tl.zeros([], tl.float32)
    m2 = tl.zeros([], tl.float32)
    count = tl.zeros([], tl.float32)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < n
        x = tl.load(X + base + i, mask=mask, other=0.0).to(tl.float32)
        nk = tl.minimum(n - start, BLOCK).to(tl.float32)
        mk = tl.sum(x) / nk
        xc = tl.where(mask, x - mk, 0.0)
        total = count + nk
        delta = mk - mean
        mean = mean + delta * (nk / total)
        m2 = m2 + tl.sum(xc * xc) + delta * delta * (count * nk / total)
        count = total
    rstd = tl.rsqrt(m2 / count + eps)
    tl.store(Mean + pid, mean)
    tl.store(Rstd + pid, rstd)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        mask = i < n
        x = tl.load(X + base + i, mask=mask, other=0.0).to(tl.float32)
        c = g * cpg + i // HW
        a, t = _channel_affine(W, Bias, Scale, Shift, b, c, mask, ss_b, ss_c, st_b, st_c, HAS_SCALE_SHIFT)
        z = (x - mean) * rstd * a + t
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(Y + base + i, z.to(Y.dtype.element_ty), mask=mask)


@jit
def _gn_stats_kernel(
    X,  # (B, C, HW) input, as in _gn_fwd_kernel
    PartMean,  # (B G, n_chunks) float32 chunk means
    PartM2,  # (B G, n_chunks) float32 chunk sums of squared deviations from the chunk mean
    HW,
    G,
    cpg,
    stride_b,
    stride_c,
    stride_p,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid, chunk = tl.program_id(0), tl.program_id(1)
    _, _, _, offs, mask = _tile(pid, chunk, G, cpg, HW, stride_b, stride_c, stride_p, BLOCK_C, BLOCK_P)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    n = cpg * tl.minimum(HW - chunk * BLOCK_P, BLOCK_P)
    mean = tl.sum(x) / n
    xc = tl.where(mask, x - mean, 0.0)
    tl.store(PartMean + pid * tl.num_programs(1) + chunk, mean)
    tl.store(PartM2 + pid * tl.num_programs(1) + chunk, tl.sum(xc * xc))


@jit
def _gn_bwd_dz(X, DY, offs, mask, mean, rstd, a, t, SILU: tl.constexpr):
    """xhat and dz = dy act'(xhat a + t) on one tile, both 0 outside the mask."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    if SILU:
        z = xhat * a[:, None] + t[:, None]
        sig = tl.sigmoid(z)
        dy = dy * sig * (1.0 + z * (1.0 - sig))
    return xhat, tl.where(mask, dy, 0.0)


@jit
def _gn_bwd_sums_kernel(
    X,  # (B, C, HW) forward input, as in _gn_fwd_kernel
    DY,  # gradient of y, same layout
    W,
    Bias,
    Scale,
    Shift,
    Mean,  # (B, G) float32 statistics from the forward
    Rstd,
    PartA,  # (B G, n_chunks, BLOCK_C) float32 partial sums of dz xhat per channel
    PartB,  # (B G, n_chunks, BLOCK_C) float32 partial sums of dz per channel
    HW,
    G,
    cpg,
    stride_b,
    stride_c,
    stride_p,
    ss_b,
    ss_c,
    st_b,
    st_c,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid, chunk = tl.program_id(0), tl.program_id(1)
    b, c, cmask, offs, mask = _tile(pid, chunk, G, cpg, HW, stride_b, stride_c, stride_p, BLOCK_C, BLOCK_P)
    a, t = _channel_affine(W, Bias, Scale, Shift, b, c, cmask, ss_b, ss_c, st_b, st_c, HAS_SCALE_SHIFT)
    xhat, dz = _gn_bwd_dz(X, DY, offs, mask, tl.load(Mean + pid), tl.load(Rstd + pid), a, t, SILU)
    out = (pid * tl.num_programs(1) + chunk) * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(PartA + out, tl.sum(dz * xhat, axis=1))
    tl.store(PartB + out, tl.sum(dz, axis=1))


@jit
def _gn_bwd_dx_kernel(
    X,  # (B, C, HW) forward input, as in _gn_fwd_kernel
    DY,  # gradient of y, same layout
    DX,  # gradient of x, same layout, written once
    W,
    Bias,
    Scale,
    Shift,
    Mean,  # (B, G) float32 statistics from the forward
    Rstd,
    SumA,  # (B, C) float32 sums of dz xhat: written when COMPUTE_SUMS, else read
    SumB,  # (B, C) float32 sums of dz, likewise
    HW,
    G,
    cpg,
    stride_b,
    stride_c,
    stride_p,
    ss_b,
    ss_c,
    st_b,
    st_c,
    COMPUTE_SUMS: tl.constexpr,  # the program holds the whole group (fused path)
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b, c, cmask, offs, mask = _tile(pid, tl.program_id(1), G, cpg, HW, stride_b, stride_c, stride_p, BLOCK_C, BLOCK_P)
    a, t = _channel_affine(W, Bias, Scale, Shift, b, c, cmask, ss_b, ss_c, st_b, st_c, HAS_SCALE_SHIFT)
    rstd = tl.load(Rstd + pid)
    xhat, dz = _gn_bwd_dz(X, DY, offs, mask, tl.load(Mean + pid), rstd, a, t, SILU)
    sums = b * G * cpg + c
    if COMPUTE_SUMS:
        sum_a = tl.sum(dz * xhat, axis=1)
        sum_b = tl.sum(dz, axis=1)
        tl.store(SumA + sums, sum_a, mask=cmask)
        tl.store(SumB + sums, sum_b, mask=cmask)
    else:
        sum_a = tl.load(SumA + sums, mask=cmask, other=0.0)
        sum_b = tl.load(SumB + sums, mask=cmask, other=0.0)
    n = cpg * HW
    mean_dxhat = tl.sum(a * sum_b) / n
    mean_dxhat_xhat = tl.sum(a * sum_a) / n
    dx = rstd * (dz * a[:, None] - mean_dxhat - xhat * mean_dxhat_xhat)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@jit
def _gn_jvp_sums_kernel(
    X,  # (B, C, HW) forward input, as in _gn_fwd_kernel
    TX,  # tangent of x, same layout
    Mean,  # (B, G) float32 statistics from the forward
    Rstd,
    PartT,  # (B G, n_chunks) float32 partial sums of tx
    PartXT,  # (B G, n_chunks) float32 partial sums of xhat tx
    HW,
    G,
    cpg,
    stride_b,
    stride_c,
    stride_p,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid, chunk = tl.program_id(0), tl.program_id(1)
    _, _, _, offs, mask = _tile(pid, chunk, G, cpg, HW, stride_b, stride_c, stride_p, BLOCK_C, BLOCK_P)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tx = tl.load(TX + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - tl.load(Mean + pid)) * tl.load(Rstd + pid), 0.0)
    tl.store(PartT + pid * tl.num_programs(1) + chunk, tl.sum(tx))
    tl.store(PartXT + pid * tl.num_programs(1) + chunk, tl.sum(xhat * tx))


@jit
def _gn_jvp_kernel(
    X,  # (B, C, HW) forward input, as in _gn_fwd_kernel
    TX,  # tangent of x, same layout
    TY,  # tangent of y, same layout, written once
    W,
    Bias,
    Scale,
    Shift,
    TA,  # (B, C) float32 tangent of a = weight (1 + scale); read only when HAS_TAFFINE
    TT,  # (B, C) float32 tangent of t = bias (1 + scale) + shift; read only when HAS_TAFFINE
    Mean,  # (B, G) float32 statistics from the forward
    Rstd,
    SumT,  # (B, G) float32 sums of tx over the group: written when COMPUTE_SUMS, else read
    SumXT,  # (B, G) float32 sums of xhat tx, likewise
    HW,
    G,
    cpg,
    stride_b,
    stride_c,
    stride_p,
    ss_b,
    ss_c,
    st_b,
    st_c,
    COMPUTE_SUMS: tl.constexpr,  # the program holds the whole group (fused path)
    HAS_SCALE_SHIFT: tl.constexpr,
    HAS_TAFFINE: tl.constexpr,  # weight, bias, scale or shift carry a tangent
    SILU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    b, c, cmask, offs, mask = _tile(pid, tl.program_id(1), G, cpg, HW, stride_b, stride_c, stride_p, BLOCK_C, BLOCK_P)
    a, t = _channel_affine(W, Bias, Scale, Shift, b, c, cmask, ss_b, ss_c, st_b, st_c, HAS_SCALE_SHIFT)
    rstd = tl.load(Rstd + pid)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tx = tl.load(TX + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - tl.load(Mean + pid)) * rstd, 0.0)
    if COMPUTE_SUMS:
        sum_t = tl.sum(tx)
        sum_xt = tl.sum(xhat * tx)
        tl.store(SumT + pid, sum_t)
        tl.store(SumXT + pid, sum_xt)
    else:
        sum_t = tl.load(SumT + pid)
        sum_xt = tl.load(SumXT + pid)
    n = cpg * HW
    txhat = rstd * (tx - sum_t / n - xhat * (sum_xt / n))
    tz = txhat * a[:, None]
    if HAS_TAFFINE:
        ta = tl.load(TA + b * G * cpg + c, mask=cmask, other=0.0)
        tt = tl.load(TT + b * G * cpg + c, mask=cmask, other=0.0)
        tz = tz + xhat * ta[:, None] + tt[:, None]
    if SILU:
        z = xhat * a[:, None] + t[:, None]
        sig = tl.sigmoid(z)
        tz = tz * sig * (1.0 + z * (1.0 - sig))
    tl.store(TY + offs, tz.to(TY.dtype.element_ty), mask=mask)


# --- 3. launchers ----------------------------------------------------------------------------------------------------


def unsupported(x: Tensor, num_groups: int) -> list[str]:
    """Why the Triton kernels cannot take these inputs (empty when they can). Shapes are checked by cmfast.ops."""
    reasons = dtype_reasons({"x": x})
    cpg = x.shape[1] // num_groups
    if cpg > MAX_CHANNELS_PER_GROUP:
        reasons.append(f"{cpg} channels per group exceed {MAX_CHANNELS_PER_GROUP}")
    elif _plan(cpg, _hw(x), 1)[2] > GRID_LIMIT:
        reasons.append(f"{_hw(x)} positions per channel need more chunks than the grid allows")
    if per_sample_numel(x) >= OFFSET_LIMIT:
        reasons.append(f"{per_sample_numel(x)} elements per sample overflow the kernels' 32-bit offsets")
    return reasons


def _hw(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _plan(cpg: int, hw: int, max_fused: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, n_chunks): the whole group in one tile when it fits in max_fused, else CHUNK-sized tiles."""
    block_c, block_p = _next_power_of_2(cpg), _next_power_of_2(hw)
    if block_c * block_p <= max_fused:
        return block_c, block_p, 1
    block_p = max(1, CHUNK // block_c)
    return block_c, block_p, -(-hw // block_p)


def _forward_path(fmt: torch.memory_format, padded_group: int, n_chunks: int, path: str = "auto") -> str:
    """ "flat" (NCHW: the looped kernel over the contiguous group), "fused" (one tile per group) or "split". path
    "flat" or "tile" forces the looped or the tiled kernels where the layout allows it."""
    if path not in FORWARD_PATHS:
        raise ValueError(f"unknown forward path {path!r}; expected one of {', '.join(FORWARD_PATHS)}")
    flat_layout = fmt != torch.channels_last  # the looped kernel walks a group's contiguous NCHW span
    if flat_layout and (path == "flat" or path == "auto" and padded_group > FLAT_ABOVE):
        return "flat"
    return "fused" if n_chunks == 1 else "split"


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_warps(block_c: int, block_p: int) -> int:
    return min(16, max(2, block_c * block_p // 1024))


def _layout(x: Tensor, scale: Tensor | None, shift: Tensor | None):
    """x made contiguous in its memory format, that format, and the launch's shape and stride arguments."""
    fmt = memory_format(x)
    x = x.contiguous(memory_format=fmt)
    C, hw = x.shape[1], _hw(x)
    strides = (hw * C, 1, C) if fmt == torch.channels_last else (C * hw, hw, 1)  # (b, c, p) of a dense layout
    ss = (scale.stride(0), scale.stride(1), shift.stride(0), shift.stride(1)) if scale is not None else (0, 0, 0, 0)
    return x, fmt, hw, strides, ss


def _check(x: Tensor, num_groups: int) -> None:
    reasons = unsupported(x, num_groups)
    if reasons:
        raise ValueError("group_norm_silu Triton kernels: " + "; ".join(reasons))


def group_norm_silu_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
    path: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward. x: (B, C, *spatial); weight, bias: (C,); scale, shift: (B, C) (any strides) or None.
    Returns y (x's dtype and layout) and the float32 (B, G) mean and rstd the backward needs. path: "auto" picks
    the kernels by layout and group size; "flat" (NCHW only) or "tile" forces one (see FORWARD_PATHS)."""
    _check(x, num_groups)
    x, fmt, hw, strides, ss = _layout(x, scale, shift)
    B, C, G = x.shape[0], x.shape[1], num_groups
    cpg = C // G
    y = torch.empty_like(x, memory_format=fmt)
    block_c, block_p, n_chunks = _plan(cpg, hw, MAX_FUSED_FWD)
    has_ss = scale is not None
    scale, shift = (scale, shift) if has_ss else (weight, weight)  # placeholders, never read
    meta = dict(HAS_SCALE_SHIFT=has_ss, SILU=bool(silu), BLOCK_C=block_c, BLOCK_P=block_p,
                num_warps=_num_warps(block_c, block_p))  # fmt: skip
    if y.numel() == 0:
        return y, x.new_zeros((B, G), dtype=torch.float32), x.new_zeros((B, G), dtype=torch.float32)
    if _forward_path(fmt, block_c * _next_power_of_2(hw), n_chunks, path) == "flat":
        mean = torch.empty((B, G), dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _gn_fwd_flat_kernel[(B * G,)](
            x, y, weight, bias, scale, shift, mean, rstd, hw, G, cpg, *ss, float(eps), HAS_SCALE_SHIFT=has_ss,
            SILU=bool(silu), BLOCK=FLAT_BLOCK, num_warps=FLAT_WARPS,
        )  # fmt: skip
        return y, mean, rstd
    if n_chunks == 1:
        mean = torch.empty((B, G), dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _gn_fwd_kernel[(B * G,)](
            x, y, weight, bias, scale, shift, mean, rstd, hw, G, cpg, *strides, *ss, float(eps), COMPUTE_STATS=True,
            **meta,
        )  # fmt: skip
        return y, mean, rstd
    part_mean = torch.empty((B * G, n_chunks), dtype=torch.float32, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    _gn_stats_kernel[(B * G, n_chunks)](
        x, part_mean, part_m2, hw, G, cpg, *strides, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=meta["num_warps"]
    )
    # Chan et al.: merge the chunks' (count, mean, M2) into the group's
    count = cpg * (hw - block_p * torch.arange(n_chunks, device=x.device)).clamp(max=block_p).float()
    n = cpg * hw
    mean = (part_mean * count).sum(1) / n
    m2 = part_m2.sum(1) + (count * (part_mean - mean[:, None]) ** 2).sum(1)
    mean, rstd = mean.view(B, G), torch.rsqrt(m2 / n + eps).view(B, G)
    _gn_fwd_kernel[(B * G, n_chunks)](
        x, y, weight, bias, scale, shift, mean, rstd, hw, G, cpg, *strides, *ss, float(eps), COMPUTE_STATS=False,
        **meta,
    )  # fmt: skip
    return y, mean, rstd


def group_norm_silu_backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Launch the backward: dx (x's dtype and layout), dweight, dbias, and dscale, dshift as (B, C) (None without
    the scale-shift form), each in its input's dtype."""
    _check(x, num_groups)
    x, fmt, hw, strides, ss = _layout(x, scale, shift)
    dy = dy.contiguous(memory_format=fmt)
    B, C, G = x.shape[0], x.shape[1], num_groups
    cpg = C // G
    dx = torch.empty_like(x, memory_format=fmt)
    block_c, block_p, n_chunks = _plan(cpg, hw, MAX_FUSED_BWD)
    has_ss = scale is not None
    s_arg, t_arg = (scale, shift) if has_ss else (weight, weight)  # placeholders, never read
    meta = dict(HAS_SCALE_SHIFT=has_ss, SILU=bool(silu), BLOCK_C=block_c, BLOCK_P=block_p,
                num_warps=_num_warps(block_c, block_p))  # fmt: skip
    mean, rstd = mean.contiguous(), rstd.contiguous()
    if dx.numel() == 0:
        sum_a = sum_b = x.new_zeros((B, C), dtype=torch.float32)
    elif n_chunks == 1:
        sum_a = torch.empty((B, C), dtype=torch.float32, device=x.device)
        sum_b = torch.empty_like(sum_a)
        _gn_bwd_dx_kernel[(B * G,)](
            x, dy, dx, weight, bias, s_arg, t_arg, mean, rstd, sum_a, sum_b, hw, G, cpg, *strides, *ss,
            COMPUTE_SUMS=True, **meta,
        )  # fmt: skip
    else:
        part_a = torch.empty((B * G, n_chunks, block_c), dtype=torch.float32, device=x.device)
        part_b = torch.empty_like(part_a)
        _gn_bwd_sums_kernel[(B * G, n_chunks)](
            x, dy, weight, bias, s_arg, t_arg, mean, rstd, part_a, part_b, hw, G, cpg, *strides, *ss, **meta
        )
        sum_a = part_a.sum(1)[:, :cpg].reshape(B, C)
        sum_b = part_b.sum(1)[:, :cpg].reshape(B, C)
        _gn_bwd_dx_kernel[(B * G, n_chunks)](
            x, dy, dx, weight, bias, s_arg, t_arg, mean, rstd, sum_a, sum_b, hw, G, cpg, *strides, *ss,
            COMPUTE_SUMS=False, **meta,
        )  # fmt: skip
    return (dx, *param_grads(sum_a, sum_b, weight, bias, scale, shift))


def affine_tangents(
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    tweight: Tensor | None,
    tbias: Tensor | None,
    tscale: Tensor | None,
    tshift: Tensor | None,
    batch: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor | None, Tensor | None]:
    """The (B, C) tangents of the per-channel a = weight (1 + scale) and t = bias (1 + scale) + shift, dense in
    `dtype`: ta = tweight (1 + scale) + weight tscale, tt = tbias (1 + scale) + bias tscale + tshift. (None, None)
    when no parameter carries a tangent. scale, tscale, tshift: (B, C) or None."""
    if all(t is None for t in (tweight, tbias, tscale, tshift)):
        return None, None
    C = weight.shape[0]
    s1 = 1 + scale.to(dtype) if scale is not None else torch.ones((), dtype=dtype, device=weight.device)
    ta = torch.zeros((batch, C), dtype=dtype, device=weight.device)
    tt = torch.zeros_like(ta)
    if tweight is not None:
        ta = ta + tweight.to(dtype) * s1
    if tbias is not None:
        tt = tt + tbias.to(dtype) * s1
    if tscale is not None:
        ta = ta + weight.to(dtype) * tscale.to(dtype)
        tt = tt + bias.to(dtype) * tscale.to(dtype)
    if tshift is not None:
        tt = tt + tshift.to(dtype)
    return ta.contiguous(), tt.contiguous()


def group_norm_silu_jvp(
    x: Tensor,
    tx: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    ta: Tensor | None,
    tt: Tensor | None,
    num_groups: int,
    silu: bool,
) -> Tensor:
    """Launch the forward-mode kernels: the tangent ty of y (x's dtype and layout) along tx (like x) and the (B, C)
    float32 tangents ta, tt of the per-channel affine (None: no parameter tangent), from the forward's (B, G) mean and
    rstd. The group means of tx and xhat tx are taken in the same program as ty when the group fits one tile."""
    _check(x, num_groups)
    x, fmt, hw, strides, ss = _layout(x, scale, shift)
    tx = tx.contiguous(memory_format=fmt)
    B, C, G = x.shape[0], x.shape[1], num_groups
    cpg = C // G
    ty = torch.empty_like(x, memory_format=fmt)
    if ty.numel() == 0:
        return ty
    block_c, block_p, n_chunks = _plan(cpg, hw, MAX_FUSED_BWD)  # x and tx live, as x and dy in the backward
    has_ss, has_taff = scale is not None, ta is not None
    s_arg, t_arg = (scale, shift) if has_ss else (weight, weight)  # placeholders, never read
    ta, tt = (ta, tt) if has_taff else (weight, weight)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    meta = dict(HAS_SCALE_SHIFT=has_ss, HAS_TAFFINE=has_taff, SILU=bool(silu), BLOCK_C=block_c, BLOCK_P=block_p,
                num_warps=_num_warps(block_c, block_p))  # fmt: skip
    sums = torch.empty((2, B * G), dtype=torch.float32, device=x.device)
    if n_chunks > 1:
        parts = torch.empty((2, B * G, n_chunks), dtype=torch.float32, device=x.device)
        _gn_jvp_sums_kernel[(B * G, n_chunks)](
            x, tx, mean, rstd, parts[0], parts[1], hw, G, cpg, *strides, BLOCK_C=block_c, BLOCK_P=block_p,
            num_warps=meta["num_warps"],
        )  # fmt: skip
        sums = parts.sum(-1)
    _gn_jvp_kernel[(B * G, n_chunks)](
        x, tx, ty, weight, bias, s_arg, t_arg, ta, tt, mean, rstd, sums[0], sums[1], hw, G, cpg, *strides, *ss,
        COMPUTE_SUMS=n_chunks == 1, **meta,
    )  # fmt: skip
    return ty


def param_grads(sum_a: Tensor, sum_b: Tensor, weight: Tensor, bias: Tensor, scale: Tensor | None, shift: Tensor | None):
    """dweight, dbias, dscale, dshift (None, None without scale and shift), each in its input's dtype, from the
    (B, C) per-channel sums of dz xhat and dz (float32, or float64 for float64 inputs)."""
    if scale is None:
        return sum_a.sum(0).to(weight.dtype), sum_b.sum(0).to(bias.dtype), None, None
    s1 = 1 + scale.to(sum_a.dtype)
    dscale = sum_a * weight.to(sum_a.dtype) + sum_b * bias.to(sum_a.dtype)
    return (
        (sum_a * s1).sum(0).to(weight.dtype),
        (sum_b * s1).sum(0).to(bias.dtype),
        dscale.to(scale.dtype),
        sum_b.to(shift.dtype),
    )


# --- 4. registered op ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cmfast::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); mean and rstd are the (B, G) statistics the backward reuses. backend: "ext" (the C++/CUDA
    extension's cmfast_ext::group_norm_silu), "triton" or "torch"."""
    if backend == "ext":
        return torch.ops.cmfast_ext.group_norm_silu(x, weight, bias, scale, shift, num_groups, eps, silu)
    if backend == "triton":
        return group_norm_silu_forward(x, weight, bias, scale, shift, num_groups, eps, silu)
    y = group_norm_silu_ref(x, weight, bias, num_groups, eps, scale, shift, silu)
    xg = x.to(compute_dtype(x.dtype)).reshape(x.shape[0], num_groups, -1)
    var, mean = torch.var_mean(xg, dim=-1, correction=0)
    return y.contiguous(memory_format=memory_format(x)), mean, torch.rsqrt(var + eps)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, silu, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=memory_format(x)), stats, torch.empty_like(stats)


def group_norm_silu_backward_torch(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu):
    """The kernels' backward (see the module docstring) in PyTorch, in float32 (float64 for float64), from the
    forward's (B, G) statistics: the registered backward's torch implementation."""
    compute = compute_dtype(x.dtype)
    B, C = x.shape[:2]
    groups = (B, num_groups, -1)
    xhat = ((x.to(compute).reshape(groups) - mean[..., None]) * rstd[..., None]).reshape(B, C, -1)
    a, t = weight.to(compute).expand(B, C), bias.to(compute).expand(B, C)
    if scale is not None:
        s1 = 1 + scale.to(compute)
        a, t = a * s1, t * s1 + shift.to(compute)
    dz = dy.to(compute).reshape(B, C, -1)
    if silu:
        z = xhat * a[..., None] + t[..., None]
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    sum_a, sum_b = (dz * xhat).sum(-1), dz.sum(-1)
    n = xhat[0].numel() // num_groups
    mean_dxhat = (a * sum_b).reshape(groups).sum(-1, keepdim=True) / n
    mean_dxhat_xhat = (a * sum_a).reshape(groups).sum(-1, keepdim=True) / n
    dxhat = (dz * a[..., None]).reshape(groups)
    dx = rstd[..., None] * (dxhat - mean_dxhat - xhat.reshape(groups) * mean_dxhat_xhat)
    dx = dx.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format(x))
    return (dx, *param_grads(sum_a, sum_b, weight, bias, scale, shift))


@torch.library.custom_op("cmfast::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dscale, dshift); dscale and dshift are empty without the scale-shift form. The "ext"
    backend runs the extension's backward where it has one (CPU), else the PyTorch one on its forward's statistics."""
    if backend == "ext" and ext_has_kernel("group_norm_silu_backward", x.device.type):
        dx, sum_a, sum_b = torch.ops.cmfast_ext.group_norm_silu_backward(
            dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu
        )
        grads = (dx, *param_grads(sum_a, sum_b, weight, bias, scale, shift))
    elif backend == "triton":
        grads = group_norm_silu_backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu)
    else:
        grads = group_norm_silu_backward_torch(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_group_norm_silu_backward_op.register_fake
def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu, backend):
    dx = torch.empty_like(x, memory_format=memory_format(x))
    dw, db = weight.new_empty(weight.shape), bias.new_empty(bias.shape)
    if scale is None:
        return dx, dw, db, x.new_empty(0), x.new_empty(0)
    return dx, dw, db, scale.new_empty(scale.shape), shift.new_empty(shift.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.backend = num_groups, silu, backend


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dscale, dshift = torch.ops.cmfast.group_norm_silu_backward(
        dy, x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.silu, ctx.backend
    )
    if scale is None:
        dscale = dshift = None
    return dx, dw, db, dscale, dshift, None, None, None, None


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu_jvp_torch(x, tx, weight, bias, scale, shift, mean, rstd, ta, tt, num_groups, silu):
    """The kernels' forward-mode rule (see the module docstring) in PyTorch, in float32 (float64 for float64), from
    the forward's (B, G) statistics: the registered JVP's torch implementation."""
    compute = compute_dtype(x.dtype)
    B, C = x.shape[:2]
    groups = (B, num_groups, -1)
    r = rstd.to(compute)[..., None]
    xhat = (x.to(compute).reshape(groups) - mean.to(compute)[..., None]) * r
    txg = tx.to(compute).reshape(groups)
    txhat = r * (txg - txg.mean(-1, keepdim=True) - xhat * (xhat * txg).mean(-1, keepdim=True))
    xhat, txhat = xhat.reshape(B, C, -1), txhat.reshape(B, C, -1)
    a, t = weight.to(compute).expand(B, C), bias.to(compute).expand(B, C)
    if scale is not None:
        s1 = 1 + scale.to(compute)
        a, t = a * s1, t * s1 + shift.to(compute)
    tz = txhat * a[..., None]
    if ta is not None:
        tz = tz + xhat * ta.to(compute)[..., None] + tt.to(compute)[..., None]
    if silu:
        z = xhat * a[..., None] + t[..., None]
        sig = torch.sigmoid(z)
        tz = tz * sig * (1 + z * (1 - sig))
    return tz.reshape(x.shape).to(x.dtype).contiguous(memory_format=memory_format(x))


@torch.library.custom_op("cmfast::group_norm_silu_jvp", mutates_args=())
def _group_norm_silu_jvp_op(
    x: Tensor,
    tx: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    ta: Tensor | None,
    tt: Tensor | None,
    num_groups: int,
    silu: bool,
    backend: str,
) -> Tensor:
    """The tangent of y along tx and the (B, C) tangents ta, tt of the per-channel affine (None: none), from the
    forward's mean and rstd. backend: "ext" (cmfast_ext::group_norm_silu_jvp), "triton" or "torch"."""
    if backend == "ext":
        return torch.ops.cmfast_ext.group_norm_silu_jvp(x, tx, weight, bias, scale, shift, mean, rstd, ta, tt,
                                                        num_groups, silu)  # fmt: skip
    if backend == "triton":
        return group_norm_silu_jvp(x, tx, weight, bias, scale, shift, mean, rstd, ta, tt, num_groups, silu)
    return group_norm_silu_jvp_torch(x, tx, weight, bias, scale, shift, mean, rstd, ta, tt, num_groups, silu)


@_group_norm_silu_jvp_op.register_fake
def _(x, tx, weight, bias, scale, shift, mean, rstd, ta, tt, num_groups, silu, backend):
    return torch.empty_like(x, memory_format=memory_format(x))


class GroupNormSiLU(torch.autograd.Function):
    """cmfast::group_norm_silu with its backward and its forward-mode rule: apply(x, weight, bias, scale, shift,
    num_groups, eps, silu, backend, jvp_backend) -> (y, mean, rstd), mean and rstd not differentiable. backend runs
    the forward and the backward, jvp_backend the tangent (cmfast.ops chooses both; an exception there is raised
    when a JVP is taken). Tangents of x, weight, bias,
    scale and shift are all taken."""

    @staticmethod
    def forward(x, weight, bias, scale, shift, num_groups, eps, silu, backend, jvp_backend):
        return torch.ops.cmfast.group_norm_silu(x, weight, bias, scale, shift, num_groups, eps, silu, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, scale, shift, num_groups, _, silu, backend, jvp_backend = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.save_for_forward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups, ctx.silu, ctx.backend, ctx.jvp_backend = num_groups, silu, backend, jvp_backend

    @staticmethod
    def backward(ctx, dy, dmean, drstd):
        return (*_backward(ctx, dy, dmean, drstd), None)

    @staticmethod
    def jvp(ctx, tx, tweight, tbias, tscale, tshift, *_):
        if isinstance(ctx.jvp_backend, Exception):  # the backend asked for has no forward-mode kernel here
            raise ctx.jvp_backend
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        tx = tx if tx is not None else torch.zeros_like(x)
        ta, tt = affine_tangents(weight, bias, scale, tweight, tbias, tscale, tshift, x.shape[0], mean.dtype)
        ty = torch.ops.cmfast.group_norm_silu_jvp(
            x, tx, weight, bias, scale, shift, mean, rstd, ta, tt, ctx.num_groups, ctx.silu, ctx.jvp_backend
        )
        return ty, None, None


def _ext_forward_fake(x, weight, bias, scale, shift, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=memory_format(x)), stats, torch.empty_like(stats)


def _ext_jvp_fake(x, tx, weight, bias, scale, shift, mean, rstd, ta, tt, num_groups, silu):
    return torch.empty_like(x, memory_format=memory_format(x))


def _ext_backward_fake(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu):
    sums = x.new_empty(x.shape[:2], dtype=torch.float32)
    return torch.empty_like(x, memory_format=memory_format(x)), sums, torch.empty_like(sums)


def register_ext_fakes() -> None:
    """Register the fake implementations of the extension's cmfast_ext::group_norm_silu, its backward and its JVP
    (schemas in csrc/ops.cpp), so torch.compile traces them; cmfast.ops calls this once, after loading the extension.
    The JVP's is skipped for a cmfast._C built without it."""
    torch.library.register_fake("cmfast_ext::group_norm_silu", _ext_forward_fake)
    torch.library.register_fake("cmfast_ext::group_norm_silu_backward", _ext_backward_fake)
    if ext_has_kernel("group_norm_silu_jvp", "cpu"):
        torch.library.register_fake("cmfast_ext::group_norm_silu_jvp", _ext_jvp_fake)
