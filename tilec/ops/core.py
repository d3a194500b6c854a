"""Dense tilec ops: embedding, norms, residual add, linear, RoPE, SwiGLU, argmax and sampling.

Reference implementations follow HF transformers' MiMo-V2-Flash arithmetic (dtypes and order of operations), so a
model written with these ops matches HF to rounding in fp32 and within bf16 tolerance in bf16.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tilec.errors import ShapeError, TilecError
from tilec.ops.registry import define


def _fail(op: str, what: str) -> None:
    raise ShapeError(f"tilec.{op}: {what}")


def _check_last_dim(op: str, x: Tensor, name: str, size: int, wname: str) -> None:
    if x.shape[-1] != size:
        _fail(op, f"{name} has last dim {x.shape[-1]} (shape {tuple(x.shape)}) but {wname} expects {size}")


# ----------------------------------------------------------------------------------------------------- embedding
def _embedding_check(ids: Tensor, weight: Tensor) -> None:
    if ids.dtype not in (torch.int32, torch.int64):
        _fail("embedding", f"token ids must be int32 or int64, got {ids.dtype}")
    if weight.dim() != 2:
        _fail("embedding", f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")


def _embedding_fake(ids: Tensor, weight: Tensor) -> Tensor:
    _embedding_check(ids, weight)
    return weight.new_empty((*ids.shape, weight.shape[1]))


@define("embedding", fake=_embedding_fake)
def embedding(ids: Tensor, weight: Tensor) -> Tensor:
    """Gather rows of ``weight`` [V, H] for token ids [...] -> [..., H]."""
    _embedding_check(ids, weight)
    return F.embedding(ids, weight)


# ------------------------------------------------------------------------------------------------------ rms norm
def _norm_check(op: str, x: Tensor, weight: Tensor) -> None:
    if weight.dim() != 1:
        _fail(op, f"weight must be 1-D, got shape {tuple(weight.shape)}")
    _check_last_dim(op, x, "input", weight.shape[0], "weight")


def _rms_norm_math(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # HF order: normalise in fp32, cast back to the input dtype, then scale by the weight.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _norm_check("rms_norm", x, weight)
    return x.new_empty(x.shape, dtype=torch.result_type(x, weight))


@define("rms_norm", fake=_rms_norm_fake)
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: ``weight * (x / sqrt(mean(x^2) + eps))``, normalised in fp32."""
    _norm_check("rms_norm", x, weight)
    return _rms_norm_math(x, weight, eps)


def _add_rms_norm_fake(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _norm_check("add_rms_norm", x, weight)
    if x.shape != residual.shape:
        _fail("add_rms_norm", f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape")
    summed = x.new_empty(x.shape, dtype=torch.result_type(x, residual))
    return summed.new_empty(summed.shape, dtype=torch.result_type(summed, weight)), summed


@define("add_rms_norm", fake=_add_rms_norm_fake)
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Residual add fused with RMSNorm: returns ``(rms_norm(x + residual), x + residual)``."""
    _add_rms_norm_fake(x, residual, weight, eps)
    summed = x + residual
    return _rms_norm_math(summed, weight, eps), summed


# ----------------------------------------------------------------------------------------------------------- add
def _add_fake(a: Tensor, b: Tensor) -> Tensor:
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        _fail("add", f"shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast")
    return a.new_empty(shape, dtype=torch.result_type(a, b))


@define("add", fake=_add_fake)
def add(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise ``a + b`` (the residual connection)."""
    _add_fake(a, b)
    return a + b


# ----------------------------------------------------------------------------------------------------------- cat
def _cat_fake(tensors: list[Tensor], dim: int) -> Tensor:
    if not tensors:
        _fail("cat", "needs at least one tensor")
    try:
        return torch.cat([t.new_empty(t.shape) for t in tensors], dim=dim)
    except RuntimeError as exc:
        _fail("cat", f"shapes {[tuple(t.shape) for t in tensors]} do not join on dim {dim}: {exc}")


@define("cat", fake=_cat_fake)
def cat(tensors: list[Tensor], dim: int) -> Tensor:
    """Concatenate tensors along ``dim`` (e.g. the hidden states a DFlash draft reads from several layers)."""
    _cat_fake(tensors, dim)
    return torch.cat(tensors, dim=dim)


# -------------------------------------------------------------------------------------------------------- linear
def _linear_check(x: Tensor, weight: Tensor, bias: Optional[Tensor], op: str = "linear",
                  wname: str = "weight") -> None:
    if weight.dim() != 2:
        _fail(op, f"{wname} must be [out, in], got shape {tuple(weight.shape)}")
    _check_last_dim(op, x, "input", weight.shape[1], f"{wname} {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        _fail(op, f"bias of {wname}: shape {tuple(bias.shape)} does not match its {weight.shape[0]} rows")


def _linear_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor], op: str = "linear",
                 wname: str = "weight") -> Tensor:
    _linear_check(x, weight, bias, op, wname)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.result_type(x, weight))


