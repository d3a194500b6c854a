"""What each process of the tensor-parallel tests runs (tests/test_tensor_parallel.py). Module-level functions, so
`tilec.runtime.distributed.launch` can start them in fresh processes; each raises AssertionError on a mismatch, which
`launch` raises in the test."""

from __future__ import annotations

import torch

import tilec
from tilec.graph import op_counts
from tilec.models import build_model
from tilec.models.dflash import build_draft
from tilec.models.mxfp4_experts import quantize_experts_of
from tilec.runtime import distributed


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _prompt(vocab: int, rows: int, seed: int, device="cpu") -> torch.Tensor:
    return torch.randint(0, vocab, (1, rows), generator=torch.Generator().manual_seed(seed)).to(device)


def _expert_size(model) -> int:
    experts = model.model.layers[1].mlp.experts
    return getattr(experts, "inter", None) or experts.gate_up_proj.shape[1] // 2


def logits_and_steps(tp, target: str, seed: int, overrides: dict, mxfp4: str | None) -> None:
    """A shard's prefill and decode steps against the whole model's (fp32 tiny: 1e-5), its op counts and shapes,
    and the same greedy tokens, plain and with a DFlash draft. ``mxfp4``: "pass" (Options.mxfp4) or "checkpoint"
    (experts quantised before sharding)."""
    model = build_model("tiny", seed=seed, **overrides)
    options = tilec.Options(mxfp4=mxfp4 == "pass")
    if mxfp4 == "checkpoint":
        quantize_experts_of(model)
    whole = tilec.compile(model, target="reference", options=options)
    cm = tilec.compile(model, target=target, options=options.replace(tensor_parallel=tp.world))

    cfg, layers = model.config, model.config.num_hidden_layers
    assert op_counts(cm.graph)["tilec.all_reduce"] == 2 * layers
    heads = cm.source.model.layers[1].self_attn.num_heads
    assert heads * tp.world == cfg.num_attention_heads
    assert _expert_size(cm.source) * tp.world == _expert_size(model)
    assert cm.source.lm_head.weight.shape[0] * tp.world == cfg.vocab_size
    assert op_counts(cm.graph)["tilec.all_gather"] == 1

    prompt = _prompt(cfg.vocab_size, 11, seed + 1)
    ours, theirs = cm.new_session(1, 64), whole.new_session(1, 64)
    a, b = ours.step(prompt), theirs.step(prompt)
    assert _rel(a, b) < 1e-5, f"rank {tp.rank}: prefill logits differ by {_rel(a, b):.2e}"
    token = b[:, -1:].argmax(-1)
    for _ in range(12):  # decode steps, past the sliding window's ring
        a, b = ours.step(token), theirs.step(token)
        assert _rel(a, b) < 1e-5, f"rank {tp.rank}: decode logits differ by {_rel(a, b):.2e}"
        token = b[:, -1:].argmax(-1)
    assert torch.equal(cm.generate(prompt, 10), whole.generate(prompt, 10))
    draft = build_draft(model, num_hidden_layers=1, block_size=4, sliding_window=5, seed=seed + 2)
    assert torch.equal(cm.generate(prompt, 10, draft=draft), whole.generate(prompt, 10))


