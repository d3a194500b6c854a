"""MXFP4 expert weights re-laid for the CUDA decode kernels (templates/cuda/moe_experts_mxfp4.cu.j2).

The kernels multiply on the tensor cores with ``mma.m16n8k16`` (bf16, fp32 sums), the weights as the 16-row left
operand and up to 8 token rows as the right one. Re-laid here once, when a program loads, each thread's 32-bit word
of weights is exactly its left-operand fragment for one k16 step, so it is loaded straight into registers (no shared
memory) and turned into bf16 with a few bit operations. The bytes are the same count as the checkpoint's; only their
order and the bit order within a word change.

Units. A weight matrix W [N, K] of one expert (codes: E2M1, 4 bits) is cut into tiles of 16 rows and chunks of 64
columns. In tile T, row ``16T + 8h + g`` (h = 0, 1; g = 0..7) and chunk c, lane ``L = 4g + t`` of a warp holds four
words, one per k16 step s = 0..3, and step s of lane (g, t) covers the four columns ``k = 64c + 16t + 4s + q``
(q = 0..3) of rows 16T + g and 16T + 8 + g. The mma's k positions 2t, 2t+1 mean columns k, k+1 and positions 2t+8,
2t+9 columns k+2, k+3, for both operands, so the activations a lane needs for a chunk are 16 consecutive values
(``x[token g, 64c + 16t : 64c + 16t + 16]``), and all of a lane's columns in a chunk lie in one 32-column scale block.

Words. The mma fragment's registers are R0 (row g, columns k, k+1), R1 (row g+8, k, k+1), R2 (row g, k+2, k+3) and R3
(row g+8, k+2, k+3), each two bf16 (low half first). An element goes to register ``j = h + 2 * (q // 2)``, half
``q % 2``; its 3 magnitude bits (code & 7) sit at bit ``MAG_SHIFT[j] + 16 * half`` and its sign (code >> 3) at
``SIGN_SHIFT[j] + 16 * half``. The kernel rebuilds R_j with the magnitudes at bf16 bits 6..8 and the sign at 15 (value
* 2^-126, exact, codes 0 and 1 being bf16 subnormals): R0 = w & M, R1 = (w << 3) & M, R2 and R3 two shifts each.

Scales. Per chunk, 32 bytes: ``[g][b][h]`` with b the chunk's scale block (lanes t = 0, 1 use b = 0, t = 2, 3 use
b = 1), so a lane's two scales (rows g and g+8) are one 16-bit load.

Gate and up. The gate_up matrix [2I, H] (gate rows, then up rows) is re-laid with tile T's rows 0..7 = gate rows
8T..8T+7 and rows 8..15 = up rows 8T..8T+7, so a lane's sums hold gate and up of the same column side by side.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from tilec.errors import ShapeError

TILE_N = 16  # weight rows per mma tile
CHUNK_K = 64  # columns per 16-byte load of each lane
MAG_SHIFT = (6, 3, 0, 9)
SIGN_SHIFT = (15, 12, 13, 14)


def check_shape(n: int, k: int, what: str) -> None:
    if n % TILE_N or k % CHUNK_K:
        raise ShapeError(f"{what}: the CUDA experts kernels need rows in multiples of {TILE_N} and a reduction "
                         f"length in multiples of {CHUNK_K}, got [{n}, {k}]; the Triton kernels take any shape")


def _rows_paired(t: Tensor) -> Tensor:
    """[E, 2I, ...] gate rows then up rows -> rows in tiles of 8 gate rows and the matching 8 up rows."""
    e, two_i = t.shape[:2]
    return t.reshape(e, 2, two_i // 16, 8, *t.shape[2:]).transpose(1, 2).reshape(t.shape)


def fragment_words(blocks: Tensor, gate_up: bool = False) -> Tensor:
    """MXFP4 blocks uint8 [E, N, K/2] (element 2j in byte j's low nibble) -> int32 [E, N/16, K/64, 32, 4]."""
    e, n, half_k = blocks.shape
    k = 2 * half_k
    check_shape(n, k, "MXFP4 expert blocks")
    if gate_up:
        blocks = _rows_paired(blocks)
    out = torch.empty((e, n // TILE_N, k // CHUNK_K, 32, 4), dtype=torch.int32, device=blocks.device)
    mag = torch.tensor(MAG_SHIFT, dtype=torch.int64, device=blocks.device)
    sign = torch.tensor(SIGN_SHIFT, dtype=torch.int64, device=blocks.device)
    q = torch.arange(4, device=blocks.device)
    h = torch.arange(2, device=blocks.device)
    j = h[:, None] + 2 * (q[None, :] // 2)  # [h, q] -> register
    half = 16 * (q % 2)[None, :]
    mag_at, sign_at = mag[j] + half, sign[j] + half  # [2, 4]
    for x in range(e):  # one expert at a time bounds the temporaries
        b = blocks[x].to(torch.int64)
        codes = torch.stack((b & 15, b >> 4), dim=-1).reshape(n, k)  # [N, K]
        # [T, h, g, c, t, s, q]
        codes = codes.reshape(n // TILE_N, 2, 8, k // CHUNK_K, 4, 4, 4)
        bits = ((codes & 7) << mag_at[None, :, None, None, None, None, :]) | \
            ((codes >> 3) << sign_at[None, :, None, None, None, None, :])
        word = bits.sum(dim=(1, 6))  # disjoint bits: the sum is the OR; [T, g, c, t, s]
        word = torch.where(word >= 2 ** 31, word - 2 ** 32, word)
        out[x] = word.permute(0, 2, 1, 3, 4).reshape(n // TILE_N, k // CHUNK_K, 32, 4).to(torch.int32)
    return out


def fragment_scales(scales: Tensor, gate_up: bool = False) -> Tensor:
    """E8M0 scale codes uint8 [E, N, K/32] -> uint8 [E, N/16, K/64, 32] (per chunk: [g][b][h])."""
    e, n, blocks = scales.shape
    check_shape(n, 32 * blocks, "MXFP4 expert scales")
    if gate_up:
        scales = _rows_paired(scales)
    s = scales.reshape(e, n // TILE_N, 2, 8, blocks // 2, 2)  # [E, T, h, g, c, b]
    return s.permute(0, 1, 4, 3, 5, 2).reshape(e, n // TILE_N, blocks // 2, 32).contiguous()


def unpack_fragment_words(words: Tensor, gate_up: bool = False) -> Tensor:
    """The inverse of `fragment_words` as E2M1 codes uint8 [E, N, K] (for tests and inspection)."""
    e, nt, nc = words.shape[:3]
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(e, nt, nc, 8, 4, 4).permute(0, 1, 3, 2, 4, 5)  # [E, T, g, c, t, s]
    codes = torch.empty((e, nt, 2, 8, nc, 4, 4, 4), dtype=torch.int64, device=words.device)
    for h in range(2):
        for q in range(4):
            j, half = h + 2 * (q // 2), 16 * (q % 2)
            mag = (w >> (MAG_SHIFT[j] + half)) & 7
            sign = (w >> (SIGN_SHIFT[j] + half)) & 1
            codes[:, :, h, :, :, :, :, q] = mag | (sign << 3)
    codes = codes.reshape(e, nt * TILE_N, nc * CHUNK_K).to(torch.uint8)
    if gate_up:  # undo the pairing: tile rows (T, h, g) -> h * I + 8T + g
        codes = codes.reshape(e, nt, 2, 8, -1).transpose(1, 2).reshape(codes.shape)
    return codes


# Weights derived from a graph's own by name (``<weight>@<layout>``): what plans ask for in ``derived_weights`` and
# a program computes once when it loads (tilec/codegen/triton.py).
DERIVED = {
    "mma_words_gate_up": functools.partial(fragment_words, gate_up=True),
    "mma_scales_gate_up": functools.partial(fragment_scales, gate_up=True),
    "mma_words": fragment_words,
    "mma_scales": fragment_scales,
}
# mxfp4_moe_experts' (gate_up blocks, gate_up scales, down blocks, down scales), re-laid, in that order
EXPERT_LAYOUTS = ("mma_words_gate_up", "mma_scales_gate_up", "mma_words", "mma_scales")


def relay_experts(gate_up_blocks: Tensor, gate_up_scales: Tensor, down_blocks: Tensor, down_scales: Tensor) -> tuple:
    """The four tensors the CUDA decode kernels read after an experts op's own arguments, as a program derives them."""
    return tuple(DERIVED[layout](t) for layout, t in
                 zip(EXPERT_LAYOUTS, (gate_up_blocks, gate_up_scales, down_blocks, down_scales)))