@define("linear", fake=_linear_fake)
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` with weight [out, in]."""
    _linear_check(x, weight, bias)
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------------------- rope
def rope_inv_freq(rotary_dim: int, theta: float, device=None) -> Tensor:
    """Inverse frequencies of the default RoPE, computed exactly as HF does (fp32)."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rope_cos_sin(start_pos: Tensor, rows: int, rotary_dim: int, theta: float, dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [B, T, rotary_dim] for query rows at positions ``start_pos[b] + t``."""
    positions = start_pos.to(torch.int64)[:, None] + torch.arange(rows, device=start_pos.device)
    freqs = positions.to(torch.float32)[..., None] * rope_inv_freq(rotary_dim, theta, start_pos.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rope_check(x: Tensor, start_pos: Tensor, head_dim: int, rotary_dim: int, op: str = "rope",
                what: str = "input") -> None:
    if x.dim() != 3:
        _fail(op, f"{what} must be [batch, rows, heads*head_dim], got shape {tuple(x.shape)}")
    if head_dim <= 0 or x.shape[-1] % head_dim:
        _fail(op, f"{what} last dim {x.shape[-1]} (shape {tuple(x.shape)}) is not a multiple of head_dim {head_dim}")
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        _fail(op, f"rotary_dim {rotary_dim} must be even and within head_dim {head_dim}")
    if start_pos.dim() != 1 or start_pos.shape[0] != x.shape[0]:
        _fail(op, f"start_pos must be [batch={x.shape[0]}], got shape {tuple(start_pos.shape)}")


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    """Rotate-half RoPE on the first ``cos.shape[-1]`` dims of every head of x [B, T, N*head_dim]."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == 0:
        return x.clone()
    b, t, _ = x.shape
    xh = x.view(b, t, -1, head_dim)
    rot, rest = xh[..., :rotary_dim], xh[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return torch.cat((out, rest), dim=-1).reshape(b, t, -1)


def _rope_fake(x: Tensor, start_pos: Tensor, head_dim: int, rotary_dim: int, theta: float) -> Tensor:
    _rope_check(x, start_pos, head_dim, rotary_dim)
    return x.new_empty(x.shape)


@define("rope", fake=_rope_fake)
def rope(x: Tensor, start_pos: Tensor, head_dim: int, rotary_dim: int, theta: float) -> Tensor:
    """Partial rotate-half RoPE on x [B, T, heads*head_dim]; row t of batch b sits at ``start_pos[b] + t``."""
    _rope_check(x, start_pos, head_dim, rotary_dim)
    cos, sin = rope_cos_sin(start_pos, x.shape[1], rotary_dim, theta, x.dtype)
    return apply_rope(x, cos, sin, head_dim)


def _qkv_rope_fake(x, wq, wk, wv, bq, bk, bv, start_pos, head_dim, rotary_dim, theta):
    q, k, v = (_linear_fake(x, w, b, "qkv_rope", name) for w, b, name in ((wq, bq, "wq"), (wk, bk, "wk"),
                                                                             (wv, bv, "wv")))
    _rope_check(q, start_pos, head_dim, rotary_dim, "qkv_rope", "q (x @ wq.T)")
    _rope_check(k, start_pos, head_dim, rotary_dim, "qkv_rope", "k (x @ wk.T)")
    return q, k, v


@define("qkv_rope", fake=_qkv_rope_fake)
def qkv_rope(
    x: Tensor, wq: Tensor, wk: Tensor, wv: Tensor, bq: Optional[Tensor], bk: Optional[Tensor],
    bv: Optional[Tensor], start_pos: Tensor, head_dim: int, rotary_dim: int, theta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Q, K, V projections with partial RoPE applied to Q and K in the epilogue: returns ``(q, k, v)``."""
    _qkv_rope_fake(x, wq, wk, wv, bq, bk, bv, start_pos, head_dim, rotary_dim, theta)
    q, k, v = F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)
    cos, sin = rope_cos_sin(start_pos, x.shape[1], rotary_dim, theta, q.dtype)
    return apply_rope(q, cos, sin, head_dim), apply_rope(k, cos, sin, head_dim), v


# ------------------------------------------------------------------------------------------------------- swiglu
def _silu_mul_fake(gate: Tensor, up: Tensor) -> Tensor:
    if gate.shape != up.shape:
        _fail("silu_mul", f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return gate.new_empty(gate.shape, dtype=torch.result_type(gate, up))


@define("silu_mul", fake=_silu_mul_fake)
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, the SwiGLU activation."""
    _silu_mul_fake(gate, up)
    return F.silu(gate) * up


def _swiglu_fake(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    gate = _linear_fake(x, w_gate, None, "swiglu", "w_gate")
    up = _linear_fake(x, w_up, None, "swiglu", "w_up")
    if gate.shape != up.shape:
        _fail("swiglu", f"w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} differ in shape")
    return _linear_fake(gate, w_down, None, "swiglu", "w_down")


@define("swiglu", fake=_swiglu_fake)
def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Dense SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""
    _swiglu_fake(x, w_gate, w_up, w_down)
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


# --------------------------------------------------------------------------------------------- argmax and sample
def _argmax_fake(logits: Tensor) -> Tensor:
    if logits.dim() == 0 or logits.shape[-1] == 0:
        _fail("argmax", f"needs a non-empty last dim to choose from, got shape {tuple(logits.shape)}")
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


@define("argmax", fake=_argmax_fake)
def argmax(logits: Tensor) -> Tensor:
    """Greedy choice over the last dim (the first maximum on ties)."""
    _argmax_fake(logits)
    return torch.argmax(logits, dim=-1)


def _lm_head_argmax_fake(x: Tensor, weight: Tensor) -> Tensor:
    _linear_check(x, weight, None, "lm_head_argmax")
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


@define("lm_head_argmax", fake=_lm_head_argmax_fake)
def lm_head_argmax(x: Tensor, weight: Tensor) -> Tensor:
    """``argmax(x @ weight.T)`` over the vocabulary without materialising the logits (greedy decoding)."""
    _lm_head_argmax_fake(x, weight)
    return torch.argmax(F.linear(x, weight), dim=-1)


def _sample_fake(logits: Tensor, uniform: Tensor, temperature: float, top_p: float) -> Tensor:
    _argmax_fake(logits)
    if uniform.shape != logits.shape[:-1]:
        _fail("sample", f"uniform must have shape {tuple(logits.shape[:-1])}, got {tuple(uniform.shape)}")
    if not temperature > 0 or not 0 < top_p <= 1:
        raise TilecError(f"tilec.sample: needs temperature > 0 and 0 < top_p <= 1, got temperature={temperature}, "
                         f"top_p={top_p} (use argmax for greedy decoding)")
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


def sampling_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution ``sample`` draws from: softmax(logits / temperature), cut to the top-p nucleus."""
    probs = torch.softmax(logits.to(torch.float32) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@define("sample", fake=_sample_fake)
def sample(logits: Tensor, uniform: Tensor, temperature: float, top_p: float) -> Tensor:
    """Draw a token per row by inverse CDF with the given uniform numbers in [0, 1) (deterministic, capturable)."""
    _sample_fake(logits, uniform, temperature, top_p)
    probs = sampling_probs(logits, temperature, top_p)
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (uniform.to(torch.float32) * cdf[..., -1])[..., None].contiguous(), right=True)
    # A uniform that rounds to 1.0 lands past the end: give it the last token that has any probability.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(index.squeeze(-1), last)
