"""Tests of every tilec op (``torch.ops.tilec.*``): numerics, shape checks and fake (meta) implementations.

Each op's reference implementation is compared with an independent implementation written here from the op's
documented semantics (plain loops or straightforward torch, in float64), and, where HF transformers' MiMo-V2-Flash
has the same computation, with HF's own modules and functions. Inputs are random (seeded), never zeros or ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import tilec.ops as ops
import tilec.ops.moe as moe_module
from tilec.errors import ShapeError, TilecError

hf = pytest.importorskip("transformers.models.mimo_v2_flash.modeling_mimo_v2_flash")
from transformers.models.mimo_v2_flash.configuration_mimo_v2_flash import MiMoV2FlashConfig  # noqa: E402

FP32_TOL = 1e-5
BF16_TOL = 1e-2
SEEDS = st.integers(0, 2**31 - 1)
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALL_OPS = ("embedding", "rms_norm", "add_rms_norm", "add", "linear", "rope", "qkv_rope", "silu_mul", "swiglu",
           "attention", "moe_router", "moe_experts", "argmax", "sample")


# ------------------------------------------------------------------------------------------------------ helpers
def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def round_to(t: torch.Tensor, dtype) -> torch.Tensor:
    """A float64 tensor rounded to ``dtype`` (where the op under test holds an intermediate result in that dtype)."""
    return t.to(dtype).double()


def randn(gen: torch.Generator, *shape, dtype=torch.float32, std: float = 1.0) -> torch.Tensor:
    return (std * torch.randn(*shape, generator=gen)).to(dtype)


def hf_config(**overrides) -> MiMoV2FlashConfig:
    base = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=6)
    base.update(overrides)
    cfg = MiMoV2FlashConfig(**base)
    cfg._experts_implementation = "eager"
    return cfg


def test_every_listed_op_is_registered():
    assert set(ALL_OPS) <= set(ops.OPS)
    for name in ALL_OPS:
        assert getattr(torch.ops.tilec, name).default is ops.OPS[name].overload


# ---------------------------------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_gathers_rows(ids_dtype, dtype):
    gen = torch.Generator().manual_seed(1)
    weight = randn(gen, 50, 12, dtype=dtype)
    ids = torch.randint(0, 50, (3, 5), generator=gen).to(ids_dtype)
    out = ops.embedding(ids, weight)
    assert out.shape == (3, 5, 12) and out.dtype == dtype
    for i in range(3):
        for j in range(5):
            assert torch.equal(out[i, j], weight[int(ids[i, j])])
    assert torch.equal(out, torch.nn.Embedding.from_pretrained(weight)(ids.long()))


# ---------------------------------------------------------------------------------------------------- rms norms
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Row by row in float64: weight * x / sqrt(mean(x^2) + eps)."""
    rows = x.double().reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for i, row in enumerate(rows):
        out[i] = weight.double() * row / math.sqrt(sum(float(v) ** 2 for v in row) / len(row) + eps)
    return out.view(x.shape)


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = hf.MiMoV2FlashRMSNorm(weight.shape[0], eps=eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


@FUZZ
@given(seed=SEEDS, rows=st.integers(1, 6), hidden=st.integers(1, 40), eps=st.sampled_from([1e-6, 1e-5, 1e-2]),
       bf16=st.booleans())
def test_rms_norm_matches_reference_and_hf(seed, rows, hidden, eps, bf16):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = randn(gen, 2, rows, hidden, dtype=dtype, std=3.0)
    weight = (1.0 + 0.5 * randn(gen, hidden)).to(dtype)
    out = ops.rms_norm(x, weight, eps)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, rms_norm_reference(x, weight, eps)) < (BF16_TOL if bf16 else FP32_TOL)
    assert torch.equal(out, hf_rms_norm(x, weight, eps))  # same arithmetic as HF: bit-exact


@FUZZ
@given(seed=SEEDS, hidden=st.integers(1, 40), bf16=st.booleans())
def test_add_rms_norm_matches_reference_and_hf(seed, hidden, bf16):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, residual = randn(gen, 2, 3, hidden, dtype=dtype), randn(gen, 2, 3, hidden, dtype=dtype, std=4.0)
    weight = (1.0 + 0.5 * randn(gen, hidden)).to(dtype)
    normed, summed = ops.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(summed, x + residual)
    want_sum = x.double() + residual.double()
    assert rel_err(summed, want_sum) < (BF16_TOL if bf16 else 1e-7)
    assert rel_err(normed, rms_norm_reference(want_sum, weight, 1e-5)) < (BF16_TOL if bf16 else FP32_TOL)
    assert torch.equal(normed, hf_rms_norm(residual + x, weight, 1e-5))


def test_rms_norm_mixed_dtypes_follow_hf():
    gen = torch.Generator().manual_seed(2)
    x, weight = randn(gen, 3, 16, dtype=torch.bfloat16), 1.0 + randn(gen, 16)
    out = ops.rms_norm(x, weight, 1e-5)
    assert out.dtype == torch.float32
    assert torch.equal(out, hf_rms_norm(x, weight, 1e-5))


