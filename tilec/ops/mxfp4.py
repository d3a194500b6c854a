"""MXFP4 experts: `moe_experts` with each expert's weights held in MXFP4 (see tilec/mxfp4.py for the format).

The reference dequantises only the experts the router chose, then runs exactly `moe_experts`' code on them, so its
output is bit-for-bit `moe_experts` on the dequantised weights. Hopper has no FP4 tensor cores; kernels dequantise
tiles in registers the same way (exact in bf16, see tilec/mxfp4.py).
"""

import torch
from torch import Tensor

from tilec import mxfp4
from tilec.errors import ShapeError
from tilec.ops import moe
from tilec.ops.registry import OPS, define

_OP = "mxfp4_moe_experts"


def _fail(what: str) -> None:
    raise ShapeError(f"tilec.{_OP}: {what}")


def _check(x, weights, indices, gate_up_blocks, gate_up_scales, down_blocks, down_scales) -> None:
    named = (("gate_up_blocks", gate_up_blocks), ("gate_up_scales", gate_up_scales), ("down_blocks", down_blocks),
             ("down_scales", down_scales))
    for name, t in named:
        if t.dtype != torch.uint8 or t.dim() != 3:
            _fail(f"{name} must be a 3-D uint8 tensor, got {t.dtype} {tuple(t.shape)}")
    experts, two_i, half_h = gate_up_blocks.shape
    hidden, inter = 2 * half_h, two_i // 2
    if two_i % 2 or half_h % 16:
        _fail(f"gate_up_blocks {tuple(gate_up_blocks.shape)} should be [E, 2I, H/2] with H a multiple of 32")
    expected = {"gate_up_scales": (experts, two_i, hidden // 32), "down_blocks": (experts, hidden, inter // 2),
                "down_scales": (experts, hidden, inter // 32)}
    if inter % 32:
        _fail(f"expert size I = {inter} (from gate_up_blocks {tuple(gate_up_blocks.shape)}) must be a multiple of 32")
    for name, t in named[1:]:
        if tuple(t.shape) != expected[name]:
            _fail(f"{name} {tuple(t.shape)} does not pair with gate_up_blocks {tuple(gate_up_blocks.shape)}: "
                  f"expected {expected[name]}")
    moe.routing_check(_OP, x, weights, indices, hidden)


def _fake(x, weights, indices, gate_up_blocks, gate_up_scales, down_blocks, down_scales):
    _check(x, weights, indices, gate_up_blocks, gate_up_scales, down_blocks, down_scales)
    return x.new_empty(x.shape)


@define(_OP, fake=_fake)
def mxfp4_moe_experts(x: Tensor, weights: Tensor, indices: Tensor, gate_up_blocks: Tensor, gate_up_scales: Tensor,
                      down_blocks: Tensor, down_scales: Tensor) -> Tensor:
    """`moe_experts` with MXFP4 expert weights: ``sum_j weights[..., j] * expert[indices[..., j]](x)``.

    Layout (row-major uint8, as tilec.mxfp4 defines it): gate_up_blocks [E, 2I, H/2] and gate_up_scales [E, 2I, H/32]
    hold each expert's gate rows then up rows, quantised along H; down_blocks [E, H, I/2] and down_scales [E, H, I/32]
    along I. Element 2j of a row is the low nibble of byte j; each scale covers 32 consecutive elements of a row. H and
    I must be multiples of 32. Weights are dequantised to x's dtype (exact for float32 and bfloat16).
    """
    _check(x, weights, indices, gate_up_blocks, gate_up_scales, down_blocks, down_scales)
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() <= moe.GATHER_LIMIT:
        # One dequantised copy per (row, slot), no host sync; moe_experts' gather path then picks copy i for pair i.
        touched, local = flat, torch.arange(flat.numel(), device=flat.device)
    else:
        # Each chosen expert once; ids renumbered in the same order, so moe_experts' loop visits them as before.
        touched, local = torch.unique(flat, return_inverse=True)
    experts, two_i, half_h = gate_up_blocks.shape
    hidden = 2 * half_h
    gate_up = mxfp4.dequantize(mxfp4.MXFP4Tensor(gate_up_blocks[touched], gate_up_scales[touched],
                                                 (touched.numel(), two_i, hidden)), x.dtype)
    down = mxfp4.dequantize(mxfp4.MXFP4Tensor(down_blocks[touched], down_scales[touched],
                                              (touched.numel(), hidden, two_i // 2)), x.dtype)
    return OPS["moe_experts"].reference(x, weights, local.view(indices.shape), gate_up, down)
