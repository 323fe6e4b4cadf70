"""Per-op benchmarks: cmfast's fused ops against eager PyTorch and torch.compile at the networks' shapes.

For each op and shape: the median time of every implementation, its achieved memory bandwidth (GB/s, from the fewest
bytes the op must move: each input read once, each output written once) or, for attention, its TFLOP/s, both also as
% of the device's ceilings measured in the same run (a 1 GiB copy; an 8192^3 bf16 matrix product), and its speed-up
over eager PyTorch in the same run. Implementations that cannot take an input record why instead of a time.

    python -m bench ops              # every shape at batch 1 and 256 on CUDA; small CPU shapes without a GPU
    python -m bench ops --quick      # batch 256 only, fewer shapes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cmfast import ops
from cmfast.kernels import group_norm_silu as _gn_kernels
from cmfast.kernels import group_norm_silu_nhwc as _gn_nhwc_kernels
from cmfast.kernels.attention import attention_ref
from cmfast.kernels.heun_step import heun_step_ref
from cmfast.kernels.skip_out import skip_out_ref

from .common import failure, peak_bandwidth_gbs, peak_tflops, time_graph_ms, time_ms

SIGMA_MIN, SIGMA_DATA = 0.002, 0.5

# (network, channels, resolution): GroupNorm inputs of DDPM++ on CIFAR-10 (128 channels x 2 at every level) and of
# ADM on ImageNet-64 (192 x 1, 2, 3, 4), from cmfast/networks/configs.py.
GN_SHAPES = [
    ("ddpmpp-cifar10", 128, 32),
    ("ddpmpp-cifar10", 256, 32),
    ("ddpmpp-cifar10", 256, 16),
    ("adm-imagenet64", 192, 64),
    ("adm-imagenet64", 384, 32),
    ("adm-imagenet64", 576, 16),
    ("adm-imagenet64", 768, 8),
    ("adm-imagenet64", 1152, 16),
]
# (network, heads, head_dim, tokens): DDPM++ attends at 16x16 with one 256-channel head; ADM-64 at 32, 16 and 8 with
# 64-channel heads.
ATTN_SHAPES = [
    ("ddpmpp-cifar10", 1, 256, 256),
    ("adm-imagenet64", 6, 64, 1024),
    ("adm-imagenet64", 9, 64, 256),
    ("adm-imagenet64", 12, 64, 64),
]
_LABEL = {"triton": "cmfast-triton", "ext": "cmfast-ext"}
_BACKEND = {v: k for k, v in _LABEL.items()}
IMAGE_SHAPES = [("ddpmpp-cifar10", 3, 32), ("adm-imagenet64", 3, 64)]


@dataclass
class Case:
    """One op at one shape: implementations by name, and the bytes or FLOPs the op needs at least."""

    op: str
    network: str
    shape: str
    batch: int
    dtype: str
    mode: str  # "fwd" or "fwd+bwd"
    impls: dict[str, Callable[[], object]]
    bytes: float = 0.0
    flops: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)


def _backend_impls(op: str, call: Callable[[str], object], args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """cmfast's fused backends that can take these inputs, as thunks; the others with the reason."""
    impls, skipped = {}, {}
    for backend in ("triton", "ext"):
        try:
            ops.explain(op, *args, backend=backend, **kwargs)
        except ops.BackendError as e:
            skipped[_LABEL[backend]] = str(e).split(": ", 2)[-1]
            continue
        impls[_LABEL[backend]] = lambda backend=backend: call(backend)
    return impls, skipped


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _eager_gn(x, w, b, scale=None, shift=None):
    """What a user writes: F.group_norm in x's dtype, then (ADM) scale-shift, then F.silu."""
    h = F.group_norm(x, 32, w, b, 1e-5)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


def _grad_thunk(fn: Callable, inputs: list[torch.Tensor], dy: torch.Tensor) -> Callable:
    def run():
        return torch.autograd.grad(fn(), inputs, dy)

    return run