# ---------------------------------------------------------------------------------------------------------- add
@pytest.mark.parametrize("shapes", [((2, 3, 8), (2, 3, 8)), ((2, 3, 8), (8,)), ((1, 8), (4, 1))])
def test_add_broadcasts(shapes):
    gen = torch.Generator().manual_seed(3)
    a, b = randn(gen, *shapes[0]), randn(gen, *shapes[1], dtype=torch.bfloat16)
    out = ops.add(a, b)
    want = torch.broadcast_to(a.double(), out.shape) + torch.broadcast_to(b.double(), out.shape)
    assert out.shape == torch.broadcast_shapes(a.shape, b.shape) and out.dtype == torch.float32
    assert rel_err(out, want) < 1e-7


# ------------------------------------------------------------------------------------------------------- linear
def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """out[..., o] = sum_i x[..., i] * weight[o, i] + bias[o], one output feature at a time, in float64."""
    x64, w64 = x.double(), weight.double()
    cols = [(x64 * w64[o]).sum(-1) + (float(bias[o]) if bias is not None else 0.0) for o in range(weight.shape[0])]
    return torch.stack(cols, dim=-1)


@FUZZ
@given(seed=SEEDS, lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), fin=st.integers(1, 24),
       fout=st.integers(1, 24), with_bias=st.booleans(), bf16=st.booleans())
def test_linear_matches_reference(seed, lead, fin, fout, with_bias, bf16):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, weight = randn(gen, *lead, fin, dtype=dtype), randn(gen, fout, fin, dtype=dtype)
    bias = randn(gen, fout, dtype=dtype) if with_bias else None
    out = ops.linear(x, weight, bias)
    assert out.shape == (*lead, fout) and out.dtype == dtype
    assert rel_err(out, linear_reference(x, weight, bias)) < (BF16_TOL if bf16 else FP32_TOL)


