"""HF import (`tilec.models.hf`): in-memory models, save_pretrained directories, packed / sharded / FP8 checkpoints,
errors, and checkpoints written back for transformers. All on CPU with the tiny preset."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from tilec.errors import CheckpointError  # noqa: E402
from tilec.models import hf as hf_import  # noqa: E402
from tilec.models.config import MiMoConfig  # noqa: E402
from tilec.models.hf import from_hf, save_checkpoint  # noqa: E402
from tilec.models.mimo import PRESETS  # noqa: E402

FP8_DIMS = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=136)  # not multiples of 128
PROJ = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
        "down_proj.weight")


# ----------------------------------------------------------------------------------------------------- helpers
def tiny(**overrides) -> MiMoConfig:
    return MiMoConfig(**{**PRESETS["tiny"], **overrides})


def random_hf_model(cfg: MiMoConfig, seed: int = 0):
    """HF MiMo with weights of std 0.1, norms near 1, and non-zero sinks and router correction bias."""
    torch.manual_seed(seed)
    model = transformers.MiMoV2FlashForCausalLM(cfg.to_hf()).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "inv_freq" in name:
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("norm.weight"):
                t.copy_(1 + 0.1 * noise)
            elif name.endswith(("sinks", "e_score_correction_bias")):
                t.copy_(noise if name.endswith("sinks") else 0.1 * noise)
            else:
                t.copy_(0.1 * noise)
    return model


def tilec_logits(model, ids):
    b, t = ids.shape
    caches = [torch.zeros(s.shape, dtype=s.dtype) for s in model.cache_layout(b, t)]
    with torch.no_grad():
        return model(ids, torch.zeros(b, dtype=torch.long), caches)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def read_dir(path) -> tuple[dict, dict]:
    """(config dict, all tensors) of a single-file checkpoint directory."""
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def write_dir(path, config: dict, tensors: dict) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))


def assert_same_tensors(model, reference: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    for name, t in reference.items():
        assert state[name].dtype == t.dtype, name
        assert torch.equal(state[name], t), name


def quantize_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and per-block fp32 scales (the multiplier, DeepSeek's ``weight_scale_inv``), block by block."""
    (n, k), (bn, bk) = w.shape, block
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(n / bn), math.ceil(k / bk))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            s[i, j] = blk.abs().max().clamp(min=1e-12) / 448.0
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize_fp8(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    (n, k), (bn, bk) = q.shape, block
    out = torch.empty(n, k)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def write_fp8_checkpoint(src, dst, block, with_block_size: bool = True) -> dict:
    """FP8 copy of the save_pretrained directory ``src`` (every projection quantised). Returns the test's own
    dequantisation of every quantised weight, by hub name."""
    config, tensors = read_dir(src)
    config.pop("dtype", None)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if with_block_size:
        config["quantization_config"]["weight_block_size"] = list(block)
    out, dequantized = {}, {}
    for key, w in tensors.items():
        if key.endswith(PROJ):
            q, s = quantize_fp8(w, block)
            out[key], out[key.removesuffix(".weight") + ".weight_scale_inv"] = q, s
            dequantized[key] = dequantize_fp8(q, s, block)
        else:
            out[key] = w
    write_dir(dst, config, out)
    return dequantized


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(tiny())


@pytest.fixture(scope="module")
def hub_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "ckpt"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, PRESETS["tiny"]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fp8_source(tmp_path_factory):
    """A save_pretrained directory of a MiMo whose dims are not multiples of 128."""
    path = tmp_path_factory.mktemp("fp8src") / "ckpt"
    random_hf_model(tiny(**FP8_DIMS), seed=3).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------------ loading
def test_in_memory_hf_model_matches_hf_logits(hf_model, ids):
    model = from_hf(hf_model)
    assert_same_tensors(model, hf_model.state_dict())
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().min() > 0  # the bias is really exercised
    assert rel_err(tilec_logits(model, ids), hf_logits(hf_model, ids)) < 1e-4


def test_save_pretrained_directory_loads_hub_names(hf_model, hub_dir, ids):
    _, tensors = read_dir(hub_dir)
    assert "model.layers.1.self_attn.attention_sink_bias" in tensors
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in tensors
    assert not any(k.endswith(("sinks", "gate_up_proj")) for k in tensors)
    model = from_hf(hub_dir)
    assert_same_tensors(model, hf_model.state_dict())
    assert rel_err(tilec_logits(model, ids), hf_logits(hf_model, ids)) < 1e-4


def test_packed_layout_loads_bit_exact(hf_model, tmp_path):
    save_checkpoint(from_hf(hf_model), tmp_path / "packed", expert_layout="packed")
    _, tensors = read_dir(tmp_path / "packed")
    assert "model.layers.2.mlp.experts.gate_up_proj" in tensors
    assert not any(".experts.0." in k for k in tensors)
    assert_same_tensors(from_hf(tmp_path / "packed"), hf_model.state_dict())


def test_sharded_checkpoint_with_and_without_index(hf_model, tmp_path):
    path = save_checkpoint(from_hf(hf_model), tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert_same_tensors(from_hf(path), hf_model.state_dict())
    (path / "model.safetensors.index.json").unlink()
    assert_same_tensors(from_hf(path), hf_model.state_dict())


def test_bf16_load_and_dtype_rules(hf_model, ids, tmp_path):
    model = from_hf(hf_model, dtype=torch.bfloat16)
    expected = {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
                for k, v in hf_model.state_dict().items()}
    assert_same_tensors(model, expected)
    assert model.config.dtype == "bfloat16"
    err = rel_err(tilec_logits(model, ids), hf_logits(hf_model, ids))
    assert 0 < err < 5e-2
    # A bf16 directory loads as bf16 from config.json's dtype, and from its tensors when config.json says nothing.
    path = save_checkpoint(model, tmp_path / "bf16")
    assert_same_tensors(from_hf(path), expected)
    config = json.loads((path / "config.json").read_text())
    assert config.pop("dtype") == "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    assert_same_tensors(from_hf(path), expected)
    assert from_hf(path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_mtp_rotary_and_activation_scale_keys_are_ignored(hf_model, hub_dir, tmp_path):
    config, tensors = read_dir(hub_dir)
    tensors["model.mtp.0.self_attn.q_proj.weight"] = torch.randn(4, 4)
    tensors["model.mtp.0.final_layernorm.weight"] = torch.randn(4)
    tensors["model.rotary_emb.full_attention_inv_freq"] = torch.randn(5)
    tensors["model.layers.0.self_attn.q_proj.activation_scale"] = torch.ones(1)
    write_dir(tmp_path / "mtp", config, tensors)
    assert_same_tensors(from_hf(tmp_path / "mtp"), hf_model.state_dict())


def test_tied_embeddings(tmp_path, ids):
    hf = random_hf_model(tiny(tie_word_embeddings=True), seed=5)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    hf.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in read_dir(tmp_path / "tied")[1]
    for src in (hf, tmp_path / "tied"):
        model = from_hf(src)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert rel_err(tilec_logits(model, ids), hf_logits(hf, ids)) < 1e-4


# ------------------------------------------------------------------------------------------------------ FP8
@pytest.mark.parametrize("block", [(128, 128), (64, 48)])
def test_fp8_block_scaled_weights_dequantize_exactly(fp8_source, tmp_path, block):
    dequantized = write_fp8_checkpoint(fp8_source, tmp_path / "fp8", block)
    _, originals = read_dir(fp8_source)
    model = from_hf(tmp_path / "fp8", dtype=torch.float32)
    state = model.state_dict()
    e = FP8_DIMS["moe_intermediate_size"]
    for layer in (1, 3):
        prefix = f"model.layers.{layer}"
        assert torch.equal(state[f"{prefix}.self_attn.q_proj.weight"], dequantized[f"{prefix}.self_attn.q_proj.weight"])
        for n in range(8):
            expert = f"{prefix}.mlp.experts.{n}"
            gate_up = state[f"{prefix}.mlp.experts.gate_up_proj"][n]
            assert torch.equal(gate_up[:e], dequantized[f"{expert}.gate_proj.weight"])
            assert torch.equal(gate_up[e:], dequantized[f"{expert}.up_proj.weight"])
            assert torch.equal(state[f"{prefix}.mlp.experts.down_proj"][n], dequantized[f"{expert}.down_proj.weight"])
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"], dequantized["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(state["model.embed_tokens.weight"], originals["model.embed_tokens.weight"])
    # Quantisation changed the weights (so the checks above could fail), but only by e4m3 rounding.
    w, d = originals["model.layers.0.mlp.down_proj.weight"], dequantized["model.layers.0.mlp.down_proj.weight"]
    assert 0 < rel_err(d, w) < 0.05


def test_fp8_default_dtype_is_bf16_and_logits_match_hf(fp8_source, tmp_path, ids):
    dequantized = write_fp8_checkpoint(fp8_source, tmp_path / "fp8", (128, 128), with_block_size=False)
    model = from_hf(tmp_path / "fp8")
    assert model.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    key = "model.layers.2.self_attn.o_proj.weight"
    assert torch.equal(model.state_dict()[key], dequantized[key].to(torch.bfloat16))
    # An HF model holding the test's own dequantised weights, loaded by transformers itself.
    config, tensors = read_dir(fp8_source)
    write_dir(tmp_path / "deq", config, {**tensors, **dequantized})
    reference = transformers.MiMoV2FlashForCausalLM.from_pretrained(tmp_path / "deq").eval()
    assert rel_err(tilec_logits(from_hf(tmp_path / "fp8", dtype=torch.float32), ids), hf_logits(reference, ids)) < 1e-4


def test_fp8_packed_experts_dequantize_per_expert(fp8_source, tmp_path):
    packed = save_checkpoint(from_hf(fp8_source), tmp_path / "packed", expert_layout="packed")
    config, tensors = read_dir(packed)
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    expected = {}
    for key in [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        pairs = [quantize_fp8(w, (128, 128)) for w in tensors[key]]
        tensors[key] = torch.stack([q for q, _ in pairs])
        tensors[key + "_scale_inv"] = torch.stack([s for _, s in pairs])
        expected[key] = torch.stack([dequantize_fp8(q, s, (128, 128)) for q, s in pairs])
    write_dir(tmp_path / "fp8", config, tensors)
    state = from_hf(tmp_path / "fp8", dtype=torch.float32).state_dict()
    assert len(expected) == 6
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# ------------------------------------------------------------------------------------------------------ errors
def edited_copy(hub_dir, dst, edit_tensors=None, edit_config=None):
    config, tensors = read_dir(hub_dir)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    write_dir(dst, config, tensors)
    return dst


def raises(src, *fragments) -> str:
    with pytest.raises(CheckpointError) as info:
        from_hf(src)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_error_missing_config(hub_dir, tmp_path):
    (tmp_path / "x").mkdir()
    shutil.copy(hub_dir / "model.safetensors", tmp_path / "x")
    raises(tmp_path / "x", "config.json")


def test_error_not_mimo(hub_dir, tmp_path):
    raises(edited_copy(hub_dir, tmp_path / "x", edit_config=lambda c: c.update(model_type="llama")), "'llama'", "MiMo")
    with pytest.raises(CheckpointError, match="Linear"):
        from_hf(torch.nn.Linear(2, 2))


def test_error_no_safetensors(hub_dir, tmp_path):
    (tmp_path / "x").mkdir()
    shutil.copy(hub_dir / "config.json", tmp_path / "x")
    raises(tmp_path / "x", "no *.safetensors")


def test_error_index_names_missing_shard(hf_model, tmp_path):
    path = save_checkpoint(from_hf(hf_model), tmp_path / "sharded", max_shard_bytes=64 * 1024)
    gone = sorted(path.glob("*.safetensors"))[1]
    gone.unlink()
    raises(path, gone.name, "missing")


def test_error_missing_tensor(hub_dir, tmp_path):
    key = "model.layers.2.self_attn.q_proj.weight"
    raises(edited_copy(hub_dir, tmp_path / "a", lambda t: t.pop(key)), repr(key), "(128, 64)")
    sink = "model.layers.1.self_attn.attention_sink_bias"
    raises(edited_copy(hub_dir, tmp_path / "b", lambda t: t.pop(sink)), sink, "(4,)")


def test_error_misshapen_tensor(hub_dir, tmp_path):
    key = "model.layers.1.self_attn.k_proj.weight"
    raises(edited_copy(hub_dir, tmp_path / "x", lambda t: t.update({key: torch.randn(32, 64)})),
           repr(key), "(32, 64)", "expected (64, 64)")


def test_error_missing_expert(hub_dir, tmp_path):
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    raises(edited_copy(hub_dir, tmp_path / "x", lambda t: t.pop(key)), "expert 5", repr(key), "(32, 64)")


def test_error_unexpected_keys(hub_dir, tmp_path):
    extra = {"model.layers.7.mlp.gate.weight": torch.randn(8, 64),
             "model.layers.1.mlp.shared_experts.w": torch.randn(2)}
    raises(edited_copy(hub_dir, tmp_path / "x", lambda t: t.update(extra)), *extra, "2 tensor(s)")


def test_error_fp8_scale_missing_or_misshapen(fp8_source, tmp_path):
    write_fp8_checkpoint(fp8_source, tmp_path / "fp8", (128, 128))
    scale = "model.layers.1.self_attn.q_proj.weight_scale_inv"
    raises(edited_copy(tmp_path / "fp8", tmp_path / "a", lambda t: t.pop(scale)), repr(scale), "(1, 2)")
    raises(edited_copy(tmp_path / "fp8", tmp_path / "b", lambda t: t.update({scale: torch.ones(1, 1)})),
           repr(scale), "(1, 1)", "expected (1, 2)")
    expert_scale = "model.layers.3.mlp.experts.4.down_proj.weight_scale_inv"
    raises(edited_copy(tmp_path / "fp8", tmp_path / "c", lambda t: t.pop(expert_scale)), repr(expert_scale))


def test_error_unsupported_quantization(hub_dir, tmp_path):
    path = edited_copy(hub_dir, tmp_path / "x", edit_config=lambda c: c.update(quantization_config={
        "quant_method": "awq"}))
    raises(path, "'awq'")


# ------------------------------------------------------------------------------------------------------ writing
def test_save_checkpoint_per_expert_loads_in_transformers(hf_model, ids, tmp_path):
    model = from_hf(hf_model)
    path = save_checkpoint(model, tmp_path / "out")
    _, tensors = read_dir(path)
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in tensors
    assert "model.layers.2.self_attn.attention_sink_bias" in tensors
    reloaded = transformers.MiMoV2FlashForCausalLM.from_pretrained(path).eval()
    assert_same_tensors(model, reloaded.state_dict())
    assert rel_err(hf_logits(reloaded, ids), tilec_logits(model, ids)) < 1e-4
    assert_same_tensors(from_hf(path), hf_model.state_dict())


def test_save_checkpoint_is_all_or_nothing(hf_model, tmp_path, monkeypatch):
    model = from_hf(hf_model)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="busy"):
        save_checkpoint(model, tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]

    def fail_second_shard(tensors, filename, metadata=None):
        if "00002" in filename:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_import, "save_file", fail_second_shard)
    with pytest.raises(CheckpointError, match="cannot write .*half: disk full"):
        save_checkpoint(model, tmp_path / "half", max_shard_bytes=64 * 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # no partial directory, no temporary left
