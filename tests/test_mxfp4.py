"""The MXFP4 format (`tilec.mxfp4`) and the `mxfp4_moe_experts` op.

The format is checked bit for bit against a second implementation written here in plain Python (exact fractions and
integers, one value at a time, nothing shared with tilec's vectorised code), on every E2M1 code, every rounding tie,
saturation, both ends of the E8M0 range, zero blocks, subnormals and hypothesis-drawn tensors; and against PyTorch's
own definitions of ``float8_e8m0fnu`` and ``float4_e2m1fn_x2`` (and its reference MXFP4 quantiser) where present.
The op is checked to be exactly ``moe_experts`` on the dequantised weights, on both of moe_experts' code paths.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import tilec.ops as ops
import tilec.ops.moe as moe_module
from tilec import mxfp4
from tilec.errors import QuantizationError, ShapeError, TilecError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 codes 0..7, typed from the OCP table
GRID = [Fraction(m) for m in MAGNITUDES]


# ------------------------------------------------------------------------------- the independent implementation
def floor_log2(f: Fraction) -> int:
    e = f.numerator.bit_length() - f.denominator.bit_length()
    while Fraction(2) ** e > f:
        e -= 1
    while Fraction(2) ** (e + 1) <= f:
        e += 1
    return e


def ref_scale_code(block: list[float], rule: str) -> int:
    """E8M0 code of one block: floor = OCP's floor(log2(amax)) - 2; ceil = the smallest 2^e with amax / 2^e <= 6,
    searched upwards from the bottom of the range. Both clamped to [-127, 127]; an all-zero block gets 2^-127."""
    amax = max(abs(Fraction(v)) for v in block)
    if rule == "ceil":  # (below 2^(floor(log2 amax) - 3) every scale clips: start the search there)
        start = -127 if amax == 0 else max(-127, floor_log2(amax) - 3)
        e = next((e for e in range(start, 128) if amax <= 6 * Fraction(2) ** e), 127)
    else:
        e = -127 if amax == 0 else min(max(floor_log2(amax) - 2, -127), 127)
    return e + 127


def ref_code(value: float, scale_code: int) -> int:
    """E2M1 code of ``value`` under the scale: the nearest magnitude (ties to the even code, which saturates at 6
    by itself), and the sign bit of value (so -0.0 and small negatives give code 8)."""
    magnitude = abs(Fraction(value)) / Fraction(2) ** (scale_code - 127)
    code = min(range(8), key=lambda i: (abs(magnitude - GRID[i]), i % 2))
    return code | (8 if math.copysign(1.0, value) < 0 else 0)


def ref_quantize(x: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    packed, scales = [], []
    for row in x.double().reshape(-1, k).tolist():
        for b in range(0, k, 32):
            block = row[b:b + 32]
            s = ref_scale_code(block, rule)
            codes = [ref_code(v, s) for v in block]
            scales.append(s)
            packed += [codes[j] + 16 * codes[j + 1] for j in range(0, 32, 2)]
    lead = tuple(x.shape[:-1])
    return (torch.tensor(packed, dtype=torch.uint8).view(*lead, k // 2),
            torch.tensor(scales, dtype=torch.uint8).view(*lead, k // 32))


def ref_value(code: int, scale_code: int) -> float:
    if scale_code == 255:
        return math.nan
    return math.copysign(math.ldexp(MAGNITUDES[code & 7], scale_code - 127), -1.0 if code & 8 else 1.0)


def ref_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 values, one element at a time: byte j holds element 2j in its low nibble, 2j + 1 in the high one."""
    k = 2 * blocks.shape[-1]
    out = []
    for brow, srow in zip(blocks.reshape(-1, k // 2).tolist(), scales.reshape(-1, k // 32).tolist()):
        for j, byte in enumerate(brow):
            s = srow[(2 * j) // 32]
            out += [ref_value(byte % 16, s), ref_value(byte // 16, s)]
    return torch.tensor(out, dtype=torch.float64).view(*blocks.shape[:-1], k)


def assert_matches_reference(x: torch.Tensor, rule: str) -> mxfp4.MXFP4Tensor:
    q = mxfp4.quantize(x, rule)
    want_blocks, want_scales = ref_quantize(x, rule)
    assert torch.equal(q.scales, want_scales)
    assert torch.equal(q.blocks, want_blocks)
    want = ref_dequantize(want_blocks, want_scales)
    got64 = mxfp4.dequantize(q, torch.float64)
    assert torch.equal(got64, want) and torch.equal(torch.signbit(got64), torch.signbit(want))
    assert torch.equal(mxfp4.dequantize(q), want.float())  # exact in float32 (inf only past 2^128)
    assert torch.equal(mxfp4.dequantize(q, torch.bfloat16), want.to(torch.bfloat16))  # and in bf16
    return q


def block_of(values, fill: float = 0.0) -> torch.Tensor:
    """One 32-value row: ``values`` then ``fill``."""
    values = list(values)
    return torch.tensor([values + [fill] * (32 - len(values))], dtype=torch.float32)


def codes_of(q: mxfp4.MXFP4Tensor) -> list[int]:
    out = []
    for byte in q.blocks.reshape(-1).tolist():
        out += [byte & 0xF, byte >> 4]
    return out


# ------------------------------------------------------------------------------------------------ E2M1 codes
def test_every_code_decodes_to_the_ocp_table_element_zero_in_the_low_nibble():
    codes = list(range(16)) * 2
    blocks = torch.tensor([[codes[j] | (codes[j + 1] << 4) for j in range(0, 32, 2)]], dtype=torch.uint8)
    q = mxfp4.MXFP4Tensor(blocks, torch.tensor([[127]], dtype=torch.uint8), (1, 32))
    out = mxfp4.dequantize(q)[0]
    table = list(MAGNITUDES) + [-m for m in MAGNITUDES]
    assert out.tolist() == table * 2
    assert torch.signbit(out[8]) and not torch.signbit(out[0])  # code 8 is -0
    assert tuple(mxfp4.E2M1_VALUES) == tuple(table)
    pair = mxfp4.MXFP4Tensor(torch.tensor([[0x21] * 16], dtype=torch.uint8), torch.tensor([[127]], dtype=torch.uint8),
                             (1, 32))
    assert mxfp4.dequantize(pair)[0, :2].tolist() == [0.5, 1.0]  # 0x21: element 0 = code 1, element 1 = code 2


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_every_representable_value_encodes_to_its_code(rule):
    values = list(MAGNITUDES) + [-m for m in MAGNITUDES[1:]]  # amax 6: scale 2^0 under both rules
    q = assert_matches_reference(block_of(values), rule)
    assert q.scales.tolist() == [[127]]
    assert codes_of(q)[:15] == list(range(8)) + list(range(9, 16))
    assert torch.equal(mxfp4.dequantize(q)[0, :15], torch.tensor(values))


TIES = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)]


@pytest.mark.parametrize("tie,want", TIES)
def test_ties_round_to_the_even_code_and_neighbours_to_the_nearest(tie, want):
    below, above = (torch.nextafter(torch.tensor(tie), torch.tensor(to)).item() for to in (0.0, 8.0))  # float32
    lower = max(m for m in MAGNITUDES if m < tie)
    upper = min(m for m in MAGNITUDES if m > tie)
    values = [6.0, tie, -tie, below, above, -below, -above]  # amax 6: scale 1
    x = block_of(values)
    q = assert_matches_reference(x, "floor")
    got = mxfp4.dequantize(q)[0, :7].tolist()
    assert got == [6.0, want, -want, lower, upper, -lower, -upper]
    assert codes_of(q)[1] % 2 == 0  # the even code


def test_values_past_six_saturate_under_floor_and_not_under_ceil():
    x = block_of([7.9, 6.5, 7.0, -7.99, 6.0, 1.0])  # amax 7.9: floor scale 2^0, so 6..8 clip to 6
    q = assert_matches_reference(x, "floor")
    assert q.scales.tolist() == [[127]]
    assert mxfp4.dequantize(q)[0, :6].tolist() == [6.0, 6.0, 6.0, -6.0, 6.0, 1.0]
    c = assert_matches_reference(x, "ceil")
    assert c.scales.tolist() == [[128]]  # 2^1: 7.9 / 2 = 3.95 <= 6
    assert mxfp4.dequantize(c)[0, :6].tolist() == [8.0, 6.0, 8.0, -8.0, 6.0, 1.0]


def test_ceil_keeps_the_floor_scale_when_amax_is_exactly_six_times_it():
    for amax in (6.0, 6 * 2.0 ** -100, 6 * 2.0 ** 100, 3.0, 1.5):
        x = block_of([amax, -amax / 3, amax / 7])
        assert mxfp4.quantize(x, "ceil").scales.tolist() == mxfp4.quantize(x, "floor").scales.tolist()
        assert_matches_reference(x, "ceil")
    x = block_of([torch.nextafter(torch.tensor(6.0), torch.tensor(7.0)).item()])
    assert mxfp4.quantize(x, "ceil").scales.tolist() == [[128]]
    assert mxfp4.quantize(x, "floor").scales.tolist() == [[127]]


def test_negative_values_keep_their_sign_bit_even_when_they_round_to_zero():
    q = assert_matches_reference(block_of([4.0, -0.1, -0.0, 0.1, -0.25]), "floor")
    assert codes_of(q)[1:5] == [8, 8, 0, 8]
    out = mxfp4.dequantize(q)[0, 1:5]
    assert torch.signbit(out).tolist() == [True, True, False, True] and not out.abs().any()


# ---------------------------------------------------------------------------------------------- E8M0 scales
def test_every_scale_code_is_a_power_of_two_and_255_is_nan():
    ones = torch.full((256, 16), 0x22, dtype=torch.uint8)  # every element 1.0
    scales = torch.arange(256, dtype=torch.uint8)[:, None]
    out = mxfp4.dequantize(mxfp4.MXFP4Tensor(ones, scales, (256, 32)), torch.float64)
    for c in range(255):
        assert out[c].tolist() == [math.ldexp(1.0, c - 127)] * 32, c
    assert out[255].isnan().all()  # the E8M0 NaN poisons its whole block
    assert mxfp4.dequantize(mxfp4.MXFP4Tensor(ones[:1], scales[:1], (1, 32)))[0, 0].item() == 2.0 ** -127  # subnormal


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
def test_scale_clamps_at_the_bottom_of_the_range(rule):
    tiny = [2.0 ** -140, -(2.0 ** -149), 3 * 2.0 ** -128, 2.0 ** -127, 1.5 * 2.0 ** -126, 2.0 ** -125]
    x = torch.tensor([[v] * 32 for v in tiny], dtype=torch.float32)
    q = assert_matches_reference(x, rule)
    assert q.scales[:5].reshape(-1).tolist() == [0] * 5  # floor(log2 amax) - 2 would be below -127: clamped
    out = mxfp4.dequantize(q)
    assert out[0, 0] == 0 and out[1, 0] == 0 and torch.signbit(out[1, 0])  # under 2^-129: +-0
    assert out[2:, 0].tolist() == [3 * 2.0 ** -128, 2.0 ** -127, 1.5 * 2.0 ** -126, 2.0 ** -125]  # subnormals exact


def test_scale_clamps_at_the_top_for_float64_and_overflows_documentedly_in_float32():
    huge = torch.tensor([[2.0 ** 140, -(2.0 ** 135), 2.0 ** 129] + [1.0] * 29], dtype=torch.float64)
    q = assert_matches_reference(huge, "floor")
    assert q.scales.tolist() == [[254]]  # 2^127, the largest finite code
    assert mxfp4.dequantize(q, torch.float64)[0, :3].tolist() == [6 * 2.0 ** 127, -6 * 2.0 ** 127, 4 * 2.0 ** 127]
    assert mxfp4.dequantize(q)[0, :3].tolist() == [math.inf, -math.inf, math.inf]  # >= 2^128 in float32
    # float32's largest value: floor stays at 2^125 and decodes finitely; ceil takes 2^126, where 4 overflows.
    big = block_of([torch.finfo(torch.float32).max, 2.0 ** 127])
    floor, ceil = assert_matches_reference(big, "floor"), assert_matches_reference(big, "ceil")
    assert floor.scales.tolist() == [[252]]
    assert mxfp4.dequantize(floor)[0, :2].tolist() == [1.5 * 2.0 ** 127, 2.0 ** 127]
    assert ceil.scales.tolist() == [[253]]
    assert mxfp4.dequantize(ceil)[0, 0].item() == math.inf
    assert mxfp4.dequantize(ceil, torch.float64)[0, 0].item() == 2.0 ** 128


def test_zero_blocks_get_the_smallest_scale_and_keep_signed_zeros():
    x = torch.zeros(3, 64)
    x[1, :32] = -0.0
    x[2, 32:] = torch.linspace(-3, 5, 32)  # a zero block beside a non-zero one
    q = assert_matches_reference(x, "floor")
    assert q.scales.tolist() == [[0, 0], [0, 0], [0, 127]]  # amax 5: 2^(2 - 2)
    assert q.blocks[0].tolist() == [0] * 32 and q.blocks[1, :16].tolist() == [0x88] * 16
    out = mxfp4.dequantize(q)
    assert not out[:, :32].any() and torch.signbit(out[1, :32]).all() and not torch.signbit(out[0]).any()
    assert torch.equal(mxfp4.quantize(x, "ceil").scales[:, 0], torch.zeros(3, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_raise_naming_the_position(bad):
    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(1))
    x[2, 1, 40] = bad
    x[2, 1, 50] = bad  # the first one is named
    with pytest.raises(QuantizationError) as info:
        mxfp4.quantize(x, name="layer.w")
    message = str(info.value)
    assert isinstance(info.value, TilecError)
    assert "[2, 1, 40]" in message and str(bad) in message and "layer.w" in message and "(3, 2, 64)" in message


def test_k_not_a_multiple_of_32_raises_saying_what_works():
    with pytest.raises(ShapeError) as info:
        mxfp4.quantize(torch.randn(4, 40))
    assert "40" in str(info.value) and "64" in str(info.value) and "unquantised" in str(info.value)
    with pytest.raises(ShapeError):
        mxfp4.quantize(torch.tensor(1.5))
    with pytest.raises(QuantizationError, match="round"):
        mxfp4.quantize(torch.randn(2, 32), "round")
    with pytest.raises(QuantizationError, match="int64"):
        mxfp4.quantize(torch.ones(2, 32, dtype=torch.int64))
    with pytest.raises(QuantizationError, match="int8"):
        mxfp4.dequantize(mxfp4.quantize(torch.randn(2, 32)), torch.int8)


def test_mxfp4_tensor_checks_its_parts():
    blocks, scales = torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8)
    assert mxfp4.MXFP4Tensor(blocks, scales, (2, 32)).nbytes == 34 == mxfp4.nbytes((2, 32))
    with pytest.raises(ShapeError, match=r"\(2, 16\)"):
        mxfp4.MXFP4Tensor(blocks, scales, (2, 64))
    with pytest.raises(ShapeError, match="float32"):
        mxfp4.MXFP4Tensor(blocks.float(), scales, (2, 32))
    with pytest.raises(ShapeError, match="multiple of 32"):
        mxfp4.MXFP4Tensor(blocks, scales, (2, 33))


# ------------------------------------------------------------------------------------------ random tensors
def _blocky_values(seed: int, n: int) -> list[float]:
    """Values built to hit the format's edges: per block a power of two 2^k, then E2M1 values and midpoints (ties)
    times 2^k and their float32 neighbours, random values up to 8 * 2^k, signed zeros and subnormals. Blocks whose
    largest value is in [4, 8) * 2^k have scale 2^k, so their midpoints are exact ties."""
    rng = random.Random(seed)
    edges = [m / 4 for m in range(0, 33)]  # 0, 0.25, ..., 8: every magnitude and midpoint, and past 6
    out = []
    for _ in range(n // 32):
        k = rng.randint(-150, 124)
        for _ in range(32):
            kind = rng.random()
            if kind < 0.7:
                v = math.ldexp(rng.choice(edges), k)
                if kind < 0.2:  # a float32 neighbour
                    v = torch.nextafter(torch.tensor(v), torch.tensor(math.inf if rng.random() < 0.5 else 0.0)).item()
            elif kind < 0.9:
                v = rng.uniform(0, 8) * 2.0 ** k
            else:
                v = rng.choice([0.0, -0.0, 1e-45, 2.0 ** -140, 2.0 ** -126])
            out.append(-v if rng.random() < 0.5 else v)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rows=st.integers(1, 3), k=st.sampled_from([32, 64, 96]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       rule=st.sampled_from(mxfp4.SCALE_RULES))
def test_random_tensors_match_the_reference_bit_for_bit(data, rows, k, dtype, rule):
    if data.draw(st.booleans()):
        values = _blocky_values(data.draw(st.integers(0, 2**32 - 1)), rows * k)
    else:
        values = data.draw(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=rows * k,
                                    max_size=rows * k))
    x = torch.tensor(values, dtype=torch.float64).view(rows, k)
    finite = torch.isfinite(x.to(dtype))  # large floats overflow in bf16 / fp16: quantise only what is finite
    x = torch.where(finite, x, torch.zeros_like(x)).to(dtype)
    assert_matches_reference(x, rule)


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_weights_match_the_reference(rule, dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 5, 128, generator=gen) * torch.exp2(torch.randint(-30, 30, (2, 5, 1), generator=gen))
         ).to(dtype)
    q = assert_matches_reference(x, rule)
    assert q.blocks.shape == (2, 5, 64) and q.scales.shape == (2, 5, 4)
    err = mxfp4.relative_error(x, q)
    assert 0.05 < err < 0.15  # MXFP4 on Gaussian data: about 11%


def test_large_tensors_are_processed_in_chunks_identically(monkeypatch):
    x = torch.randn(40, 96, generator=torch.Generator().manual_seed(8))
    whole = mxfp4.quantize(x)
    monkeypatch.setattr(mxfp4, "_CHUNK_ELEMENTS", 200)  # two rows per chunk
    parts = mxfp4.quantize(x)
    assert torch.equal(whole.blocks, parts.blocks) and torch.equal(whole.scales, parts.scales)
    assert torch.equal(mxfp4.dequantize(parts), mxfp4.dequantize(whole))
    x[33, 70] = math.nan
    with pytest.raises(QuantizationError, match=r"\[33, 70\]"):  # the chunk's offset is part of the index
        mxfp4.quantize(x)


def test_meta_tensors_give_shapes_only():
    q = mxfp4.quantize(torch.empty(4, 6, 64, device="meta", dtype=torch.bfloat16))
    assert q.blocks.is_meta and q.blocks.shape == (4, 6, 32) and q.scales.shape == (4, 6, 2)
    assert q.nbytes == 4 * 6 * 34 and mxfp4.relative_error(torch.empty(4, 6, 64, device="meta"), q) is None
    assert mxfp4.dequantize(q, torch.bfloat16).shape == (4, 6, 64)


def test_checkpoint_layout_is_a_reshape():
    q = mxfp4.quantize(torch.randn(3, 10, 96, generator=torch.Generator().manual_seed(9)))
    stored = mxfp4.blocks_to_checkpoint(q.blocks)
    assert stored.shape == (3, 10, 3, 16) and stored.data_ptr() == q.blocks.data_ptr()
    assert torch.equal(stored[1, 2, 1], q.blocks[1, 2, 16:32])  # block j of a row is bytes 16j..16j+15
    assert torch.equal(mxfp4.blocks_from_checkpoint(stored), q.blocks)
    with pytest.raises(ShapeError, match=r"\(3, 10, 2, 24\)"):
        mxfp4.blocks_from_checkpoint(q.blocks.view(3, 10, 2, 24))
    with pytest.raises(ShapeError):
        mxfp4.blocks_to_checkpoint(torch.zeros(3, 10, dtype=torch.uint8))


# -------------------------------------------------------------------------------------- PyTorch's own formats
@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="this torch has no float8_e8m0fnu")
def test_scale_codes_are_torch_float8_e8m0fnu():
    codes = torch.arange(256, dtype=torch.uint8)
    torch_values = codes.view(torch.float8_e8m0fnu).to(torch.float64)
    ones = torch.full((256, 16), 0x22, dtype=torch.uint8)
    ours = mxfp4.dequantize(mxfp4.MXFP4Tensor(ones, codes[:, None], (256, 32)), torch.float64)[:, 0]
    assert torch.equal(ours[:255], torch_values[:255]) and ours[255].isnan() and torch_values[255].isnan()
    # torch's float -> e8m0 conversion of the scale a block gets, 2^e, gives back the code quantize chose.
    for e in range(-125, 126, 7):
        q = mxfp4.quantize(block_of([4 * 2.0 ** e, -(2.0 ** e)]))
        assert q.scales.item() == torch.tensor(2.0 ** e).to(torch.float8_e8m0fnu).view(torch.uint8).item()


def _torch_reference_quantizer() -> dict:
    """PyTorch's reference MXFP4 code (torch.testing._internal.common_quantized: the E2M1 packing behind its
    float4_e2m1fn_x2 tests and torchao's to_mxfp), taken from its source so that its test-only imports are not
    needed."""
    spec = importlib.util.find_spec("torch.testing._internal.common_quantized")
    if spec is None or spec.origin is None:
        pytest.skip("this torch has no torch.testing._internal.common_quantized")
    tree = ast.parse(open(spec.origin).read())
    wanted = {"_n_ones", "_f32_to_floatx_unpacked", "_floatx_unpacked_to_f32", "down_size", "pack_uint4",
              "_bfloat16_to_float4_e2m1fn_x2", "to_mxfp"}
    body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in wanted) or (
        isinstance(n, ast.Assign) and all(isinstance(t, (ast.Name, ast.Tuple)) for t in n.targets)
        and all(name.id.isupper() for t in n.targets for name in ast.walk(t) if isinstance(name, ast.Name)))]
    namespace = {"torch": torch, "Tensor": torch.Tensor}
    try:
        exec(compile(ast.Module(body=body, type_ignores=[]), spec.origin, "exec"), namespace)  # noqa: S102
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torch's reference MXFP4 code did not load: {exc}")
    if not wanted <= set(namespace):
        pytest.skip(f"torch's reference MXFP4 code lacks {sorted(wanted - set(namespace))}")
    return namespace


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="this torch has no float4_e2m1fn_x2")
def test_blocks_are_torch_float4_e2m1fn_x2():
    ref = _torch_reference_quantizer()
    assert ref["_floatx_unpacked_to_f32"](torch.arange(16, dtype=torch.uint8), 2, 1).tolist() == \
        list(MAGNITUDES) + [-m for m in MAGNITUDES]
    gen = torch.Generator().manual_seed(10)
    values = torch.tensor(MAGNITUDES + tuple(-m for m in MAGNITUDES))[torch.randint(0, 16, (4, 64), generator=gen)]
    values[:, ::32] = 6.0  # scale 2^0 in every block: the blocks are the elements themselves
    packed = ref["_bfloat16_to_float4_e2m1fn_x2"](values.to(torch.bfloat16))
    assert packed.dtype == torch.float4_e2m1fn_x2
    q = mxfp4.quantize(values)
    assert q.blocks.view(torch.float4_e2m1fn_x2).shape == packed.shape
    assert torch.equal(packed.view(torch.uint8), q.blocks)


