"""The fused ops: one file per op, each holding in order its plain-PyTorch reference `<op>_ref`, its Triton kernels,
their launchers, and the op registered with torch.library (`cmfast::<op>`, with its fake implementation and backward).

`group_norm_silu.py` (GroupNorm, optionally with ADM's scale-shift, then SiLU; forward and backward),
`group_norm_silu_nhwc.py` (its channels_last inference form on x + pre_add + alpha residual; forward only),
`attention.py` (flash-style attention read straight from the qkv projection; forward and backward), `skip_out.py` (the
consistency model's c_skip x + c_out F; forward and backward), `heun_step.py` (the teacher's Heun step for
distillation); `_common.py` holds what they share (the optional Triton import, dtypes, limits, the memory-format rule).
The backend (C++/CUDA extension, Triton or PyTorch) is an argument of the registered ops; `cmfast.ops` chooses it and
holds the public entry points. This package imports only cmfast's math (`cmfast.preconditioning`), never `cmfast.ops`.
"""
