"""``tilec.compile`` and CompiledModel: targets, running, greedy generation, sessions, the report, atomic saving."""

from __future__ import annotations

import pathlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import tilec
from tilec.errors import ArtifactError, ShapeError, TargetError
from tilec.models import build_model

from conftest import new_caches, random_ids, rel_err, run_eager


def greedy_reference(model, prompt: torch.Tensor, new_tokens: int, max_len: int = 64) -> torch.Tensor:
    """Greedy decoding written by hand over the eager model and a static KV cache."""
    caches = new_caches(model, prompt.shape[0], max_len)
    logits, caches = run_eager(model, prompt, 0, caches)
    out, pos = [prompt], prompt.shape[1]
    for i in range(new_tokens):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        out.append(token)
        if i + 1 < new_tokens:
            logits, caches = run_eager(model, token, pos, caches)
            pos += 1
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------------- targets
def test_unknown_target_is_refused():
    with pytest.raises(TargetError, match=r"unknown target 'tpu'; choose one of reference, triton, cuda, auto"):
        tilec.compile(build_model("tiny"), target="tpu")


def test_auto_target_picks_reference(tiny):
    cm = tilec.compile(tiny, target="auto", options=tilec.Options(max_seq_len=32))
    assert cm.target == "reference" and cm.report["target"] == "reference"


# ---------------------------------------------------------------------------------------------------- running
def test_call_equals_eager_model(tiny, tiny_cm):
    ids = random_ids(2, 9, tiny.config.vocab_size, seed=40)
    got = tiny_cm(ids)
    want, _ = run_eager(tiny, ids, 0, max_len=9)
    assert got.shape == (2, 9, tiny.config.vocab_size)
    assert rel_err(got, want) < 1e-5
    # A 1-D list of ids is one sequence.
    one = tiny_cm(ids[1].tolist())
    assert one.shape == (1, 9, tiny.config.vocab_size) and rel_err(one[0], want[1]) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_equals_hand_written_greedy_loop(tiny, tiny_cm, batch):
    prompt = random_ids(batch, 6, tiny.config.vocab_size, seed=41 + batch)
    got = tiny_cm.generate(prompt, max_new_tokens=20)
    want = greedy_reference(tiny, prompt, 20)
    assert got.shape == (batch, 26)
    assert torch.equal(got, want), f"\n{got}\n{want}"
    assert len(set(got[0, 6:].tolist())) > 1  # the model does not just repeat one token


def test_generate_zero_tokens_returns_the_prompt(tiny_cm):
    prompt = random_ids(2, 5, 512, seed=43)
    assert torch.equal(tiny_cm.generate(prompt, max_new_tokens=0), prompt)
    with pytest.raises(ShapeError, match="max_new_tokens must be >= 0"):
        tiny_cm.generate(prompt, max_new_tokens=-1)


def test_generate_stops_at_eos(tiny, tiny_cm):
    prompt = random_ids(2, 6, tiny.config.vocab_size, seed=44)
    free = tiny_cm.generate(prompt, max_new_tokens=20)
    eos = int(free[0, 6 + 4])  # row 0 emits this token by its 5th new token at the latest
    got = tiny_cm.generate(prompt, max_new_tokens=20, eos_token_id=eos)

    expected_rows, ends = [], []
    for row in free:
        gen = row[6:].tolist()
        end = gen.index(eos) + 1 if eos in gen else len(gen)
        ends.append(end)
        expected_rows.append(row[:6].tolist() + gen[:end] + [eos] * (len(gen) - end))
    stop = max(ends) if all(eos in row[6:].tolist() for row in free) else 20
    expected = torch.tensor(expected_rows)[:, :6 + stop]
    assert ends[0] <= 5
    assert torch.equal(got, expected), f"\n{got}\n{expected}"
    # A list of eos ids works too.
    assert torch.equal(tiny_cm.generate(prompt, max_new_tokens=20, eos_token_id=[eos]), got)


