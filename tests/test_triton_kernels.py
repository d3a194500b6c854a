"""Each generated Triton kernel against its op's reference, on drawn shapes (CPU interpreter here, fp32; the
`gpu` tests repeat the checks in bf16 on CUDA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tilec import ops
from tilec.codegen.triton import lower
from tilec.graph import GraphInfo, propagate_meta

# The same checks run on the GPU when there is one (compiled kernels, fp32 with exact fp32 dots).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def single_op_graph(fn, args) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """A graph holding one call of op ``fn``, its tensor arguments (also inside lists) as inputs."""
    graph, inputs = torch.fx.Graph(), []

    def placeholder(t):
        inputs.append(t)
        return graph.placeholder(f"a{len(inputs) - 1}")

    node_args = [[placeholder(x) for x in a] if isinstance(a, list) else placeholder(a)
                 if isinstance(a, torch.Tensor) else a for a in args]
    graph.output(graph.call_function(fn, tuple(node_args)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    gm.meta["tilec"] = GraphInfo(kind="plain", description=f"one {fn}")
    propagate_meta(gm, inputs)
    return gm, inputs


def _run_single_op(fn, *args, device=DEVICE):
    """Lower a one-op graph to Triton; run kernel and reference on separate copies of the same inputs."""
    args = [a.to(device) if isinstance(a, torch.Tensor) else [x.to(device) for x in a] if isinstance(a, list) else a
            for a in args]
    gm, inputs = single_op_graph(fn, args)
    program = lower(gm, torch.device(device), "test")
    mine, theirs = [t.clone() for t in inputs], [t.clone() for t in inputs]
    return program(*mine), gm(*theirs), (mine, theirs)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@FAST
@given(m=st.integers(1, 20), n=st.integers(1, 70), k=st.integers(1, 90), bias=st.booleans(), seed=st.integers(0, 99))
def test_linear(m, n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(1, m, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    got, ref, _ = _run_single_op(ops.linear, x, w, b)
    assert rel(got, ref) < 1e-5


@FAST
@given(rows=st.integers(1, 9), heads=st.integers(1, 3), kv=st.sampled_from([1, 2]), d=st.sampled_from([8, 12, 32]),
       factor=st.sampled_from([0.0, 0.5, 1.0]), bias=st.booleans(), seed=st.integers(0, 99))
def test_qkv_rope(rows, heads, kv, d, factor, bias, seed):
    g = torch.Generator().manual_seed(seed)
    hidden, rd = 24, int(d * factor) // 2 * 2
    x = torch.randn(1, rows, hidden, generator=g)
    wq, wk, wv = (torch.randn(h * dd, hidden, generator=g) for h, dd in ((heads * kv, d), (kv, d), (kv, 8)))
    bs = [torch.randn(w.shape[0], generator=g) if bias else None for w in (wq, wk, wv)]
    pos = torch.tensor([int(torch.randint(0, 5000, (1,), generator=g))])
    got, ref, _ = _run_single_op(ops.qkv_rope, x, wq, wk, wv, *bs, pos, d, rd, 1e4)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("rows", [3, 17, 70])
def test_projections_at_decode_and_prefill_rows(rows):
    """linear, qkv_rope and swiglu on one tile of rows (up to ROW_TILE: decode and verify steps) and on a prefill's
    tiles (more rows), against the reference ops."""
    g = torch.Generator().manual_seed(rows)
    hidden, inter, d = 40, 72, 16
    x = torch.randn(1, rows, hidden, generator=g)
    w = torch.randn(56, hidden, generator=g)
    got, ref, _ = _run_single_op(ops.linear, x, w, torch.randn(56, generator=g))
    assert rel(got, ref) < 1e-5
    # Q's and K's pairs split by the blocks of pairs, and (4 heads of 32: 64 pairs each) in whole blocks
    for nq, nk, head in ((4 * d, 2 * d, d), (128, 128, 32)):
        wq, wk, wv = (torch.randn(n, hidden, generator=g) for n in (nq, nk, nk // head * 8))
        got, ref, _ = _run_single_op(ops.qkv_rope, x, wq, wk, wv, None, None, None, torch.tensor([321]), head, 8,
                                     1e4)
        for a, b in zip(got, ref):
            assert rel(a, b) < 1e-5
    gate, up, down = (torch.randn(*shape, generator=g) for shape in ((inter, hidden), (inter, hidden), (hidden, inter)))
    got, ref, _ = _run_single_op(ops.swiglu, x, gate, up, down)
    assert rel(got, ref) < 1e-5


@FAST
@given(rows=st.integers(1, 9), hidden=st.integers(1, 300), add=st.booleans(), seed=st.integers(0, 99))
def test_rms_norm_and_add(rows, hidden, add, seed):
    g = torch.Generator().manual_seed(seed)
    x, r, w = torch.randn(1, rows, hidden, generator=g), torch.randn(1, rows, hidden, generator=g), \
        torch.randn(hidden, generator=g)
    if add:
        got, ref, _ = _run_single_op(ops.add_rms_norm, x, r, w, 1e-5)
        assert rel(got[0], ref[0]) < 1e-5 and torch.equal(got[1], ref[1])
    else:
        got, ref, _ = _run_single_op(ops.rms_norm, x, w, 1e-5)
        assert rel(got, ref) < 1e-5


@FAST
@given(batch=st.integers(1, 2), rows=st.integers(1, 9), kv=st.integers(1, 2), group=st.integers(1, 3),
       window=st.integers(0, 12), causal=st.booleans(), sinks=st.booleans(), ring=st.booleans(),
       seed=st.integers(0, 99))
def test_attention(batch, rows, kv, group, window, causal, sinks, ring, seed):
    g = torch.Generator().manual_seed(seed)
    d, dv, heads = 16, 8, kv * group
    cap = (window - 1 + 8) if (ring and window) else 48
    start = [int(torch.randint(0, 30, (1,), generator=g)) for _ in range(batch)]
    q = torch.randn(batch, rows, heads * d, generator=g)
    k, v = torch.randn(batch, rows, kv * d, generator=g), torch.randn(batch, rows, kv * dv, generator=g)
    kc, vc = torch.randn(batch, kv, cap, d, generator=g), torch.randn(batch, kv, cap, dv, generator=g)
    s = torch.randn(heads, generator=g) if sinks else None
    args = (q, k, v, kc, vc, torch.tensor(start), s, heads, d, dv, window, d ** -0.5, 0.7, causal)
    got, ref, (mine, theirs) = _run_single_op(ops.attention, *args)
    assert rel(got, ref) < 1e-5
    # The kernel appended the same rows as the reference did (both started from the same cache contents).
    assert torch.equal(mine[3], theirs[3]) and torch.allclose(mine[4], theirs[4])


@pytest.mark.parametrize("fn,shapes", [
    (ops.embedding, None), (ops.add, [(2, 5, 33), (2, 5, 33)]), (ops.silu_mul, [(1, 3, 70), (1, 3, 70)]),
    (ops.argmax, [(2, 3, 77)]), (ops.lm_head_argmax, [(2, 3, 40), (300, 40)]),
    (ops.lm_head_argmax, [(1, 37, 40), (300, 40)]),  # a prefill's rows: tensor-core tiles of rows
    (ops.swiglu, [(1, 3, 24), (40, 24), (40, 24), (24, 40)]), (ops.rope, None), (ops.cat, None),
    (ops.kv_append, None),
])
def test_small_ops(fn, shapes):
    g = torch.Generator().manual_seed(0)
    if fn is ops.embedding:
        args = (torch.randint(0, 50, (2, 4), generator=g), torch.randn(50, 33, generator=g))
    elif fn is ops.rope:
        args = (torch.randn(2, 3, 4 * 16, generator=g), torch.tensor([3, 900]), 16, 8, 1e4)
    elif fn is ops.cat:
        args = ([torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 9, generator=g)], -1)
    elif fn is ops.kv_append:
        args = (torch.randn(1, 3, 2 * 8, generator=g), torch.randn(1, 3, 2 * 4, generator=g),
                torch.randn(1, 2, 10, 8, generator=g), torch.randn(1, 2, 10, 4, generator=g), torch.tensor([8]),
                8, 4, 0.5)
    else:
        args = tuple(torch.randn(*s, generator=g) for s in shapes)
        if fn is ops.lm_head_argmax or fn is ops.argmax:
            args[0][..., 7] += 5  # a clear winner in some rows; the rest are random
    got, ref, (mine, theirs) = _run_single_op(fn, *args)
    if fn is ops.kv_append:
        assert torch.equal(mine[2], theirs[2]) and torch.allclose(mine[3], theirs[3])
    elif got.dtype == torch.int64:
        assert torch.equal(got, ref)
    else:
        assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("window", [0, 40])
def test_attention_merges_only_the_live_chunks(monkeypatch, window):
    """A cache far larger than the context: the key chunks from the step's last key on are dead, attend_kernel stores
    nothing for them and combine_kernel merges only the live ones (here 1 to all 4 of 4). The scratch starts as NaN,
    so reading a chunk that was not stored would show. Against the reference, and the first row of an 8-row step the
    same bits as its own 1-row step, also where the 8 rows cross a chunk's end (the 8-row step then merges one more
    chunk than the 1-row step: for that row, it holds nothing)."""
    real_empty = torch.empty

    def nan_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", nan_empty)
    g = torch.Generator().manual_seed(window)
    kv, group, d, dv, cap = 2, 2, 16, 8, 300
    heads = kv * group
    kc, vc = torch.randn(1, kv, cap, d, generator=g), torch.randn(1, kv, cap, dv, generator=g)
    q = torch.randn(1, 8, heads * d, generator=g)
    k, v = torch.randn(1, 8, kv * d, generator=g), torch.randn(1, 8, kv * dv, generator=g)
    for start in (3, 75, 150, 285):
        def step(rows):
            args = (q[:, rows], k[:, rows], v[:, rows], kc.clone(), vc.clone(), torch.tensor([start + rows[0]]),
                    None, heads, d, dv, window, d ** -0.5, 0.7, True)
            got, ref, _ = _run_single_op(ops.attention, *args)
            assert not got.isnan().any() and rel(got, ref) < 1e-5, (start, rows)
            return got
        assert torch.equal(step([0])[0, 0], step(list(range(8)))[0, 0]), start


@pytest.mark.parametrize("window", [0, 9])
def test_attention_prefill_splits_keys_only_as_far_as_needed(monkeypatch, window):
    """A prefill (more rows than a verify step) whose blocks of rows already make the plan's PREFILL_PROGRAMS does not
    split its keys into chunks: it allocates no scratch for partial states (a long prompt's would be n_split x rows x
    DV floats a kv head: gigabytes). Each causal block of rows goes over only the keys its own rows see; against the
    reference, after a cache history and with the step's rows in several blocks."""
    real_empty = torch.empty
    scratch = []

    def recording_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        if t.dtype == torch.float32 and t.dim() <= 2:
            scratch.append(tuple(t.shape))
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", recording_empty)
    g = torch.Generator().manual_seed(window)
    kv, group, d, dv, cap, rows, start = 2, 2, 16, 8, 300, 40, 100
    heads = kv * group
    kc, vc = torch.randn(1, kv, cap, d, generator=g), torch.randn(1, kv, cap, dv, generator=g)
    q = torch.randn(1, rows, heads * d, generator=g)
    k, v = torch.randn(1, rows, kv * d, generator=g), torch.randn(1, rows, kv * dv, generator=g)
    got, ref, _ = _run_single_op(ops.attention, q, k, v, kc, vc, torch.tensor([start]), None, heads, d, dv, window,
                                 d ** -0.5, 0.7, True)
    assert not got.isnan().any() and rel(got, ref) < 1e-5
    if DEVICE == "cpu":
        # The interpreter's plan: 2 programs; 2 kv heads x 2 blocks of 64 rows (80 rows) are more. A sliding window's
        # keys are one chunk and the one it may straddle, so its prefill has 2 (the float32 outputs of 1 x 40 x 32 are
        # not scratch: 3 dims). Before: 4 chunks (MAX_SPLIT) for full attention. (On a GPU, the test checks the
        # values: there only, each block of rows skips the key tiles its rows cannot see.)
        splits = {n // (kv * rows * group) for shape in scratch for n in [shape[0]] if len(shape) == 1}
        assert splits == (set() if window == 0 else {2}), scratch


def test_attention_launches_no_chunk_past_the_cache(monkeypatch):
    """Full attention whose key tiles are 64 wide (heads of at most 128): the rule of two tiles a chunk makes chunks of
    128 keys, so the launch counts its chunks again rather than keep MAX_SPLIT's, which would leave chunks that start
    past the whole cache (programs and scratch for nothing). Against the reference."""
    from tilec.codegen.plans import attention_context
    from tilec.codegen.render import load_source, render
    from tilec.codegen.tuning import device_info

    real_empty = torch.empty
    scratch = []

    def recording_empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        if t.dtype == torch.float32 and t.dim() == 1:
            scratch.append(t.numel())
        return t
    monkeypatch.setattr(torch, "empty", recording_empty)
    kv, group, d, dv, cap = 2, 2, 16, 8, 300
    ctx = {**attention_context(kv * group, kv, d, dv, 0, d ** -0.5, 0.7, True, 8, torch.float32,
                               device_info(torch.device(DEVICE))), "BLOCK_S": 64, "CHUNK": 64, "MAX_SPLIT": 8}
    module = load_source(render("triton/attention.py.j2", ctx={**ctx, "nodes": ["test"]}), "attention")
    g = torch.Generator().manual_seed(4)
    layer = tuple(t.to(DEVICE) for t in (
        torch.randn(1, 1, kv * group * d, generator=g), torch.randn(1, 1, kv * d, generator=g),
        torch.randn(1, 1, kv * dv, generator=g), torch.randn(1, kv, cap, d, generator=g),
        torch.randn(1, kv, cap, dv, generator=g), torch.tensor([250]))) + (None,)
    got = module.launch(*[t.clone() if t is not None else None for t in layer])
    want = ops.attention(*[t.clone() if t is not None else None for t in layer], kv * group, d, dv, 0, d ** -0.5,
                         0.7, True)
    assert rel(got, want) < 1e-5
    # 308 positions (the cache and a verify step's 8 rows) in chunks of 128: 3 chunks; 8 rows a step's plan (rows x
    # groups = 2 for this 1-row call). MAX_SPLIT's count, min(8, 308 / 64) = 5, would leave 2 chunks past the cache.
    assert scratch and all(n == kv * 3 * group for n in scratch), scratch


def test_attention_tiles_for_short_windows():
    """On a GPU, a short sliding window (at most SHORT_WINDOW keys) takes chunks of 32 keys in tiles of 16; full
    attention and long windows keep chunks of 64 (tiles of 32 for heads wider than 128, else 64); the interpreter
    takes tiles of 16 in chunks of 64 whatever the window."""
    from tilec.codegen.plans import SHORT_WINDOW, attention_context
    from tilec.codegen.tuning import DeviceInfo

    h100, cpu = DeviceInfo(False, 132, (9, 0)), DeviceInfo(True, 1)

    def tiles(window, head_dim, dev):
        ctx = attention_context(16, 2, head_dim, 128, window, 0.1, 1.0, True, 8, torch.bfloat16, dev)
        return ctx["BLOCK_S"], ctx["CHUNK"]
    assert tiles(129, 192, h100) == tiles(SHORT_WINDOW, 128, h100) == (16, 32)
    assert tiles(0, 192, h100) == tiles(SHORT_WINDOW + 1, 192, h100) == (32, 64)
    assert tiles(0, 128, h100) == (64, 64)
    assert tiles(129, 192, cpu) == tiles(0, 192, cpu) == (16, 64)
