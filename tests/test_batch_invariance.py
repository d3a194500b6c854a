"""Batch invariance, checked where the CPU can check it: the launch configuration.

Greedy DFlash gives plain decoding's tokens only if each row of a verify step (up to `spec_rows` rows) is the same
bits as a 1-row decode step. The GPU tests check the bits (`test_verify_step_rows_equal_decode_steps`,
`test_gpu_experts_batch_invariant`, `benchmarks/check_batch_invariance.py`); the interpreter cannot, since numpy's
matmul gives a row's result depending on its place in the tile. What it can check is the cause: every kernel of an
8-row step must be launched with the same tiles, splits and key chunks as in a 1-row step, its launch differing
only in what counts the rows. This records every launch of the generated step (kernel, constexprs, scalars, grid)
and compares them.
"""

from __future__ import annotations

import pytest
import torch

import tilec
from tilec.models import build_model

ROWS = 8

# Launch values that may differ with the step's row count without changing a row's arithmetic.
#   P, BLOCK_P: the MoE decode slots, one per (row, choice); G: how many programs share them. Which slot or program
#   computes an expert changes nothing in a row's numbers: its output is kept per row, summed in router order.
FREE_KWARGS = {"gate_up_kernel": {"G", "P", "BLOCK_P"}, "down_kernel": {"G", "P", "BLOCK_P"}}
# Grid dimensions that must not change: key chunks of attention (dim 1), column tiles of the matmuls (dim 0).
FIXED_GRID = {"attend_kernel": (0, 1), "combine_kernel": (0,), "gate_up_kernel": (0,), "down_kernel": (0,),
              "gate_up_silu_kernel": (0,), "linear_kernel": (0,), "qkv_rope_kernel": (0,),
              "router_scores_kernel": (0,)}


class Recording:
    """Stands in for a @triton.jit function in a kernel module: records each launch, then makes it."""

    def __init__(self, name: str, kernel, log: list):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            scalars = tuple(a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool))
            self.log.append((self.name, tuple(grid), scalars, dict(kwargs)))
            return self.kernel[grid](*args, **kwargs)
        return launch


def record_launches(cm, monkeypatch) -> list:
    """Every kernel launch of ``cm``'s step goes to the returned list (until the test ends: kernel modules are
    cached and shared between compiled models)."""
    program = cm.program
    program.load()
    log: list = []
    for kernel in program.kernels:
        module = program.kernel_module(kernel.alias)
        for name, obj in list(vars(module).items()):
            # Launched kernels are named *_kernel; other @triton.jit functions are helpers the kernels call.
            if name.endswith("_kernel") and hasattr(obj, "fn"):
                monkeypatch.setattr(module, name, Recording(name, obj, log))
    return log


def compare(block: list, single: list, what: str) -> None:
    assert [c[0] for c in block] == [c[0] for c in single], f"{what}: different kernels launched"
    for (name, grid8, scalars8, kw8), (_, grid1, scalars1, kw1) in zip(block, single):
        free = FREE_KWARGS.get(name, set())
        differ = {k for k in kw8.keys() | kw1.keys() if kw8.get(k) != kw1.get(k)} - free
        assert not differ, f"{what}: {name} launched with {[(k, kw8.get(k), kw1.get(k)) for k in differ]}"
        for a, b in zip(scalars8, scalars1):  # a scalar that differs must count rows (8 rows against 1)
            assert a == b or a == ROWS * b, f"{what}: {name} scalar arguments {scalars8} against {scalars1}"
        for dim in FIXED_GRID.get(name, ()):
            assert grid8[dim] == grid1[dim], f"{what}: {name} grid {grid8} against {grid1}"


def launches_of_steps(cm, log: list, prompt: int, seed: int, singles: int = ROWS) -> tuple[list, list[list]]:
    """From the same cache after a prompt: the launches of one ROWS-row step, and of the 1-row steps at its first
    ``singles`` positions."""
    ids = torch.randint(0, 512, (1, prompt + ROWS), generator=torch.Generator().manual_seed(seed))
    a, b = cm.new_session(1, 40), cm.new_session(1, 40)
    a.step(ids[:, :prompt])
    b.step(ids[:, :prompt])
    log.clear()
    a.step(ids[:, prompt:])
    block, steps = list(log), []
    for t in range(singles):
        log.clear()
        b.step(ids[:, prompt + t:prompt + t + 1])
        steps.append(list(log))
    return block, steps


@pytest.mark.parametrize("mxfp4", [False, True])
def test_verify_and_decode_steps_launch_the_same_tiles(mxfp4, monkeypatch):
    """An 8-row step and 1-row steps at each of its positions, past the sliding window (tiny: window 9) so ring
    slots have been reused: the same kernels with the same constexprs, scalars and fixed grid dimensions."""
    cm = tilec.compile(build_model("tiny", seed=2), target="triton", options=tilec.Options(mxfp4=mxfp4))
    block, singles = launches_of_steps(cm, record_launches(cm, monkeypatch), prompt=14, seed=3)
    assert {c[0] for c in block} >= {"attend_kernel", "gate_up_kernel", "down_kernel", "linear_kernel",
                                      "qkv_rope_kernel", "gate_up_silu_kernel"}
    for t, single in enumerate(singles):
        compare(block, single, f"row {t}")
    # the dense projections read each weight tile once for all of the verify step's rows: one tile of rows
    for name, grid, _, kwargs in block:
        if name in ("linear_kernel", "qkv_rope_kernel", "gate_up_silu_kernel"):
            assert grid[1] == 1 and kwargs["BLOCK_M"] >= ROWS, (name, grid, kwargs)


def test_the_check_sees_a_row_dependent_configuration(monkeypatch):
    """Negative control: an attention launcher sizing its tiles from the step's row count (what the templates did
    before batch invariance) is caught."""
    cm = tilec.compile(build_model("tiny", seed=2), target="triton")
    log = record_launches(cm, monkeypatch)
    program = cm.program
    attention = next(program.kernel_module(k.alias) for k in program.kernels if k.alias.endswith("attention"))
    real = attention.launch

    def row_dependent(q, *args, **kwargs):  # one key chunk more per extra row: a configuration that follows T
        log.append(("attend_kernel", (0, q.shape[1], 0), (), {}))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(attention, "launch", row_dependent)
    block, (single,) = launches_of_steps(cm, log, prompt=12, seed=4, singles=1)
    with pytest.raises(AssertionError, match="attend_kernel grid"):
        compare(block, single, "row 0")


def test_observing_sees_every_launch_and_then_lets_go():
    cm = tilec.compile(build_model("tiny"), target="triton")
    program, seen = cm.program, []
    plain = {k.alias: program.kernel_module(k.alias) for k in program.kernels}
    with program.observing(lambda alias, args, out: seen.append((alias, out))):
        logits = cm(torch.tensor([[5, 7, 9]]))
    calls = [line for line in program.step_source.splitlines() if ".launch(" in line]
    assert [alias for alias, _ in seen] == [line.split("= ")[-1].split(".launch")[0].strip() for line in calls]
    assert torch.equal(seen[-1][1], logits)  # the lm_head's output is what the call returned
    assert {k.alias: program.kernel_module(k.alias) for k in program.kernels} == plain
    seen.clear()
    cm(torch.tensor([[5, 7, 9]]))
    assert not seen
