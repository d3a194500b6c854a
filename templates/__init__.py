"""Jinja templates: the target syntax of generated kernels lives here and nowhere else."""
