"""The MXFP4 fragment layout of the CUDA decode kernels (tilec/codegen/mma_layout.py), checked on the CPU.

Three things must agree for the kernels to compute W @ x: the re-laid words hold every code once (round trip), the
kernel's bit operations (templates/cuda/mxfp4_mma.cuh, `step`) rebuild each fragment register's two bf16
values exactly, and the mma's operand positions pair each weight with the activation of the same column. The last
is checked by emulating mma.m16n8k16's fragment ownership (PTX ISA, "Matrix Fragments for mma.m16n8k16", bf16) over
the re-laid words and comparing with the dequantised matrix product.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tilec import mxfp4
from tilec.codegen import mma_layout
from tilec.errors import ShapeError

TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "cuda" / "mxfp4_mma.cuh"
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def codes_of(blocks: torch.Tensor) -> torch.Tensor:
    b = blocks.to(torch.int64)
    return torch.stack((b & 15, b >> 4), dim=-1).reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])


def value(codes: torch.Tensor) -> torch.Tensor:
    v = E2M1[codes & 7]
    return torch.where(codes >= 8, -v, v)


def random_blocks(e, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("gate_up", [False, True])
@pytest.mark.parametrize("shape", [(2, 32, 128), (1, 48, 64), (3, 16, 192)])
def test_fragment_words_round_trip(shape, gate_up):
    e, n, k = shape
    blocks = random_blocks(e, n, k, 1)
    words = mma_layout.fragment_words(blocks, gate_up)
    assert words.shape == (e, n // 16, k // 64, 32, 4) and words.dtype == torch.int32
    assert torch.equal(mma_layout.unpack_fragment_words(words, gate_up), codes_of(blocks).to(torch.uint8))


def test_gate_up_pairs_rows():
    """Tile T's rows 0..7 are gate rows 8T..8T+7 and rows 8..15 the matching up rows (I = n / 2)."""
    e, n, k = 1, 64, 64
    blocks = random_blocks(e, n, k, 2)
    words = mma_layout.fragment_words(blocks, gate_up=True)
    plain = mma_layout.unpack_fragment_words(words, gate_up=False)[0]  # rows in tile order
    codes = codes_of(blocks)[0]
    i = n // 2
    for t in range(n // 16):
        for r in range(16):
            src = 8 * t + r if r < 8 else i + 8 * t + r - 8
            assert torch.equal(plain[16 * t + r], codes[src].to(torch.uint8))


def kernel_registers(word: torch.Tensor) -> list[torch.Tensor]:
    """`step`'s bit operations, as written in the template, on int64 words holding 32-bit values."""
    w = word & 0xFFFFFFFF
    m32 = 0xFFFFFFFF
    r0 = w & 0x81C081C0
    r1 = ((w << 3) & m32) & 0x81C081C0
    r2 = (((w << 6) & m32) & 0x01C001C0) | (((w << 2) & m32) & 0x80008000)
    r3 = ((w >> 3) & 0x01C001C0) | (((w << 1) & m32) & 0x80008000)
    return [r0, r1, r2, r3]


def test_template_spells_the_same_bit_operations():
    """The emulation above is the template's: the same four expressions (so the tests below test the kernel)."""
    src = TEMPLATE.read_text()
    for expr in ("u32 r0 = w & 0x81C081C0u;", "u32 r1 = (w << 3) & 0x81C081C0u;",
                 "u32 r2 = ((w << 6) & 0x01C001C0u) | ((w << 2) & 0x80008000u);",
                 "u32 r3 = ((w >> 3) & 0x01C001C0u) | ((w << 1) & 0x80008000u);"):
        assert expr in src, expr


def bf16_times_2_126(bits16: torch.Tensor) -> torch.Tensor:
    """A bf16 bit pattern with only bits 6..8 and 15 set, times 2^126, exactly (float64)."""
    mag = (bits16 >> 6) & 7  # e1 e0 m: bf16 exponent bits 8..7 and mantissa bit 6
    exp, man = mag >> 1, mag & 1
    v = torch.where(exp == 0, man.double() * 2.0 ** -127, (1 + man.double() / 2) * 2.0 ** (exp.double() - 127))
    v = v * 2.0 ** 126
    return torch.where(((bits16 >> 15) & 1) == 1, -v, v)


def test_registers_rebuild_every_code_pair():
    """Every 8-code word: R_j's halves are the E2M1 values (times 2^-126 as bf16) of the codes placed there."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4096, 2, 4), generator=g)  # [word, h, q]
    codes[:16, 0, 0] = torch.arange(16)  # every code in every slot at least once
    codes[16:32, 1, 3] = torch.arange(16)
    word = torch.zeros(4096, dtype=torch.int64)
    for h in range(2):
        for q in range(4):
            j, half = h + 2 * (q // 2), 16 * (q % 2)
            word |= (codes[:, h, q] & 7) << (mma_layout.MAG_SHIFT[j] + half)
            word |= (codes[:, h, q] >> 3) << (mma_layout.SIGN_SHIFT[j] + half)
    regs = kernel_registers(word)
    for h in range(2):
        for q in range(4):
            j, half = h + 2 * (q // 2), q % 2
            got = bf16_times_2_126((regs[j] >> (16 * half)) & 0xFFFF)
            assert torch.equal(got, value(codes[:, h, q])), (h, q)
    for r in regs:  # nothing but bits 6..8 and 15 of each half
        assert not torch.any(r & ~0x81C081C0)


def emulate_mma_tile_product(words, scales, x, tile, chunks):
    """What the kernel's warp computes for one tile: mma.m16n8k16 over the given chunks with the registers built by
    `kernel_registers` (times scale) and B fragments from x [8, K] as the kernel loads them. Returns [16, 8]."""
    out = torch.zeros(16, 8, dtype=torch.float64)
    for c in chunks:
        for s in range(4):
            a = torch.zeros(16, 16, dtype=torch.float64)  # [row, k position]
            b = torch.zeros(16, 8, dtype=torch.float64)  # [k position, token]
            for lane in range(32):
                gg, t = lane >> 2, lane & 3
                w = words[tile, c, lane, s].to(torch.int64)
                sc = scales[tile, c, lane // 4 * 4 + 0: lane // 4 * 4 + 4]  # [g][b][h] of this g
                blk = t >> 1
                s_g, s_g8 = float(2.0 ** (int(sc[2 * blk]) - 127)), float(2.0 ** (int(sc[2 * blk + 1]) - 127))
                regs = kernel_registers(w.view(1))
                vals = [bf16_times_2_126(torch.stack(((r >> 0) & 0xFFFF, (r >> 16) & 0xFFFF))).flatten()
                        for r in regs]
                # PTX fragment ownership: a0,a1 (g, 2t..2t+1); a2,a3 (g+8, 2t..); a4,a5 (g, 2t+8..); a6,a7 (g+8, 2t+8..)
                a[gg, 2 * t:2 * t + 2] = vals[0] * s_g
                a[gg + 8, 2 * t:2 * t + 2] = vals[1] * s_g8
                a[gg, 2 * t + 8:2 * t + 10] = vals[2] * s_g
                a[gg + 8, 2 * t + 8:2 * t + 10] = vals[3] * s_g8
                # b0,b1 (2t..2t+1, token g); b2,b3 (2t+8.., token g): the kernel's x registers for step s
                k = 64 * c + 16 * t + 4 * s
                b[2 * t:2 * t + 2, gg] = x[gg, k:k + 2]
                b[2 * t + 8:2 * t + 10, gg] = x[gg, k + 2:k + 4]
            out += a @ b
    return out


@pytest.mark.parametrize("gate_up", [False, True])
def test_emulated_mma_computes_the_dequantised_product(gate_up):
    e, n, k = 1, 32, 128
    g = torch.Generator().manual_seed(4)
    blocks = random_blocks(e, n, k, 5)
    scales = torch.randint(118, 130, (e, n, k // 32), dtype=torch.uint8, generator=g)
    x = torch.randn(8, k, generator=g, dtype=torch.float64)
    words = mma_layout.fragment_words(blocks, gate_up)[0]
    fscales = mma_layout.fragment_scales(scales, gate_up)[0]
    dense = mxfp4.dequantize(mxfp4.MXFP4Tensor(blocks[0], scales[0], (n, k)), dtype=torch.float32).double()  # [n, k]
    if gate_up:  # tile rows (T, h, g) hold gate row 8T + g (h = 0) and up row I + 8T + g (h = 1)
        dense = dense.reshape(2, n // 16, 8, k).transpose(0, 1).reshape(n, k)
    for tile in range(n // 16):
        got = emulate_mma_tile_product(words, fscales, x, tile, range(k // 64))
        want = dense[16 * tile:16 * tile + 16] @ x.T
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ShapeError, match="multiples of 16"):
        mma_layout.fragment_words(torch.zeros(1, 24, 32, dtype=torch.uint8))
    with pytest.raises(ShapeError, match="multiples of 64"):
        mma_layout.fragment_scales(torch.zeros(1, 16, 3, dtype=torch.uint8))
