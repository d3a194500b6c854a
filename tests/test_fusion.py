"""Fusion passes: each stage's graph against the one before it on the same random inputs, on drawn configs."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import tilec
from tilec.graph import op_counts
from tilec.models import MiMoConfig, MiMoForCausalLM
from tilec.models.config import DENSE, FULL, SLIDING, SPARSE


@st.composite
def configs(draw):
    layers = draw(st.integers(1, 4))
    kv = draw(st.integers(1, 2))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    factor = draw(st.sampled_from([0.25, 0.5, 1.0]))
    assume(int(head_dim * factor) % 2 == 0)
    experts = draw(st.integers(2, 6))
    return MiMoConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=layers,
        num_attention_heads=2 * kv * draw(st.integers(1, 2)), num_key_value_heads=kv, head_dim=head_dim,
        v_head_dim=draw(st.sampled_from([8, 16])), n_routed_experts=experts,
        num_experts_per_tok=draw(st.integers(1, experts)), sliding_window=draw(st.integers(1, 12)),
        attention_bias=draw(st.booleans()), tie_word_embeddings=draw(st.booleans()),
        layer_types=draw(st.lists(st.sampled_from([FULL, SLIDING]), min_size=layers, max_size=layers)),
        mlp_layer_types=draw(st.lists(st.sampled_from([DENSE, SPARSE]), min_size=layers, max_size=layers)),
        rope_parameters={k: {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": factor}
                         for k in (FULL, SLIDING)})


def _run(gm, model, ids, start):
    """Run a stage graph at `start` over a cache of random contents (the same for every stage)."""
    specs = model.cache_layout(ids.shape[0], 32)
    gen = torch.Generator().manual_seed(7)
    caches = [torch.randn(s.shape, generator=gen, dtype=s.dtype) for s in specs]
    pos = torch.full((ids.shape[0],), start, dtype=torch.long)
    with torch.no_grad():
        out = gm(ids, pos, *caches)
    return out, caches


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs(), seed=st.integers(0, 1000), rows=st.integers(1, 8), start=st.integers(0, 20),
       hidden=st.booleans())
def test_every_fusion_stage_computes_what_the_stage_before_it_computes(cfg, seed, rows, start, hidden):
    model = MiMoForCausalLM(cfg).init_weights(seed, std=0.1)
    layers = (0, cfg.num_hidden_layers - 1) if hidden else ()
    cm = tilec.compile(model, options=tilec.Options(greedy=True, hidden_layers=layers))
    ids = torch.randint(0, cfg.vocab_size, (2, rows), generator=torch.Generator().manual_seed(seed))
    stages = list(cm.stages.items())
    for (name_a, a), (name_b, b) in zip(stages, stages[1:]):
        out_a, caches_a = _run(a, model, ids, start)
        out_b, caches_b = _run(b, model, ids, start)
        if name_b == "greedy_head":  # the graph now returns the argmax of what it returned
            logits = out_a[0] if hidden else out_a
            assert torch.equal(out_b[0] if hidden else out_b, logits.argmax(-1)), name_b
        else:
            for x, y in zip(out_a if hidden else [out_a], out_b if hidden else [out_b]):
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5, msg=name_b)
        for ca, cb in zip(caches_a, caches_b):  # the cache writes are the same too
            torch.testing.assert_close(cb, ca, rtol=1e-5, atol=1e-5, msg=name_b)
    stats = {r.name: r.stats for r in cm.records}
    n = cfg.num_hidden_layers
    assert stats["fuse_add_rms_norm"] == {"add_rms_norm": 2 * n}
    assert stats["fuse_qkv_rope"] == {"qkv_rope": n}
    assert stats["fuse_swiglu"] == {"swiglu": cfg.mlp_layer_types.count(DENSE)}
    assert stats["greedy_head"] == {"argmax_outputs": 1, "lm_head_fused": 1}
    final = op_counts(cm.graph)
    assert final.get("tilec.add", 0) == 0 and final.get("tilec.rope", 0) == 0 and final.get("tilec.silu_mul", 0) == 0
    assert final["tilec.lm_head_argmax"] == 1 and final["tilec.rms_norm"] == 1  # only the first layer's input norm


def test_fusions_can_be_turned_off():
    model = MiMoForCausalLM(MiMoConfig(**__import__("tilec.models.mimo", fromlist=["PRESETS"]).PRESETS["tiny"]))
    cm = tilec.compile(model.init_weights(0), options=tilec.Options(fuse=False))
    assert [r.name for r in cm.records] == ["capture", "dead_code"]


def test_a_projection_used_twice_is_not_fused():
    """qkv_rope only fuses when the projections feed nothing else (it would compute them twice otherwise)."""
    from tilec.passes import fuse_qkv_rope

    cm = tilec.compile(MiMoForCausalLM(MiMoConfig(**__import__("tilec.models.mimo", fromlist=["PRESETS"])
                                                    .PRESETS["tiny"])).init_weights(0),
                       options=tilec.Options(fuse=False))
    gm = tilec.graph.copy_graph_module(cm.graph)
    k_proj = next(n for n in gm.graph.nodes if n.name == "l0_k_proj")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0], k_proj),)  # now the k projection is also a graph output
    gm.recompile()
    assert fuse_qkv_rope.run(gm) == {"qkv_rope": 3}
