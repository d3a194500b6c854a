"""CUDA megakernel templates."""
