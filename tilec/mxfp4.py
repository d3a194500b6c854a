"""MXFP4 (OCP Microscaling v1.0): blocks of 32 E2M1 values sharing one E8M0 scale.

Format. A tensor ``x`` of shape ``[..., K]`` is cut along its last dimension into blocks of 32 values. Each block has
one scale ``2^(s - 127)`` stored as the uint8 E8M0 code ``s`` (0..254; 255 is NaN) and 32 E2M1 elements of 4 bits:
codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8..15 the same with the sign bit (8 is -0). Two elements share a
byte, element ``2j`` in the low nibble and ``2j + 1`` in the high one (as PyTorch's ``float4_e2m1fn_x2``, Triton's
``dot_scaled`` and gpt-oss). In memory an `MXFP4Tensor` holds ``blocks`` uint8 ``[..., K/2]`` and ``scales`` uint8
``[..., K/32]``, both row-major; checkpoints (gpt-oss / HF) hold the blocks as ``[..., K/32, 16]``, a pure reshape
(`blocks_to_checkpoint`, `blocks_from_checkpoint`).

Rules, for every case (each one tested in tests/test_mxfp4.py):

- Scale, ``floor`` rule (OCP): ``e = floor(log2(amax)) - 2``, amax the block's largest magnitude, then clamped to
  the E8M0 range [-127, 127]. Elements ``x / 2^e`` are rounded to the nearest E2M1 value, ties to the even code
  (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), and saturate at +-6 (values in (6, 8)
  become 6: the spec's rule clips up to a quarter of the block maximum).
- Scale, ``ceil`` rule: the smallest power of two with ``amax / 2^e <= 6`` (no element saturates), i.e. the floor
  rule's ``e`` plus one when ``amax / 2^e > 6``; clamped the same way. Elements are rounded as above.
- Computing ``e`` is exact (``frexp``, no floating-point log2), so amax exactly 6 * 2^e stays at e under ``ceil``.
- All-zero blocks (+0 or -0) get scale code 0 (2^-127, the smallest) and their elements keep their sign: +0 is code 0,
  -0 is code 8. Generally the sign bit is always kept: a negative value that rounds to zero becomes -0 (code 8), as
  IEEE rounding does; dequantisation gives -0.0 back.
- Subnormal inputs are ordinary values: float32 subnormals (below 2^-126) are scaled exactly. The E8M0 range clamps
  at the bottom: every block with amax below 2^-124 (``floor``; ``ceil``: at most 6 * 2^-127) gets scale code 0
  (2^-127), however small its values, so its elements are those of ``x * 2^127`` rounded (magnitudes up to 2^-129
  become +-0).
- Clamping at the top happens only for float64 inputs (float32 amax < 2^128 gives e <= 126): a block with amax at or
  above 2^130 (``floor``) or above 6 * 2^127 (``ceil``) gets code 254 (2^127), and its elements saturate at +-6.
- NaN or +-Inf anywhere in the input raise `QuantizationError` naming the first such element's index: no E2M1 value
  is right for them (an E8M0 NaN scale would poison the whole block).
- ``K % 32 != 0`` raises ShapeError saying which K would work (the next multiple of 32, zero padded) or to keep
  the tensor unquantised. A 0-d tensor raises ShapeError too.
- Input dtypes: float32, bfloat16 and float16 are computed in float32 (exactly: they all widen exactly); float64 in
  float64. Meta tensors give meta blocks and scales of the right shapes (byte counts without data).
- Dequantisation is ``value(code) * 2^(s - 127)``, exact in float32, bfloat16 and float64 with one exception: the
  product overflows to +-inf when it is at least 2^128, which needs scale code 254 (2^127) with an element >= 2, or
  code 253 (2^126) with an element >= 4 (``ceil`` picks 253 for float32 blocks with amax above 1.5 * 2^127, and their
  values from 1.75 * 2^127 up round to 4; the floor rule never goes above 252 for float32 inputs). float16 output
  rounds (its range is far smaller). Scale code 255 (the E8M0 NaN, found only in foreign checkpoints) dequantises its
  whole block to NaN. Code 0 (2^-127) relies on IEEE subnormal arithmetic, PyTorch's default
  (``torch.set_flush_denormal(True)`` would flush those blocks to zero).

Work is vectorised torch, in chunks of rows so that a large expert tensor never needs more than a few hundred MB of
temporaries, on whatever device the tensor is.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import torch
from torch import Tensor

from tilec.errors import QuantizationError, ShapeError

BLOCK = 32  # values per scale
SCALE_BIAS = 127
SCALE_NAN = 0xFF
SCALE_RULES = ("floor", "ceil")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
# Rounding |v| to E2M1 magnitudes: each midpoint between neighbours adds one to the code when |v| is past it; at a
# tie (|v| equal to the midpoint) it goes to the even code, so ">=" where the lower neighbour's code is odd.
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
_CHUNK_ELEMENTS = 1 << 24
_DEQUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.float16)


@dataclasses.dataclass(frozen=True)
class MXFP4Tensor:
    """A tensor of ``shape`` [..., K] in MXFP4: ``blocks`` uint8 [..., K/2] (element 2j in the low nibble of byte
    j) and ``scales`` uint8 [..., K/32] (E8M0 codes), both row-major on the same device."""

    blocks: Tensor
    scales: Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if not shape or shape[-1] % BLOCK:
            raise ShapeError(f"MXFP4Tensor shape {shape}: the last dimension must be a multiple of {BLOCK}")
        for name, t in (("blocks", self.blocks), ("scales", self.scales)):
            if t.dtype != torch.uint8:
                raise ShapeError(f"MXFP4Tensor {name} must be uint8, got {t.dtype}")
        want_blocks, want_scales = (*shape[:-1], shape[-1] // 2), (*shape[:-1], shape[-1] // BLOCK)
        if tuple(self.blocks.shape) != want_blocks or tuple(self.scales.shape) != want_scales:
            raise ShapeError(f"MXFP4Tensor of shape {shape} needs blocks {want_blocks} and scales {want_scales}; got "
                             f"blocks {tuple(self.blocks.shape)} and scales {tuple(self.scales.shape)}")

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()

    @property
    def device(self) -> torch.device:
        return self.blocks.device


def nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of an MXFP4 tensor of ``shape`` (blocks and scales): 17 bytes per 32 values."""
    numel = math.prod(shape)
    return numel // 2 + numel // BLOCK


