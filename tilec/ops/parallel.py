"""Ops between the GPUs of a tensor-parallel model.

A tensor-parallel MiMo (models/parallel.py) computes partial sums of the attention output projection and of the
MLP's down projection on each GPU; ``all_reduce`` adds them up, so every GPU holds the whole residual stream again.
"""

import torch
from torch import Tensor

from tilec.errors import ShapeError
from tilec.ops.registry import define


def _all_reduce_fake(x: Tensor, group: str) -> Tensor:
    if not x.is_floating_point():
        raise ShapeError(f"tilec.all_reduce: sums floating-point tensors, got {x.dtype}")
    return torch.empty_like(x)


@define("all_reduce", fake=_all_reduce_fake)
def all_reduce(x: Tensor, group: str) -> Tensor:
    """The sum of ``x`` over the processes of tensor-parallel group ``group`` (every process gets the same bits)."""
    from tilec.runtime import distributed

    _all_reduce_fake(x, group)
    return distributed.all_reduce_(x.clone(), group)
