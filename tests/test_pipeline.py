"""The pipeline: every stage runnable and equal, verify's checks, pass crashes, dead code, and stage dumps."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.fx as fx
from torch import nn

import tilec
from tilec import ops
from tilec.errors import VerifyError
from tilec.graph import copy_graph_module, example_meta_inputs, op_counts, propagate_meta
from tilec.passes import dead_code
from tilec.passmanager import Pass, PassContext, StageRecord, run_pipeline
from tilec.runtime.kv_cache import CacheSpec
from tilec.verify import verify

from conftest import new_caches, random_ids, rel_err, run_eager


def run_steps(gm, model, steps: list[torch.Tensor], max_len: int = 48):
    """Run ``gm`` over consecutive steps from position 0 with a fresh cache; returns every step's logits."""
    batch = steps[0].shape[0]
    caches, pos, out = new_caches(model, batch, max_len), 0, []
    for ids in steps:
        with torch.no_grad():
            out.append(gm(ids, torch.full((batch,), pos, dtype=torch.long), *caches))
        pos += ids.shape[1]
    return out, caches


def first_record(gm) -> StageRecord:
    return StageRecord("capture", gm, dict(gm.meta["tilec_capture_stats"]), 0.0)


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


# ------------------------------------------------------------------------------------------ stages are runnable
def test_every_stage_runs_and_gives_the_same_logits(tiny, tiny_cm):
    vocab = tiny.config.vocab_size
    steps = [random_ids(2, 7, vocab, seed=20)] + [random_ids(2, 1, vocab, seed=21 + i) for i in range(3)]
    eager_caches, want, pos = new_caches(tiny, 2, 48), [], 0
    for ids in steps:
        logits, eager_caches = run_eager(tiny, ids, pos, eager_caches)
        want.append(logits)
        pos += ids.shape[1]
    assert list(tiny_cm.stages) == [r.name for r in tiny_cm.records]
    assert list(tiny_cm.stages)[0] == "capture" and len(tiny_cm.stages) >= 2
    for name, gm in tiny_cm.stages.items():
        got, caches = run_steps(gm, tiny, steps)
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"stage {name}: rel err {rel_err(g, w):.3g}"
        for c, e in zip(caches, eager_caches):
            assert torch.equal(c, e), f"stage {name}: cache differs"
        verify(gm, name)  # each kept stage still satisfies the invariants


def test_stages_are_separate_copies_sharing_weights(tiny_cm):
    graphs = list(tiny_cm.stages.values())
    assert graphs[0] is not graphs[1] and graphs[0].graph is not graphs[1].graph
    assert graphs[0].get_submodule("model.embed_tokens").weight is graphs[1].get_submodule(
        "model.embed_tokens").weight


# ----------------------------------------------------------------------------------------------------- verify
def test_verify_rejects_a_non_tilec_node(tiny_cm):
    gm = copy_graph_module(tiny_cm.stages["capture"])
    q = node(gm, "l0_q_proj")
    with gm.graph.inserting_after(q):
        relu = gm.graph.call_function(torch.relu, (q,))
    q.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not relu)
    relu.meta["val"] = q.meta["val"]
    gm.recompile()
    with pytest.raises(VerifyError) as err:
        verify(gm, "my_stage")
    msg = str(err.value)
    assert "my_stage" in msg and f"%{relu.name}" in msg and "relu" in msg and "not a tilec op" in msg


def test_verify_rejects_a_method_call(tiny_cm):
    gm = copy_graph_module(tiny_cm.stages["capture"])
    q = node(gm, "l0_q_proj")
    with gm.graph.inserting_after(q):
        neg = gm.graph.call_method("neg", (q,))
    q.replace_all_uses_with(neg, delete_user_cb=lambda user: user is not neg)
    neg.meta["val"] = q.meta["val"]
    gm.recompile()
    with pytest.raises(VerifyError, match=rf"after stage 'methods': node %{neg.name} \(Tensor.neg\)"):
        verify(gm, "methods")