# --------------------------------------------------------------------------------------------------------- rope
def rope_reference(x: torch.Tensor, start_pos, head_dim: int, rotary_dim: int, theta: float) -> torch.Tensor:
    """Rotate-half RoPE pair by pair in float64: dims (i, i + r/2) of each head turn by pos * theta^(-2i/r)."""
    b_, t_, width = x.shape
    out = x.double().clone().view(b_, t_, width // head_dim, head_dim)
    half = rotary_dim // 2
    for b in range(b_):
        for t in range(t_):
            pos = int(start_pos[b]) + t
            for i in range(half):
                angle = pos / theta ** (2 * i / rotary_dim)
                c, s = math.cos(angle), math.sin(angle)
                x1, x2 = out[b, t, :, i].clone(), out[b, t, :, i + half].clone()
                out[b, t, :, i], out[b, t, :, i + half] = x1 * c - x2 * s, x2 * c + x1 * s
    return out.view(b_, t_, width)


def hf_cos_sin(positions: torch.Tensor, head_dim: int, rotary_dim: int, theta: float, dtype):
    rope = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": (rotary_dim + 0.5) / head_dim}
    cfg = hf_config(head_dim=head_dim, rope_parameters={"full_attention": rope, "sliding_attention": rope})
    emb = hf.MiMoV2FlashRotaryEmbedding(cfg)
    cos, sin = emb(torch.empty(0, dtype=dtype), positions, "full_attention")
    assert cos.shape[-1] == rotary_dim
    return cos, sin


ROPE_DIMS = st.sampled_from([(4, 2), (8, 4), (8, 8), (12, 4), (16, 6), (6, 0)])  # (head_dim, rotary_dim)


@FUZZ
@given(seed=SEEDS, batch=st.integers(1, 3), rows=st.integers(1, 8), heads=st.integers(1, 3), dims=ROPE_DIMS,
       theta=st.sampled_from([1e4, 5e6, 50.0]), bf16=st.booleans(), data=st.data())
def test_rope_matches_reference(seed, batch, rows, heads, dims, theta, bf16, data):
    head_dim, rotary_dim = dims
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    start_pos = torch.tensor(data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch)))
    x = randn(gen, batch, rows, heads * head_dim, dtype=dtype)
    out = ops.rope(x, start_pos, head_dim, rotary_dim, theta)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out, rope_reference(x, start_pos, head_dim, rotary_dim, theta)) < (BF16_TOL if bf16 else FP32_TOL)
    # The dims past rotary_dim pass through unchanged.
    per_head = out.view(batch, rows, heads, head_dim)[..., rotary_dim:]
    assert torch.equal(per_head, x.view(batch, rows, heads, head_dim)[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim,theta", [(192, 64, 5e6), (192, 64, 1e4), (12, 4, 1e4), (16, 16, 1e4)])
def test_rope_matches_hf(head_dim, rotary_dim, theta, dtype):
    gen = torch.Generator().manual_seed(4)
    batch, rows, heads = 2, 5, 3
    start_pos = torch.tensor([7, 4000])
    positions = start_pos[:, None] + torch.arange(rows)
    q = randn(gen, batch, rows, heads * head_dim, dtype=dtype)
    k = randn(gen, batch, rows, 2 * head_dim, dtype=dtype)
    cos, sin = hf_cos_sin(positions, head_dim, rotary_dim, theta, dtype)
    to_hf = lambda t: t.view(batch, rows, -1, head_dim).transpose(1, 2)  # noqa: E731
    want_q, want_k = hf.apply_rotary_pos_emb(to_hf(q), to_hf(k), cos, sin)
    got_q = ops.rope(q, start_pos, head_dim, rotary_dim, theta)
    got_k = ops.rope(k, start_pos, head_dim, rotary_dim, theta)
    assert torch.equal(to_hf(got_q), want_q)
    assert torch.equal(to_hf(got_k), want_k)


# ----------------------------------------------------------------------------------------------------- qkv_rope
@FUZZ
@given(seed=SEEDS, batch=st.integers(1, 2), rows=st.integers(1, 6), hkv=st.integers(1, 2), group=st.integers(1, 3),
       dims=ROPE_DIMS, v_head_dim=st.sampled_from([2, 6]), with_bias=st.booleans(), data=st.data())
def test_qkv_rope_matches_reference(seed, batch, rows, hkv, group, dims, v_head_dim, with_bias, data):
    head_dim, rotary_dim = dims
    gen = torch.Generator().manual_seed(seed)
    hidden, theta = 10, 1e4
    start_pos = torch.tensor(data.draw(st.lists(st.integers(0, 30), min_size=batch, max_size=batch)))
    x = randn(gen, batch, rows, hidden)
    wq, wk, wv = (randn(gen, n, hidden) for n in (hkv * group * head_dim, hkv * head_dim, hkv * v_head_dim))
    bq, bk, bv = ((randn(gen, w.shape[0]) if with_bias else None) for w in (wq, wk, wv))
    q, k, v = ops.qkv_rope(x, wq, wk, wv, bq, bk, bv, start_pos, head_dim, rotary_dim, theta)
    want_q = rope_reference(linear_reference(x, wq, bq), start_pos, head_dim, rotary_dim, theta)
    want_k = rope_reference(linear_reference(x, wk, bk), start_pos, head_dim, rotary_dim, theta)
    assert rel_err(q, want_q) < FP32_TOL
    assert rel_err(k, want_k) < FP32_TOL
    assert rel_err(v, linear_reference(x, wv, bv)) < FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention_bias", [False, True])
def test_qkv_rope_matches_hf_attention_projections(attention_bias, dtype):
    cfg = hf_config(attention_bias=attention_bias, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=12, v_head_dim=8)
    torch.manual_seed(5)
    attn = hf.MiMoV2FlashAttention(cfg, layer_idx=0).to(dtype)  # full attention layer: 2 kv heads
    gen = torch.Generator().manual_seed(5)
    batch, rows, rotary_dim, theta = 2, 4, int(12 * 0.334), cfg.rope_parameters["full_attention"]["rope_theta"]
    start_pos = torch.tensor([3, 11])
    x = randn(gen, batch, rows, 24, dtype=dtype)
    emb = hf.MiMoV2FlashRotaryEmbedding(cfg)
    cos, sin = emb(x, start_pos[:, None] + torch.arange(rows), "full_attention")
    with torch.no_grad():
        hq = attn.q_proj(x).view(batch, rows, -1, 12).transpose(1, 2)
        hk = attn.k_proj(x).view(batch, rows, -1, 12).transpose(1, 2)
        hv = attn.v_proj(x)
        want_q, want_k = hf.apply_rotary_pos_emb(hq, hk, cos, sin)
    bias = lambda lin: lin.bias if attention_bias else None  # noqa: E731
    q, k, v = ops.qkv_rope(x, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, bias(attn.q_proj),
                           bias(attn.k_proj), bias(attn.v_proj), start_pos, 12, rotary_dim, theta)
    assert torch.equal(q.view(batch, rows, -1, 12).transpose(1, 2), want_q)
    assert torch.equal(k.view(batch, rows, -1, 12).transpose(1, 2), want_k)
    assert torch.equal(v, hv)


# ------------------------------------------------------------------------------------------- silu_mul and swiglu
def silu_reference(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / (1.0 + torch.exp(-x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_reference(dtype):
    gen = torch.Generator().manual_seed(6)
    gate, up = randn(gen, 3, 4, 20, dtype=dtype, std=4.0), randn(gen, 3, 4, 20, dtype=dtype)
    out = ops.silu_mul(gate, up)
    assert out.shape == gate.shape and out.dtype == dtype
    assert rel_err(out, silu_reference(gate) * up.double()) < (BF16_TOL if dtype == torch.bfloat16 else FP32_TOL)


@FUZZ
@given(seed=SEEDS, rows=st.integers(1, 5), hidden=st.integers(1, 16), inter=st.integers(1, 24), bf16=st.booleans())
def test_swiglu_matches_reference_and_hf(seed, rows, hidden, inter, bf16):
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = randn(gen, 2, rows, hidden, dtype=dtype)
    w_gate, w_up, w_down = randn(gen, inter, hidden, dtype=dtype), randn(gen, inter, hidden, dtype=dtype), \
        randn(gen, hidden, inter, dtype=dtype)
    out = ops.swiglu(x, w_gate, w_up, w_down)
    assert out.shape == x.shape and out.dtype == dtype
    # The op's intermediates are tensors of the input dtype: round the reference's there too (in bf16 the last
    # projection may cancel, so unrounded intermediates would differ by more than the output's rounding).
    gate, up = round_to(linear_reference(x, w_gate, None), dtype), round_to(linear_reference(x, w_up, None), dtype)
    act = round_to(round_to(silu_reference(gate), dtype) * up, dtype)
    assert rel_err(out, linear_reference(act, w_down, None)) < (BF16_TOL if bf16 else FP32_TOL)
    mlp = hf.MiMoV2FlashMLP(hf_config(hidden_size=hidden), intermediate_size=inter).to(dtype)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(w_gate), mlp.up_proj.weight.copy_(w_up), mlp.down_proj.weight.copy_(w_down)
        assert torch.equal(out, mlp(x))


# --------------------------------------------------------------------------------------------------- moe_router
def router_reference(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scaling):
    """Row by row in float64: sigmoid scores, bias for the choice only, group filter, top-k, renormalise, scale."""
    experts, size = weight.shape[0], weight.shape[0] // n_group
    all_w, all_i, min_gap = [], [], math.inf
    for row in x.double().reshape(-1, x.shape[-1]):
        scores = [1.0 / (1.0 + math.exp(-float(row @ w_e))) for w_e in weight.double()]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        allowed = list(range(experts))
        if n_group > 1:
            group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
            groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
            allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
            ranked = sorted(group_score)
            min_gap = min([min_gap] + [b - a for a, b in zip(ranked, ranked[1:])])
        chosen = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        ranked = sorted(choice)
        min_gap = min([min_gap] + [b - a for a, b in zip(ranked, ranked[1:])])
        w = [scores[e] for e in chosen]
        if norm_topk_prob:
            w = [s / sum(w) for s in w]
        all_w.append([s * scaling for s in w])
        all_i.append(chosen)
    shape = (*x.shape[:-1], top_k)
    return torch.tensor(all_w, dtype=torch.float64).view(shape), torch.tensor(all_i).view(shape), min_gap


ROUTER_GROUPS = st.sampled_from([(8, 1, 1), (8, 2, 1), (8, 4, 2), (12, 3, 2), (16, 4, 3), (6, 1, 1)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=SEEDS, groups=ROUTER_GROUPS, data=st.data(), norm=st.booleans(), with_bias=st.booleans(),
       scaling=st.sampled_from([1.0, 2.5]), bf16=st.booleans())
def test_moe_router_matches_reference_and_hf(seed, groups, data, norm, with_bias, scaling, bf16):
    experts, n_group, topk_group = groups
    top_k = data.draw(st.integers(1, topk_group * (experts // n_group)), label="top_k")
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    hidden = 12
    x, weight = randn(gen, 2, 3, hidden, dtype=dtype), randn(gen, experts, hidden, dtype=dtype, std=0.5)
    bias = randn(gen, experts, std=0.3) if with_bias else None
    want_w, want_i, gap = router_reference(x, weight, bias, top_k, n_group, topk_group, norm, scaling)
    assume(gap > 1e-4)  # a near tie may be broken either way by fp32 rounding
    got_w, got_i = ops.moe_router(x, weight, bias, top_k, n_group, topk_group, norm, scaling)
    assert got_w.dtype == torch.float32 and got_i.dtype == torch.int64 and got_i.shape == (2, 3, top_k)
    assert torch.equal(got_i, want_i)  # same experts, best choice first
    assert rel_err(got_w, want_w) < FP32_TOL

    cfg = hf_config(hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group,
                    topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scaling)
    router = hf.MiMoV2FlashTopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(weight.float())
        router.e_score_correction_bias.copy_(bias if bias is not None else torch.zeros(experts))
        _, hf_w, hf_i = router(x)
    hf_i, order = hf_i.sort(dim=-1)  # HF's top-k is unsorted: compare by expert id
    mine_i, mine_order = got_i.view(-1, top_k).sort(dim=-1)
    assert torch.equal(mine_i, hf_i)
    assert rel_err(got_w.view(-1, top_k).gather(-1, mine_order), hf_w.gather(-1, order)) < 1e-6


# -------------------------------------------------------------------------------------------------- moe_experts
def experts_reference(x, weights, indices, gate_up, down):
    """sum_j weights[j] * down[e_j] @ (silu(gate) * up), gate/up = halves of gate_up[e_j] @ x, row by row.

    Each expert's intermediates and output are rounded to the input dtype, where the op (and HF) hold them.
    """
    inter, dtype = gate_up.shape[1] // 2, x.dtype
    k = indices.shape[-1]
    rows, w, ids = x.double().reshape(-1, x.shape[-1]), weights.double().reshape(-1, k), indices.reshape(-1, k)
    out = torch.zeros_like(rows)
    for r in range(rows.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[r, j])
            h = round_to(gate_up[e].double() @ rows[r], dtype)
            act = round_to(round_to(silu_reference(h[:inter]), dtype) * h[inter:], dtype)
            out[r] += float(w[r, j]) * round_to(down[e].double() @ act, dtype)
    return out.view(x.shape)


def hf_experts(x, weights, indices, gate_up, down):
    experts, two_i, hidden = gate_up.shape
    module = hf.MiMoV2FlashExperts(hf_config(hidden_size=hidden, n_routed_experts=experts,
                                             moe_intermediate_size=two_i // 2)).to(x.dtype)
    with torch.no_grad():
        module.gate_up_proj.copy_(gate_up), module.down_proj.copy_(down)
        k = indices.shape[-1]
        return module(x.reshape(-1, hidden), indices.reshape(-1, k), weights.reshape(-1, k)).view(x.shape)


def experts_inputs(seed, rows, top_k, experts=6, hidden=10, inter=7, dtype=torch.float32, duplicates=False):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, rows, hidden, dtype=dtype)
    if duplicates:
        indices = torch.randint(0, experts, (rows, top_k), generator=gen)
    else:
        indices = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(rows)])
    weights = torch.rand(rows, top_k, generator=gen) + 0.1
    gate_up, down = randn(gen, experts, 2 * inter, hidden, dtype=dtype), randn(gen, experts, hidden, inter, dtype=dtype)
    return x, weights, indices, gate_up, down


@pytest.mark.parametrize("limit", [0, 10**9], ids=["per-expert-loop", "gather"])
@FUZZ
@given(seed=SEEDS, rows=st.integers(1, 12), top_k=st.integers(1, 4), duplicates=st.booleans(), bf16=st.booleans())
def test_moe_experts_both_paths_match_reference_and_hf(limit, seed, rows, top_k, duplicates, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float32
    args = experts_inputs(seed, rows, top_k, dtype=dtype, duplicates=duplicates)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe_module, "GATHER_LIMIT", limit)
        out = ops.moe_experts(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert rel_err(out, experts_reference(*args)) < (BF16_TOL if bf16 else FP32_TOL)
    assert rel_err(out, hf_experts(*args)) < (BF16_TOL if bf16 else 1e-6)


@pytest.mark.parametrize("rows,top_k", [(16, 4), (13, 5), (1, 8), (40, 8)])  # 64 and 8 gather, 65 and 320 loop
def test_moe_experts_default_paths_around_gather_limit(rows, top_k):
    """Both sides of the default GATHER_LIMIT (rows * k <= 64 gathers, above it loops) give the same numbers."""
    args = experts_inputs(13, rows, top_k, experts=10)
    x = args[0].view(2, rows // 2, -1) if rows % 2 == 0 else args[0]  # leading dims are flattened and restored
    args = (x, args[1].view(*x.shape[:-1], top_k), args[2].view(*x.shape[:-1], top_k), *args[3:])
    out = ops.moe_experts(*args)
    assert out.shape == x.shape
    assert rel_err(out, experts_reference(*args)) < FP32_TOL
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe_module, "GATHER_LIMIT", 0 if rows * top_k <= moe_module.GATHER_LIMIT else 10**9)
        other = ops.moe_experts(*args)
    assert rel_err(other, out) < 1e-6


def test_moe_router_then_experts_match_hf_moe_block():
    cfg = hf_config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=6, n_group=2,
                    topk_group=1, routed_scaling_factor=1.5)
    torch.manual_seed(14)
    block = hf.MiMoV2FlashMoE(cfg)
    gen = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for p in (block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj):
            p.copy_(randn(gen, *p.shape, std=0.5))
        block.gate.e_score_correction_bias.copy_(randn(gen, 8, std=0.3))
        x = randn(gen, 2, 5, 16)
        want = block(x)
    w, i = ops.moe_router(x, block.gate.weight, block.gate.e_score_correction_bias, 3, 2, 1, True, 1.5)
    got = ops.moe_experts(x, w, i, block.experts.gate_up_proj, block.experts.down_proj)
    assert rel_err(got, want) < 1e-6


# ------------------------------------------------------------------------------------------------------- argmax
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_picks_the_first_maximum(dtype):
    gen = torch.Generator().manual_seed(15)
    logits = randn(gen, 3, 4, 50, dtype=dtype)
    logits[1, 2, 7] = logits[1, 2, 31] = logits[1, 2].max() + 1  # a tie: the first one wins
    out = ops.argmax(logits)
    assert out.shape == (3, 4) and out.dtype == torch.int64
    for i in range(3):
        for j in range(4):
            row = [float(v) for v in logits[i, j]]
            assert int(out[i, j]) == row.index(max(row))
    assert int(out[1, 2]) == 7


# ------------------------------------------------------------------------------------------------------- sample
def nucleus_reference(logits_row: torch.Tensor, temperature: float, top_p: float) -> list[float]:
    """softmax(logits / T) in float64, cut to the smallest most-probable set whose mass reaches top_p, renormalised."""
    z = [float(v) / temperature for v in logits_row]
    top = max(z)
    p = [math.exp(v - top) for v in z]
    p = [v / sum(p) for v in p]
    if top_p < 1.0:
        kept, mass = set(), 0.0
        for i in sorted(range(len(p)), key=lambda i: -p[i]):
            kept.add(i)
            mass += p[i]
            if mass >= top_p:
                break
        p = [v if i in kept else 0.0 for i, v in enumerate(p)]
        p = [v / sum(p) for v in p]
    return p


SAMPLE_SETTINGS = [(1.0, 1.0), (0.7, 1.0), (1.6, 1.0), (1.0, 0.8), (0.8, 0.5), (1.3, 0.95)]


@pytest.mark.parametrize("temperature,top_p", SAMPLE_SETTINGS)
def test_sample_is_the_inverse_cdf_of_the_nucleus(temperature, top_p):
    """A uniform in the middle of token i's interval of the CDF picks token i; tokens outside the nucleus never come."""
    gen = torch.Generator().manual_seed(16)
    vocab = 12
    logits = randn(gen, vocab, std=2.0)
    p = nucleus_reference(logits, temperature, top_p)
    cdf = [sum(p[:i + 1]) for i in range(vocab)]
    live = [i for i in range(vocab) if p[i] > 1e-5]
    mids = torch.tensor([(cdf[i] - p[i] / 2) for i in live])
    got = ops.sample(logits.expand(len(live), vocab), mids, temperature, top_p)
    assert got.tolist() == live
    grid = torch.cat((torch.linspace(0, 1, 2001)[:-1], torch.tensor([1 - 2**-24])))
    picked = ops.sample(logits.expand(len(grid), vocab), grid, temperature, top_p)
    assert set(picked.tolist()) <= {i for i in range(vocab) if p[i] > 0}
    assert int(picked[0]) == live[0] and int(picked[-1]) == live[-1]
    if top_p < 1.0:
        assert len(live) < vocab  # the nucleus did cut something


@pytest.mark.parametrize("temperature,top_p", SAMPLE_SETTINGS)
def test_sample_frequencies_match_the_distribution(temperature, top_p):
    """40000 draws: every token's frequency is within 5 standard errors of its probability (a multinomial count)."""
    gen = torch.Generator().manual_seed(17)
    vocab, draws = 10, 40000
    logits = randn(gen, vocab, std=1.5)
    uniform = torch.rand(draws, generator=gen)
    got = ops.sample(logits.to(torch.bfloat16).expand(draws, vocab), uniform, temperature, top_p)
    freq = torch.bincount(got, minlength=vocab).double() / draws
    p = torch.tensor(nucleus_reference(logits.to(torch.bfloat16), temperature, top_p), dtype=torch.float64)
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / draws).sqrt() + 1.0 / draws).all(), (freq, p)


def test_sample_is_deterministic_given_uniforms():
    gen = torch.Generator().manual_seed(18)
    logits, uniform = randn(gen, 2, 3, 30), torch.rand(2, 3, generator=gen)
    first = ops.sample(logits, uniform, 0.9, 0.9)
    assert first.shape == (2, 3) and first.dtype == torch.int64
    for _ in range(3):
        assert torch.equal(ops.sample(logits.clone(), uniform.clone(), 0.9, 0.9), first)


def test_sample_float64_uniform_below_one_stays_in_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    got = ops.sample(logits, torch.tensor([1 - 1e-9], dtype=torch.float64), 1.0, 0.5)
    assert int(got) == 0  # the nucleus at top_p 0.5 is {0}


# ------------------------------------------------------------------------------------------------- shape errors
def _t(*shape, dtype=torch.float32):
    return randn(torch.Generator().manual_seed(sum(shape) + 19), *shape, dtype=dtype)


def _ids(*shape):
    return torch.randint(1, 9, shape, generator=torch.Generator().manual_seed(20))


def _attention_args(**changes):
    """Well-formed attention arguments (B=1, T=2, 4 heads of 6, 2 kv heads, v dim 4, capacity 10) with changes."""
    args = dict(q=_t(1, 2, 24), k=_t(1, 2, 12), v=_t(1, 2, 8), k_cache=_t(1, 2, 10, 6), v_cache=_t(1, 2, 10, 4),
                start_pos=torch.tensor([3]), sinks=_t(4), num_heads=4, head_dim=6, v_head_dim=4, window=3, scale=0.4,
                value_scale=0.7)
    args.update(changes)
    return tuple(args.values())


SHAPE_ERRORS = [  # (op, args, fragments the message must contain besides "tilec.<op>")
    ("embedding", (_t(2, 3), _t(10, 8)), ["float32"]),
    ("embedding", (_ids(2, 3), _t(10)), ["(10,)"]),
    ("rms_norm", (_t(2, 3, 8), _t(6), 1e-5), ["(2, 3, 8)", "6"]),
    ("rms_norm", (_t(2, 8), _t(8, 2), 1e-5), ["(8, 2)"]),
    ("add_rms_norm", (_t(2, 8), _t(3, 8), _t(8), 1e-5), ["(2, 8)", "(3, 8)"]),
    ("add_rms_norm", (_t(2, 8), _t(2, 8), _t(7), 1e-5), ["(2, 8)", "7"]),
    ("add", (_t(2, 3), _t(4)), ["(2, 3)", "(4,)"]),
    ("linear", (_t(2, 5, 7), _t(3, 8), None), ["(2, 5, 7)", "(3, 8)"]),
    ("linear", (_t(2, 7), _t(3, 7), _t(4)), ["(4,)"]),
    ("linear", (_t(2, 7), _t(7), None), ["(7,)"]),
    ("rope", (_t(1, 2, 16), torch.tensor([0]), 8, 3, 1e4), ["rotary_dim 3"]),
    ("rope", (_t(1, 2, 16), torch.tensor([0]), 8, 10, 1e4), ["rotary_dim 10", "head_dim 8"]),
    ("rope", (_t(1, 2, 16), torch.tensor([0]), 6, 2, 1e4), ["16", "head_dim 6"]),
    ("rope", (_t(1, 2, 16), torch.tensor([0, 1]), 8, 4, 1e4), ["(2,)"]),
    ("rope", (_t(2, 16), torch.tensor([0, 1]), 8, 4, 1e4), ["(2, 16)"]),
    ("silu_mul", (_t(2, 6), _t(2, 5)), ["(2, 6)", "(2, 5)"]),
    ("attention", _attention_args(k_cache=_t(1, 2, 10, 8)), ["k_cache (1, 2, 10, 8)", "(1, 2, 10, 6)"]),
    ("attention", _attention_args(v_cache=_t(1, 2, 10, 6)), ["v_cache (1, 2, 10, 6)", "(1, 2, 10, 4)"]),
    ("attention", _attention_args(v_cache=_t(1, 2, 9, 4)), ["v_cache (1, 2, 9, 4)", "(1, 2, 10, 4)"]),
    ("attention", _attention_args(q=_t(1, 2, 20)), ["(1, 2, 20)"]),
    ("attention", _attention_args(k=_t(1, 2, 10)), ["(1, 2, 10)"]),
    ("attention", _attention_args(k_cache=_t(1, 10, 6)), ["(1, 10, 6)"]),
    ("attention", _attention_args(q=_t(1, 2, 18), num_heads=3), ["3 query heads", "2 kv heads"]),
    ("attention", _attention_args(start_pos=torch.tensor([3, 4])), ["(2,)"]),
    ("attention", _attention_args(start_pos=torch.tensor([3.0])), ["float32"]),
    ("attention", _attention_args(sinks=_t(3)), ["(3,)"]),
    ("attention", _attention_args(window=-1), ["-1"]),
    ("moe_router", (_t(2, 8), _t(6, 7), None, 2, 1, 1, True, 1.0), ["(6, 7)", "(2, 8)"]),
    ("moe_router", (_t(2, 8), _t(6, 8), _t(5), 2, 1, 1, True, 1.0), ["(5,)"]),
    ("moe_router", (_t(2, 8), _t(6, 8), None, 7, 1, 1, True, 1.0), ["top_k 7"]),
    ("moe_router", (_t(2, 8), _t(6, 8), None, 2, 4, 1, True, 1.0), ["4 groups"]),
    ("moe_router", (_t(2, 8), _t(6, 8), None, 3, 3, 1, True, 1.0), ["top_k 3"]),
    ("moe_experts", (_t(3, 8), _t(3, 2), _ids(3, 2), _t(4, 10, 8), _t(4, 8, 4)), ["(4, 10, 8)", "(4, 8, 4)"]),
    ("moe_experts", (_t(3, 8), _t(3, 2), _ids(3, 2), _t(4, 9, 8), _t(4, 8, 4)), ["(4, 9, 8)"]),
    ("moe_experts", (_t(3, 8), _t(3, 2), _ids(3, 2), _t(4, 10, 8), _t(5, 8, 5)), ["(5, 8, 5)"]),
    ("moe_experts", (_t(3, 8), _t(3, 2), _ids(3, 2), _t(10, 8), _t(4, 8, 5)), ["(10, 8)"]),
    ("moe_experts", (_t(3, 7), _t(3, 2), _ids(3, 2), _t(4, 10, 8), _t(4, 8, 5)), ["(3, 7)", "8"]),
    ("moe_experts", (_t(3, 8), _t(3, 2), _ids(3, 3), _t(4, 10, 8), _t(4, 8, 5)), ["(3, 2)", "(3, 3)"]),
    ("moe_experts", (_t(3, 8), _t(4, 2), _ids(4, 2), _t(4, 10, 8), _t(4, 8, 5)), ["(4, 2)", "(3, 8)"]),
    ("moe_experts", (_t(3, 8), _t(3, 2), _t(3, 2), _t(4, 10, 8), _t(4, 8, 5)), ["float32"]),
    ("sample", (_t(2, 11), _t(3), 1.0, 1.0), ["(3,)", "(2,)"]),
]


def _to_meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name,args,fragments", SHAPE_ERRORS, ids=[f"{c[0]}-{i}" for i, c in enumerate(SHAPE_ERRORS)])
def test_misshapen_input_raises_shape_error(name, args, fragments, device):
    """The reference (CPU) and the fake (meta) report the same ShapeError, naming the op and the offending shape."""
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    if device == "meta":
        args = _to_meta(args)
    with pytest.raises(ShapeError) as info:
        getattr(ops, name)(*args)
    assert isinstance(info.value, TilecError)
    message = str(info.value)
    assert f"tilec.{name}" in message
    for fragment in fragments:
        assert fragment in message


def _qkv_rope_args(**changes):
    args = dict(x=_t(1, 2, 8), wq=_t(8, 8), wk=_t(4, 8), wv=_t(6, 8), bq=None, bk=None, bv=None,
                start_pos=torch.tensor([0]), head_dim=4, rotary_dim=2, theta=1e4)
    args.update(changes)
    return tuple(args.values())


@pytest.mark.parametrize("name,args,fragments", [
    ("qkv_rope", _qkv_rope_args(wk=_t(4, 7)), ["(4, 7)"]),
    ("qkv_rope", _qkv_rope_args(bv=_t(5)), ["(5,)"]),
    ("qkv_rope", _qkv_rope_args(rotary_dim=3), ["rotary_dim 3"]),
    ("qkv_rope", _qkv_rope_args(wk=_t(6, 8)), ["6", "head_dim 4"]),
    ("swiglu", (_t(2, 8), _t(6, 8), _t(6, 8), _t(8, 5)), ["(8, 5)"]),
    ("swiglu", (_t(2, 8), _t(6, 8), _t(5, 8), _t(8, 6)), ["w_gate (6, 8)", "w_up (5, 8)"]),
])
def test_composite_ops_raise_shape_error_with_the_shape(name, args, fragments):
    """qkv_rope and swiglu reject misshapen weights with a ShapeError naming the shape (the op name: next test)."""
    for call_args in (args, _to_meta(args)):
        with pytest.raises(ShapeError) as info:
            getattr(ops, name)(*call_args)
        for fragment in fragments:
            assert fragment in str(info.value)


@pytest.mark.parametrize("name,args,weight", [
    ("qkv_rope", _qkv_rope_args(wk=_t(4, 7)), "wk"),
    ("swiglu", (_t(2, 8), _t(6, 8), _t(6, 8), _t(8, 5)), "w_down"),
])
def test_composite_ops_name_themselves_and_the_weight(name, args, weight):
    with pytest.raises(ShapeError) as info:
        getattr(ops, name)(*args)
    assert f"tilec.{name}" in str(info.value) and weight in str(info.value)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_argmax_rejects_an_empty_vocab(device):
    with pytest.raises(ShapeError, match="tilec.argmax"):
        ops.argmax(torch.empty(2, 0, device=device))


# ------------------------------------------------------------------------------------------ fake implementations
def _fake_cases():
    bf = torch.bfloat16
    sp = torch.tensor([2, 5])
    return [
        ("embedding", (_ids(2, 3), _t(10, 8, dtype=bf))),
        ("embedding", (_ids(4).to(torch.int32), _t(10, 8))),
        ("rms_norm", (_t(2, 3, 8, dtype=bf), _t(8), 1e-5)),
        ("rms_norm", (_t(2, 3, 8, dtype=bf), _t(8, dtype=bf), 1e-5)),
        ("add_rms_norm", (_t(2, 3, 8, dtype=bf), _t(2, 3, 8, dtype=bf), _t(8, dtype=bf), 1e-5)),
        ("add_rms_norm", (_t(2, 3, 8, dtype=bf), _t(2, 3, 8), _t(8, dtype=bf), 1e-5)),
        ("add", (_t(2, 3, 8), _t(8, dtype=bf))),
        ("add", (_t(1, 8, dtype=bf), _t(4, 1, dtype=bf))),
        ("linear", (_t(2, 3, 8), _t(5, 8), _t(5))),
        ("linear", (_t(2, 3, 8, dtype=bf), _t(5, 8, dtype=bf), None)),
        ("rope", (_t(2, 3, 16, dtype=bf), sp, 8, 4, 1e4)),
        ("qkv_rope", (_t(2, 3, 16), _t(32, 16), _t(16, 16), _t(12, 16), _t(32), None, _t(12), sp, 8, 4, 1e4)),
        ("silu_mul", (_t(2, 3, 6, dtype=bf), _t(2, 3, 6, dtype=bf))),
        ("swiglu", (_t(2, 3, 8), _t(6, 8), _t(6, 8), _t(8, 6))),
        ("attention", _attention_args()),
        ("attention", _attention_args(q=_t(1, 2, 24, dtype=bf), k=_t(1, 2, 12, dtype=bf), v=_t(1, 2, 8, dtype=bf),
                                      k_cache=_t(1, 2, 10, 6, dtype=bf), v_cache=_t(1, 2, 10, 4, dtype=bf),
                                      sinks=None, window=0)),
        ("moe_router", (_t(2, 3, 8, dtype=bf), _t(6, 8, dtype=bf), _t(6), 2, 2, 1, True, 2.5)),
        ("moe_router", (_t(5, 8), _t(6, 8), None, 3, 1, 1, False, 1.0)),
        ("moe_experts", (_t(2, 3, 8), _t(2, 3, 2), _ids(2, 3, 2) % 4, _t(4, 10, 8), _t(4, 8, 5))),
        ("moe_experts", (_t(40, 8, dtype=bf), _t(40, 2), _ids(40, 2) % 4, _t(4, 10, 8, dtype=bf),
                         _t(4, 8, 5, dtype=bf))),
        ("argmax", (_t(2, 3, 11, dtype=bf),)),
        ("sample", (_t(2, 3, 11), torch.rand(2, 3, generator=torch.Generator().manual_seed(21)), 0.8, 0.9)),
    ]


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("name,args", _fake_cases(), ids=[c[0] for c in _fake_cases()])
def test_fake_matches_reference_shapes_and_dtypes(name, args):
    op = getattr(ops, name)
    real = _flat(op(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
    fake = _flat(op(*_to_meta(args)))
    assert len(fake) == len(real)
    for r, f in zip(real, fake):
        assert f.device.type == "meta"
        assert (f.shape, f.dtype) == (r.shape, r.dtype)


def test_fake_cases_cover_every_op():
    assert {name for name, _ in _fake_cases()} == set(ALL_OPS)
