"""capture: a model -> an FX graph of tilec ops, with shapes, readable names, and errors that point at user code."""

from __future__ import annotations

import inspect
import operator
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import tilec
from tilec.errors import UnsupportedError
from tilec.graph import op_counts
from tilec.models import build_model
from tilec.ops import op_name

from conftest import new_caches, random_ids, rel_err, run_eager

THIS_FILE = __file__


def line_of(fn, needle: str) -> int:
    """The line number in this file of the first line of ``fn`` that contains ``needle``."""
    lines, first = inspect.getsourcelines(fn)
    for i, text in enumerate(lines):
        if needle in text:
            return first + i
    raise AssertionError(f"{needle!r} not in {fn.__qualname__}")


# ------------------------------------------------------------------------------------------- MiMo vs eager
@pytest.fixture(scope="module")
def tiny_gm(tiny):
    return tilec.capture(tiny, batch=2, rows=5, max_seq_len=48)


def test_captured_graph_equals_eager_over_prefill_and_decode(tiny, tiny_gm):
    batch, max_len, vocab = 2, 48, tiny.config.vocab_size
    graph_caches = new_caches(tiny, batch, max_len)
    eager_caches = new_caches(tiny, batch, max_len)
    # Prefill 12 tokens (longer than the 9-key window and the 16-slot ring), then 6 decode steps.
    steps = [random_ids(batch, 12, vocab, seed=1)] + [random_ids(batch, 1, vocab, seed=10 + i) for i in range(6)]
    pos = 0
    for ids in steps:
        start = torch.full((batch,), pos, dtype=torch.long)
        with torch.no_grad():
            got = tiny_gm(ids, start, *graph_caches)
        want, eager_caches = run_eager(tiny, ids, pos, eager_caches)
        assert got.shape == (batch, ids.shape[1], vocab)
        assert torch.equal(got, want), f"logits differ at position {pos}: rel err {rel_err(got, want):.3g}"
        for i, (g, e) in enumerate(zip(graph_caches, eager_caches)):
            assert torch.equal(g, e), f"cache tensor {i} differs after position {pos}"
        pos += ids.shape[1]
    assert all(c.abs().sum() > 0 for c in graph_caches)  # every layer's cache was written