def group_norm_cases(device, dtype, batches, quick) -> list[Case]:
    cases = []
    shapes = GN_SHAPES[1:5] if quick else GN_SHAPES
    for network, C, R in shapes:
        for batch in batches:
            for form in ("silu", "scale-shift") if network.startswith("adm") else ("silu",):
                # channels_last (the CUDA extension's layout) for the plain form at the large batch
                for layout in ("nchw", "channels_last") if batch > 1 and form == "silu" else ("nchw",):
                    cases += _gn_case(device, dtype, network, C, R, batch, form, layout, quick)
    return cases


def _gn_case(device, dtype, network, C, R, batch, form, layout, quick) -> list[Case]:
    g = torch.Generator(device).manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, C, R, R, device=device, dtype=dtype, generator=g).contiguous(memory_format=fmt)
    w = 1 + 0.1 * torch.randn(C, device=device, dtype=dtype, generator=g)
    b = 0.1 * torch.randn(C, device=device, dtype=dtype, generator=g)
    ss = (0.1 * torch.randn(batch, C, device=device, dtype=dtype, generator=g) for _ in range(2))
    scale, shift = ss if form == "scale-shift" else (None, None)
    eager = lambda: _eager_gn(x, w, b, scale, shift)  # noqa: E731
    compiled_fn = _compiled(_eager_gn)
    _compiled_eager = lambda: compiled_fn(x, w, b, scale, shift)  # noqa: E731
    impls, skipped = _backend_impls(
        "group_norm_silu",
        lambda be: ops.group_norm_silu(x, w, b, 32, scale=scale, shift=shift, backend=be),
        (x, w, b, 32),
        dict(scale=scale, shift=shift),
    )
    if layout == "nchw" and "cmfast-triton" in impls:  # both forward paths, whichever the launcher would pick
        for path in ("flat", "tile"):  # the Triton launcher itself, with its forward path forced
            impls[f"cmfast-triton[{path}]"] = lambda path=path: _gn_kernels.group_norm_silu_forward(
                x, w, b, scale, shift, 32, 1e-5, True, path=path
            )
    n_bytes = 2 * x.numel() * x.element_size()
    shape = f"{C}x{R}x{R} {form} {layout}"
    common = dict(op="group_norm_silu", network=network, shape=shape, batch=batch, dtype=str(dtype)[6:])
    cases = [
        Case(
            mode="fwd",
            impls={"eager": eager, "compile": _compiled_eager, **impls},
            bytes=n_bytes,
            skipped=skipped,
            **common,
        )
    ]
    if batch > 1 and layout == "nchw" and not quick:
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        dy = torch.randn_like(x)
        xs, ws, bs = leaves

        def thunks(fn):
            return _grad_thunk(lambda: fn(xs, ws, bs), leaves, dy)

        bwd = {
            "eager": thunks(lambda x_, w_, b_: _eager_gn(x_, w_, b_, scale, shift)),
            "compile": thunks(lambda x_, w_, b_: compiled_fn(x_, w_, b_, scale, shift)),
        }
        for name in [k for k in impls if k in _BACKEND]:
            be = _BACKEND[name]
            bwd[name] = thunks(
                lambda x_, w_, b_, be=be: ops.group_norm_silu(x_, w_, b_, 32, scale=scale, shift=shift, backend=be)
            )
        # forward: read x, write y; backward: read x and dy, write dx
        cases.append(Case(mode="fwd+bwd", impls=bwd, bytes=5 * x.numel() * x.element_size(), skipped=skipped, **common))
    return cases


def group_norm_nhwc_cases(device, dtype, batches, quick) -> list[Case]:
    """The inference engine's channels_last GroupNorm+SiLU on x + pre_add (+ residual), against the unfused ops."""
    shapes = GN_SHAPES[1:5] if quick else GN_SHAPES
    return [
        _gn_nhwc_case(device, dtype, network, C, R, batch, residual)
        for network, C, R in shapes
        for batch in batches
        for residual in (False, True)
    ]


def _eager_gn_nhwc(x, pre_add, residual, w, b, scale=None, shift=None):
    """What an unfused network holds: the sum in x's dtype, then GroupNorm, scale-shift and SiLU."""
    h = x + pre_add.to(x.dtype)[:, :, None, None]
    if residual is not None:
        h = h + residual
    return _eager_gn(h, w, b, scale, shift)


