"""Autograd wrappers of the Triton path, one module per op: each registers a
`torch.library.custom_op` (namespace "fasttx") with `register_fake` and `register_autograd`, whose
implementation calls the launchers in fasttx.kernels. Only fasttx.functional imports these."""