def test_generate_with_eos_stops_early_when_every_row_is_done(tiny_cm):
    prompt = random_ids(1, 6, 512, seed=45)
    free = tiny_cm.generate(prompt, max_new_tokens=10)
    eos = int(free[0, 6 + 2])
    first = free[0, 6:].tolist().index(eos)
    got = tiny_cm.generate(prompt, max_new_tokens=10, eos_token_id=eos)
    assert got.shape == (1, 6 + first + 1) and torch.equal(got, free[:, :6 + first + 1])


@pytest.mark.parametrize("bad, what", [
    (torch.tensor([[1, 2, 512]]), "in 0..511"),
    (torch.tensor([[3, -1, 4]]), "in 0..511"),
    (torch.tensor([[1.0, 2.0]]), "integers"),
    (torch.zeros((1, 0), dtype=torch.long), "at least one token"),
    ([], "at least one token"),
    (torch.zeros((1, 2, 3), dtype=torch.long), r"\[batch, tokens\]"),
])
def test_bad_input_ids_raise_shape_error(tiny_cm, bad, what):
    with pytest.raises(ShapeError, match=what):
        tiny_cm(bad)
    with pytest.raises(ShapeError, match=what):
        tiny_cm.generate(bad, max_new_tokens=2)


def test_generating_past_max_seq_len_is_refused(tiny_cm):
    prompt = random_ids(1, 6, 512, seed=46)
    with pytest.raises(ShapeError, match=r"positions 10\.\.10 do not fit a KV cache sized for 10 tokens"):
        tiny_cm.generate(prompt, max_new_tokens=8, max_seq_len=10)
    with pytest.raises(ShapeError, match="sized for 4 tokens"):
        tiny_cm.generate(prompt, max_new_tokens=1, max_seq_len=4)
    # Exactly filling the cache is fine: 6 + 5 tokens, the last one is never fed back.
    assert tiny_cm.generate(prompt, max_new_tokens=5, max_seq_len=10).shape == (1, 11)


def test_session_refuses_steps_past_its_cache_and_keeps_its_length(tiny_cm):
    session = tiny_cm.new_session(batch=2, max_seq_len=8)
    session.step(random_ids(2, 6, 512, seed=47))
    with pytest.raises(ShapeError, match=r"positions 6\.\.8 do not fit"):
        session.step(random_ids(2, 3, 512, seed=48))
    assert session.length == 6
    with pytest.raises(ShapeError, match=r"\[2, T\]"):
        session.step(random_ids(1, 1, 512, seed=49))
    with pytest.raises(ShapeError, match="cannot roll back to length 7"):
        session.rollback(7)


# ---------------------------------------------------------------------------------------------------- sessions
def test_session_steps_equal_one_prefill(tiny, tiny_cm):
    ids = random_ids(2, 11, tiny.config.vocab_size, seed=50)
    session = tiny_cm.new_session(batch=2, max_seq_len=32)
    parts = [session.step(ids[:, :4]), session.step(ids[:, 4:5]), session.step(ids[:, 5:])]
    assert session.length == 11
    want, _ = run_eager(tiny, ids, 0, max_len=32)
    assert rel_err(torch.cat(parts, dim=1), want) < 1e-5


def speculate_and_rollback(cm, prompt, rounds):
    """Per round: step a speculative block, keep ``accepted`` rows of it, then step ``bonus``; return bonus logits."""
    batch = prompt.shape[0]
    rolled = cm.new_session(batch=batch, max_seq_len=128)
    straight = cm.new_session(batch=batch, max_seq_len=128)
    rolled.step(prompt)
    straight.step(prompt)
    out = []
    for block, accepted, bonus in rounds:
        length = rolled.length
        rolled.step(block)
        rolled.rollback(length + accepted)
        got = rolled.step(torch.cat((block[:, :accepted], bonus), dim=1)[:, accepted:])
        if accepted:
            straight.step(block[:, :accepted])
        want = straight.step(bonus)
        assert rolled.length == straight.length
        out.append((got, want))
    return out


