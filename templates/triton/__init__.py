"""Triton kernel templates."""
