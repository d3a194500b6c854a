"""Code generation: Jinja templates rendered into Triton kernels (and, later, the CUDA megakernel)."""
