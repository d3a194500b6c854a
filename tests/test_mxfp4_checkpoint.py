"""MXFP4 experts in checkpoints: the gpt-oss / HF layout (``*_blocks`` uint8 [E, N, K/32, 16], ``*_scales`` uint8
[E, N, K/32]) written by `save_checkpoint` and read by `from_hf` bit for bit, never re-quantised; transformers' own
gpt-oss dequantiser reads the same numbers from those tensors; misshapen tensors are errors naming key and shapes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tilec
from tilec import mxfp4
from tilec.errors import CheckpointError
from tilec.models import build_model, from_hf
from tilec.models.hf import save_checkpoint
from tilec.models.mimo import MiMoExperts
from tilec.models.mxfp4_experts import MXFP4Experts

from conftest import new_caches, random_ids

PREFIX = "model.layers.{}.mlp.experts."


@pytest.fixture(scope="module")
def quantised(tiny):
    return mxfp4.quantize_model_experts(tiny)


@pytest.fixture(scope="module")
def saved(quantised, tmp_path_factory):
    return save_checkpoint(quantised, tmp_path_factory.mktemp("mx") / "ckpt")


def logits(model, ids):
    with torch.no_grad():
        return model(ids, torch.zeros(ids.shape[0], dtype=torch.long), new_caches(model, ids.shape[0], 32))


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def rewrite(src, dst, edit):
    """A copy of checkpoint ``src`` with its tensors edited by ``edit(tensors)``."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