def test_verify_rejects_a_wrong_recorded_shape(tiny_cm):
    gm = copy_graph_module(tiny_cm.stages["capture"])
    q = node(gm, "l0_q_proj")
    right = q.meta["val"]
    q.meta["val"] = torch.empty((*right.shape[:-1], right.shape[-1] + 1), dtype=right.dtype, device="meta")
    with pytest.raises(VerifyError) as err:
        verify(gm, "shapes")
    msg = str(err.value)
    assert "after stage 'shapes'" in msg and "%l0_q_proj" in msg and "tilec.linear" in msg
    assert "f32[1, 1, 129]" in msg and "f32[1, 1, 128]" in msg, msg


def test_verify_rejects_a_wrong_recorded_dtype_and_a_missing_shape(tiny_cm):
    gm = copy_graph_module(tiny_cm.stages["capture"])
    n = node(gm, "l1_o_proj")
    n.meta["val"] = torch.empty(n.meta["val"].shape, dtype=torch.bfloat16, device="meta")
    with pytest.raises(VerifyError, match=r"%l1_o_proj .*recorded bf16\[1, 1, 64\] but computes f32\[1, 1, 64\]"):
        verify(gm, "dtypes")
    gm = copy_graph_module(tiny_cm.stages["capture"])
    del node(gm, "l2_add").meta["val"]
    with pytest.raises(VerifyError, match=r"after stage 'meta': node %l2_add .*meta\['val'\]"):
        verify(gm, "meta")


def test_verify_accepts_the_captured_graph(tiny_cm):
    verify(copy_graph_module(tiny_cm.stages["capture"]), "capture")


# ------------------------------------------------------------------------------------------------ pass manager
def test_a_crashing_pass_is_reported_naming_the_pass(tiny_cm):
    gm = tiny_cm.stages["capture"]

    def explode(g, ctx):
        raise KeyError("no such node")

    passes = [Pass("dead_code", dead_code.run), Pass("explode", explode)]
    with pytest.raises(VerifyError, match=r"pass 'explode' failed: KeyError") as err:
        run_pipeline(gm, passes, PassContext(tilec.Options()), first=first_record(gm))
    assert isinstance(err.value.__cause__, KeyError)


def test_a_pass_that_breaks_the_graph_is_caught_by_verify(tiny_cm):
    gm = tiny_cm.stages["capture"]

    def add_relu(g, ctx):
        q = node(g, "l0_q_proj")
        with g.graph.inserting_after(q):
            relu = g.graph.call_function(torch.relu, (q,))
        q.replace_all_uses_with(relu, delete_user_cb=lambda user: user is not relu)
        return {"inserted": 1}

    passes = [Pass("sneaky_relu", add_relu)]
    with pytest.raises(VerifyError, match=r"after stage 'sneaky_relu': node %relu .*not a tilec op"):
        run_pipeline(gm, passes, PassContext(tilec.Options()), first=first_record(gm))
    # With verification off the same pass goes through (verify is what caught it).
    records = run_pipeline(gm, passes, PassContext(tilec.Options(verify=False)), first=first_record(gm))
    assert [r.name for r in records] == ["capture", "sneaky_relu"] and records[1].stats == {"inserted": 1}
    # The input stage was not touched: each pass works on its own copy.
    assert "relu" not in [n.name for n in gm.graph.nodes]


def _k_proj_reads_q_weight(g, ctx):
    """A buggy pass: a well-formed graph whose shapes no longer fit (k_proj now has q_proj's weight)."""
    k = node(g, "l0_k_proj")
    k.args = (k.args[0], next(n for n in g.graph.nodes if n.op == "get_attr"
                              and n.target == "model.layers.0.self_attn.q_proj.weight"), None)
    return {}


def _use_before_definition(g, ctx):
    """A buggy pass: a node reads a weight defined later in the graph (not topologically ordered)."""
    q = node(g, "l0_q_proj")
    q.args = (q.args[0], next(n for n in g.graph.nodes if n.op == "get_attr" and n.target == "lm_head.weight"), None)
    return {}


