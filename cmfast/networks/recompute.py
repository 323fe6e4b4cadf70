"""GroupNorm+SiLU followed by a convolution, keeping only the norm's input for backward.

In a U-Net block, `conv(SiLU(GroupNorm(x)))` saves two activations for backward in eager PyTorch: x (GroupNorm's
input) and SiLU's output (the convolution's input, needed for the weight gradient). The fused GroupNorm+SiLU already
drops GroupNorm's output; `norm_act_conv` also drops the convolution's input. Its forward runs the fused op and the
convolution without recording a graph and saves x alone; its backward recomputes SiLU(GroupNorm(x)) with the fused
op (one cheap pass over x), takes the convolution's gradients from it and back-propagates through the recomputed
norm. Results and gradients are those of the plain composition, up to rounding.

It applies where the convolution directly consumes the norm's output (no resampling or dropout in between) and
autograd records a graph; elsewhere the plain composition runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops


def can_recompute(*tensors: Tensor | None) -> bool:
    """Whether the recomputing path applies: reverse-mode autograd records a graph through one of `tensors`, and no
    torch.func transform (forward-mode jvp, vmap, grad) is active, which needs the ops' own rules."""
    if not torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _NormActConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, scale, shift, conv_weight, conv_bias, groups, eps, silu, padding):
        device_type = x.device.type
        ctx.autocast = (device_type, *_autocast_state(device_type))
        ctx.norm_args = (groups, eps, silu)
        ctx.padding = padding
        with torch.no_grad():
            h = ops.group_norm_silu(x, norm_weight, norm_bias, groups, eps, scale, shift, silu)
            y = F.conv2d(h, conv_weight, conv_bias, padding=padding)  # under autocast: in its dtype, as eager runs it
        ctx.h_dtype, ctx.conv_dtype = h.dtype, y.dtype
        ctx.save_for_backward(x, norm_weight, norm_bias, scale, shift, conv_weight)
        ctx.conv_bias_dtype = conv_bias.dtype if conv_bias is not None else None  # None: no bias
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, norm_weight, norm_bias, scale, shift, conv_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        device_type, autocast_on, autocast_dtype = ctx.autocast
        leaves = [
            t.detach().requires_grad_(need) if t is not None else None
            for t, need in zip((x, norm_weight, norm_bias, scale, shift), needs[:5])
        ]
        with torch.enable_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on):
            groups, eps, silu = ctx.norm_args
            h = ops.group_norm_silu(leaves[0], leaves[1], leaves[2], groups, eps, leaves[3], leaves[4], silu)
        dt = ctx.conv_dtype
        mask = [any(needs[:5]), needs[5], ctx.conv_bias_dtype is not None and needs[6]]
        grad_h, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y.to(dt), h.detach().to(dt), conv_weight.to(dt), [conv_weight.shape[0]] if mask[2] else None,
            [1, 1], [ctx.padding, ctx.padding], [1, 1], False, [0, 0], 1, mask,
        )  # fmt: skip
        grads = [None] * 5
        wanted = [(i, leaf) for i, leaf in enumerate(leaves) if leaf is not None and leaf.requires_grad]
        if wanted:
            found = torch.autograd.grad(h, [leaf for _, leaf in wanted], grad_h.to(ctx.h_dtype))
            for (i, _), g in zip(wanted, found):
                grads[i] = g
        grad_w = grad_w.to(conv_weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(ctx.conv_bias_dtype) if grad_b is not None else None
        return (*grads, grad_w, grad_b, None, None, None, None)


def norm_act_conv(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_bias: Tensor | None,
    groups: int,
    eps: float,
    conv_weight: Tensor,
    conv_bias: Tensor | None = None,
    padding: int = 0,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
) -> Tensor:
    """conv2d(group_norm_silu(x, ...), conv_weight, conv_bias, stride 1, `padding`) through `cmfast.ops`, saving only
    x (and the parameters) for backward when autograd records a graph; the plain composition otherwise."""
    h_inputs = (x, norm_weight, norm_bias, scale, shift, conv_weight, conv_bias)
    if not can_recompute(*h_inputs):
        h = ops.group_norm_silu(x, norm_weight, norm_bias, groups, eps, scale, shift, silu)
        return F.conv2d(h, conv_weight, conv_bias, padding=padding)
    return _NormActConv.apply(*h_inputs, groups, eps, silu, padding)
