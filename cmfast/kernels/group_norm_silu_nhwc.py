"""channels_last GroupNorm(+scale-shift)(+SiLU) forward with fused pre-adds, for inference.

    h = round(x + pre_add + alpha residual),  y = act(hhat a + t),  hhat = (h - mean_g) rstd_g,
    a = weight (1 + scale),  t = bias (1 + scale) + shift

The sum is computed in float32 and rounded once to x's dtype: h is what an unfused network holds in memory (a conv
output plus its folded bias and time-embedding term, plus a residual), and the statistics and arithmetic run in float32
on that rounded h. act is SiLU (the identity for silu=False); scale and shift are ADM's per-(sample, channel) terms; y
is rounded once. pre_add is (1, C) or (B, C), residual is like x (alpha a float); h itself is written only when asked
for (return_sum: the engine needs it when the sum also feeds a later skip connection). Forward only.

x is (B, C, H, W) stored channels_last, so a pixel's C channels are contiguous: every program reads whole channel rows
(one [BLOCK_P, BLOCK_C] tile, C padded to a power of two with masks, 16-byte accesses) and keeps the statistics of
all G groups at once; a channel's group is c // (C / G), which need not be a power of two (6 for C = 192, 18 for 576).
Two paths, picked by the launcher from the padded sample size:
- single: one program per sample holds its H W x C elements (at most MAX_SINGLE padded): h read once, the group
  statistics taken from registers in two exact passes (mean, then centred squares), y written once;
- split: one program per (sample, tile of TILE_ELEMENTS / BLOCK_C pixels) writes each tile's per-group mean and
  centred sum of squares; a small kernel merges the tiles per sample with Chan et al.'s parallel-variance formula; a
  normalise kernel on the same tiles writes y. x (and residual) are read twice, or h once more when it was written.

The registered op cmfast::group_norm_silu_nhwc runs the C++/CUDA extension, these kernels or PyTorch, whichever
backend cmfast.ops chose, with a fake implementation for torch.compile; it has no backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    GRID_LIMIT,
    OFFSET_LIMIT,
    compute_dtype,
    dtype_reasons,
    jit,
    memory_format,
    per_sample_numel,
    tl,
)

MAX_SINGLE = 32768  # padded elements (BLOCK_P x BLOCK_C) one program holds on the single-pass path
TILE_ELEMENTS = 8192  # padded elements per program on the split path (the group fold costs 3 G x BLOCK_C)
MAX_CHANNELS = 4096  # one padded channel row per program at least
MERGE_BLOCK_T = 64  # tiles the merge kernel folds in per step
PATHS = ("auto", "single", "split")  # the launcher's `path`: "single" or "split" forces one (tests, benchmarks)
# The CUDA kernel's limits (csrc/cuda/group_norm_silu_nhwc.cu): 16-byte vectors of channels, one per thread of a row.
EXT_THREADS = 256

# --- 1. PyTorch reference -------------------------------------------------------------------------------------------


def group_norm_silu_nhwc_ref(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int = 32,
    eps: float = 1e-5,
    pre_add: Tensor | None = None,
    residual: Tensor | None = None,
    alpha: float = 1.0,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
) -> tuple[Tensor, Tensor]:
    """(y, h): h = x + pre_add + alpha residual in float32 (float64 for float64 x) rounded to x's dtype (x itself when
    nothing is added), y = act(GroupNorm(h) weight + bias, then (1 + scale) + shift) in float32 on h, rounded to x's
    dtype. x: (B, C, *spatial), any layout; weight, bias: (C,) or None; pre_add: (C,), (1, C) or (B, C); residual:
    like x; scale, shift: B x C values or None. Both outputs in x's memory format."""
    compute = compute_dtype(x.dtype)
    B, C = x.shape[:2]
    per_channel = (-1, C, *[1] * (x.dim() - 2))
    h = x
    if pre_add is not None or residual is not None:
        s = x.to(compute)
        if pre_add is not None:
            s = s + pre_add.to(compute).reshape(per_channel)
        if residual is not None:
            s = s + alpha * residual.to(compute)
        h = s.to(x.dtype)
    hg = h.to(compute).reshape(B, num_groups, -1)
    var, mean = torch.var_mean(hg, dim=-1, correction=0, keepdim=True)
    z = ((hg - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        z = z * weight.to(compute).reshape(per_channel)
    if bias is not None:
        z = z + bias.to(compute).reshape(per_channel)
    if scale is not None:
        z = z * (1 + scale.to(compute).reshape(per_channel)) + shift.to(compute).reshape(per_channel)
    y = F.silu(z) if silu else z
    fmt = memory_format(x)
    return y.to(x.dtype).contiguous(memory_format=fmt), h.contiguous(memory_format=fmt)


# --- 2. kernels ------------------------------------------------------------------------------------------------------


@jit
def _load_sum(
    X, Pre, Res, Sum, offs, mask, c, cmask, b, pre_b, pre_c, alpha, HAS_PRE: tl.constexpr, HAS_RES: tl.constexpr,
    STORE_SUM: tl.constexpr,
):  # fmt: skip
    """h = round(x + pre_add + alpha residual) on one [BLOCK_P, BLOCK_C] tile, as float32 (0 outside the mask);
    written to Sum when STORE_SUM."""
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        h += tl.load(Pre + b * pre_b + c * pre_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        h += alpha * tl.load(Res + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE or HAS_RES:
        rounded = h.to(X.dtype.element_ty)
        if STORE_SUM:
            tl.store(Sum + offs, rounded, mask=mask)
        h = tl.where(mask, rounded.to(tl.float32), 0.0)  # padded pixels got pre_add
    return h


@jit
def _group_map(c, cmask, cpg, BLOCK_G: tl.constexpr):
    """[BLOCK_G, BLOCK_C] one-hot of channel c in group g: folds per-channel sums into groups (sum over axis 1) and
    spreads per-group values over their channels (sum over axis 0)."""
    g = tl.arange(0, BLOCK_G)
    return ((c // cpg)[None, :] == g[:, None]) & cmask[None, :]


@jit
def _to_groups(per_channel, onehot):
    return tl.sum(tl.where(onehot, per_channel[None, :], 0.0), axis=1)


@jit
def _to_channels(per_group, onehot):
    return tl.sum(tl.where(onehot, per_group[:, None], 0.0), axis=0)


@jit
def _normalise_store(
    h, Y, offs, mask, mean_c, rstd_c, W, Bias, Scale, Shift, b, c, cmask, ss_b, ss_c, st_b, st_c,
    HAS_SCALE_SHIFT: tl.constexpr, SILU: tl.constexpr,
):  # fmt: skip
    """y = act((h - mean) rstd a + t) on one tile, stored in Y's dtype."""
    a = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    t = tl.load(Bias + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE_SHIFT:
        s1 = 1.0 + tl.load(Scale + b * ss_b + c * ss_c, mask=cmask, other=0.0).to(tl.float32)
        a = a * s1
        t = t * s1 + tl.load(Shift + b * st_b + c * st_c, mask=cmask, other=0.0).to(tl.float32)
    z = (h - mean_c[None, :]) * (rstd_c * a)[None, :] + t[None, :]
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


@jit
def _single_kernel(
    X,  # (B, H W, C) input, channels_last: element (b, p, c) at b H W C + p C + c
    Pre,  # (B or 1, C) pre-add at b pre_b + c pre_c; read only when HAS_PRE
    Res,  # (B, H W, C) residual, like X; read only when HAS_RES
    Sum,  # (B, H W, C) h, written when STORE_SUM
    Y,  # (B, H W, C) output, written once
    W,  # (C,) weight
    Bias,  # (C,) bias
    Scale,  # (B, C) ADM scale at b ss_b + c ss_c; read only when HAS_SCALE_SHIFT
    Shift,  # (B, C) ADM shift at b st_b + c st_c; read only when HAS_SCALE_SHIFT
    HW,
    C,
    cpg,  # channels per group
    pre_b,  # Pre's sample stride: 0 when shared by the batch
    pre_c,
    ss_b,
    ss_c,
    st_b,
    st_c,
    alpha,
    eps,
    HAS_PRE: tl.constexpr,
    HAS_RES: tl.constexpr,
    STORE_SUM: tl.constexpr,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (p < HW)[:, None] & cmask[None, :]
    offs = b.to(tl.int64) * HW * C + p[:, None] * C + c[None, :]
    h = _load_sum(X, Pre, Res, Sum, offs, mask, c, cmask, b, pre_b, pre_c, alpha, HAS_PRE, HAS_RES, STORE_SUM)
    onehot = _group_map(c, cmask, cpg, BLOCK_G)
    n = HW * cpg
    mean_c = _to_channels(_to_groups(tl.sum(h, axis=0), onehot) / n, onehot)
    d = tl.where(mask, h - mean_c[None, :], 0.0)
    rstd_g = tl.rsqrt(_to_groups(tl.sum(d * d, axis=0), onehot) / n + eps)
    rstd_c = _to_channels(rstd_g, onehot)
    _normalise_store(
        h,
        Y,
        offs,
        mask,
        mean_c,
        rstd_c,
        W,
        Bias,
        Scale,
        Shift,
        b,
        c,
        cmask,
        ss_b,
        ss_c,
        st_b,
        st_c,
        HAS_SCALE_SHIFT,
        SILU,
    )


@jit
def _tile_stats_kernel(
    X,  # (B, H W, C) input, channels_last
    Pre,  # (B or 1, C) pre-add; read only when HAS_PRE
    Res,  # (B, H W, C) residual; read only when HAS_RES
    Sum,  # (B, H W, C) h, written when STORE_SUM
    PartMean,  # (B, n_tiles, G) float32 per-tile group means
    PartM2,  # (B, n_tiles, G) float32 per-tile sums of squared deviations from those means
    HW,
    C,
    G,
    cpg,
    pre_b,
    pre_c,
    alpha,
    HAS_PRE: tl.constexpr,
    HAS_RES: tl.constexpr,
    STORE_SUM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    tile, b = tl.program_id(0), tl.program_id(1)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (p < HW)[:, None] & cmask[None, :]
    offs = b.to(tl.int64) * HW * C + p[:, None] * C + c[None, :]
    h = _load_sum(X, Pre, Res, Sum, offs, mask, c, cmask, b, pre_b, pre_c, alpha, HAS_PRE, HAS_RES, STORE_SUM)
    onehot = _group_map(c, cmask, cpg, BLOCK_G)
    n = tl.minimum(HW - tile * BLOCK_P, BLOCK_P) * cpg
    mean_g = _to_groups(tl.sum(h, axis=0), onehot) / n
    d = tl.where(mask, h - _to_channels(mean_g, onehot)[None, :], 0.0)
    m2_g = _to_groups(tl.sum(d * d, axis=0), onehot)
    g = tl.arange(0, BLOCK_G)
    out = (b * tl.num_programs(0) + tile) * G + g
    tl.store(PartMean + out, mean_g, mask=g < G)
    tl.store(PartM2 + out, m2_g, mask=g < G)


@jit
def _merge_kernel(
    PartMean,  # (B, n_tiles, G) float32 per-tile group means
    PartM2,  # (B, n_tiles, G) float32 per-tile centred sums of squares
    Mean,  # (B, G) float32 group means, written
    Rstd,  # (B, G) float32 reciprocal standard deviations, written
    HW,
    G,
    cpg,
    n_tiles,
    tile_p,  # pixels per tile (the last tile may hold fewer)
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Chan et al.'s merge of the tiles' (count, mean, M2), BLOCK_T tiles at a time, for every group of sample b."""
    b = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    count = tl.zeros([BLOCK_G], tl.float32)
    mean = tl.zeros([BLOCK_G], tl.float32)
    m2 = tl.zeros([BLOCK_G], tl.float32)
    for start in range(0, n_tiles, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        tmask = t < n_tiles
        mask = tmask[:, None] & (g < G)[None, :]
        offs = (b * n_tiles + t[:, None]) * G + g[None, :]
        mk = tl.load(PartMean + offs, mask=mask, other=0.0)
        m2k = tl.load(PartM2 + offs, mask=mask, other=0.0)
        nk = tl.where(tmask, tl.minimum(HW - t * tile_p, tile_p) * cpg, 0).to(tl.float32)
        n_step = tl.sum(nk, axis=0)  # the same for every group
        mean_step = tl.sum(nk[:, None] * mk, axis=0) / n_step
        dev = tl.where(mask, mk - mean_step[None, :], 0.0)
        m2_step = tl.sum(m2k, axis=0) + tl.sum(nk[:, None] * dev * dev, axis=0)
        total = count + n_step
        delta = mean_step - mean
        mean = mean + delta * (n_step / total)
        m2 = m2 + m2_step + delta * delta * (count * n_step / total)
        count = total
    tl.store(Mean + b * G + g, mean, mask=g < G)
    tl.store(Rstd + b * G + g, tl.rsqrt(m2 / count + eps), mask=g < G)


@jit
def _normalise_kernel(
    X,  # (B, H W, C) input, channels_last; read when not FROM_SUM
    Pre,  # (B or 1, C) pre-add; read only when HAS_PRE and not FROM_SUM
    Res,  # (B, H W, C) residual; read only when HAS_RES and not FROM_SUM
    Sum,  # (B, H W, C) h from the stats kernel; read when FROM_SUM
    Y,  # (B, H W, C) output, written once
    W,  # (C,) weight
    Bias,  # (C,) bias
    Scale,  # (B, C) ADM scale at b ss_b + c ss_c; read only when HAS_SCALE_SHIFT
    Shift,  # (B, C) ADM shift at b st_b + c st_c; read only when HAS_SCALE_SHIFT
    Mean,  # (B, G) float32 group means
    Rstd,  # (B, G) float32 reciprocal standard deviations
    HW,
    C,
    G,
    cpg,
    pre_b,
    pre_c,
    ss_b,
    ss_c,
    st_b,
    st_c,
    alpha,
    FROM_SUM: tl.constexpr,  # h was written by the stats kernel: read it rather than recompute it
    HAS_PRE: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_SCALE_SHIFT: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tile, b = tl.program_id(0), tl.program_id(1)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (p < HW)[:, None] & cmask[None, :]
    offs = b.to(tl.int64) * HW * C + p[:, None] * C + c[None, :]
    if FROM_SUM:
        h = tl.load(Sum + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = _load_sum(X, Pre, Res, Sum, offs, mask, c, cmask, b, pre_b, pre_c, alpha, HAS_PRE, HAS_RES, False)
    group = b * G + c // cpg  # each channel's group statistics, gathered (they sit in L1 / L2)
    mean_c = tl.load(Mean + group, mask=cmask, other=0.0)
    rstd_c = tl.load(Rstd + group, mask=cmask, other=0.0)
    _normalise_store(
        h,
        Y,
        offs,
        mask,
        mean_c,
        rstd_c,
        W,
        Bias,
        Scale,
        Shift,
        b,
        c,
        cmask,
        ss_b,
        ss_c,
        st_b,
        st_c,
        HAS_SCALE_SHIFT,
        SILU,
    )


# --- 3. launchers ----------------------------------------------------------------------------------------------------


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_warps(elements: int) -> int:
    return min(16, max(4, elements // 1024))


def is_channels_last(x: Tensor) -> bool:
    """x is a 4-D tensor stored channels_last (for H = W = 1 that is NCHW as well)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def unsupported(x: Tensor, num_groups: int) -> list[str]:
    """Why the Triton kernels cannot take these inputs (empty when they can). Shapes are checked by cmfast.ops."""
    reasons = dtype_reasons({"x": x})
    if not is_channels_last(x):
        reasons.append("the Triton group_norm_silu_nhwc kernels read a 4-D x stored channels_last")
    if x.shape[1] > MAX_CHANNELS:
        reasons.append(f"{x.shape[1]} channels exceed the kernels' {MAX_CHANNELS}")
    if x.shape[0] > GRID_LIMIT:
        reasons.append(f"batch {x.shape[0]} is above the grid limit {GRID_LIMIT}")
    if per_sample_numel(x) >= OFFSET_LIMIT:
        reasons.append(f"{per_sample_numel(x)} elements per sample overflow the kernels' 32-bit offsets")
    return reasons


def ext_unsupported(x: Tensor, device_type: str) -> list[str]:
    """Why the extension's CUDA kernel (csrc/cuda/group_norm_silu_nhwc.cu) cannot take these inputs; it has no CPU
    kernel, which cmfast.ops reports as the environment's reason."""
    if device_type != "cuda":
        return []
    reasons = dtype_reasons({"x": x}, takes="the CUDA kernel takes")
    if reasons:
        return reasons
    if not is_channels_last(x):
        return ["the CUDA group_norm_silu_nhwc kernel needs a 4-D x stored channels_last"]
    vec = 16 // x.element_size()  # elements per 16-byte access
    if x.shape[1] % vec:
        return [f"the CUDA group_norm_silu_nhwc kernel reads 16-byte vectors: C must be a multiple of {vec} for "
                f"{x.dtype}, got {x.shape[1]}"]  # fmt: skip
    if x.shape[1] // vec > EXT_THREADS:
        return [f"the CUDA group_norm_silu_nhwc kernel takes at most {EXT_THREADS * vec} channels for {x.dtype}"]
    if per_sample_numel(x) >= OFFSET_LIMIT:
        return [f"{per_sample_numel(x)} elements per sample overflow the CUDA kernel's 32-bit offsets"]
    if x.shape[0] > GRID_LIMIT:
        return [f"batch {x.shape[0]} is above the CUDA kernel's grid limit {GRID_LIMIT}"]
    return []


def _plan(hw: int, C: int, path: str = "auto") -> tuple[str, int, int]:
    """(path, BLOCK_P, BLOCK_C): "single" when the padded sample fits MAX_SINGLE (or path forces it), else "split"
    with tiles of TILE_ELEMENTS padded elements."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PATHS)}")
    block_c = _next_power_of_2(C)
    whole = _next_power_of_2(hw)
    if path == "single" or path == "auto" and whole * block_c <= MAX_SINGLE:
        return "single", whole, block_c
    return "split", min(whole, max(1, TILE_ELEMENTS // block_c)), block_c


def group_norm_silu_nhwc_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    pre_add: Tensor | None,
    residual: Tensor | None,
    alpha: float,
    scale: Tensor | None,
    shift: Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
    return_sum: bool,
    path: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Launch the forward. x: (B, C, H, W) channels_last; weight, bias: (C,); pre_add: (B or 1, C) (any strides) or
    None; residual: like x or None; scale, shift: (B, C) or None. Returns y and h (channels_last, x's dtype); h is an
    empty tensor unless return_sum and something is added. path: "auto", or "single"/"split" to force one."""
    reasons = unsupported(x, num_groups)
    if reasons:
        raise ValueError("group_norm_silu_nhwc Triton kernels: " + "; ".join(reasons))
    B, C, H, W = x.shape
    G, hw, fmt = num_groups, H * W, memory_format(x)  # channels_last (or NCHW as well, when H = W = 1)
    cpg = C // G
    has_pre, has_res, has_ss = pre_add is not None, residual is not None, scale is not None
    store_sum = _stores_sum(pre_add, residual, return_sum)
    y = torch.empty_like(x, memory_format=fmt)
    h = torch.empty_like(x, memory_format=fmt) if store_sum else x.new_empty(0)
    if y.numel() == 0:
        return y, h
    residual = residual.contiguous(memory_format=torch.channels_last) if has_res else x  # placeholder when absent
    # a (1, C) pre-add is shared by the batch: sample stride 0
    pre = (pre_add.stride(0) if pre_add.shape[0] > 1 else 0, pre_add.stride(1)) if has_pre else (0, 0)
    ss = (*scale.stride(), *shift.stride()) if has_ss else (0, 0, 0, 0)
    pre_add = pre_add if has_pre else weight  # placeholders, never read
    scale, shift = (scale, shift) if has_ss else (weight, weight)
    sum_out = h if store_sum else y  # placeholder when h is not written
    kind, block_p, block_c = _plan(hw, C, path)
    block_g = _next_power_of_2(G)
    meta = dict(HAS_PRE=has_pre, HAS_RES=has_res, BLOCK_P=block_p, BLOCK_C=block_c,
                num_warps=_num_warps(block_p * block_c))  # fmt: skip
    if kind == "single":
        _single_kernel[(B,)](
            x, pre_add, residual, sum_out, y, weight, bias, scale, shift, hw, C, cpg, *pre, *ss, float(alpha),
            float(eps), STORE_SUM=store_sum, HAS_SCALE_SHIFT=has_ss, SILU=bool(silu), BLOCK_G=block_g, **meta,
        )  # fmt: skip
        return y, h
    n_tiles = -(-hw // block_p)
    part = torch.empty((2, B, n_tiles, G), dtype=torch.float32, device=x.device)
    stats = torch.empty((2, B, G), dtype=torch.float32, device=x.device)
    _tile_stats_kernel[(n_tiles, B)](
        x, pre_add, residual, sum_out, part[0], part[1], hw, C, G, cpg, *pre, float(alpha), STORE_SUM=store_sum,
        BLOCK_G=block_g, **meta,
    )  # fmt: skip
    _merge_kernel[(B,)](
        part[0], part[1], stats[0], stats[1], hw, G, cpg, n_tiles, block_p, float(eps), BLOCK_T=MERGE_BLOCK_T,
        BLOCK_G=block_g, num_warps=4,
    )  # fmt: skip
    _normalise_kernel[(n_tiles, B)](
        x, pre_add, residual, sum_out, y, weight, bias, scale, shift, stats[0], stats[1], hw, C, G, cpg, *pre, *ss,
        float(alpha), FROM_SUM=store_sum, HAS_SCALE_SHIFT=has_ss, SILU=bool(silu), **meta,
    )  # fmt: skip
    return y, h


# --- 4. registered op ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cmfast::group_norm_silu_nhwc", mutates_args=())
def _group_norm_silu_nhwc_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    pre_add: Tensor | None,
    residual: Tensor | None,
    alpha: float,
    scale: Tensor | None,
    shift: Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
    return_sum: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(y, h); h is empty unless return_sum and pre_add or residual is given. backend: "ext" (the C++/CUDA
    extension's cmfast_ext::group_norm_silu_nhwc), "triton" or "torch"."""
    if backend == "ext":
        return torch.ops.cmfast_ext.group_norm_silu_nhwc(
            x, weight, bias, pre_add, residual, alpha, scale, shift, num_groups, eps, silu, return_sum
        )
    if backend == "triton":
        return group_norm_silu_nhwc_forward(
            x, weight, bias, pre_add, residual, alpha, scale, shift, num_groups, eps, silu, return_sum
        )
    y, h = group_norm_silu_nhwc_ref(x, weight, bias, num_groups, eps, pre_add, residual, alpha, scale, shift, silu)
    return y, h if _stores_sum(pre_add, residual, return_sum) else x.new_empty(0)


def _stores_sum(pre_add: Tensor | None, residual: Tensor | None, return_sum: bool) -> bool:
    """Whether the op writes h: asked for, and something is added to x."""
    return bool(return_sum) and (pre_add is not None or residual is not None)


def _ext_fake(x, weight, bias, pre_add, residual, alpha, scale, shift, num_groups, eps, silu, return_sum):
    y = torch.empty_like(x, memory_format=memory_format(x))
    return y, torch.empty_like(y) if _stores_sum(pre_add, residual, return_sum) else x.new_empty(0)


@_group_norm_silu_nhwc_op.register_fake
def _(x, weight, bias, pre_add, residual, alpha, scale, shift, num_groups, eps, silu, return_sum, backend):
    return _ext_fake(x, weight, bias, pre_add, residual, alpha, scale, shift, num_groups, eps, silu, return_sum)


def _no_backward(ctx, dy, dh):
    raise RuntimeError(
        "cmfast::group_norm_silu_nhwc is inference-only (no backward); use cmfast.ops.group_norm_silu for training"
    )


_group_norm_silu_nhwc_op.register_autograd(_no_backward)


def register_ext_fakes() -> None:
    """Register the fake implementation of the extension's cmfast_ext::group_norm_silu_nhwc (schema in csrc/ops.cpp),
    so torch.compile traces it; cmfast.ops calls this once, after loading the extension."""
    torch.library.register_fake("cmfast_ext::group_norm_silu_nhwc", _ext_fake)
