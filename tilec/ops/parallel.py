"""Ops between the GPUs of a tensor-parallel model.

A tensor-parallel MiMo (models/parallel.py) computes partial sums of the attention output projection and of the
MLP's down projection on each GPU; ``all_reduce`` adds them up, so every GPU holds the whole residual stream again.
Its lm_head computes a slice of the vocabulary on each GPU; ``all_gather`` joins the slices into whole logits.
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


def _all_gather_fake(x: Tensor, group: str) -> Tensor:
    from tilec.runtime import distributed

    return x.new_empty((*x.shape[:-1], x.shape[-1] * distributed.group(group).size()))


@define("all_gather", fake=_all_gather_fake)
def all_gather(x: Tensor, group: str) -> Tensor:
    """The ranks' ``x`` of tensor-parallel group ``group`` side by side along the last dim, in rank order."""
    from tilec.runtime import distributed

    return distributed.all_gather_last(x, group)
