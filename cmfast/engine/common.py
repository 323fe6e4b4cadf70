"""What the engine's networks share: frozen weight records, the deferred residual sum, the fused norm call, and the
attention and resampling steps on channels_last tensors.

A block's output is often `main + alpha * residual` (a residual connection). Instead of adding at once, a block
returns a `Pending` sum; the next GroupNorm adds it while it reads it (`norm_act(..., residual=...)`) and writes the
sum out for the skip connections that need it later. Where the next step is not a norm (a concatenation, the output),
`materialize` adds it with one op. So a residual add costs no kernel of its own wherever a norm follows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops

CHANNELS_LAST = torch.channels_last


@dataclass
class Norm:
    """A GroupNorm's parameters, in the engine's dtype."""

    weight: Tensor
    bias: Tensor
    groups: int
    eps: float


@dataclass
class Pending:
    """main + alpha * residual, not yet added (residual None: main is the value)."""

    main: Tensor
    residual: Tensor | None = None
    alpha: float = 1.0
    value: Tensor | None = None  # the sum, once some step has written it

    def materialize(self) -> Tensor:
        if self.value is None:
            self.value = self.main if self.residual is None else torch.add(self.main, self.residual, alpha=self.alpha)
        return self.value


def as_pending(x: Tensor | Pending) -> Pending:
    return x if isinstance(x, Pending) else Pending(x)


def norm_act(
    x: Tensor | Pending,
    norm: Norm,
    pre_add: Tensor | None = None,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
) -> tuple[Tensor, Tensor]:
    """(act(GroupNorm(x + pre_add) [* (1 + scale) + shift]), the summed x) in one fused op, adding a pending
    residual on the way; the second result is x's materialised value, which skip connections read."""
    p = as_pending(x)
    if p.value is not None or p.residual is None:
        source = p.materialize()
        return fused_norm(source, norm, pre_add, None, 1.0, scale, shift, silu, False)[0], source
    y, total = fused_norm(p.main, norm, pre_add, p.residual, p.alpha, scale, shift, silu, True)
    p.value = total
    return y, total


def fused_norm(x, norm: Norm, pre_add, residual, alpha, scale, shift, silu, return_sum) -> tuple[Tensor, Tensor]:
    """cmfast::group_norm_silu_nhwc on the backend `cmfast.ops` chooses, called as the registered op on every backend
    (its "torch" implementation too), so it is one op at the dispatcher, as it is one kernel on a GPU."""
    b, c = x.shape[:2]
    choice = ops.explain(
        "group_norm_silu_nhwc", x, norm.weight, norm.bias, norm.groups, norm.eps, pre_add=pre_add, residual=residual,
        alpha=alpha, scale=scale, shift=shift, silu=silu, return_sum=return_sum,
    )  # fmt: skip
    pre_add = pre_add.reshape(-1, c) if pre_add is not None else None
    scale, shift = (scale.reshape(b, c), shift.reshape(b, c)) if scale is not None else (None, None)
    return torch.ops.cmfast.group_norm_silu_nhwc(
        x, norm.weight, norm.bias, pre_add, residual, alpha, scale, shift, norm.groups, norm.eps, silu, return_sum,
        choice.backend,
    )  # fmt: skip


def conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int = 1) -> Tensor:
    """A same-padded convolution of a channels_last x (weights stored channels_last)."""
    return F.conv2d(x, weight, bias, stride=stride, padding=weight.shape[-1] // 2)


def linear_nhwc(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution of channels_last x as one matrix product over its (B, H W, C) rows; channels_last out."""
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for channels_last x
    out = F.linear(rows, weight, bias)
    return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def self_attention(y: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, heads: int, scale: float) -> Tensor:
    """Multi-head self-attention of a channels_last (B, C, H, W) y, q/k/v projected as (3, heads, head_dim) rows.

    The projection's (B, H W, 3C) output is cut into q, k and v as (B, heads, T, head_dim) views whose last
    dimension has unit stride, the layout every fused SDPA backend takes; on CUDA the kernel (SDPA, or cmfast's
    attention over the same projection) is the faster of the two at this shape (`ATTENTION_CHOICE`). Returns
    (B, T, C), channels (head, d).
    """
    b, c, h, w = y.shape
    t = h * w
    qkv = linear_nhwc(y, qkv_weight, qkv_bias).permute(0, 2, 3, 1).reshape(b, t, 3 * c)
    if _attention_kernel(qkv, heads, scale) == "cmfast":
        return ops.attention(qkv.transpose(1, 2), heads).transpose(1, 2)
    return _sdpa(qkv, heads, scale)


def _sdpa(qkv: Tensor, heads: int, scale: float) -> Tensor:
    b, t, c3 = qkv.shape
    q, k, v = (u.transpose(1, 2) for u in qkv.reshape(b, t, 3, heads, c3 // (3 * heads)).unbind(2))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(b, t, c3 // 3)


ATTENTION_CHOICE: dict[tuple, str] = {}  # (shape, dtype, heads, device) -> "sdpa" or "cmfast", measured once


def _attention_kernel(qkv: Tensor, heads: int, scale: float) -> str:
    """ "sdpa" off CUDA; on CUDA the faster of SDPA and cmfast's attention at this shape, timed once with CUDA events
    (outside a graph capture: during one, the measured choice or SDPA). cmfast's kernel takes only the
    1/sqrt(head_dim) scale, which both networks use."""
    if qkv.device.type != "cuda" or abs(scale * math.sqrt(qkv.shape[-1] // (3 * heads)) - 1) > 1e-6:
        return "sdpa"
    key = (tuple(qkv.shape), qkv.dtype, heads, qkv.device.index)
    if key in ATTENTION_CHOICE or torch.cuda.is_current_stream_capturing():
        return ATTENTION_CHOICE.get(key, "sdpa")
    runs = {"sdpa": lambda: _sdpa(qkv, heads, scale)}
    if not ops.explain("attention", qkv.transpose(1, 2), heads).backend == "torch":
        runs["cmfast"] = lambda: ops.attention(qkv.transpose(1, 2), heads)
    times = {}
    for name, fn in runs.items():
        fn()  # compile / autotune outside the timing
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        end.synchronize()
        times[name] = start.elapsed_time(end)
    ATTENTION_CHOICE[key] = min(times, key=times.get)
    return ATTENTION_CHOICE[key]


def rows_to_nhwc(rows: Tensor, height: int, width: int) -> Tensor:
    """(B, H W, C) rows -> a channels_last (B, C, H, W) view."""
    b, _, c = rows.shape
    return rows.reshape(b, height, width, c).permute(0, 3, 1, 2)


def resample(x: Tensor, mode: str | None) -> Tensor:
    """2x average pooling ("down"), 2x nearest up-sampling ("up"), or x."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


def weight(t: Tensor, dtype: torch.dtype, device, scale: float = 1.0) -> Tensor:
    """A frozen copy of a parameter in the engine's dtype (4-D weights channels_last), optionally scaled."""
    t = t.detach().to(device=device, dtype=torch.float32) * scale
    t = t.to(dtype)
    return t.contiguous(memory_format=CHANNELS_LAST) if t.dim() == 4 else t.contiguous()


def norm_of(module, dtype, device) -> Norm:
    return Norm(weight(module.weight, dtype, device), weight(module.bias, dtype, device), module.num_groups, module.eps)