@pytest.mark.parametrize("broken", [_k_proj_reads_q_weight, _use_before_definition])
def test_a_pass_that_leaves_a_broken_graph_is_reported_naming_the_pass(tiny_cm, broken):
    gm = tiny_cm.stages["capture"]
    with pytest.raises(VerifyError, match="buggy_pass"):
        run_pipeline(gm, [Pass("buggy_pass", broken)], PassContext(tilec.Options()), first=first_record(gm))


def test_pipeline_records_stats_and_progress(tiny_cm):
    gm = tiny_cm.stages["capture"]
    seen = []
    passes = [Pass("dead_code", dead_code.run, "doc a"), Pass("again", dead_code.run, "doc b")]
    records = run_pipeline(gm, passes, PassContext(tilec.Options()), first=first_record(gm),
                           progress=lambda name, i, n: seen.append((name, i, n)))
    assert seen == [("dead_code", 1, 2), ("again", 2, 2)]
    assert [(r.name, r.doc, r.stats) for r in records[1:]] == [("dead_code", "doc a", {"removed": 0}),
                                                             ("again", "doc b", {"removed": 0})]
    assert records[2].op_counts == dict(op_counts(gm))


# ------------------------------------------------------------------------------------------------- dead code
class CacheWriter(nn.Module):
    """A user decoder whose attention result is unused (it only fills the cache) and with a pure unused branch."""

    vocab, hidden, heads, head_dim, v_head_dim = 32, 16, 2, 8, 8

    def __init__(self):
        super().__init__()
        h = self.hidden
        self.embed = nn.Embedding(self.vocab, h)
        self.q = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.v = nn.Linear(h, self.heads * self.v_head_dim, bias=False)
        self.unused = nn.Linear(h, h)
        self.head = nn.Linear(h, self.vocab, bias=False)

    def cache_layout(self, batch, max_seq_len, spec_rows=8):
        return [CacheSpec("k_cache_0", (batch, self.heads, max_seq_len, self.head_dim), torch.float32),
                CacheSpec("v_cache_0", (batch, self.heads, max_seq_len, self.v_head_dim), torch.float32)]

    def forward(self, input_ids, start_pos, kv_caches):
        x = self.embed(input_ids)
        ops.attention(self.q(x), self.k(x), self.v(x), kv_caches[0], kv_caches[1], start_pos, None, self.heads,
                      self.head_dim, self.v_head_dim, 0, self.head_dim ** -0.5, 1.0)
        self.unused(x)
        return self.head(x)


def test_dead_code_keeps_cache_writes_and_drops_pure_unused_work(tmp_path):
    torch.manual_seed(0)
    model = CacheWriter().eval()
    cm = tilec.compile(model, options=tilec.Options(max_seq_len=16))
    assert cm.info.kind == "decoder"
    capture, final = cm.stages["capture"], cm.graph
    assert capture.meta["tilec_capture_stats"]["linear"] == 5  # q, k, v, unused, head were all rewritten
    for gm in (capture, final):
        assert op_counts(gm) == {"tilec.embedding": 1, "tilec.linear": 4, "tilec.attention": 1}

    # Now give dead_code something to remove: unused pure ops hanging off the captured graph.
    gm = copy_graph_module(capture)
    x = node(gm, "embed")
    w = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "head.weight")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        lin = gm.graph.call_function(ops.linear, (x, w, None))
        gm.graph.call_function(ops.add, (lin, lin))
    gm.recompile()
    propagate_meta(gm, example_meta_inputs(gm))
    records = run_pipeline(gm, [Pass("dead_code", dead_code.run)], PassContext(tilec.Options()),
                           first=first_record(gm))
    assert op_counts(gm) == {"tilec.embedding": 1, "tilec.linear": 5, "tilec.attention": 1, "tilec.add": 1}
    after = records[-1]
    assert after.stats == {"removed": 2}
    assert after.op_counts == {"tilec.embedding": 1, "tilec.linear": 4, "tilec.attention": 1}

    # The kept attention still writes the cache: positions 0..4 hold the keys and scaled values of the prompt.
    ids = random_ids(1, 5, CacheWriter.vocab, seed=30)
    for graph in (gm, after.graph):
        caches = new_caches(model, 1, 16)
        with torch.no_grad():
            logits = graph(ids, torch.zeros(1, dtype=torch.long), *caches)
            want_k = model.k(model.embed(ids)).view(1, 5, 2, 8).transpose(1, 2)
            want_v = model.v(model.embed(ids)).view(1, 5, 2, 8).transpose(1, 2)
            want_logits = model.head(model.embed(ids))
        assert rel_err(caches[0][:, :, :5], want_k) < 1e-6 and rel_err(caches[1][:, :, :5], want_v) < 1e-6
        assert torch.equal(caches[0][:, :, 5:], torch.zeros_like(caches[0][:, :, 5:]))
        assert torch.equal(logits, want_logits)


