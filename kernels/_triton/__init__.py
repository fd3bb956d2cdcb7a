"""Triton kernels. Imported only when the Triton backend is chosen (see ``kernels/_dispatch.py``),
so ``import kernels`` works without triton. Under ``TRITON_INTERPRET=1`` they run on CPU tensors."""