@pytest.mark.skipif(not (hasattr(torch, "float4_e2m1fn_x2") and hasattr(torch, "float8_e8m0fnu")),
                    reason="this torch has no float4_e2m1fn_x2 / float8_e8m0fnu")
def test_ceil_rule_is_torch_reference_rceil_quantizer():
    """torch's reference to_mxfp(format='mxfp4') uses the round-up scale (RCEIL): bit-equal to our ceil rule."""
    ref = _torch_reference_quantizer()
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        x = (torch.randn(16, 256, generator=gen) * torch.exp2(torch.randint(-60, 60, (16, 1), generator=gen))
             ).to(torch.bfloat16)
        x[0, :32] = 0.0
        scales, blocks = ref["to_mxfp"](x.clone(), format="mxfp4")
        assert scales.dtype == torch.float8_e8m0fnu and blocks.dtype == torch.float4_e2m1fn_x2
        q = mxfp4.quantize(x, "ceil")
        assert torch.equal(scales.view(torch.uint8), q.scales)
        assert torch.equal(blocks.view(torch.uint8), q.blocks)


# -------------------------------------------------------------------------------------- the mxfp4_moe_experts op
def experts_case(seed, rows, top_k, experts=6, hidden=64, inter=32, dtype=torch.float32, duplicates=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=gen).to(dtype)
    if duplicates:
        indices = torch.randint(0, experts, (rows, top_k), generator=gen)
    else:
        indices = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(rows)])
    weights = torch.rand(rows, top_k, generator=gen) + 0.1
    gate_up = mxfp4.quantize(0.2 * torch.randn(experts, 2 * inter, hidden, generator=gen))
    down = mxfp4.quantize(0.2 * torch.randn(experts, hidden, inter, generator=gen))
    return x, weights, indices, gate_up, down


