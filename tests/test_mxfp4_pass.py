"""The mxfp4_experts pass: MoE experts lowered to `mxfp4_moe_experts`, everything else untouched, its stats, the
options and CLI that turn it on, and the report section. The graph is run before and after the pass on the same
inputs: after it, the model computes exactly what the original graph computes on the dequantised expert weights,
and its logits differ from the unquantised model's by the (reported, bounded) quantisation error."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import tilec
from tilec import cost, mxfp4
from tilec.cli import main
from tilec.errors import QuantizationError, TilecError
from tilec.graph import copy_graph_module, op_counts
from tilec.models import build_model
from tilec.models.mxfp4_experts import MXFP4Experts
from tilec.passes import mxfp4_experts
from tilec.passmanager import PassContext

from conftest import MIMO_FILE, new_caches, random_ids, rel_err

EXPERT_ATTRS = ("gate_up_proj", "down_proj")


def compile_tiny(model, **options):
    return tilec.compile(model, options=tilec.Options(max_seq_len=64, **options))


def stage_pair(cm):
    """(graph before the mxfp4_experts stage, graph after it, its record)."""
    names = [r.name for r in cm.records]
    i = names.index("mxfp4_experts")
    return cm.records[i - 1].graph, cm.records[i].graph, cm.records[i]


def run_graph(gm, model, ids, start: int = 0, caches=None):
    caches = caches if caches is not None else new_caches(model, ids.shape[0], 48)
    with torch.no_grad():
        return gm(ids, torch.full((ids.shape[0],), start, dtype=torch.long), *caches), caches


def attr(gm, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def expert_modules(gm) -> list[str]:
    return sorted({n.target.rpartition(".")[0] for n in gm.graph.nodes
                   if n.op == "get_attr" and n.target.endswith(EXPERT_ATTRS)})


def with_dequantised_experts(before, after):
    """A copy of the graph ``before`` whose expert weights are replaced by the dequantised MXFP4 copies the pass
    made (what the pass promises to compute, exactly)."""
    gm = copy_graph_module(before)  # its own modules, sharing the tensors
    for module in expert_modules(before):
        for name in EXPERT_ATTRS:
            original = attr(before, f"{module}.{name}")
            q = mxfp4.MXFP4Tensor(attr(after, f"{module}.{name}_blocks"), attr(after, f"{module}.{name}_scales"),
                                  tuple(original.shape))
            setattr(gm.get_submodule(module), name, torch.nn.Parameter(mxfp4.dequantize(q, original.dtype),
                                                                       requires_grad=False))
    return gm


@pytest.fixture(scope="module", params=mxfp4.SCALE_RULES)
def lowered(request, tiny):
    return request.param, compile_tiny(tiny, mxfp4=True, mxfp4_scale_rule=request.param)


# ----------------------------------------------------------------------------------------------- the invariant
@pytest.mark.parametrize("seed", [0, 1])
def test_after_the_pass_the_graph_is_the_original_on_dequantised_experts(lowered, tiny, seed):
    _, cm = lowered
    before, after, _ = stage_pair(cm)
    reference = with_dequantised_experts(before, after)
    vocab = tiny.config.vocab_size
    prompt, step = random_ids(2, 9, vocab, seed), random_ids(2, 1, vocab, seed + 100)
    got, caches = run_graph(after, tiny, prompt)
    want, want_caches = run_graph(reference, tiny, prompt)
    assert torch.equal(got, want)
    got2, _ = run_graph(after, tiny, step, 9, caches)  # a decode step on the caches the prefill wrote
    want2, _ = run_graph(reference, tiny, step, 9, want_caches)
    assert torch.equal(got2, want2)


def test_logits_error_against_the_unquantised_model_is_small(lowered, tiny, tiny_cm):
    rule, cm = lowered
    ids = random_ids(2, 16, tiny.config.vocab_size, seed=5)
    err = rel_err(cm(ids), tiny_cm(ids))
    print(f"tiny fp32, MXFP4 experts ({rule}): logits relative error {err:.4f}")
    assert 1e-3 < err < 0.05  # measured 0.016 (floor), 0.020 (ceil); zero would mean nothing was quantised


def test_only_the_experts_change(lowered):
    _, cm = lowered
    before, after, record = stage_pair(cm)
    counts_before, counts_after = op_counts(before), op_counts(after)
    moe = counts_before.pop("tilec.moe_experts")
    assert moe == 3 and counts_after.pop("tilec.mxfp4_moe_experts") == moe
    assert "tilec.moe_experts" not in counts_after and counts_after == counts_before
    old = {n.target for n in before.graph.nodes if n.op == "get_attr"}
    new = {n.target for n in after.graph.nodes if n.op == "get_attr"}
    experts = {t for t in old if t.endswith(EXPERT_ATTRS)}
    assert len(experts) == 6
    assert old - new == experts
    assert new - old == {f"{t}_{part}" for t in experts for part in ("blocks", "scales")}
    for target in old & new:  # attention, dense MLP, routers, norms, embeddings, lm_head: the very same tensors
        assert attr(after, target) is attr(before, target), target
    for target in new - old:
        assert attr(after, target).dtype == torch.uint8
    for module in expert_modules(before):  # the originals are gone from this stage, kept in the earlier one
        assert not hasattr(after.get_submodule(module), "gate_up_proj")
        assert hasattr(before.get_submodule(module), "gate_up_proj")


def test_stats_record_bytes_and_per_layer_error(lowered):
    rule, cm = lowered
    before, after, record = stage_pair(cm)
    stats = record.stats
    json.dumps(stats)  # serialisable as it is
    e, h, i = 8, 64, 32
    fp32, mx = 4 * (e * 2 * i * h + e * h * i), e * 2 * i * (h // 2 + h // 32) + e * h * (i // 2 + i // 32)
    assert (stats["quantized"], stats["kept"], stats["scale_rule"]) == (3, 0, rule)
    assert (stats["bytes_before"], stats["bytes_after"]) == (3 * fp32, 3 * mx)
    assert [d["module"] for d in stats["layers"]] == [f"model.layers.{n}.mlp.experts" for n in (1, 2, 3)]
    for d in stats["layers"]:
        gate_up, down = (attr(before, f"{d['module']}.{n}") for n in EXPERT_ATTRS)
        q_gu, q_d = (mxfp4.MXFP4Tensor(attr(after, f"{d['module']}.{n}_blocks"),
                                       attr(after, f"{d['module']}.{n}_scales"), tuple(w.shape))
                     for n, w in zip(EXPERT_ATTRS, (gate_up, down)))
        assert d["rel_err_gate_up"] == pytest.approx(mxfp4.relative_error(gate_up, q_gu), rel=1e-5)
        assert d["rel_err_down"] == pytest.approx(mxfp4.relative_error(down, q_d), rel=1e-5)
        assert min(d["rel_err_gate_up"], d["rel_err_down"]) <= d["rel_err"] <= max(d["rel_err_gate_up"],
                                                                                    d["rel_err_down"])
        assert 0.05 < d["rel_err"] < 0.15 and d["status"] == "quantized" and d["dtype"] == "float32"
        assert (d["bytes_before"], d["bytes_after"]) == (fp32, mx)
    assert stats["max_rel_err"] == max(d["rel_err"] for d in stats["layers"])


def test_report_counts_parameters_and_only_touched_expert_bytes(lowered, tiny_cm):
    _, cm = lowered
    assert cm.report["parameters"] == tiny_cm.report["parameters"]  # blocks hold two parameters per byte
    assert cm.report["weight_bytes"]["uint8"] == stage_pair(cm)[2].stats["bytes_after"]
    node = next(n for n in cm.graph.graph.nodes if n.name == "l1_experts_mxfp4_moe_experts")
    weights, kv = cost.node_step_bytes(node, 256)
    assert (weights, kv) == (stage_pair(cm)[2].stats["layers"][0]["bytes_after"] * 2 // 8, 0)  # top-2 of 8 experts


# --------------------------------------------------------------------------------------- pre-quantised models
def test_pre_quantised_layers_are_kept_as_they_are(tiny, tiny_cm):
    quantised = mxfp4.quantize_model_experts(tiny)
    assert isinstance(quantised.model.layers[2].mlp.experts, MXFP4Experts)
    assert type(tiny.model.layers[2].mlp.experts).__name__ == "MiMoExperts"  # the original is untouched
    assert quantised.model.layers[0].self_attn.q_proj.weight is tiny.model.layers[0].self_attn.q_proj.weight
    cm = compile_tiny(quantised, mxfp4=True)
    before, after, record = stage_pair(cm)
    stats = record.stats
    assert (stats["quantized"], stats["kept"]) == (0, 3)
    assert [d["status"] for d in stats["layers"]] == ["kept"] * 3 and stats["max_rel_err"] is None
    assert stats["bytes_before"] == stats["bytes_after"] == 3 * stats["layers"][0]["bytes_after"]
    buffers = dict(quantised.named_buffers())
    for n in after.graph.nodes:
        if n.op == "get_attr" and n.target.endswith(("_blocks", "_scales")):
            assert attr(after, n.target) is buffers[n.target]  # never re-quantised
    ids = random_ids(1, 7, tiny.config.vocab_size, seed=6)
    from_pass = compile_tiny(tiny, mxfp4=True)(ids)
    assert torch.equal(cm(ids), from_pass)
    assert torch.equal(compile_tiny(quantised)(ids), from_pass)  # no --mxfp4 needed to run an MXFP4 model
    with torch.no_grad():  # and the eager module computes the same
        # caches of the capacity cm(ids) makes (the prompt's length): the attention's sums then have the same
        # lengths (a longer cache adds exact zeros, but BLAS may block its sums differently: 1 ulp on an AMD EPYC)
        eager = quantised(ids, torch.zeros(1, dtype=torch.long), new_caches(quantised, 1, ids.shape[1]))
    assert torch.equal(eager, from_pass)


def test_mixed_models_quantise_the_rest(tiny):
    model = mxfp4.quantize_model_experts(tiny)
    model.model.layers[2].mlp.experts = tiny.model.layers[2].mlp.experts  # back to the float experts
    stats = stage_pair(compile_tiny(model, mxfp4=True))[2].stats
    assert (stats["quantized"], stats["kept"]) == (1, 2)
    assert [d["status"] for d in stats["layers"]] == ["kept", "quantized", "kept"]


# ----------------------------------------------------------------------------------------------- mini, on meta
def test_mini_on_meta_quantises_expert_bytes_to_a_quarter():
    model = build_model("mini", device="meta")
    cm = tilec.compile(model, options=tilec.Options(mxfp4=True, report_contexts=(256,)))
    stats = stage_pair(cm)[2].stats
    experts = 11 * 128 * 3 * 2048 * 768
    assert stats["quantized"] == 11 and stats["max_rel_err"] is None
    assert stats["bytes_before"] == 2 * experts  # bf16
    assert stats["bytes_after"] == experts * 17 // 32  # 4 bits + 8 bits per 32
    assert stats["bytes_after"] / stats["bytes_before"] == pytest.approx(0.53125 / 2)
    rep = cm.report
    assert abs(rep["parameters"] / 6.98e9 - 1) < 0.005
    assert rep["weight_bytes"]["uint8"] == stats["bytes_after"]
    assert 0.255 < rep["decode_step_bytes"][0]["floor_ms_h100"] < 0.26  # DESIGN.md: 0.256 ms with MXFP4 experts


# ------------------------------------------------------------------------------------------- errors, options
def test_nan_in_an_expert_weight_fails_naming_the_pass_node_weight_and_element(tiny):
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.model.layers[2].mlp.experts.down_proj[5, 17, 3] = math.inf
    with pytest.raises(QuantizationError) as info:
        compile_tiny(model, mxfp4=True)
    message = str(info.value)
    for fragment in ("mxfp4_experts", "l2_experts_moe_experts", "model.layers.2.mlp.experts.down_proj", "[5, 17, 3]",
                     "inf"):
        assert fragment in message, (fragment, message)


def test_options_validate_the_mxfp4_settings():
    assert tilec.Options().mxfp4 is False and tilec.Options().mxfp4_scale_rule == "floor"
    with pytest.raises(TilecError, match="'round'"):
        tilec.Options(mxfp4=True, mxfp4_scale_rule="round")
    with pytest.raises(TilecError, match="mxfp4"):
        tilec.Options(mxfp4="yes")


def test_running_the_pass_twice_keeps_what_the_first_run_lowered(tiny_cm):
    gm = copy_graph_module(tiny_cm.records[0].graph)
    ctx = PassContext(tilec.Options(mxfp4=True))
    assert mxfp4_experts.run(gm, ctx)["quantized"] == 3
    blocks = attr(gm, "model.layers.1.mlp.experts.gate_up_proj_blocks")
    again = mxfp4_experts.run(gm, ctx)
    assert (again["quantized"], again["kept"]) == (0, 3)
    assert attr(gm, "model.layers.1.mlp.experts.gate_up_proj_blocks") is blocks
    assert again["bytes_before"] == again["bytes_after"] == 3 * again["layers"][0]["bytes_after"]


# --------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")


@pytest.mark.parametrize("rule", [None, "ceil"])
def test_cli_mxfp4_writes_the_report_section(tmp_path, capsys, wide_console, rule):
    out = tmp_path / "tiny"
    argv = ["compile", str(MIMO_FILE), "--preset", "tiny", "--mxfp4", "-o", str(out), "--max-seq-len", "64"]
    assert main(argv + (["--mxfp4-scale-rule", rule] if rule else [])) == 0
    stdout = capsys.readouterr().out
    assert "mxfp4_experts" in stdout and "mxfp4_moe_experts 3" in stdout
    assert f"MXFP4 experts ({rule or 'floor'}): 3 layer(s) quantised" in stdout
    report = (out / "report.md").read_text()
    assert "## MXFP4 experts" in report and f"scale rule `{rule or 'floor'}`" in report
    assert "Expert bytes 590 KB -> 78.3 KB" in report
    for n in (1, 2, 3):
        assert f"| model.layers.{n}.mlp.experts | quantized | float32 | 197 KB | 26.1 KB | 0.1" in report
    rep = json.loads((out / "report.json").read_text())
    mx = next(s for s in rep["stages"] if s["name"] == "mxfp4_experts")["stats"]
    assert mx["bytes_after"] == 78336 and len(mx["layers"]) == 3
    assert "mxfp4_experts" in json.loads((out / "manifest.json").read_text())["stages"]
    assert main(["inspect", str(out)]) == 0
    summary = capsys.readouterr().out
    assert f"quantized 3, scale_rule {rule or 'floor'}, bytes_before 589824, bytes_after 78336" in summary
    assert "model.layers.1.mlp.experts" not in summary  # per-layer details are for the report, not the table


def test_cli_without_mxfp4_has_no_section_and_the_rule_needs_the_flag(tmp_path, capsys, wide_console):
    assert main(["compile", str(MIMO_FILE), "--preset", "tiny", "-o", str(tmp_path / "a")]) == 0
    assert "MXFP4" not in (tmp_path / "a" / "report.md").read_text()
    assert main(["compile", str(MIMO_FILE), "--preset", "tiny", "--mxfp4-scale-rule", "ceil"]) == 2
    assert "--mxfp4" in capsys.readouterr().err
