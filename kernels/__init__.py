"""Fused Triton kernels, installed as `cmfast.kernels` (setup.py maps this folder).

Empty for now: the fused GroupNorm+SiLU, attention, skip/out and Heun-step ops land here, one file per op with its
PyTorch reference beside it.
"""
