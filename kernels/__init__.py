"""Fused Triton kernels, installed as `cmfast.kernels` (setup.py maps this folder).

One file per op, each with its plain-PyTorch reference `<op>_ref` beside the kernels and launchers:
`group_norm_silu.py` (GroupNorm, optionally with ADM's scale-shift, then SiLU; forward and backward), `attention.py`
(flash-style attention read straight from the qkv projection; forward and backward), `skip_out.py` (the consistency
model's c_skip x + c_out F), `heun_step.py` (the teacher's Heun step for distillation). The public, dispatched entry
points are in `cmfast.ops`.
"""