def test_rollback_then_restep_equals_never_having_stepped(tiny_cm):
    prompt = random_ids(2, 5, 512, seed=51)
    rounds = [(random_ids(2, 8, 512, seed=60 + i), accepted, random_ids(2, 1, 512, seed=70 + i))
              for i, accepted in enumerate([0, 3, 8, 1, 5, 2])]  # 30+ positions: the 16-slot SWA rings wrap
    results = speculate_and_rollback(tiny_cm, prompt, rounds)
    for got, want in results:
        assert rel_err(got, want) < 1e-5
    # The check can fail: the rejected rows do change the logits if they are not rolled back.
    session = tiny_cm.new_session(batch=2, max_seq_len=128)
    session.step(prompt)
    session.step(rounds[0][0])
    assert rel_err(session.step(rounds[0][2]), results[0][1]) > 1e-2


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accepted=st.lists(st.integers(0, 8), min_size=2, max_size=5), block=st.integers(1, 8),
       seed=st.integers(0, 2 ** 16))
def test_rollback_fuzz(tiny_cm, accepted, block, seed):
    prompt = random_ids(1, 3, 512, seed=seed)
    rounds = [(random_ids(1, block, 512, seed=seed + 1 + i), min(a, block), random_ids(1, 1, 512, seed=seed + 99 + i))
              for i, a in enumerate(accepted)]
    for got, want in speculate_and_rollback(tiny_cm, prompt, rounds):
        assert rel_err(got, want) < 1e-5


# ------------------------------------------------------------------------------------------------------ report
def test_a_finished_sessions_caches_go_to_the_next_session_of_its_layout(tiny):
    """new_session gives a gone session's cache tensors, zeroed, to the next session of the same layout (on a GPU its
    CUDA graphs were captured on them); a live session's are never shared; at most SPARE_CACHES layouts are kept; and
    a session on reused caches steps exactly as one on new caches does."""
    import gc

    cm = tilec.compile(tiny, options=tilec.Options(max_seq_len=64))
    ids = random_ids(1, 5, 512, seed=2)
    first = cm.new_session(1, 32)
    want = first.step(ids)
    ptrs = [t.data_ptr() for t in first.cache.tensors]
    live = cm.new_session(1, 32)
    assert not set(ptrs) & {t.data_ptr() for t in live.cache.tensors}
    del first
    gc.collect()
    again = cm.new_session(1, 32)
    assert [t.data_ptr() for t in again.cache.tensors] == ptrs
    assert all(not t.any() for t in again.cache.tensors)  # zeroed: the first session had stepped
    assert torch.equal(again.step(ids), want)
    del live, again
    for length in (16, 24, 40):
        cm.new_session(1, length)  # gone at once
    gc.collect()
    assert len(cm._spare_caches) == cm.SPARE_CACHES
    assert [key[0] for key in cm._spare_caches] == [24, 40]  # the newest
    assert cm.generation_length(10) == 10  # on the CPU just what is needed (on a GPU at least max_seq_len)


def test_report_of_tiny_counts_every_weight(tiny, tiny_cm):
    rep = tiny_cm.report
    numel = sum(t.numel() for t in list(tiny.parameters()) + list(tiny.buffers()))
    assert rep["parameters"] == numel == tiny.config.parameter_counts()["total"]
    assert rep["weight_bytes"] == {"float32": 4 * numel} and rep["weight_bytes_total"] == 4 * numel
    assert [d["context"] for d in rep["decode_step_bytes"]] == list(tiny_cm.options.report_contexts)
    assert [s["name"] for s in rep["stages"]] == list(tiny_cm.stages)
    assert "parameters: 307,296" in tiny_cm.report_markdown()