def _gn_nhwc_case(device, dtype, network, C, R, batch, residual) -> Case:
    g = torch.Generator(device).manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(batch, C, R, R, device=device, dtype=dtype, generator=g).contiguous(memory_format=cl)
    res = torch.randn_like(x).contiguous(memory_format=cl) if residual else None
    pre = torch.randn(batch, C, device=device, generator=g)  # a folded conv bias plus a time-embedding term
    w = 1 + 0.1 * torch.randn(C, device=device, dtype=dtype, generator=g)
    b = 0.1 * torch.randn(C, device=device, dtype=dtype, generator=g)
    scale, shift = (
        (0.1 * torch.randn(batch, C, device=device, dtype=dtype, generator=g) for _ in range(2))
        if network.startswith("adm")
        else (None, None)
    )
    compiled_fn = _compiled(_eager_gn_nhwc)
    impls = {
        "eager": lambda: _eager_gn_nhwc(x, pre, res, w, b, scale, shift),
        "compile": lambda: compiled_fn(x, pre, res, w, b, scale, shift),
    }
    kwargs = dict(pre_add=pre, residual=res, scale=scale, shift=shift)
    fused, skipped = _backend_impls(
        "group_norm_silu_nhwc",
        lambda be: ops.group_norm_silu_nhwc(x, w, b, 32, **kwargs, backend=be),
        (x, w, b, 32),
        kwargs,
    )
    impls.update(fused)
    if "cmfast-triton" in fused and _gn_nhwc_kernels._plan(R * R, C)[0] == "single":  # the other path beside it
        impls["cmfast-triton[split]"] = lambda: _gn_nhwc_kernels.group_norm_silu_nhwc_forward(
            x, w, b, pre, res, 1.0, scale, shift, 32, 1e-5, True, False, path="split"
        )
    form = ("scale-shift" if scale is not None else "silu") + (" +residual" if residual else "")
    # read x (and the residual), write y
    n_bytes = (3 if residual else 2) * x.numel() * x.element_size()
    common = dict(network=network, shape=f"{C}x{R}x{R} {form} channels_last", batch=batch, dtype=str(dtype)[6:])
    return Case(op="group_norm_silu_nhwc", mode="fwd", impls=impls, bytes=n_bytes, skipped=skipped, **common)


def attention_cases(device, dtype, batches, quick) -> list[Case]:
    cases = []
    for network, H, D, T in ATTN_SHAPES[:2] if quick else ATTN_SHAPES:
        for batch in batches:
            g = torch.Generator(device).manual_seed(0)
            qkv = torch.randn(batch, 3 * H * D, T, device=device, dtype=dtype, generator=g)
            compiled_ref = _compiled(attention_ref)
            impls = {
                "eager": lambda qkv=qkv, H=H: attention_ref(qkv, H),
                "compile": lambda qkv=qkv, H=H, f=compiled_ref: f(qkv, H),
            }
            impls.update(_sdpa_backends(qkv, H, D, T))
            fused, skipped = _backend_impls(
                "attention", lambda be, qkv=qkv, H=H: ops.attention(qkv, H, backend=be), (qkv, H), {}
            )
            impls.update(fused)
            flops = 4 * batch * H * T * T * D
            common = dict(op="attention", network=network, shape=f"{H}x{D} T={T}", batch=batch, dtype=str(dtype)[6:])
            cases.append(Case(mode="fwd", impls=impls, flops=flops, skipped=skipped, **common))
            if batch > 1 and not quick:
                leaf = qkv.detach().requires_grad_()
                dout = torch.randn(batch, H * D, T, device=device, dtype=dtype, generator=g)
                bwd = {
                    "eager": _grad_thunk(lambda leaf=leaf, H=H: attention_ref(leaf, H), [leaf], dout),
                    "compile": _grad_thunk(lambda leaf=leaf, H=H, f=compiled_ref: f(leaf, H), [leaf], dout),
                }
                for name in fused:
                    be = _BACKEND[name]
                    bwd[name] = _grad_thunk(
                        lambda leaf=leaf, H=H, be=be: ops.attention(leaf, H, backend=be), [leaf], dout
                    )
                # FlashAttention's convention: the backward costs 2.5 forwards
                cases.append(Case(mode="fwd+bwd", impls=bwd, flops=3.5 * flops, skipped=skipped, **common))
    return cases


