"""Tensor parallelism (models/parallel.py, runtime/distributed.py): shards against the whole model.

Each case starts its processes with `tilec.runtime.distributed.launch` (gloo on the CPU, NCCL on GPUs) and runs a
function of tests/tp_workers.py in each; an assertion failing in any process fails the test."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tilec
from tilec.errors import ConfigError, TilecError
from tilec.models import build_model
from tilec.models.hf import save_checkpoint
from tilec.models.mxfp4_experts import quantize_experts_of
from tilec.models.parallel import check, head_ranges, shard_model
from tilec.runtime import distributed
from tilec.runtime.distributed import TensorParallel

import tp_workers
from conftest import MIMO_FILE


@pytest.mark.parametrize("world,target,mxfp4", [
    (2, "reference", None),  # full-attention layers' one kv head repeated on both ranks, sliding ones' two split
    (4, "reference", "pass"),  # every kv head repeated; MXFP4 experts quantised after the split
    (2, "triton", "checkpoint"),  # the Triton kernels (interpreter); experts quantised before the split
])
def test_shards_compute_the_whole_model(world, target, mxfp4, monkeypatch):
    if target == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    overrides = {"moe_intermediate_size": 32 * world} if mxfp4 else {}
    distributed.launch(tp_workers.logits_and_steps, world, target, 3 + world, overrides, mxfp4)


def test_checkpoint_directories_load_as_shards(tmp_path):
    paths = []
    for mxfp4 in (False, True):  # bf16 experts, then MXFP4 ones as they are stored
        model = build_model("tiny", seed=6, moe_intermediate_size=64)
        if mxfp4:
            quantize_experts_of(model)
        paths.append((str(save_checkpoint(model, tmp_path / str(mxfp4))), mxfp4))
    distributed.launch(tp_workers.from_checkpoint, 2, paths)


def test_the_sum_matters():
    distributed.launch(tp_workers.partial_sums_differ, 2, 5)


def test_one_shot_setup_failing_anywhere_falls_back_everywhere():
    distributed.launch(tp_workers.one_shot_setup_fails_on_rank_1, 2)


def test_a_failing_rank_is_a_clear_error():
    with pytest.raises(TilecError, match=r"(?s)rank 1 of 2 failed.*rank 1 cannot go on"):
        distributed.launch(tp_workers.fails_on_rank_1, 2)


def test_head_ranges_follow_the_kv_groups():
    cfg = build_model("mini", device="meta").config  # 16 heads; 2 kv heads on full layers, 4 on sliding ones
    full, sliding = 0, 1
    assert [head_ranges(cfg, full, TensorParallel(r, 4)) for r in range(4)] == [
        (range(0, 4), range(0, 1)), (range(4, 8), range(0, 1)), (range(8, 12), range(1, 2)),
        (range(12, 16), range(1, 2))]
    assert [head_ranges(cfg, sliding, TensorParallel(r, 2)) for r in range(2)] == [
        (range(0, 8), range(0, 2)), (range(8, 16), range(2, 4))]
    assert head_ranges(cfg, full, None) == (range(16), range(2))


def test_shard_slices_match_the_whole_weights():
    model = build_model("tiny", seed=2)
    shards = [shard_model(model, TensorParallel(r, 2)) for r in range(2)]
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.experts.down_proj"):
        whole = model.state_dict()[name]
        assert torch.equal(torch.cat([s.state_dict()[name] for s in shards], dim=-1), whole)
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj  # [E, gate rows then up rows, H]
    inter = gate_up.shape[1] // 2
    parts = [s.model.layers[1].mlp.experts.gate_up_proj for s in shards]
    assert torch.equal(torch.cat([p[:, :inter // 2] for p in parts], 1), gate_up[:, :inter])
    assert torch.equal(torch.cat([p[:, inter // 2:] for p in parts], 1), gate_up[:, inter:])
    # whole tensors on the same device are shared, not copied
    assert shards[1].model.embed_tokens.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(torch.cat([s.lm_head.weight for s in shards]), model.lm_head.weight)  # by vocabulary
    tied = build_model("tiny", seed=2, tie_word_embeddings=True)
    assert shard_model(tied, TensorParallel(1, 2)).lm_head.weight.shape == tied.lm_head.weight.shape  # kept whole
    assert shards[0].cache_layout(1, 32)[2].shape[1] == 1  # layer 1 (sliding): 2 kv heads, one a rank
    with pytest.raises(TilecError, match="shard"):
        save_checkpoint(shards[0], "unused")  # its slices under the whole model's config would be a broken checkpoint


@pytest.mark.parametrize("world,overrides,mxfp4,what", [
    (3, {}, False, "num_attention_heads"),
    (2, {"num_key_value_heads": 3, "num_attention_heads": 6}, False, "3 kv heads"),
    (2, {"intermediate_size": 99}, False, "intermediate_size"),
    (2, {}, True, "multiple of 32"),  # tiny's experts: 32 values, 16 a rank
    (2, {"vocab_size": 511}, False, "vocab_size"),
])
def test_unsplittable_models_are_refused(world, overrides, mxfp4, what):
    cfg = build_model("tiny", device="meta", **overrides).config
    with pytest.raises(ConfigError, match=what):
        check(cfg, TensorParallel(0, world), mxfp4)


def test_tensor_parallel_needs_its_process_group(tiny):
    with pytest.raises(TilecError, match="process group"):
        tilec.compile(tiny, options=tilec.Options(tensor_parallel=2))
    for bad in (0, True, 1.5):
        with pytest.raises(TilecError, match="tensor_parallel"):
            tilec.Options(tensor_parallel=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,mxfp4", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_two_gpus_match_one(dtype, mxfp4):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    distributed.launch(tp_workers.same_on_gpu, 2, 11, dtype, mxfp4)


def test_cli_generate_on_two_ranks(tiny, tiny_cm, tmp_path, capfd, monkeypatch):
    from tilec.cli import main
    from tilec.models.dflash import build_draft, save_draft

    monkeypatch.setenv("COLUMNS", "400")
    ckpt = save_checkpoint(tiny, tmp_path / "ckpt")
    save_draft(build_draft(tiny, num_hidden_layers=1, seed=3), tmp_path / "draft")
    assert main(["generate", str(ckpt), "--draft", str(tmp_path / "draft"), "--prompt-ids", "1,2,1",
                 "--max-new-tokens", "6", "--tensor-parallel", "2"]) == 0
    lines = [line for line in capfd.readouterr().out.splitlines() if line.strip()]
    want = tiny_cm.generate([[1, 2, 1]], 6)[0, 3:].tolist()
    assert [int(t) for t in lines[0].split()] == want  # printed once, by rank 0
    assert "6 new tokens" in lines[1] and "DFlash draft" in lines[1] and "2 GPUs" in lines[2]
    assert len(lines) == 3


@settings(max_examples=200, deadline=None)
@given(kv=st.sampled_from([1, 2, 3, 4, 8]), group=st.sampled_from([1, 2, 3, 4, 8]),
       world=st.sampled_from([1, 2, 3, 4, 6, 8]))
def test_every_query_head_meets_its_own_kv_head_on_one_rank(kv, group, world):
    """For any head counts and number of ranks the split accepts: each query head lives on exactly one rank, and
    there the attention op's own grouping (local query j reads local kv j // (local heads / local kv heads)) gives
    the kv head the whole model gives it (global query h reads kv h // (heads / kv heads))."""
    heads = kv * group
    cfg = build_model("tiny", device="meta", num_attention_heads=heads, num_key_value_heads=kv,
                      layer_types=["full_attention"] * 4).config
    try:
        ranges = [head_ranges(cfg, 0, TensorParallel(r, world)) for r in range(world)]
    except ConfigError:
        assert heads % world or (kv % world and world % kv)
        return
    assert sorted(h for q, _ in ranges for h in q) == list(range(heads))
    for q, kvr in ranges:
        assert len(q) % len(kvr) == 0
        local_group = len(q) // len(kvr)
        for j, h in enumerate(q):
            assert kvr.start + j // local_group == h // group


def test_cli_compile_writes_each_ranks_artifact(tmp_path, capfd, monkeypatch):
    from tilec.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["compile", str(MIMO_FILE), "--preset", "tiny", "--target", "triton", "--tensor-parallel", "2",
                 "-o", str(tmp_path / "out")]) == 0
    out = capfd.readouterr().out
    assert "tensor-parallel rank 0 of 2" in out and "each of the 2 ranks" in out
    assert "rank 1 of 2" not in out  # rank 0 alone prints
    for rank in (0, 1):
        step = (tmp_path / "out" / f"rank{rank}" / "step.py").read_text()
        assert step.count("_all_reduce.launch(") == 8 and "_all_gather.launch(" in step
