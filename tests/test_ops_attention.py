"""Tests of ``tilec.attention``: against a naive float64 loop over the full history, over several calls into one KV
cache (prefill, decode, speculative rows and their rollback, ring caches), and against HF's eager attention.

Split from test_ops.py (its helpers live there); inputs are random (seeded), never zeros or ones.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import tilec.ops as ops

from test_ops import BF16_TOL, FP32_TOL, SEEDS, randn, rel_err

hf = pytest.importorskip("transformers.models.mimo_v2_flash.modeling_mimo_v2_flash")
from transformers.masking_utils import causal_mask_function, sliding_window_overlay  # noqa: E402

# ---------------------------------------------------------------------------------------------------- attention
def naive_attention(q, hist_k, hist_v, start, num_heads, head_dim, v_head_dim, window, scale, sinks):
    """Per (batch, query row, head) loop over the keys kept by absolute position.

    ``hist_k[b][p]`` / ``hist_v[b][p]`` are the key [Hkv, D] and the (already value-scaled) value [Hkv, Dv] at
    position p of batch row b, for every position up to the last query row. Returns float64 [B, T, Hq*Dv].
    """
    batch, rows = q.shape[:2]
    group = num_heads // hist_k[0][0].shape[0]
    out = torch.empty(batch, rows, num_heads, v_head_dim, dtype=torch.float64)
    for b in range(batch):
        for t in range(rows):
            pos = start[b] + t
            first = 0 if window == 0 else max(0, pos - window + 1)  # the query plus window - 1 keys before it
            keys, values = torch.stack(hist_k[b][first:pos + 1]), torch.stack(hist_v[b][first:pos + 1])
            for h in range(num_heads):
                kv = h // group
                logits = keys[:, kv] @ q[b, t, h * head_dim:(h + 1) * head_dim].double() * scale
                top = float(logits.max()) if sinks is None else max(float(logits.max()), float(sinks[h]))
                weights = torch.exp(logits - top)
                denominator = weights.sum() + (0.0 if sinks is None else math.exp(float(sinks[h]) - top))
                out[b, t, h] = (weights[:, None] * values[:, kv]).sum(0) / denominator
    return out.reshape(batch, rows, num_heads * v_head_dim)


class AttentionScenario:
    """A KV cache driven through several attention calls, mirrored by a full-history reference and a cache model."""

    def __init__(self, gen, batch, hkv, group, head_dim, v_head_dim, capacity, window, use_sinks, value_scale,
                 dtype=torch.float32, pos_dtype=torch.int64):
        self.gen, self.batch, self.hkv, self.heads = gen, batch, hkv, hkv * group
        self.d, self.dv, self.cap, self.window, self.value_scale = head_dim, v_head_dim, capacity, window, value_scale
        self.dtype, self.pos_dtype = dtype, pos_dtype
        self.scale = 0.3 + 0.7 * float(torch.rand(1, generator=gen))
        self.sinks = randn(gen, self.heads, std=1.5) if use_sinks else None
        # Unwritten slots hold garbage, which the mask must ignore.
        self.k_cache = randn(gen, batch, hkv, capacity, head_dim, dtype=dtype, std=5.0)
        self.v_cache = randn(gen, batch, hkv, capacity, v_head_dim, dtype=dtype, std=5.0)
        self.hist_k = [[] for _ in range(batch)]
        self.hist_v = [[] for _ in range(batch)]
        self.start = [0] * batch

    def preload(self, lengths):
        """Write history straight into the cache (slot = position % capacity), as if earlier steps had run."""
        for b, n in enumerate(lengths):
            for p in range(n):
                k, v = randn(self.gen, self.hkv, self.d, dtype=self.dtype), \
                    randn(self.gen, self.hkv, self.dv, dtype=self.dtype)
                self.k_cache[b, :, p % self.cap], self.v_cache[b, :, p % self.cap] = k, v
                self.hist_k[b].append(k.double())
                self.hist_v[b].append(v.double())
            self.start[b] = n

    def step(self, rows: int, start=None):
        """One attention call of ``rows`` rows at ``start`` (default: the current length); checks output and cache."""
        start = list(self.start if start is None else start)
        b_, d, dv, hkv = self.batch, self.d, self.dv, self.hkv
        q = randn(self.gen, b_, rows, self.heads * d, dtype=self.dtype)
        k = randn(self.gen, b_, rows, hkv * d, dtype=self.dtype)
        v = randn(self.gen, b_, rows, hkv * dv, dtype=self.dtype)
        want_k, want_v = self.k_cache.clone(), self.v_cache.clone()
        for b in range(b_):
            del self.hist_k[b][start[b]:], self.hist_v[b][start[b]:]  # a rollback forgets the rejected rows
            assert len(self.hist_k[b]) == start[b], "the scenario must not leave holes in the history"
            for t in range(rows):
                k_row = k[b, t].view(hkv, d)
                v_row = (v[b, t].view(hkv, dv) * self.value_scale).to(self.dtype)
                self.hist_k[b].append(k_row.double())
                self.hist_v[b].append(v_row.double())
                want_k[b, :, (start[b] + t) % self.cap], want_v[b, :, (start[b] + t) % self.cap] = k_row, v_row
        out = ops.attention(q, k, v, self.k_cache, self.v_cache, torch.tensor(start, dtype=self.pos_dtype),
                            self.sinks, self.heads, d, dv, self.window, self.scale, self.value_scale)
        assert out.shape == (b_, rows, self.heads * dv) and out.dtype == self.dtype
        want = naive_attention(q, self.hist_k, self.hist_v, start, self.heads, d, dv, self.window, self.scale,
                               self.sinks)
        # The slots of the new positions hold k and value_scale * v; every other slot is untouched.
        assert torch.equal(self.k_cache, want_k)
        assert torch.allclose(self.v_cache, want_v, rtol=1e-6, atol=0)
        self.start = [s + rows for s in start]
        return out, want


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_attention_matches_naive_reference_over_several_calls(data):
    draw = data.draw
    batch, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    v_head_dim = draw(st.sampled_from([n for n in (2, 4, 6, 8) if n != head_dim]))
    history = draw(st.lists(st.integers(0, 12), min_size=batch, max_size=batch), label="history per batch row")
    prefill = draw(st.integers(0, 20), label="prefill rows (0: none)")
    steps = draw(st.lists(st.integers(1, 8), min_size=1, max_size=4), label="rows per decode/verify call")
    accepted = [draw(st.lists(st.integers(0, t), min_size=batch, max_size=batch)) for t in steps]
    total = max(history) + prefill + sum(steps)
    window = draw(st.one_of(st.just(0), st.integers(1, total + 3)), label="window")
    ring = window > 0 and draw(st.booleans(), label="ring cache")
    # A ring must hold the window plus the rows a call may write and then roll back.
    capacity = (window - 1 + max(steps) if ring else total) + draw(st.integers(0, 2))
    scenario = AttentionScenario(
        torch.Generator().manual_seed(draw(SEEDS, label="seed")), batch, hkv, group, head_dim, v_head_dim, capacity,
        window, draw(st.booleans(), label="sinks"), draw(st.floats(0.25, 1.5), label="value_scale"),
        pos_dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    scenario.preload(history)
    if prefill:
        out, want = scenario.step(prefill)  # may be longer than the ring
        assert rel_err(out, want) < FP32_TOL
    for rows, keep in zip(steps, accepted):
        start = list(scenario.start)
        out, want = scenario.step(rows)
        assert rel_err(out, want) < FP32_TOL
        scenario.start = [s + n for s, n in zip(start, keep)]  # accept a prefix, roll the rest back


@pytest.mark.parametrize("window,capacity", [(5, 5 - 1 + 8), (1, 8), (3, 40), (0, 40)])
@pytest.mark.parametrize("use_sinks", [False, True])
def test_attention_rollback_of_speculative_rows(window, capacity, use_sinks):
    """Prefill past the ring, verify 8 speculative rows, accept 3, verify 8 new rows from there."""
    scenario = AttentionScenario(torch.Generator().manual_seed(7), 2, 2, 2, 6, 4, capacity, window, use_sinks, 0.707)
    out, want = scenario.step(20)
    assert rel_err(out, want) < FP32_TOL
    out, want = scenario.step(8)  # positions 20..27
    assert rel_err(out, want) < FP32_TOL
    out, want = scenario.step(8, start=[23, 21])  # rows 23.. and 21.. replace the rejected ones
    assert rel_err(out, want) < FP32_TOL
    out, want = scenario.step(1)
    assert rel_err(out, want) < FP32_TOL


def test_attention_ring_one_slot_short_loses_rollback():
    """With a ring of window - 1 + 7 slots, rolling back 8 rows exposes a stale key: the reference notices."""
    window = 5
    scenario = AttentionScenario(torch.Generator().manual_seed(8), 1, 1, 2, 6, 4, window - 1 + 7, window, True, 0.707)
    scenario.step(20)
    scenario.step(8)  # positions 20..27
    out, want = scenario.step(1, start=[20])
    assert rel_err(out, want) > 1e-3


@pytest.mark.parametrize("window,ring", [(0, False), (1, False), (1, True), (3, False), (3, True), (6, True),
                                         (40, False), (40, True)])
@pytest.mark.parametrize("use_sinks", [False, True])
def test_attention_matches_hf_eager(window, ring, use_sinks):
    """Prefill, two decode steps and a verify step give HF's eager attention over the whole sequence."""
    gen = torch.Generator().manual_seed(9)
    batch, hkv, group, d, dv, value_scale = 2, 2, 3, 12, 8, 0.707
    heads, chunks = hkv * group, [6, 1, 1, 5]
    length = sum(chunks)
    capacity = window - 1 + max(chunks[1:]) if ring else length
    q, k = randn(gen, batch, length, heads * d), randn(gen, batch, length, hkv * d)
    v = randn(gen, batch, length, hkv * dv)
    sinks = randn(gen, heads) if use_sinks else None
    k_cache, v_cache = randn(gen, batch, hkv, capacity, d), randn(gen, batch, hkv, capacity, dv)
    outs, pos = [], 0
    for rows in chunks:
        rows_of = lambda t: t[:, pos:pos + rows]  # noqa: E731
        outs.append(ops.attention(rows_of(q), rows_of(k), rows_of(v), k_cache, v_cache, torch.tensor([pos] * batch),
                                  sinks, heads, d, dv, window, d ** -0.5, value_scale))
        pos += rows
    got = torch.cat(outs, dim=1).view(batch, length, heads, dv)

    idx = torch.arange(length)
    allowed = causal_mask_function(0, 0, idx[:, None], idx[None, :])
    if window:
        allowed &= sliding_window_overlay(window)(0, 0, idx[:, None], idx[None, :])
    mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min).expand(batch, 1, -1, -1)
    module = SimpleNamespace(num_key_value_groups=group, sinks=sinks, training=False)
    want, _ = hf.eager_attention_forward(
        module, q.view(batch, length, heads, d).transpose(1, 2), k.view(batch, length, hkv, d).transpose(1, 2),
        v.view(batch, length, hkv, dv).transpose(1, 2) * value_scale, mask, scaling=d ** -0.5)
    assert rel_err(got, want) < FP32_TOL


def test_attention_bf16_matches_reference():
    gen = torch.Generator().manual_seed(10)
    scenario = AttentionScenario(gen, 2, 2, 2, 8, 6, 5 - 1 + 4, 5, True, 0.707, dtype=torch.bfloat16)
    scenario.preload([3, 9])
    for rows in (6, 1, 4):
        out, want = scenario.step(rows)
        assert rel_err(out, want) < BF16_TOL


def test_attention_sinks_and_value_scale_matter():
    """Guards against a reference that ignores sinks or value_scale: both change the output."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = randn(gen, 1, 3, 4 * 6), randn(gen, 1, 3, 2 * 6), randn(gen, 1, 3, 2 * 4)
    cache = lambda dim: randn(torch.Generator().manual_seed(12), 1, 2, 8, dim)  # noqa: E731
    run = lambda sinks, vs: ops.attention(q, k, v, cache(6), cache(4), torch.tensor([0]), sinks, 4, 6, 4, 0,  # noqa
                                          0.5, vs)
    base = run(None, 1.0)
    assert rel_err(run(None, 0.5), base * 0.5) < 1e-6
    assert rel_err(run(randn(gen, 4) + 2.0, 1.0), base) > 1e-2
