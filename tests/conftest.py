"""Shared fixtures: the tiny MiMo model, an eager reference runner with a fresh KV cache, and the `gpu` marker hook."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; Triton reads this when a kernel is first loaded.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tilec  # noqa: E402
from tilec.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIMO_FILE = REPO / "models" / "mimo.py"


def pytest_configure(config):
    # The test models are tiny: one intra-op thread is as fast, and it avoids OpenMP threads stalling each other
    # (tens of ms per small matmul) when the machine's few cores are busy with other work. OMP_NUM_THREADS wins.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with a reason, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------------------ helpers
def new_caches(model, batch: int, max_len: int) -> list[torch.Tensor]:
    """A fresh (zero) KV cache laid out as ``model.cache_layout`` says."""
    return [torch.zeros(s.shape, dtype=s.dtype) for s in model.cache_layout(batch, max_len)]


def run_eager(model, ids: torch.Tensor, start: int = 0, caches: list[torch.Tensor] | None = None,
              max_len: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the eager model on ``ids`` [B, T] at positions start..; returns (logits, caches), the caches updated."""
    batch = ids.shape[0]
    if caches is None:
        caches = new_caches(model, batch, max_len)
    with torch.no_grad():
        logits = model(ids, torch.full((batch,), start, dtype=torch.long), caches)
    return logits, caches


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def random_ids(batch: int, tokens: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny():
    """tilec's MiMo with the `tiny` preset (fp32, random weights; 2 full + 2 sliding-window layers, 3 MoE)."""
    return build_model("tiny")


@pytest.fixture(scope="session")
def tiny_cm(tiny):
    """The tiny model compiled for the reference target (shared: tests must not change it)."""
    return tilec.compile(tiny, options=tilec.Options(max_seq_len=128))


@pytest.fixture
def eager():
    """``eager(model, ids, start=0, caches=None, max_len=64) -> (logits, caches)``."""
    return run_eager
