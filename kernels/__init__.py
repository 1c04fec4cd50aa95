"""fasttx.kernels: Triton kernels and their plain launchers (tensors in, tensors out).

One module per op. Nothing here knows about autograd or nn; this package imports only torch
and triton, and importing it needs triton (Linux).
"""
