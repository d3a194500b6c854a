"""Mixture-of-Experts ops: the sigmoid router and the SwiGLU experts it selects.

Routing is an op, not Python control flow, so tracing never meets data-dependent code and later schedules stay
static: expert work is per (row, top-k slot) and reads the expert id at run time.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from typing import Optional

from tilec.errors import ShapeError
from tilec.ops.registry import define

# At or below this many (row, slot) pairs the experts gather their weights per pair (no host sync, CUDA-graph
# capturable); above it they loop over the experts that were hit, as HF does.
GATHER_LIMIT = 64


def _fail(op: str, what: str) -> None:
    raise ShapeError(f"tilec.{op}: {what}")


def _router_check(x, weight, correction_bias, top_k, n_group, topk_group) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        _fail("moe_router", f"weight {tuple(weight.shape)} does not fit input {tuple(x.shape)}")
    experts = weight.shape[0]
    if correction_bias is not None and tuple(correction_bias.shape) != (experts,):
        _fail("moe_router", f"correction bias {tuple(correction_bias.shape)} should be ({experts},)")
    if not 1 <= top_k <= experts:
        _fail("moe_router", f"top_k {top_k} must be in 1..{experts}")
    if n_group < 1 or experts % n_group or not 1 <= topk_group <= n_group:
        _fail("moe_router", f"{experts} experts cannot form {n_group} groups choosing {topk_group}")
    if n_group > 1 and (experts // n_group < 2 or top_k > topk_group * (experts // n_group)):
        _fail("moe_router", f"groups of {experts // n_group} experts x {topk_group} cannot supply top_k {top_k}")


def _router_fake(x, weight, correction_bias, top_k, n_group, topk_group, norm_topk_prob, scaling):
    _router_check(x, weight, correction_bias, top_k, n_group, topk_group)
    shape = (*x.shape[:-1], top_k)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.int64)


@define("moe_router", fake=_router_fake)
def moe_router(
    x: Tensor, weight: Tensor, correction_bias: Optional[Tensor], top_k: int, n_group: int, topk_group: int,
    norm_topk_prob: bool, scaling: float,
) -> tuple[Tensor, Tensor]:
    """Sigmoid router: returns (weights fp32 [..., k], expert ids int64 [..., k]), best choice first.

    The correction bias only steers the choice; the weights are the plain sigmoid scores of the chosen experts,
    renormalised to sum to one when ``norm_topk_prob`` and multiplied by ``scaling``.
    """
    _router_check(x, weight, correction_bias, top_k, n_group, topk_group)
    scores = F.linear(x.to(torch.float32), weight.to(torch.float32)).sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.to(torch.float32)
    if n_group > 1:
        grouped = choice.view(*choice.shape[:-1], n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        chosen = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(-1, chosen, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(choice.shape)
    indices = choice.topk(top_k, dim=-1, sorted=True).indices
    weights = scores.gather(-1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling, indices


def _experts_check(x, weights, indices, gate_up, down) -> None:
    if gate_up.dim() != 3 or down.dim() != 3:
        _fail("moe_experts", f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} must be 3-D")
    experts, two_i, hidden = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (experts, hidden, two_i // 2):
        _fail("moe_experts", f"gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not pair: expected "
                             f"down ({experts}, {hidden}, {two_i // 2})")
    routing_check("moe_experts", x, weights, indices, hidden)


def routing_check(op: str, x, weights, indices, hidden: int) -> None:
    """The checks every experts op makes on its input rows and the router's choice."""
    if x.shape[-1] != hidden:
        _fail(op, f"input {tuple(x.shape)} does not match expert hidden size {hidden}")
    if weights.shape != indices.shape or weights.shape[:-1] != x.shape[:-1]:
        _fail(op, f"router weights {tuple(weights.shape)} / ids {tuple(indices.shape)} do not fit input "
                  f"{tuple(x.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        _fail(op, f"expert ids must be int32 or int64, got {indices.dtype}")


def _experts_fake(x, weights, indices, gate_up, down):
    _experts_check(x, weights, indices, gate_up, down)
    return x.new_empty(x.shape)


def swiglu_expert(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """One expert on rows x [N, H]: ``down(silu(gate) * up)`` with gate_up [2I, H] (gate rows first)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


@define("moe_experts", fake=_experts_fake)
def moe_experts(x: Tensor, weights: Tensor, indices: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """SwiGLU experts weighted by the router: ``sum_j weights[..., j] * expert[indices[..., j]](x)``.

    gate_up [E, 2I, H] holds each expert's gate rows then up rows (HF's packed layout); down is [E, H, I].
    """
    _experts_check(x, weights, indices, gate_up, down)
    hidden, k = x.shape[-1], indices.shape[-1]
    rows = x.reshape(-1, hidden)
    ids = indices.reshape(-1, k).to(torch.int64)
    w = weights.reshape(-1, k).to(torch.float32)
    out = torch.zeros(rows.shape, dtype=torch.float32, device=x.device)
    if ids.numel() <= GATHER_LIMIT:
        flat = ids.reshape(-1)
        h = torch.bmm(gate_up[flat], rows.repeat_interleave(k, 0)[:, :, None]).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(down[flat], (F.silu(gate) * up)[:, :, None]).squeeze(-1)
        out += (y.to(torch.float32) * w.reshape(-1, 1)).view(-1, k, hidden).sum(1)
    else:
        for expert in torch.unique(ids).tolist():
            token, slot = torch.nonzero(ids == expert, as_tuple=True)
            y = swiglu_expert(rows[token], gate_up[expert], down[expert])
            out.index_add_(0, token, y.to(torch.float32) * w[token, slot, None])
    return out.to(x.dtype).view(x.shape)
