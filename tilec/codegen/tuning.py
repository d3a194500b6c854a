"""Block sizes and warp counts for the generated kernels: the decisions, in Python, that templates only spell.

Decode is memory-bound: what matters is keeping every SM streaming weights. A GEMV over N output rows gets enough
programs for a few per SM (small BLOCK_N) and long contiguous reads along K (large BLOCK_K). Under the CPU
interpreter the opposite holds: every program costs Python time, so blocks are as large as the shapes allow.
"""

from __future__ import annotations

import dataclasses

import torch

from tilec.options import pdl_requested, triton_interpret_requested


# Shared memory a block may opt in to, by compute capability, where torch does not say (CUDA programming guide)
SMEM_OPTIN = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448, (10, 0): 232448, (10, 3): 232448}


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    interpret: bool
    sms: int
    capability: tuple[int, int] = (9, 0)  # compute capability; rendering without a GPU assumes the H100
    smem_optin: int = SMEM_OPTIN[(9, 0)]  # shared memory a block may ask for, in bytes (the H100's 227 KB)
    # a step's kernels launched with programmatic dependent launch (Hopper and later; off with TILEC_PDL=0)
    pdl: bool = False

    @property
    def dot_dtype(self) -> str:
        # The interpreter computes tl.dot on bf16 wrongly; fp32 operands are exact there.
        return "tl.float32" if self.interpret else "w.dtype"


def device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda" and not triton_interpret_requested():
        props = torch.cuda.get_device_properties(device)
        cap = (props.major, props.minor)
        smem = getattr(props, "shared_memory_per_block_optin", None) or SMEM_OPTIN.get(cap, 101376)
        return with_pdl(DeviceInfo(False, props.multi_processor_count, cap, smem))
    return DeviceInfo(True, 1)


def with_pdl(dev: DeviceInfo) -> DeviceInfo:
    """``dev`` with ``pdl`` as the triton target decides it: on a GPU (not the interpreter) of compute capability 9.0
    or newer, unless TILEC_PDL=0."""
    return dataclasses.replace(dev, pdl=not dev.interpret and dev.capability >= (9, 0) and pdl_requested())


def pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def gemv_blocks(n: int, k: int, dev: DeviceInfo) -> dict:
    """One input row: BLOCK_N output rows per program, BLOCK_K along the reduction."""
    if dev.interpret:
        return {"BLOCK_N": clamp(pow2_ceil(n), 2, 64), "BLOCK_K": clamp(pow2_ceil(k), 16, 256), "num_warps": 4}
    return {"BLOCK_N": clamp(pow2_floor(n // (2 * dev.sms)), 2, 64), "BLOCK_K": clamp(pow2_ceil(k), 16, 512),
            "num_warps": 4}


def gemm_blocks(n: int, k: int, dev: DeviceInfo) -> dict:
    """Several input rows on the tensor cores (tl.dot needs 16 or more in every dimension)."""
    if dev.interpret:
        return {"BLOCK_N": clamp(pow2_ceil(n), 16, 64), "BLOCK_K": clamp(pow2_ceil(k), 16, 128), "num_warps": 4}
    return {"BLOCK_N": clamp(pow2_floor(n // (2 * dev.sms)), 16, 64), "BLOCK_K": clamp(pow2_ceil(k), 16, 128),
            "num_warps": 4}


# Rows a tensor-core program takes (pick_blocks in templates/triton/_common.j2): one tile for every step of up to
# ROW_TILE rows (decode and DFlash's verify steps: the same configuration for each, so a row's bits do not depend on
# the step); past it (a prefill) the tiles of `prefill_gemm`.
ROW_TILE = 16


def pipeline_stages(tile: dict, weight_tiles: int, itemsize: int, dev: DeviceInfo, most: int = 5,
                    rows: int = ROW_TILE) -> int:
    """Triton's num_stages for a tensor-core loop over K whose step loads x's tile of ``rows`` rows and
    ``weight_tiles`` weight tiles of tile's BLOCK_N x BLOCK_K, of ``itemsize`` bytes: the most up to ``most`` that
    fit the block's shared memory, 8 KB kept for the rest; at least 2; 1 in the interpreter."""
    if dev.interpret:
        return 1
    stage = (rows + weight_tiles * tile["BLOCK_N"]) * tile["BLOCK_K"] * itemsize
    return max(2, min(most, (dev.smem_optin - 8192) // stage))


# A prefill's projections are compute-bound: large tiles of rows and columns, so each weight tile serves many rows
# and each row's x tile many columns. PREFILL_TILE is for one weight tile a step (linear); kernels with two weight
# tiles a step (Q/K/V pairs, gate and up) take half as many columns. H100, 2026-11-24 (bench_dense_tiles.py --rows
# 4096 --sweep, mini; results/h100-2026-11-24e/run4_dense_prefill_sweep), TFLOP/s with these tiles: the attention
# output projection 558, the dense SwiGLU 537, the lm_head 341 (463 with 256 rows a tile, the only shape that gained
# from them), qkv_rope 151 (no tile swept did better; why, not yet measured). Over a 4096-token prefill
# (bench_prefill.py --profile, run8 against run2 there): linear 3.2 ms against 7.1 with the decode tiles' columns in
# blocks of 64 rows, qkv_rope 6.2 against 7.0.
PREFILL_TILE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8}


def prefill_gemm(n: int, k: int, weight_tiles: int, itemsize: int, dev: DeviceInfo) -> dict:
    """Past ROW_TILE rows: a tensor-core tile of BLOCK_M rows and BLOCK_N output columns (per weight tile) over n
    columns and k, with its stages; under the interpreter, the gemm blocks with 64 rows."""
    if dev.interpret:
        return {**gemm_blocks(n, k, dev), "BLOCK_M": 64, "num_stages": 1}
    tile = {**PREFILL_TILE, "BLOCK_N": clamp(pow2_floor(n), 16, PREFILL_TILE["BLOCK_N"] // weight_tiles),
            "BLOCK_K": clamp(pow2_ceil(k), 16, PREFILL_TILE["BLOCK_K"])}
    return {**tile, "num_stages": pipeline_stages(tile, weight_tiles, itemsize, dev, 3, tile["BLOCK_M"])}


def matmul_context(n: int, k: int, dev: DeviceInfo, itemsize: int = 2) -> dict:
    """An x @ W.T kernel's blocks for a weight [n, k] of ``itemsize`` bytes: one row's vector blocks, the tensor-core
    tiles and as many pipeline stages as fit (one weight tile a step), the row tile, and a prefill's tiles."""
    gemm = gemm_blocks(n, k, dev)
    return {"gemv": gemv_blocks(n, k, dev), "gemm": gemm, "dot_dtype": dev.dot_dtype,
            "num_stages": pipeline_stages(gemm, 1, itemsize, dev), "row_tile": ROW_TILE,
            "prefill_gemm": prefill_gemm(n, k, 1, itemsize, dev)}
