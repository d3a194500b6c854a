"""Short prefills as CUDA graphs: a prompt padded to a recurring shape, its padding harmless to the KV cache.

On the CPU the graph is a stand-in (`CpuGraphs`, from test_dflash) that reruns the step on the graph's own buffers, so
what is checked here is the bookkeeping (which shapes are padded, captured, replayed) and that padding changes nothing
a caller sees: the prompt's logits, and every later step's, which read the cache the padded step wrote.
"""

from __future__ import annotations

import pytest
import torch

import tilec
from tilec.models import build_model
from tilec.runtime.kv_cache import CacheSpec, KVCache

from test_dflash import CpuGraphs

MAX_SEQ = 96


def ring_and_full(window: int = 9, spec_rows: int = 8, max_seq: int = MAX_SEQ) -> KVCache:
    cap = window - 1 + spec_rows
    return KVCache([CacheSpec("k_full", (1, 1, max_seq, 4), torch.float32),
                    CacheSpec("k_ring", (1, 1, cap, 4), torch.float32, window)], "cpu", max_seq)


def test_pad_room_keeps_every_key_a_later_step_reads():
    cache = ring_and_full()  # ring of 16 slots for a window of 9
    assert cache.pad_room(0, 20) == 7  # the ring: 16 - 9
    assert cache.pad_room(80, 12) == 4  # the end of the cache comes first
    assert cache.pad_room(0, MAX_SEQ) == 0
    # a ring as large as the whole sequence never wraps: only the cache's end bounds the padding
    whole = KVCache([CacheSpec("k", (1, 1, MAX_SEQ, 4), torch.float32, 9)], "cpu", MAX_SEQ)
    assert whole.pad_room(0, 20) == MAX_SEQ - 20


def test_prefill_rows_for_pads_only_short_prefills():
    graphs = CpuGraphs(lambda *a: None, max_rows=8, prefill_rows=64, prefill_step=8)
    assert [graphs.prefill_rows_for(r) for r in (1, 8, 9, 16, 17, 63, 64, 65, 200)] == \
        [1, 8, 16, 16, 24, 64, 64, 65, 200]
    assert CpuGraphs(lambda *a: None, max_rows=8).prefill_rows_for(20) == 20  # prefill graphs off by default


def graphed_session(cm, step: int = 8, **kw):
    session = cm.new_session(1, MAX_SEQ)
    session._step = CpuGraphs(cm._executor, max_rows=8, bound=len(session.cache.tensors), prefill_rows=64,
                              prefill_step=step, **kw)
    return session