def _sdpa_backends(qkv, H, D, T) -> dict:
    """torch's SDPA backends on ready-made contiguous (B, H, T, D) q, k, v: its best case, no layout copies."""
    if qkv.device.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = qkv.shape[0]
    q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.reshape(B, 3, H, D, T).unbind(1))
    impls = {}
    for name, backend in [
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
    ]:

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            run()
        except RuntimeError:
            continue  # this backend does not take these inputs
        impls[name] = run
    return impls


def pointwise_cases(device, dtype, batches, quick) -> list[Case]:
    return [c for net, C, R in IMAGE_SHAPES for b in batches for c in _pointwise_case(device, dtype, net, C, R, b)]


def _pointwise_case(device, dtype, network, C, R, batch) -> list[Case]:
    g = torch.Generator(device).manual_seed(0)
    x, Fx, Fn = (torch.randn(batch, C, R, R, device=device, dtype=dtype, generator=g) for _ in range(3))
    sigma = 0.01 + 80 * torch.rand(batch, device=device, generator=g)
    sigma_next = sigma * 0.8
    common = dict(network=network, shape=f"{C}x{R}x{R}", batch=batch, dtype=str(dtype)[6:], mode="fwd")
    size = x.numel() * x.element_size()

    so_ref = _compiled(skip_out_ref)
    impls = {
        "eager": lambda: skip_out_ref(x, Fx, sigma, SIGMA_MIN, SIGMA_DATA, True),
        "compile": lambda: so_ref(x, Fx, sigma, SIGMA_MIN, SIGMA_DATA, True),
    }
    fused, skipped = _backend_impls(
        "skip_out",
        lambda be: ops.skip_out(x, Fx, sigma, SIGMA_MIN, SIGMA_DATA, True, backend=be),
        (x, Fx, sigma, SIGMA_MIN, SIGMA_DATA, True),
        {},
    )
    cases = [Case(op="skip_out", impls={**impls, **fused}, bytes=3 * size, skipped=skipped, **common)]

    # pass 1 reads x and F and writes the Euler point; pass 2 also reads F_next and writes the Heun estimate
    for label, F_next, n_bytes in (("heun_step (euler pass)", None, 3 * size), ("heun_step", Fn, 4 * size)):
        h_ref = _compiled(heun_step_ref)
        impls = {
            "eager": lambda F_next=F_next: heun_step_ref(x, Fx, sigma, sigma_next, F_next),
            "compile": lambda F_next=F_next, f=h_ref: f(x, Fx, sigma, sigma_next, F_next),
        }
        fused, skipped = _backend_impls(
            "heun_step",
            lambda be, F_next=F_next: ops.heun_step(x, Fx, sigma, sigma_next, F_next, backend=be),
            (x, Fx, sigma, sigma_next, F_next),
            {},
        )
        cases.append(Case(op=label, impls={**impls, **fused}, bytes=n_bytes, skipped=skipped, **common))
    return cases