def test_report_of_mini_on_meta_matches_the_published_sizes():
    model = build_model("mini", device="meta")
    cm = tilec.compile(model, options=tilec.Options(report_contexts=(64, 256, 4096)))
    rep = cm.report
    assert abs(rep["parameters"] / 6.98e9 - 1) < 0.005
    decode = {d["context"]: d for d in rep["decode_step_bytes"]}
    assert sorted(decode) == [64, 256, 4096]
    active = 0.689e9
    for d in decode.values():
        assert abs(d["weights"] / (2 * active) - 1) < 0.01, d  # bf16: 2 bytes per active parameter
        assert d["total"] == d["weights"] + d["kv"]
    # KV read per step, from the DESIGN's layout: full attention at 0 and (i + 1) % 6 == 0 with 2 kv heads, the
    # rest sliding windows of 129 keys with 4 kv heads; bf16 keys of 192 and values of 128.
    for context, d in decode.items():
        kv = 0
        for i in range(12):
            full = i == 0 or (i + 1) % 6 == 0
            kv += (2 if full else 4) * (context if full else min(context, 129)) * (192 + 128) * 2
        assert d["kv"] == kv, (context, d["kv"], kv)
    assert rep["weight_bytes"]["bfloat16"] + rep["weight_bytes"]["float32"] == rep["weight_bytes_total"]
    assert rep["weight_bytes"]["float32"] == 11 * 128 * 4  # the routers' fp32 correction bias
    assert abs(rep["weight_bytes_total"] / (2 * 6.98e9) - 1) < 0.005
    assert rep["specialised_for"] == {"batch": 1, "rows": 1, "max_seq_len": 4096}


# ------------------------------------------------------------------------------------------------------ saving
def snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_save_writes_and_replaces_an_artifact(tiny_cm, tmp_path):
    out = tmp_path / "art"
    assert tiny_cm.save(out) == out.resolve()
    first = snapshot(out)
    assert "manifest.json" in first and "stages/00_capture.txt" in first
    (out / "stale_file").write_text("from an older artifact")
    tiny_cm.save(out)
    assert set(snapshot(out)) == set(first)  # the older artifact was replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_save_refuses_a_non_artifact_directory(tiny_cm, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ArtifactError, match="is not a tilec artifact"):
        tiny_cm.save(out)
    assert snapshot(out) == {"notes.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ArtifactError):
        tiny_cm.save(a_file)
    assert a_file.read_text() == "x"


def test_save_into_an_empty_directory(tiny_cm, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    tiny_cm.save(out)
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("error, raised", [(OSError(28, "No space left on device"), ArtifactError),
                                           (RuntimeError("interrupted"), RuntimeError)])
def test_failed_save_leaves_the_previous_artifact_and_no_temp_dirs(tiny_cm, tmp_path, monkeypatch, error, raised):
    out = tmp_path / "art"
    tiny_cm.save(out)
    before = snapshot(out)
    real_write, calls = pathlib.Path.write_bytes, []

    def failing_write(self, data):
        calls.append(self)
        if len(calls) == 3:
            raise error
        return real_write(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", failing_write)
    with pytest.raises(raised):
        tiny_cm.save(out)
    monkeypatch.undo()
    assert len(calls) == 3  # it failed midway
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_failed_final_rename_keeps_the_previous_artifact(tiny_cm, tmp_path, monkeypatch):
    out = tmp_path / "art"
    tiny_cm.save(out)
    before = snapshot(out)
    real_replace, calls = tilec.artifact.os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the rename of the new artifact into place
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(tilec.artifact.os, "replace", flaky_replace)
    with pytest.raises(ArtifactError):
        tiny_cm.save(out)
    monkeypatch.undo()
    assert out.is_dir() and snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# ---------------------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_tiny_on_cuda_matches_cpu(tiny):
    model = build_model("tiny", device="cuda")
    cm = tilec.compile(model, options=tilec.Options(max_seq_len=64))
    ids = random_ids(2, 7, tiny.config.vocab_size, seed=80)
    want, _ = run_eager(tiny, ids, 0, max_len=7)
    got = cm(ids)
    assert got.device.type == "cuda" and rel_err(got.cpu(), want) < 1e-4
    assert torch.equal(cm.generate(ids, 8).cpu(), greedy_reference(tiny, ids, 8))
