"""Triton kernels of alit_fast (installed as ``alit_fast.kernels``).

Kernels here know nothing of nn.Module or of the model: they take tensors and launch.
Model code reaches them only through ``alit_fast.ops``.
"""