def test_every_node_is_a_tilec_op_with_real_shapes(tiny, tiny_gm):
    """meta['val'] (from the fake implementations) equals what a real run at the capture's batch/rows produces."""
    gi = tiny_gm.meta["tilec"]
    assert (gi.kind, gi.batch, gi.rows, gi.max_seq_len) == ("decoder", 2, 5, 48)
    for n in tiny_gm.graph.nodes:
        if n.op == "call_function":
            assert op_name(n.target) is not None or n.target is operator.getitem, n.format_node()
        else:
            assert n.op in ("placeholder", "get_attr", "output"), n.format_node()

    real: dict[str, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            real[n.name] = out
            return out

    ids = random_ids(gi.batch, gi.rows, tiny.config.vocab_size, seed=2)
    start = torch.full((gi.batch,), 3, dtype=torch.long)
    with torch.no_grad():
        Recorder(tiny_gm).run(ids, start, *new_caches(tiny, gi.batch, gi.max_seq_len))

    def same(meta, value) -> bool:
        if isinstance(meta, torch.Tensor):
            return isinstance(value, torch.Tensor) and meta.shape == value.shape and meta.dtype == value.dtype
        return len(meta) == len(value) and all(same(m, v) for m, v in zip(meta, value))

    checked = 0
    for n in tiny_gm.graph.nodes:
        if n.op == "output":
            continue
        assert "val" in n.meta, f"%{n.name} has no meta['val']"
        if isinstance(n.meta["val"], torch.Tensor):
            assert n.meta["val"].device.type == "meta", n.name  # from the fake implementations, not a real run
        assert same(n.meta["val"], real[n.name]), f"%{n.name}: meta {n.meta['val']} vs real {real[n.name]}"
        checked += 1
    assert checked > 100
    logits = next(n for n in tiny_gm.graph.nodes if n.op == "output").args[0]
    assert tuple(logits.meta["val"].shape) == (2, 5, tiny.config.vocab_size)


def test_placeholders_and_node_names(tiny, tiny_gm):
    placeholders = [n.name for n in tiny_gm.graph.nodes if n.op == "placeholder"]
    layers = tiny.config.num_hidden_layers
    assert placeholders == ["input_ids", "start_pos"] + [f"{kv}_cache_{i}" for i in range(layers) for kv in "kv"]
    assert [n.target for n in tiny_gm.graph.nodes if n.op == "placeholder"] == placeholders
    names = {n.name: n for n in tiny_gm.graph.nodes}
    expected = {
        "embed_tokens": "embedding", "l0_input_layernorm": "rms_norm", "l0_q_proj": "linear",
        "l0_k_proj": "linear", "l0_v_proj": "linear", "l0_q_proj_rope": "rope", "l0_k_proj_rope": "rope",
        "l0_self_attn_attention": "attention", "l0_o_proj": "linear", "l0_mlp_silu_mul": "silu_mul",
        "l1_q_proj": "linear", "l3_self_attn_attention": "attention", "lm_head": "linear",
    }
    for name, op in expected.items():
        assert name in names, f"no node {name}; nodes: {sorted(names)}"
        assert op_name(names[name].target) == op
    # The generated code reads the same names, and the caches keep the order the model declared.
    assert "def forward(self, input_ids" in tiny_gm.code and "k_cache_0, v_cache_0, k_cache_1" in tiny_gm.code
    attention = [n for n in tiny_gm.graph.nodes if op_name(n.target) == "attention"]
    assert [(a.args[3].name, a.args[4].name) for a in attention] == [(f"k_cache_{i}", f"v_cache_{i}")
                                                                     for i in range(layers)]


def test_capture_at_other_batch_and_rows_runs_like_eager(tiny, eager):
    """The graph is annotated for one batch/rows but runs at others (same ops); a batch of 3, 7 rows."""
    gm = tilec.capture(tiny, batch=3, rows=7, max_seq_len=32)
    placeholder = {n.name: n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"}
    assert tuple(placeholder["input_ids"].shape) == (3, 7) and tuple(placeholder["start_pos"].shape) == (3,)
    assert tuple(placeholder["k_cache_0"].shape) == (3, 1, 32, 32)  # full layer: max_seq_len slots
    assert tuple(placeholder["v_cache_1"].shape) == (3, 2, 9 - 1 + 8, 16)  # SWA ring: window - 1 + spec_rows
    ids = random_ids(1, 4, tiny.config.vocab_size, seed=3)
    caches = new_caches(tiny, 1, 32)
    with torch.no_grad():
        got = gm(ids, torch.full((1,), 0, dtype=torch.long), *caches)
    want, _ = eager(tiny, ids, 0, max_len=32)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- user modules
class GatedLM(nn.Module):
    """A user model written with plain torch: nn.Embedding, nn.Linear, +, F.silu(a) * b, torch.argmax."""

    def __init__(self, vocab: int = 40, hidden: int = 16, inner: int = 24):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = x + self.proj(x)
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return torch.argmax(self.head(x), dim=-1)


class EmbedLinearLM(nn.Module):
    def __init__(self, vocab: int = 40, hidden: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        return self.head(self.proj(self.embed(input_ids)))


def test_user_module_with_embedding_and_linear_is_captured():
    torch.manual_seed(0)
    model = EmbedLinearLM().eval()
    gm = tilec.capture(model, batch=2, rows=6)
    assert gm.meta["tilec"].kind == "plain"
    assert gm.meta["tilec_capture_stats"] == {"add": 0, "linear": 2, "embedding": 1, "silu_mul": 0, "cat": 0, "argmax": 0}
    assert op_counts(gm) == {"tilec.linear": 2, "tilec.embedding": 1}
    ids = random_ids(2, 6, 40, seed=4)
    with torch.no_grad():
        assert torch.equal(gm(ids), model(ids))


def test_user_module_glue_is_rewritten_into_tilec_ops():
    torch.manual_seed(0)
    model = GatedLM().eval()
    gm = tilec.capture(model, batch=2, rows=6)
    assert gm.meta["tilec_capture_stats"] == {"add": 2, "linear": 5, "embedding": 1, "silu_mul": 1, "cat": 0, "argmax": 1}
    assert op_counts(gm) == {"tilec.linear": 5, "tilec.embedding": 1, "tilec.add": 2, "tilec.silu_mul": 1,
                             "tilec.argmax": 1}
    ids = random_ids(2, 6, 40, seed=5)
    with torch.no_grad():
        assert torch.equal(gm(ids), model(ids))


class GeluBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, hidden)

    def forward(self, x):
        return F.gelu(self.fc(x))


class GeluLM(nn.Module):
    def __init__(self, vocab: int = 30, hidden: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList([GeluBlock(hidden)])
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids):
        return self.head(self.blocks[0](self.embed(input_ids)))


def test_unsupported_op_names_the_op_and_module():
    with pytest.raises(UnsupportedError) as err:
        tilec.capture(GeluLM())
    msg = str(err.value)
    assert "gelu" in msg and "'blocks.0'" in msg
    assert "1 call(s)" in msg  # only the gelu: embedding and linear were rewritten
    assert "F.linear" in msg  # says what is supported instead


def test_unsupported_op_names_the_file_and_line_of_the_call():
    with pytest.raises(UnsupportedError) as err:
        tilec.capture(GeluLM())
    line = line_of(GeluBlock.forward, "F.gelu")
    assert re.search(rf"test_capture\.py(:|, line ){line}\b", str(err.value)), str(err.value)
    assert "torch/fx" not in str(err.value)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return x


class BranchingLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.branch = DataDependent()

    def forward(self, input_ids):
        return self.branch(self.embed(input_ids))


def test_data_dependent_control_flow_names_module_and_line():
    with pytest.raises(UnsupportedError) as err:
        tilec.capture(BranchingLM())
    msg = str(err.value)
    line = line_of(DataDependent.forward, "x.sum() > 0")
    assert "'branch'" in msg, msg
    assert f"test_capture.py:{line}" in msg, msg
    assert "control flow" in msg


def test_decoder_forward_must_take_three_arguments():
    class BadDecoder(nn.Module):
        def cache_layout(self, batch, max_seq_len, spec_rows=8):
            return []

        def forward(self, input_ids, start_pos):
            return input_ids

    with pytest.raises(UnsupportedError, match=r"forward\(input_ids, start_pos, kv_caches\)"):
        tilec.capture(BadDecoder())


def test_non_module_is_refused():
    with pytest.raises(UnsupportedError, match="torch.nn.Module"):
        tilec.capture(lambda ids: ids)


# ------------------------------------------------------------------------------------- full-size presets on meta
def _design_full_layers(preset: str, layers: int) -> set[int]:
    if preset == "v2-flash":  # layer 0 and every 6th layer, (i + 1) % 6 == 0
        return {i for i in range(layers) if i == 0 or (i + 1) % 6 == 0}
    return {0, 7, 15, 23, 31, 39, 47, 55, 62, 69}


@pytest.mark.parametrize("preset, layers, hidden, heads, kv_full, spec_rows", [
    ("v2-flash", 48, 4096, 64, 4, 8),
    ("v2.5-pro", 70, 6144, 128, 8, 4),
])
def test_full_size_presets_capture_on_meta(preset, layers, hidden, heads, kv_full, spec_rows):
    model = build_model(preset)
    assert next(model.parameters()).device.type == "meta"
    batch, rows, max_len = 2, 3, 2048
    gm = tilec.capture(model, batch=batch, rows=rows, max_seq_len=max_len, spec_rows=spec_rows)
    counts = op_counts(gm)
    assert counts["tilec.attention"] == layers
    assert counts["tilec.moe_router"] == counts["tilec.moe_experts"] == layers - 1
    assert counts["tilec.silu_mul"] == 1 and counts["tilec.embedding"] == 1

    ph = {n.name: n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"}
    assert len(ph) == 2 + 2 * layers
    full = _design_full_layers(preset, layers)
    ring = 129 - 1 + spec_rows  # window of 128 past keys + the query, plus the speculative rows
    for i in range(layers):
        kv, slots = (kv_full, max_len) if i in full else (2 * kv_full, ring)
        assert tuple(ph[f"k_cache_{i}"].shape) == (batch, kv, slots, 192), i
        assert tuple(ph[f"v_cache_{i}"].shape) == (batch, kv, slots, 128), i
        assert ph[f"k_cache_{i}"].dtype == torch.bfloat16

    attention = [n for n in gm.graph.nodes if op_name(n.target) == "attention"]
    for i, node in enumerate(attention):
        assert tuple(node.meta["val"].shape) == (batch, rows, heads * 128)
        assert node.args[10] == (0 if i in full else 129)  # window
        assert (node.args[6] is None) == (i in full)  # sinks on SWA layers only
    logits = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(logits.meta["val"].shape) == (batch, rows, 152576) and logits.meta["val"].dtype == torch.bfloat16
    experts = next(n for n in gm.graph.nodes if op_name(n.target) == "moe_experts")
    assert tuple(experts.meta["val"].shape) == (batch, rows, hidden)