def run(quick: bool = False, compile: bool | None = None, log=print) -> tuple[list[dict], dict]:
    """Time every case; returns (rows, ceilings). On a CPU: small batches, and torch.compile only when asked."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = ([256] if quick else [1, 256]) if device == "cuda" else [4]
    compile = device == "cuda" if compile is None else compile
    torch._dynamo.config.cache_size_limit = 256
    ceilings = {"bandwidth_gbs": peak_bandwidth_gbs(device), "tflops": peak_tflops(device)}
    log(f"measured ceilings on {device}: {ceilings['bandwidth_gbs']:.0f} GB/s copy, {ceilings['tflops']:.0f} TFLOP/s")
    cases = group_norm_cases(device, dtype, batches, quick) + group_norm_nhwc_cases(device, dtype, batches, quick)
    cases += attention_cases(device, dtype, batches, quick) + pointwise_cases(device, dtype, batches, quick)
    rows = []
    for case in cases:
        if not compile:
            case.impls.pop("compile", None)
            case.skipped["compile"] = "torch.compile not asked for on this device (--compile)"
        results, graphed = {}, {}
        for name, fn in case.impls.items():
            try:
                with torch.no_grad() if case.mode == "fwd" else torch.enable_grad():
                    results[name] = time_ms(fn, device)
            except Exception as e:  # a failing implementation is a result to report, not a reason to stop
                case.skipped[name] = failure(e)
                continue
            if device == "cuda" and case.mode == "fwd":  # kernel time without Python's launch overhead
                try:
                    with torch.no_grad():
                        graphed[name] = time_graph_ms(fn)
                except Exception as e:  # noqa: BLE001 (not capturable: reported beside the eager time)
                    case.skipped[f"{name} (graph)"] = failure(e)
        eager = results.get("eager")
        for name, ms in results.items():
            row = dict(
                op=case.op,
                network=case.network,
                shape=case.shape,
                batch=case.batch,
                dtype=case.dtype,
                mode=case.mode,
                impl=name,
                ms=ms,
                speedup_vs_eager=eager / ms if eager else None,
            )
            if name in graphed:
                row["ms_graph"] = graphed[name]
            if case.bytes:
                row["gb_s"] = case.bytes / ms / 1e6
                row["pct_peak"] = 100 * row["gb_s"] / ceilings["bandwidth_gbs"]
                if name in graphed:
                    row["pct_peak_graph"] = 100 * case.bytes / graphed[name] / 1e6 / ceilings["bandwidth_gbs"]
            if case.flops:
                row["tflop_s"] = case.flops / ms / 1e9
                row["pct_peak"] = 100 * row["tflop_s"] / ceilings["tflops"]
            rows.append(row)
        for name, reason in case.skipped.items():
            rows.append(
                dict(
                    op=case.op,
                    network=case.network,
                    shape=case.shape,
                    batch=case.batch,
                    mode=case.mode,
                    impl=name,
                    skipped=reason,
                )
            )
        best = min(results, key=results.get) if results else "-"
        log(
            f"{case.op:24s} {case.network:15s} {case.shape:32s} b={case.batch:<4d} {case.mode:8s} "
            + " ".join(f"{k}={v:.4g}ms" for k, v in results.items())
            + f"  best={best}"
        )
    return rows, ceilings


def summary(rows: list[dict]) -> list[dict]:
    """One line per (op, shape, batch, mode): cmfast's best backend against eager, compile and the best SDPA."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if "ms" not in r:
            continue
        key = (r["op"], r["network"], r["shape"], r["batch"], r["mode"])
        groups.setdefault(key, {})[r["impl"]] = r
    out = []
    for (op, network, shape, batch, mode), impls in groups.items():
        fused = [r for k, r in impls.items() if k.startswith("cmfast") and "[" not in k]
        best = min(fused, key=lambda r: r["ms"]) if fused else None
        sdpa = [r for k, r in impls.items() if k.startswith("sdpa")]
        line = dict(
            op=op,
            network=network,
            shape=shape,
            batch=batch,
            mode=mode,
            cmfast=best["impl"] if best else None,
            cmfast_ms=best["ms"] if best else None,
            eager_ms=impls.get("eager", {}).get("ms"),
            compile_ms=impls.get("compile", {}).get("ms"),
        )
        if best:
            line["rate"] = best.get("gb_s") or best.get("tflop_s")
            line["pct_peak"] = best.get("pct_peak")
            line["pct_peak_graph"] = best.get("pct_peak_graph")
            line["x_eager"] = best["speedup_vs_eager"]
            if line["compile_ms"]:
                line["x_compile"] = line["compile_ms"] / best["ms"]
            if sdpa:
                line["x_best_sdpa"] = min(r["ms"] for r in sdpa) / best["ms"]
        out.append(line)
    return out


SUMMARY_COLUMNS = [
    "op",
    "network",
    "shape",
    "batch",
    "mode",
    "cmfast",
    "cmfast_ms",
    "rate",
    "pct_peak",
    "pct_peak_graph",
    "x_eager",
    "x_compile",
    "x_best_sdpa",
]