def test_dead_code_on_a_raw_graph_keeps_outputs_and_mutations():
    """dead_code as a pure graph -> graph function, before and after on the same inputs."""

    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8), requires_grad=False)

        def forward(self, x, start_pos, k_cache, v_cache):
            unused = ops.linear(x, self.w, None)  # noqa: F841 - dead on purpose
            ops.attention(x, x, x, k_cache, v_cache, start_pos, None, 1, 8, 8, 0, 0.5, 1.0)
            return ops.add(x, x)

    torch.manual_seed(1)
    gm = fx.symbolic_trace(Raw())
    assert op_counts(gm) == {"tilec.linear": 1, "tilec.attention": 1, "tilec.add": 1}
    x = torch.randn(1, 3, 8)

    def args():
        return x, torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)

    before_args, after_args = args(), args()
    before = gm(*before_args)
    stats = dead_code.run(gm)
    assert stats == {"removed": 2}  # the linear and its weight's get_attr
    assert op_counts(gm) == {"tilec.attention": 1, "tilec.add": 1}
    after = gm(*after_args)
    assert torch.equal(before, after)
    assert torch.equal(before_args[2], after_args[2]) and before_args[2][:, :, :3].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------- dumping
def check_dump(directory, stages: list[str]) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "tilec-artifact/1" and manifest["stages"] == stages
    assert manifest["target"] == "reference"
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    assert sorted(manifest["files"] + ["manifest.json"]) == files
    for name in ("report.md", "report.json"):
        assert (directory / name).stat().st_size > 0
    report = json.loads((directory / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == stages
    for i, stage in enumerate(stages):
        txt = (directory / "stages" / f"{i:02d}_{stage}.txt").read_text()
        assert txt.startswith(f"# stage {i}: {stage}") and "tilec.attention(" in txt
        code = (directory / "stages" / f"{i:02d}_{stage}.py").read_text()
        compile(code, f"{stage}.py", "exec")  # valid Python
        assert re.search(r"def forward\(self, input_ids\b.*, start_pos\b.*, k_cache_0, v_cache_0", code)
        assert "torch.ops.tilec.attention" in code
    assert "tilec compile report" in (directory / "report.md").read_text()


def test_dump_dir_option_writes_every_stage(tiny, tmp_path):
    out = tmp_path / "dump"
    cm = tilec.compile(tiny, options=tilec.Options(dump_dir=out, max_seq_len=32))
    assert cm.saved_to == out.resolve()
    check_dump(out, list(cm.stages))


def test_tilec_dump_environment_variable_writes_every_stage(tiny, tmp_path, monkeypatch):
    out = tmp_path / "from_env"
    monkeypatch.setenv("TILEC_DUMP", str(out))
    cm = tilec.compile(tiny)
    assert cm.options.dump_dir == out
    check_dump(out, list(cm.stages))


def test_no_dump_without_option_or_environment(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("TILEC_DUMP", raising=False)
    monkeypatch.chdir(tmp_path)
    cm = tilec.compile(tiny, options=tilec.Options.from_env(max_seq_len=32))
    assert cm.saved_to is None and list(tmp_path.iterdir()) == []