def op_args(case):
    x, weights, indices, gate_up, down = case
    return x, weights, indices, gate_up.blocks, gate_up.scales, down.blocks, down.scales


@pytest.mark.parametrize("limit", [0, 10**9], ids=["per-expert-loop", "gather"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 12), top_k=st.integers(1, 4), duplicates=st.booleans(),
       bf16=st.booleans())
def test_op_is_moe_experts_on_the_dequantised_weights_exactly(limit, seed, rows, top_k, duplicates, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    case = experts_case(seed, rows, top_k, dtype=dtype, duplicates=duplicates)
    x, weights, indices, gate_up, down = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe_module, "GATHER_LIMIT", limit)
        out = ops.mxfp4_moe_experts(*op_args(case))
        want = ops.moe_experts(x, weights, indices, mxfp4.dequantize(gate_up, dtype), mxfp4.dequantize(down, dtype))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out, want)


@pytest.mark.parametrize("rows,top_k", [(16, 4), (13, 5), (1, 6)])  # 64 pairs gather, 65 loop, 6 gather
def test_op_default_paths_are_exact_with_leading_dims(rows, top_k):
    x, weights, indices, gate_up, down = experts_case(12, rows, top_k)
    if rows % 2 == 0:
        x, weights, indices = x.view(2, rows // 2, -1), weights.view(2, rows // 2, -1), indices.view(2, rows // 2, -1)
    out = ops.mxfp4_moe_experts(*op_args((x, weights, indices.to(torch.int32), gate_up, down)))
    assert torch.equal(out, ops.moe_experts(x, weights, indices, mxfp4.dequantize(gate_up), mxfp4.dequantize(down)))


def test_op_is_registered_and_fake_matches_reference():
    assert torch.ops.tilec.mxfp4_moe_experts.default is ops.mxfp4_moe_experts is ops.OPS["mxfp4_moe_experts"].overload
    for dtype in (torch.float32, torch.bfloat16):
        args = op_args(experts_case(13, 5, 2, dtype=dtype))
        real = ops.mxfp4_moe_experts(*args)
        fake = ops.mxfp4_moe_experts(*(a.to("meta") for a in args))
        assert fake.device.type == "meta" and (fake.shape, fake.dtype) == (real.shape, real.dtype)


def _u8(*shape):
    return torch.zeros(shape, dtype=torch.uint8)


def _good(**changes):
    """Well-formed op arguments (3 rows, top-2 of 4 experts, H = 64, I = 32) with changes."""
    args = dict(x=torch.randn(3, 64), weights=torch.rand(3, 2), indices=torch.randint(0, 4, (3, 2)),
                gate_up_blocks=_u8(4, 64, 32), gate_up_scales=_u8(4, 64, 2), down_blocks=_u8(4, 64, 16),
                down_scales=_u8(4, 64, 1))
    args.update(changes)
    return tuple(args.values())


OP_SHAPE_ERRORS = [
    (_good(gate_up_blocks=torch.zeros(4, 64, 32)), ["gate_up_blocks", "uint8", "float32"]),
    (_good(down_scales=_u8(4, 64)), ["down_scales", "(4, 64)"]),
    (_good(gate_up_scales=_u8(4, 64, 3)), ["gate_up_scales (4, 64, 3)", "(4, 64, 2)"]),
    (_good(down_blocks=_u8(4, 64, 8)), ["down_blocks (4, 64, 8)", "(4, 64, 16)"]),
    (_good(down_blocks=_u8(5, 64, 16)), ["down_blocks (5, 64, 16)", "(4, 64, 16)"]),
    (_good(gate_up_blocks=_u8(4, 64, 24), gate_up_scales=_u8(4, 64, 1)), ["(4, 64, 24)", "multiple of 32"]),
    (_good(gate_up_blocks=_u8(4, 48, 32), gate_up_scales=_u8(4, 48, 2)), ["I = 24", "multiple of 32"]),
    (_good(x=torch.randn(3, 48)), ["(3, 48)", "64"]),
    (_good(weights=torch.rand(3, 3)), ["(3, 3)", "(3, 2)"]),
    (_good(indices=torch.rand(3, 2)), ["float32"]),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("args,fragments", OP_SHAPE_ERRORS, ids=[str(i) for i in range(len(OP_SHAPE_ERRORS))])
def test_op_shape_errors_name_the_op_and_the_shapes(args, fragments, device):
    args = tuple(a.to(device) for a in args)
    with pytest.raises(ShapeError) as info:
        ops.mxfp4_moe_experts(*args)
    message = str(info.value)
    assert "tilec.mxfp4_moe_experts" in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
