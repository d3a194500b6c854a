"""Compile options, and the one place where tilec reads environment variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from tilec.errors import TilecError

TARGETS = ("reference", "triton", "cuda", "auto")


@dataclasses.dataclass(frozen=True)
class Options:
    """Frozen options for one compilation.

    dump_dir: write every stage, the report and the manifest here (also set by ``TILEC_DUMP=dir``).
    verify: check the graph's invariants after every stage (cheap; on by default).
    max_batch: batch size the decode graph is specialised for.
    max_seq_len: longest sequence (prompt plus generated tokens) the KV cache is sized for by default.
    spec_rows: most query rows one step verifies (DFlash block size); sizes the sliding-window cache rings.
    report_contexts: context lengths at which the report counts bytes per decode step.
    hidden_layers: the graph also returns the hidden states after these layers (what a DFlash draft reads).
    fuse: run the fusion passes (add + RMSNorm, Q/K/V + RoPE, dense SwiGLU).
    greedy: the graph returns argmax token ids instead of logits (lm_head + argmax fused).
    mxfp4: hold the MoE experts' weights in MXFP4 (the ``mxfp4_experts`` pass); everything else keeps its precision.
    mxfp4_scale_rule: ``floor`` (the OCP rule; may clip values in (6, 8) x scale) or ``ceil`` (never clips).
    prefill_graph_rows: on a GPU, prompts of more than spec_rows and up to this many tokens are padded to a multiple of
        the largest power of two up to spec_rows and replayed as CUDA graphs (captured the second time a length is
        seen): a short prompt's time is otherwise the host's launches. 0: prompts always run directly.
    tensor_parallel: split the model over this many GPUs, one process each (models/parallel.py); every process
        compiles with the same options inside torch.distributed's process group of that size
        (tilec.runtime.distributed: ``launch``, or torchrun and ``init``).
    """

    dump_dir: Path | None = None
    verify: bool = True
    max_batch: int = 1
    max_seq_len: int = 4096
    spec_rows: int = 8
    report_contexts: tuple[int, ...] = (256, 4096)
    hidden_layers: tuple[int, ...] = ()
    fuse: bool = True
    greedy: bool = False
    mxfp4: bool = False
    mxfp4_scale_rule: str = "floor"
    prefill_graph_rows: int = 128
    tensor_parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_seq_len", "spec_rows", "tensor_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TilecError(f"Options.{name} must be a positive int, got {value!r}")
        rows = self.prefill_graph_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise TilecError(f"Options.prefill_graph_rows must be an int >= 0, got {self.prefill_graph_rows!r}")
        if not isinstance(self.mxfp4, bool):
            raise TilecError(f"Options.mxfp4 must be True or False, got {self.mxfp4!r}")
        if self.mxfp4_scale_rule not in ("floor", "ceil"):
            raise TilecError(f"Options.mxfp4_scale_rule must be 'floor' or 'ceil', got {self.mxfp4_scale_rule!r}")
        if self.dump_dir is not None and not isinstance(self.dump_dir, Path):
            object.__setattr__(self, "dump_dir", Path(self.dump_dir))

    def replace(self, **changes) -> "Options":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, **overrides) -> "Options":
        """Options with environment settings applied, then ``overrides`` (which win)."""
        env: dict = {}
        if os.environ.get("TILEC_DUMP"):
            env["dump_dir"] = Path(os.environ["TILEC_DUMP"])
        if os.environ.get("TILEC_VERIFY") is not None:
            env["verify"] = os.environ["TILEC_VERIFY"] not in ("0", "false", "no", "")
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**env)


def triton_interpret_requested() -> bool:
    """True when Triton kernels are to run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")


def pdl_requested() -> bool:
    """False when ``TILEC_PDL=0``: the Triton target then launches a step's kernels one after another, without
    programmatic dependent launch (for comparison, or where a driver mishandles it)."""
    return os.environ.get("TILEC_PDL", "1") not in ("0", "false", "no", "")


def all_reduce_requested() -> str:
    """How tensor-parallel sums run (``TILEC_ALL_REDUCE``): ``auto`` (the default: a one-shot sum through symmetric
    memory for small messages on GPUs, the process group's collective otherwise) or ``nccl`` (always the
    collective)."""
    value = os.environ.get("TILEC_ALL_REDUCE", "auto")
    if value not in ("auto", "nccl"):
        raise TilecError(f"TILEC_ALL_REDUCE={value!r}: use 'auto' or 'nccl'")
    return value