# ---------------------------------------------------------------------------------------------------- round trip
def test_checkpoint_holds_the_gpt_oss_layout(saved, quantised):
    tensors = load_file(str(saved / "model.safetensors"))
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert "model.layers.*.self_attn" in config["quantization_config"]["modules_to_not_convert"]
    e, h, i = 8, 64, 32
    for layer in (1, 2, 3):
        p = PREFIX.format(layer)
        shapes = {k: (tuple(tensors[p + k].shape), tensors[p + k].dtype) for k in
                  ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")}
        assert shapes == {"gate_up_proj_blocks": ((e, 2 * i, h // 32, 16), torch.uint8),
                          "gate_up_proj_scales": ((e, 2 * i, h // 32), torch.uint8),
                          "down_proj_blocks": ((e, h, i // 32, 16), torch.uint8),
                          "down_proj_scales": ((e, h, i // 32), torch.uint8)}
        assert p + "gate_up_proj" not in tensors and p + "0.up_proj.weight" not in tensors
        experts = quantised.model.layers[layer].mlp.experts
        assert torch.equal(tensors[p + "gate_up_proj_blocks"].reshape(e, 2 * i, h // 2), experts.gate_up_proj_blocks)
        assert torch.equal(tensors[p + "down_proj_scales"], experts.down_proj_scales)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32  # the rest stays as it was


@pytest.mark.parametrize("layout,shard", [("per_expert", None), ("packed", 64 * 1024)])
def test_save_then_load_is_bit_exact(quantised, tmp_path, layout, shard, monkeypatch):
    path = save_checkpoint(quantised, tmp_path / "c", expert_layout=layout, max_shard_bytes=shard)
    monkeypatch.setattr(mxfp4, "quantize", lambda *a, **k: pytest.fail("loading must not re-quantise"))
    loaded = from_hf(path)
    for layer in (1, 2, 3):
        assert isinstance(loaded.model.layers[layer].mlp.experts, MXFP4Experts)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.weight, torch.nn.Parameter)
    assert_same_state(loaded, quantised)
    ids = random_ids(2, 6, quantised.config.vocab_size, seed=1)
    assert torch.equal(logits(loaded, ids), logits(quantised, ids))
    again = save_checkpoint(loaded, tmp_path / "again", expert_layout=layout, max_shard_bytes=shard)
    for f in sorted(path.glob("*.safetensors")):  # a second round trip writes the same tensors
        first, second = load_file(str(f)), load_file(str(again / f.name))
        assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_transformers_gpt_oss_dequantiser_reads_the_same_numbers(saved, quantised):
    hf_mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    tensors = load_file(str(saved / "model.safetensors"))
    for layer in (1, 3):
        for proj in ("gate_up_proj", "down_proj"):
            key = PREFIX.format(layer) + proj
            theirs = hf_mxfp4.convert_moe_packed_tensors(tensors[key + "_blocks"], tensors[key + "_scales"],
                                                         dtype=torch.float32)
            ours = mxfp4.dequantize(getattr(quantised.model.layers[layer].mlp.experts, proj.removesuffix("_proj")))
            assert torch.equal(theirs.transpose(1, 2), ours)  # gpt-oss keeps [E, K, N] in memory


def test_bf16_model_round_trip_and_compile(tmp_path):
    model = mxfp4.quantize_model_experts(build_model("tiny", dtype=torch.bfloat16), "ceil")
    loaded = from_hf(save_checkpoint(model, tmp_path / "bf16"))
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight.dtype == torch.bfloat16
    assert_same_state(loaded, model)
    ids = random_ids(1, 5, 512, seed=2)
    cm = tilec.compile(tmp_path / "bf16", options=tilec.Options(max_seq_len=32, mxfp4=True))
    stats = next(r.stats for r in cm.records if r.name == "mxfp4_experts")
    assert (stats["quantized"], stats["kept"]) == (0, 3)
    assert torch.equal(cm(ids), logits(model, ids))


def test_checkpoint_mixing_mxfp4_and_float_experts(tiny, quantised, saved, tmp_path):
    def float_layer_2(tensors):
        for k in ("gate_up_proj", "down_proj"):
            for part in ("blocks", "scales"):
                tensors.pop(PREFIX.format(2) + f"{k}_{part}")
            tensors[PREFIX.format(2) + k] = getattr(tiny.model.layers[2].mlp.experts, k).detach().clone()

    loaded = from_hf(rewrite(saved, tmp_path / "mixed", float_layer_2))
    kinds = [type(loaded.model.layers[n].mlp.experts) for n in (1, 2, 3)]
    assert kinds == [MXFP4Experts, MiMoExperts, MXFP4Experts]
    assert torch.equal(loaded.model.layers[2].mlp.experts.gate_up_proj, tiny.model.layers[2].mlp.experts.gate_up_proj)
    stats = next(r.stats for r in tilec.compile(loaded, options=tilec.Options(max_seq_len=32, mxfp4=True)).records
                 if r.name == "mxfp4_experts")
    assert (stats["quantized"], stats["kept"]) == (1, 2)


def test_nan_scale_in_a_checkpoint_dequantises_its_block_to_nan(saved, tmp_path):
    key = PREFIX.format(1) + "down_proj_scales"
    loaded = from_hf(rewrite(saved, tmp_path / "nan", lambda t: t[key].__setitem__((3, 5, 0), 0xFF)))
    down = mxfp4.dequantize(loaded.model.layers[1].mlp.experts.down)
    assert down[3, 5, :32].isnan().all() and not down[3, 5, 32:].isnan().any()
    assert down.isnan().sum() == 32


# -------------------------------------------------------------------------------------------------------- errors
def raises(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        from_hf(path)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("suffix,shape,expected", [
    ("gate_up_proj_blocks", (8, 64, 4, 8), "(8, 64, 2, 16)"),
    ("gate_up_proj_blocks", (8, 64, 32), "(8, 64, 2, 16)"),
    ("gate_up_proj_scales", (8, 64, 4), "(8, 64, 2)"),
    ("down_proj_blocks", (8, 32, 1, 16), "(8, 64, 1, 16)"),
    ("down_proj_scales", (8, 64), "(8, 64, 1)"),
])
def test_misshapen_blocks_or_scales_name_the_key_and_shapes(saved, tmp_path, suffix, shape, expected):
    key = PREFIX.format(3) + suffix
    path = rewrite(saved, tmp_path / "bad", lambda t: t.update({key: torch.zeros(shape, dtype=torch.uint8)}))
    raises(path, repr(key), str(shape), f"expected {expected}")


def test_blocks_of_the_wrong_dtype_are_refused(saved, tmp_path):
    key = PREFIX.format(1) + "gate_up_proj_scales"
    path = rewrite(saved, tmp_path / "bad", lambda t: t.update({key: t[key].float()}))
    raises(path, repr(key), "float32", "uint8")


def test_a_layer_with_part_of_its_mxfp4_tensors_is_refused(saved, tmp_path):
    key = PREFIX.format(2) + "down_proj_scales"
    raises(rewrite(saved, tmp_path / "bad", lambda t: t.pop(key)), PREFIX.format(2).rstrip("."), repr(key))


def test_mxfp4_and_float_tensors_for_one_layer_are_refused(tiny, saved, tmp_path):
    key = PREFIX.format(1) + "gate_up_proj"
    path = rewrite(saved, tmp_path / "bad", lambda t: t.update({key: tiny.model.layers[1].mlp.experts.gate_up_proj
                                                               .detach().clone()}))
    raises(path, key, "does not use")


def test_mxfp4_experts_need_multiples_of_32(tmp_path):
    model = build_model("tiny")
    experts = model.model.layers[1].mlp.experts
    q = mxfp4.quantize_model_experts(model)
    path = save_checkpoint(q, tmp_path / "ok")
    config = json.loads((path / "config.json").read_text())
    config["moe_intermediate_size"] = 48  # 2I = 96 rows, I = 48: not a multiple of 32
    (path / "config.json").write_text(json.dumps(config))
    raises(path, "model.layers.1.mlp.experts", "multiples of 32", "48")
    assert experts.gate_up_proj.shape == (8, 64, 64)