def partial_sums_differ(tp, seed: int) -> None:
    """With the sum replaced by nothing, the shards' logits are wrong: the tests above can fail."""
    model = build_model("tiny", seed=seed)
    whole = tilec.compile(model, target="reference")
    cm = tilec.compile(model, target="reference", options=tilec.Options(tensor_parallel=tp.world))
    prompt = _prompt(model.config.vocab_size, 7, seed)
    distributed.all_reduce_ = lambda x, name: x
    err = _rel(cm(prompt), whole(prompt))
    assert err > 1e-2, f"rank {tp.rank}: partial sums alone came within {err:.2e}"


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def same_on_gpu(tp, seed: int, dtype: str, mxfp4: bool) -> None:
    """On GPUs: mini on the triton target split over the ranks against the whole model on each rank's GPU, prefill
    and 16 decode steps (replayed as CUDA graphs). fp32: logits within 1e-4 of their largest (only the order of the
    sums differs). bf16: within 0.15 in norm; a random bf16 mini is chaotic, and the triton target and the bf16
    reference already differ by 0.03 to 0.08 so (benchmarks/logits_error.py); a missing sum or a wrong slice is off
    by order 1. Both: the ranks' tokens agree to the bit, and the first greedy tokens are the whole model's."""
    device = torch.device("cuda", torch.cuda.current_device())
    model = build_model("mini", device=device, seed=seed, dtype=getattr(torch, dtype))
    options = tilec.Options(mxfp4=mxfp4)
    whole = tilec.compile(model, target="triton", options=options)
    cm = tilec.compile(model, target="triton", options=options.replace(tensor_parallel=tp.world))
    # fp32: a prompt of decode-step rows (the prefill tiles are sized for bf16: fp32 ones are not all checked)
    prompt = _prompt(model.config.vocab_size, 40 if dtype != "float32" else 8, seed + 1, device)
    ours, theirs = cm.new_session(1, 512), whole.new_session(1, 512)
    errors = []

    def close(a, b, what):
        err = _rel(a, b) if dtype == "float32" else _norm_rel(a, b)
        errors.append(err)
        assert err < (1e-4 if dtype == "float32" else 0.15), f"rank {tp.rank} {dtype} mxfp4={mxfp4} {what}: {err:.2e}"

    a, b = ours.step(prompt), theirs.step(prompt)
    close(a[:, -1], b[:, -1], "prefill")
    token = b[:, -1:].argmax(-1)
    for i in range(16):
        a, b = ours.step(token), theirs.step(token)
        close(a, b, f"decode step {i}")
        token = b[:, -1:].argmax(-1)
    if tp.rank == 0:
        print(f"{dtype} mxfp4={mxfp4}: logits error against the whole model, prefill {errors[0]:.2e}, decode steps "
              f"{min(errors[1:]):.2e} to {max(errors[1:]):.2e}", flush=True)
    # the ranks agree to the bit: each computes the same tokens from the same sums
    tokens = cm.generate(prompt, 8)
    gathered = [torch.empty_like(tokens) for _ in range(tp.world)]
    torch.distributed.all_gather(gathered, tokens)
    assert all(torch.equal(g, tokens) for g in gathered)
    assert torch.equal(tokens[:, :prompt.shape[1] + 2], whole.generate(prompt, 8)[:, :prompt.shape[1] + 2])
    assert cm.graph_captures > 0, "no CUDA graph captured"


def from_checkpoint(tp, paths: list[tuple[str, bool]]) -> None:
    """Checkpoint directories compiled with tensor_parallel: each rank keeps only its slices (no tensor a view of a
    whole one), and computes the whole model's logits (fp32 tiny: 1e-5). ``paths``: (directory, MXFP4 experts)."""
    for path, mxfp4 in paths:
        whole = tilec.compile(path, target="reference")
        cm = tilec.compile(path, target="reference", options=tilec.Options(tensor_parallel=tp.world))
        assert cm.source.tp == tp
        for name, t in cm.source.state_dict().items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), f"{name} holds more than its slice"
        assert (type(cm.source.model.layers[1].mlp.experts).__name__ == "MXFP4Experts") == mxfp4
        prompt = _prompt(cm.vocab_size, 9, 4)
        assert _rel(cm(prompt), whole(prompt)) < 1e-5, path


def fails_on_rank_1(tp) -> None:
    if tp.rank == 1:
        raise ValueError("rank 1 cannot go on")


def one_shot_setup_fails_on_rank_1(tp) -> None:
    """Where one rank cannot set up the one-shot sum, every rank falls back to the collective, and the sums stay
    right (on the CPU, the one-shot path is forced and its setup faked)."""
    import warnings

    distributed.all_reduce_method = lambda x: "one_shot"

    def make(x, pg):
        if tp.rank == 1:
            raise RuntimeError("no peer access here")
        return [x.new_empty(x.numel()), x.new_empty(x.numel())]

    distributed._make_buffers = make
    x = torch.full((2, 3), float(tp.rank + 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = distributed.all_reduce_(x.clone(), distributed.WORLD)
    assert torch.equal(total, torch.full((2, 3), 3.0))
    assert any("collective" in str(w.message) for w in caught)
    why = distributed.NO_ONE_SHOT[distributed.WORLD]
    assert ("no peer access here" in why) == (tp.rank == 1), why
    assert torch.equal(distributed.all_reduce_(x.clone(), distributed.WORLD), total)  # no second setup