# ----------------------------------------------------------------------------------------------------- quantize
def quantize(x: Tensor, scale_rule: str = "floor", *, name: str = "x") -> MXFP4Tensor:
    """``x`` [..., K] in MXFP4 along its last dimension (see the module docstring for every rule).

    ``name`` is what error messages call the tensor (the pass passes the weight's name).
    """
    if scale_rule not in SCALE_RULES:
        raise QuantizationError(f"scale_rule {scale_rule!r} unknown; use one of {', '.join(SCALE_RULES)}")
    if not x.is_floating_point():
        raise QuantizationError(f"quantize({name}): MXFP4 quantises floating-point tensors, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % BLOCK:
        k = x.shape[-1] if x.dim() else None
        fix = (f"pad it with zeros to {-(-k // BLOCK) * BLOCK}, or keep this tensor unquantised" if k
               else "give it a last dimension that is a multiple of 32")
        raise ShapeError(f"quantize({name}): shape {tuple(x.shape)} has last dimension {k}, not a multiple of the "
                         f"MXFP4 block size {BLOCK}; {fix}")
    shape = tuple(x.shape)
    k = shape[-1]
    blocks = torch.empty((*shape[:-1], k // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((*shape[:-1], k // BLOCK), dtype=torch.uint8, device=x.device)
    if x.is_meta or x.numel() == 0:
        return MXFP4Tensor(blocks, scales, shape)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.reshape(-1, k)
    out_b, out_s = blocks.view(-1, k // 2), scales.view(-1, k // BLOCK)
    step = max(1, _CHUNK_ELEMENTS // k)
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0:r0 + step].to(work)
        _check_finite(chunk, r0, shape, name)
        out_b[r0:r0 + step], out_s[r0:r0 + step] = _quantize_rows(chunk, scale_rule)
    return MXFP4Tensor(blocks, scales, shape)


def _check_finite(chunk: Tensor, row0: int, shape: tuple[int, ...], name: str) -> None:
    bad = ~torch.isfinite(chunk)
    if not bool(bad.any()):
        return
    row, col = (int(i) for i in bad.nonzero()[0])
    lead = shape[:-1]
    index = [int(i) for i in torch.unravel_index(torch.tensor(row0 + row), lead)] if lead else []
    where = ", ".join(str(i) for i in (*index, col))
    raise QuantizationError(f"quantize({name}): element [{where}] of shape {shape} is {float(chunk[row, col])}; "
                            f"MXFP4 has no encoding for NaN or Inf (fix that weight, or keep the tensor unquantised)")


def _quantize_rows(rows: Tensor, scale_rule: str) -> tuple[Tensor, Tensor]:
    """(blocks [n, K/2], scales [n, K/32]) of finite float32/float64 rows [n, K]."""
    n, k = rows.shape
    values = rows.view(n, k // BLOCK, BLOCK)
    amax = values.abs().amax(-1)
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2^exponent, mantissa in [0.5, 1): exact
    shared = exponent.to(torch.int32) - 3  # floor(log2(amax)) - 2, as amax / 2^shared = 8 * mantissa in [4, 8)
    if scale_rule == "ceil":
        shared += (mantissa > E2M1_MAX / 8).to(torch.int32)
    shared = torch.where(amax == 0, -SCALE_BIAS, shared).clamp_(-SCALE_BIAS, SCALE_BIAS)
    codes = (shared + SCALE_BIAS).to(torch.uint8)
    # 2^-shared is a normal number in float32 for every shared the float32 path can reach (-127..126), so the
    # scaling is exact wherever the result can round to a non-zero element.
    inverse = _pow2_table(rows.dtype, rows.device, negate=True)[codes.long()]
    scaled = values * inverse[..., None]
    magnitude = scaled.abs()
    nibble = torch.zeros(scaled.shape, dtype=torch.uint8, device=rows.device)
    for midpoint, tie_up in _MIDPOINTS:
        nibble += (magnitude >= midpoint) if tie_up else (magnitude > midpoint)
    nibble |= torch.signbit(scaled).to(torch.uint8) << 3
    nibble = nibble.view(n, k)
    return nibble[:, 0::2] | (nibble[:, 1::2] << 4), codes


def _pow2_table(dtype: torch.dtype, device, negate: bool = False) -> Tensor:
    """2^(code - 127) for codes 0..254 and NaN for 255 (or 2^(127 - code) with ``negate``), exact in ``dtype``."""
    sign = -1 if negate else 1
    table = [math.ldexp(1.0, sign * (c - SCALE_BIAS)) for c in range(255)] + [math.nan]
    return torch.tensor(table, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------- dequantize
def dequantize(q: MXFP4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The values ``q`` holds, as a ``dtype`` tensor of ``q.shape`` (exact in float32, bfloat16 and float64 except
    for overflow at the top two scale codes; scale code 255 gives NaN; see the module docstring)."""
    if dtype not in _DEQUANT_DTYPES:
        raise QuantizationError(f"dequantize: dtype {dtype} unsupported; use one of "
                                f"{', '.join(str(d).removeprefix('torch.') for d in _DEQUANT_DTYPES)}")
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if q.blocks.is_meta or out.numel() == 0:
        return out
    work = torch.float64 if dtype == torch.float64 else torch.float32
    k = q.shape[-1]
    blocks, scales, flat = q.blocks.reshape(-1, k // 2), q.scales.reshape(-1, k // BLOCK), out.view(-1, k)
    values = torch.tensor(E2M1_VALUES, dtype=work, device=q.device)
    powers = _pow2_table(work, q.device)
    step = max(1, _CHUNK_ELEMENTS // k)
    for r0 in range(0, blocks.shape[0], step):
        b = blocks[r0:r0 + step]
        elements = torch.stack((values[(b & 0xF).long()], values[(b >> 4).long()]), dim=-1)
        scaled = elements.view(b.shape[0], k // BLOCK, BLOCK) * powers[scales[r0:r0 + step].long()][..., None]
        flat[r0:r0 + step] = scaled.view(b.shape[0], k)
    return out


def relative_error(x: Tensor, q: MXFP4Tensor) -> float | None:
    """``||x - dequantize(q)|| / ||x||`` in float64 (0 when both are zero; None on the meta device)."""
    sums = squared_error(x, q)
    if sums is None:
        return None
    diff, norm = sums
    return math.sqrt(diff / norm) if norm else (0.0 if diff == 0 else math.inf)


def squared_error(x: Tensor, q: MXFP4Tensor) -> tuple[float, float] | None:
    """``(||x - dequantize(q)||^2, ||x||^2)`` in float64, chunked; None on the meta device."""
    if x.is_meta or q.blocks.is_meta:
        return None
    k = x.shape[-1]
    rows, blocks, scales = x.reshape(-1, k), q.blocks.reshape(-1, k // 2), q.scales.reshape(-1, k // BLOCK)
    step = max(1, _CHUNK_ELEMENTS // k)
    diff = norm = 0.0
    for r0 in range(0, rows.shape[0], step):
        part = MXFP4Tensor(blocks[r0:r0 + step], scales[r0:r0 + step], (blocks[r0:r0 + step].shape[0], k))
        ref = rows[r0:r0 + step].double()
        diff += float((ref - dequantize(part, torch.float64)).square().sum())
        norm += float(ref.square().sum())
    return diff, norm


# --------------------------------------------------------------------------------------------- checkpoint layout
def blocks_to_checkpoint(blocks: Tensor) -> Tensor:
    """In-memory blocks [..., K/2] as the gpt-oss / HF checkpoint holds them, [..., K/32, 16] (a view)."""
    if blocks.dim() == 0 or blocks.shape[-1] % (BLOCK // 2):
        raise ShapeError(f"MXFP4 blocks {tuple(blocks.shape)}: the last dimension must be a multiple of 16 "
                         f"(K/2 for K a multiple of 32)")
    return blocks.reshape(*blocks.shape[:-1], blocks.shape[-1] // (BLOCK // 2), BLOCK // 2)


def blocks_from_checkpoint(blocks: Tensor) -> Tensor:
    """Checkpoint blocks [..., K/32, 16] as held in memory, [..., K/2] (a view)."""
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK // 2:
        raise ShapeError(f"MXFP4 checkpoint blocks {tuple(blocks.shape)}: expected [..., K/32, 16]")
    return blocks.reshape(*blocks.shape[:-2], blocks.shape[-2] * (BLOCK // 2))


# ------------------------------------------------------------------------------------------------------ models
def quantize_model_experts(model, scale_rule: str = "floor", *, inplace: bool = False):
    """A MiMo model whose MoE experts are held in MXFP4 (`tilec.models.mxfp4_experts.MXFP4Experts`); everything
    else keeps its tensors. Layers already in MXFP4 are left alone.

    With ``inplace=False`` (the default) ``model`` is not changed: the result is a new module tree sharing every
    tensor except the experts' (so quantising a copy for `save_checkpoint` costs only the MXFP4 bytes).
    """
    from tilec.models.mxfp4_experts import quantize_experts_of

    if not inplace:
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        model = copy.deepcopy(model, memo=shared)
    quantize_experts_of(model, scale_rule)
    return model