def decode(session, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The prompt's logits, then those of `steps` greedy decode steps."""
    out = [session.step(prompt)]
    for _ in range(steps):
        out.append(session.step(out[-1][:, -1:].argmax(-1)))
    return out


@pytest.mark.parametrize("prompt_len", [19, 37])
def test_padded_prefill_changes_nothing_a_caller_sees(tiny_cm, prompt_len):
    """The prompt padded to a multiple of 8 (the tiny model's sliding-window ring wraps: 16 slots): its logits and
    the next 12 steps' are the unpadded run's, and the length counts only the prompt."""
    prompt = torch.randint(0, 512, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    direct = decode(tiny_cm.new_session(1, MAX_SEQ), prompt, 12)
    session = graphed_session(tiny_cm)
    padded = decode(session, prompt, 12)
    assert session.length == prompt_len + 12
    assert padded[0].shape == direct[0].shape
    for a, b in zip(padded, direct):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_padding_past_the_ring_would_corrupt_the_cache(tiny_cm, monkeypatch):
    """The guard matters: allowed to pad 33 rows to 48 (15 padding rows in a ring of 16 slots), the padding overwrites
    keys the next steps read, and their logits change. (So the test above would catch a wrong pad_room.)"""
    prompt = torch.randint(0, 512, (1, 33), generator=torch.Generator().manual_seed(3))
    direct = decode(tiny_cm.new_session(1, MAX_SEQ), prompt, 4)
    monkeypatch.setattr(KVCache, "pad_room", lambda self, start, rows: MAX_SEQ)
    session = graphed_session(tiny_cm, step=16)
    padded = decode(session, prompt, 4)
    torch.testing.assert_close(padded[0], direct[0], rtol=1e-5, atol=1e-5)  # the prompt's own rows are fine
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(padded[1:], direct[1:]))


def test_a_prefill_shape_is_captured_when_seen_again_and_then_replayed(tiny_cm):
    """The first prefill of a padded shape runs directly, the second captures it, the third replays; prompts of
    lengths that pad alike share the graph; decode graphs are kept apart from prefill graphs."""
    session = graphed_session(tiny_cm, max_graphs=1, prefill_graphs=2)
    graphs = session._step
    g = torch.Generator().manual_seed(1)
    results = []
    for length in (21, 22, 24, 17):  # 24, 24, 24, 24 rows
        session.rollback(0)
        prompt = torch.randint(0, 512, (1, length), generator=g)
        results.append((session.step(prompt), tiny_cm.new_session(1, MAX_SEQ).step(prompt)))
    assert (graphs.captures, graphs.replays) == (1, 3)
    for got, want in results:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    session.step(torch.tensor([[5]]))  # a decode step: its own graph, after a first sighting of nothing
    assert graphs.captures == 2 and len(graphs._prefills) == 1 and len(graphs._graphs) == 1


def test_prefill_graph_rows_option():
    assert tilec.Options().prefill_graph_rows == 128
    assert tilec.Options(prefill_graph_rows=0).prefill_graph_rows == 0
    for bad in (-1, True, 8.0):
        with pytest.raises(tilec.TilecError, match="prefill_graph_rows"):
            tilec.Options(prefill_graph_rows=bad)


def test_steps_with_extra_inputs_are_never_padded(tiny_cm):
    """A step with inputs after the caches (a draft's context) is not padded: those inputs' rows would not match."""
    session = graphed_session(tiny_cm)
    calls = []
    inner = session._step

    class Spy:
        prefill_rows_for = inner.prefill_rows_for

        def __call__(self, ids, *rest):
            calls.append(ids.shape[1])
            return tiny_cm._executor(ids, *rest[:1 + len(session.cache.tensors)])

    session._step = Spy()
    prompt = torch.randint(0, 512, (1, 19), generator=torch.Generator().manual_seed(0))
    session.step(prompt, torch.zeros(1))
    session.rollback(0)
    session.step(prompt)
    assert calls == [19, 24]


@pytest.mark.gpu
def test_gpu_padded_prefill_graphs_match_direct_prefills():
    """On the triton target with real CUDA graphs: prompts padded and replayed give the direct run's logits, and the
    decode steps after them read an intact cache."""
    model = build_model("tiny", device="cuda")  # not the shared fixture: other tests want it on the CPU
    graphed = tilec.compile(model, target="triton", options=tilec.Options(max_seq_len=MAX_SEQ))
    direct = tilec.compile(model, target="triton", options=tilec.Options(max_seq_len=MAX_SEQ, prefill_graph_rows=0))
    g = torch.Generator().manual_seed(7)
    for length in (19, 37, 19, 37, 19):
        prompt = torch.randint(0, 512, (1, length), generator=g).cuda()
        got = decode(graphed.new_session(1, MAX_SEQ), prompt, 6)
        want = decode(direct.new_session(1, MAX_SEQ), prompt, 6)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    graphs = graphed._executor
    assert len(graphs._prefills) == 2 and graphs.replays > 0


@pytest.mark.gpu
def test_gpu_dflash_after_a_padded_prefill_graph():
    """DFlash reads the target's hidden states of the prompt (its draft's first context): after a padded, replayed
    prefill they are the prompt's rows only, and greedy DFlash still gives plain decoding's tokens, which are those
    of a model that never pads."""
    from tilec.models.dflash import build_draft

    model = build_model("tiny", device="cuda")  # not the shared fixture: other tests want it on the CPU
    graphed = tilec.compile(model, target="triton", options=tilec.Options(max_seq_len=MAX_SEQ))
    direct = tilec.compile(model, target="triton", options=tilec.Options(max_seq_len=MAX_SEQ, prefill_graph_rows=0))
    draft = build_draft(model, num_hidden_layers=2)
    prompt = torch.randint(0, 512, (1, 21), generator=torch.Generator().manual_seed(9)).cuda()
    want = direct.generate(prompt, 17)
    for _ in range(3):  # direct, captured, replayed
        assert torch.equal(graphed.generate(prompt, 17), want)
        assert torch.equal(graphed.generate(prompt, 17, draft=draft), want)
    assert graphed.graph_captures > 0 and any(graphs._prefills for graphs in
                                               (m._executor for m in (graphed, *graphed._variants.values())))


def test_warmup_leaves_the_first_generation_nothing_to_capture(tiny):
    """warmup() captures a prompt length's prefill, decode and verify graphs on the caches generate() then reuses:
    the first generation of that length captures nothing and replays every step; other lengths still capture."""
    cm = tilec.compile(tiny)
    layout = len(cm.new_session(1, MAX_SEQ).cache.tensors)
    graphs = cm._executor = CpuGraphs(cm.graph, max_rows=8, bound=layout, prefill_rows=64, prefill_step=8)
    assert tilec.compile(tiny).warmup([20]) == 0  # no graphs to capture: the reference target on the CPU
    assert cm.warmup([20], max_seq_len=MAX_SEQ) == 3  # the prompt padded to 24 rows, 1 row, 8 rows
    replays = graphs.replays
    prompt = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(3))
    tokens = cm.generate(prompt, 5, max_seq_len=MAX_SEQ)
    assert graphs.captures == 3 and graphs.replays == replays + 5  # the prefill and 4 decode steps
    assert torch.equal(tokens, tilec.compile(tiny).generate(prompt, 5))
    cm.generate(prompt[:, :12], 2, max_seq_len=MAX_SEQ)  # 16 rows: a shape not warmed up, seen once
    assert graphs.captures == 3
    with pytest.raises(tilec.errors.ShapeError, match="at least 1"):
        cm.warmup([0])


@pytest.mark.gpu
def test_gpu_warmup_captures_what_the_first_generation_replays():
    model = build_model("tiny", device="cuda")  # not the shared fixture: other tests want it on the CPU
    cm = tilec.compile(model, target="triton", options=tilec.Options(max_seq_len=MAX_SEQ))
    assert cm.warmup([20, 5]) == 4  # the 20-token prompt padded to 24 rows, 1, 8 and 5 rows
    captured = cm.graph_captures
    prompt = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4)).cuda()
    tokens = cm.generate(prompt, 6)
    assert cm.graph_captures == captured and cm._executor.replays > 0
    direct = tilec.compile(model, target="triton", options=tilec.Options(max_seq_len=MAX_SEQ, prefill_graph_rows=0))
    assert torch.equal(tokens, direct.generate(prompt, 6))
