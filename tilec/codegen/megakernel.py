"""The ``cuda`` target: a decode step as one persistent CUDA kernel (the megakernel), prefill on the Triton kernels.

`plan` walks a graph and turns each op into phases of templates/cuda/megakernel.cu.j2: the op's task functions
(templates/cuda/megakernel_tasks.cuh), each dealt over the whole grid, a grid barrier after each. Every value gets a
place: weights by index in a table of addresses, the step's intermediates at fixed offsets of one workspace (sized
for MAXR rows), the step's inputs and outputs as kernel arguments. A graph with an op the megakernel lacks gets no
plan; `MegakernelProgram` then runs every step on the Triton kernels, and the report says why.

A GEMV phase copies its activations into each block's shared memory once (`source`, `staging`), so its dot
products never wait on L2 for them. Two producers need no phase of their own: an RMSNorm whose consumers all stage
its output (each consumer block computes the norm while staging: `_foldable`), and a router's top-k choice when its
experts read it first (their first phase makes it: `FOLD_ROUTER`). The report's schedule names what each phase
computes first. Attention is one phase: the last block to finish a (batch row, kv head) merges its chunks and stores
its new rows in the cache (an arrival count each, in the barrier's array).

The megakernel is bulk-synchronous: a phase starts when the whole grid has finished the one before. The weights
reach the math through registers, 8 loads of 16 bytes a lane in flight, kept one batch by a __syncwarp (at the
kernel's register ceiling ptxas otherwise may split them; benchmarks/sass_diff.py checks a build). Streaming them
through shared memory instead (a ring of bulk copies for each warp, 16 KB a warp in flight) was measured slower on
the H100 and is not in the kernel: see benchmarks/results/h100-2026-11-25/README.md. The GEMV phases take 1.5 to 3
times their bytes' time, and a third of the step's warp time waits at grid barriers behind the slowest block
(benchmarks/results/h100-2026-11-25b/README.md); the design's other step is tile-level dependencies instead of
whole-phase barriers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import operator
import os
from typing import Any

import torch
import torch.fx as fx

from tilec.codegen import mma_layout
from tilec.codegen.plans_moe import scale_fold_exact
from tilec.codegen.render import render
from tilec.codegen.triton import TritonProgram, lower as lower_triton
from tilec.errors import TargetError, UnsupportedError
from tilec.graph import attr, info, module_path
from tilec.ops import op_name

THREADS = 256  # 8 warps a block, one block an SM
CHUNK = 32  # keys an attention item stages (a lane a key)
MAX_ROWS = 16  # the most rows (batch x rows) a step may have: the task functions' register arrays
MAX_GRID = 1024  # blocks the greedy head's partial results are sized for
ALIGN = 256
RED_FLOATS = 512  # shared memory's first floats: the tasks' reductions (rms_norm's, the greedy head's)
XS_BYTES = 160 << 10  # the most shared memory a GEMV phase stages its activations in (H100: 227 KB a block)
MAX_SMEM_BYTES = (227 << 10) - 1024  # the most dynamic shared memory a block may take (H100), static kept aside
# The most of one weight a phase bulk-prefetches into L2 for the next phase that reads weights. Off: on the H100
# (2026-11-24, benchmarks/profile_megakernel.py, mini bf16, ctx 256, results/h100-2026-11-24j) a step took 1274 us
# without and 1436 us with 24 MB, the prefetches queueing ahead of the phase's own loads (a router phase of 0.5 MB
# took 14 us with them, 9 without). profile_megakernel.py --prefetch-mb sets it for A/B runs.
PREFETCH_BYTES = 0
# A router's top-k choice made in its experts' first phase where it can be (op_moe_router). H100 2026-11-24, one
# start (profile_megakernel.py, mini bf16, ctx 256): 1270 us a step with, 1295 without.
FOLD_ROUTER = True
# The most chunks attention's merge takes into shared memory at a time (0: as many as fit, all of them at the
# contexts a decode step's few items serve). Tests set it to 1 so that the merge's loop over groups runs.
MERGE_CHUNKS = 0
MERGE_ROWS = 0  # and the most query rows (0: as many as fit; tests set it small so that the loop over rows runs)
# MXFP4 experts on the tensor cores (experts_gate_up_mma, experts_down_mma, over the experts kernel's re-laid
# fragments) where the activations are bf16 and the shapes fit the fragments; else on the CUDA cores (Mxfp4Rows).
# H100 2026-11-25, one start, alternating (ab_megakernel.py, mini MXFP4, ctx 256): 743.5 and 743.0 us a step on the
# tensor cores, 957.5 and 958.3 on the CUDA cores (benchmarks/results/h100-2026-11-25g). TILEC_MXFP4_MMA=0 in the
# environment turns it off; tests set it to check both paths.
MXFP4_MMA = os.environ.get("TILEC_MXFP4_MMA", "1") != "0"
# A second build of the megakernel for steps of one row (plain decode), beside the one for up to max_rows rows (verify
# steps and batches): its tasks are instantiated for one row, so a decode step's code is less than half as large
# (mini bf16, nvcc 13.0: 18.5k instructions against 43.6k; proj_rope 1973 against 9238) and the kernel body keeps no
# values in local memory (none against 72 operations; MXFP4 none against 180). Off until it has run on a GPU
# (benchmarks/results/h100-2026-11-25g/next/README.md): TILEC_MK_ONE_ROW=1 in the environment turns it on.
ONE_ROW_BUILD = os.environ.get("TILEC_MK_ONE_ROW") == "1"
_FLOAT_TYPES = (torch.bfloat16, torch.float16, torch.float32)
# The ops whose phases stage their first argument (x) in shared memory, and so can compute an RMSNorm of it there.
_STAGING_OPS = ("linear", "qkv_rope", "moe_router", "moe_experts", "mxfp4_moe_experts", "swiglu", "lm_head_argmax")
_ID_TYPES = (torch.int64, torch.int32)
_SINK_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # attention's `flags` >> 1


@dataclasses.dataclass(frozen=True)
class Value:
    """Where a tensor lives for the kernel: ``w`` (the weight table's ``index``), ``ws`` (the workspace at
    ``offset``) or ``io`` (the kernel argument ``index``)."""
    src: str
    dtype: str
    index: int = 0
    offset: int = 0

    def ctx(self) -> dict:
        return dataclasses.asdict(self)


def _depth(chunks: int) -> int:
    """Chunks of fragments in flight a lane in the mma experts tasks: the most, up to 8, that divide ``chunks``
    (PipeRegs takes them in rounds)."""
    return next(d for d in (8, 4, 2, 1) if chunks % d == 0)


def attention_merge_floats(rows: int, v_head_dim: int, chunks: int) -> int:
    """Shared memory (floats) the attention task's merge takes for ``chunks`` chunks of ``rows`` query rows at a time
    (weighted values, max and sum a chunk and row; a row's max, sink, and running sum and values)."""
    return chunks * rows * (v_head_dim + 2) + rows * (v_head_dim + 3)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class Plan:
    """What the kernel computes and where its values live."""
    weights: list[str]  # the weight table, by get_attr target
    io: list[dict]  # kernel arguments: {"name", "kind": input|output|scratch, ...}
    phases: list[dict]
    attention: list[dict]  # per attention op: its k cache's place among the inputs, window, kv heads, group, DV
    outputs: list[int]  # io indices of the graph's outputs, in order
    output_tuple: bool
    workspace_bytes: int
    sync_words: int  # the SYNC array's 64-bit words: the grid barrier's count, then attention's arrival counts
    smem_bytes: int
    xs_bytes: int  # shared memory for a GEMV phase's activations (past RED_FLOATS floats)
    max_rows: int
    stage: str
    description: str
    scale_fold: bool = False  # the mma experts fold 2^126 into every scale (every scale code at most FOLD_LIMIT)

    @property
    def area_floats(self) -> int:
        """Where a folded router's choice starts in shared memory (floats): past the reductions and the staging."""
        return RED_FLOATS + -(-self.xs_bytes // 16) * 4

    def context(self, timeline: bool = False) -> dict:
        return {"phases": self.phases, "io": self.io, "attention": [a["node"] for a in self.attention],
                "weights": len(self.weights),
                "max_rows": self.max_rows, "threads": THREADS, "chunk": CHUNK, "red_floats": RED_FLOATS,
                "xs_bytes": self.xs_bytes, "area_floats": self.area_floats, "smem_floats": self.smem_bytes // 4,
                "merge_chunks": MERGE_CHUNKS, "merge_rows": MERGE_ROWS, "stage": self.stage,
                "description": self.description, "timeline": timeline, "scale_fold": self.scale_fold}

    def schedule(self) -> list[dict]:
        """The phases in order, for reading: op, node, task, the RMSNorms it computes first (folded into it), barrier
        after."""
        return [{"phase": i, "node": p["node"], "op": p["op"], "task": p["task"], "where": p["where"],
                 "folds": p["folds"], "barrier": p["sync"]} for i, p in enumerate(self.phases)]


class _Planner:
    def __init__(self, gm: fx.GraphModule, max_rows: int):
        self.gm, self.max_rows = gm, max_rows
        self.weights: list[str] = []
        self.weight_index: dict[str, int] = {}
        self.io: list[dict] = []
        self.values: dict[Any, Value] = {}  # fx.Node -> Value, or (node, i) -> Value for multi-output ops
        self.phases: list[dict] = []
        self.attention: list[dict] = []
        self.folded: dict[Any, dict] = {}  # an RMSNorm's output (node or (node, 0)) -> its source for the consumers
        self.folding: list[str] = []  # the norms (and router choices) the next phase computes in its prologue
        self.routes: dict[fx.Node, dict] = {}  # a router whose choice its experts' phase makes
        self.route_floats = 0  # shared memory (floats) a folded router's choice takes past the staging area
        self.mma_scales: list[fx.Node] = []  # the scales the tensor-core experts phases read (for SCALE_FOLD)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.ws = 0
        self.counts = 0  # attention's arrival counts (32-bit) in the SYNC array, past the barrier's count
        self.merge_bytes = 0  # attention's merge at all rows a (batch row, kv head) at once (plan() gives what fits)
        assert 33 + 2 * MAX_ROWS * (THREADS // 32) <= RED_FLOATS  # rms_norm's and the head's reductions
        self.smem, self.smem_why = 4 * RED_FLOATS, "the tasks' reductions"  # bytes a block, and what needs the most
        self.xs = 0  # bytes of activations a GEMV phase stages in shared memory at max_rows, the most of any phase
        self.outputs = self._output_nodes()

    # ------------------------------------------------------------------------------------------- places
    def _output_nodes(self) -> list:
        out = next(n for n in self.gm.graph.nodes if n.op == "output").args[0]
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def workspace(self, dtype: torch.dtype, per_row: int, rows: int | None = None) -> Value:
        offset = self.ws
        size = (self.max_rows if rows is None else rows) * per_row * dtype.itemsize
        self.ws += -(-size // ALIGN) * ALIGN
        return Value("ws", dtype_name(dtype), offset=offset)

    def result(self, node: fx.Node, meta, index: int | None = None) -> Value:
        """A place for an op's output: a kernel argument if the graph returns it, else the workspace."""
        key = node if index is None else (node, index)
        returned = any(o is node if index is None else (o.op == "call_function" and o.target is operator.getitem
                                                         and o.args[0] is node and o.args[1] == index)
                       for o in self.outputs)
        if meta.dim() < 2:
            raise UnsupportedError(f"%{node.name}: output of shape {tuple(meta.shape)} is not [batch, rows, ...]")
        self._dtype_ok(node, meta.dtype, _FLOAT_TYPES + _ID_TYPES)
        if returned:
            value = Value("io", dtype_name(meta.dtype), index=len(self.io))
            self.io.append({"name": f"%{node.name}" + ("" if index is None else f"[{index}]"), "kind": "output",
                            "dtype": meta.dtype, "shape": tuple(meta.shape)})
        else:
            value = self.workspace(meta.dtype, math.prod(meta.shape[2:]))
        self.values[key] = value
        return value

    def arg(self, a) -> Value | None:
        if a is None:
            return None
        if not isinstance(a, fx.Node):
            raise UnsupportedError(f"argument {a!r} is not a tensor")
        if a.op == "call_function" and a.target is operator.getitem:
            return self.values[(a.args[0], a.args[1])]
        return self.values[a]

    def derived(self, weight: fx.Node, layout: str) -> Value:
        """``weight`` re-laid (mma_layout.DERIVED[layout]) as a weight of its own, named as the Triton program names
        its derived weights (``<target>@<layout>``); the program derives it when it loads. ``weight`` is a
        get_attr node (the caller's condition for the tensor-core tasks)."""
        name = f"{weight.target}@{layout}"
        if name not in self.weight_index:
            self.weight_index[name] = len(self.weights)
            self.weights.append(name)
        return Value("w", "int32", index=self.weight_index[name])

    def staging(self, row_bytes: int) -> None:
        """A phase stages activations of ``row_bytes`` a row in shared memory: the staging area holds max_rows of
        them (up to XS_BYTES; a step whose rows do not fit reads them from L2)."""
        self.xs = max(self.xs, min(row_bytes * self.max_rows, XS_BYTES))

    def source(self, x: fx.Node) -> dict:
        """A GEMV phase's activations ``x`` [batch, rows, K], staged in shared memory: the tensor's place, or the
        RMSNorm folded into this phase (it stores the norm's sum only in the norm's first consumer phase)."""
        meta = x.meta["val"]
        self.staging(meta.shape[-1] * meta.dtype.itemsize)
        key = (x.args[0], x.args[1]) if x.op == "call_function" and x.target is operator.getitem else x
        fold = self.folded.get(key)
        if fold is None:
            return {"norm": False, "x": self.arg(x).ctx()}
        src = dict(fold["source"], sum=None if fold["sum_stored"] else fold["source"]["sum"])
        fold["sum_stored"] = True
        self.folding.append(fold["node"])
        return src

    def _dtype_ok(self, node: fx.Node, dtype: torch.dtype, allowed) -> None:
        if dtype not in allowed:
            raise UnsupportedError(f"%{node.name}: dtype {dtype} (the megakernel takes {', '.join(map(str, allowed))})")

    def phase(self, node: fx.Node, task: str, sync: bool = True, reads: tuple = (), **args) -> None:
        """A phase of ``task`` for ``node``; ``reads``: the weights (get_attr nodes) it reads whole, which an earlier
        phase prefetches into L2."""
        folds, self.folding = self.folding, []
        self.phases.append({"node": node.name, "op": op_name(node.target), "where": module_path(node), "task": task,
                            "sync": sync, "folds": folds, "reads": [w for w in reads if w is not None],
                            "args": {k: (v.ctx() if isinstance(v, Value) else v) for k, v in args.items()}})

    def schedule_prefetch(self) -> None:
        """Each phase prefetches the weights of the next phase that reads some (each weight once, at most
        PREFETCH_BYTES of it), and numbers the barriers."""
        done, barrier = set(), 0
        for i, ph in enumerate(self.phases):
            ph["barrier"] = barrier
            barrier += ph["sync"]
            ph["prefetch"] = []
            nxt = next((j for j in range(i + 1, len(self.phases)) if self.phases[j]["reads"]), None)
            if nxt is None:
                continue
            for w in self.phases[nxt]["reads"]:
                meta = w.meta["val"]
                size = min(meta.numel() * meta.element_size(), PREFETCH_BYTES) // 16 * 16
                if w.target in done or not size:
                    continue
                done.add(w.target)
                ph["prefetch"].append({"index": self.weight_index[w.target], "name": w.target, "phase": nxt,
                                       "bytes": size})
        for ph in self.phases:
            del ph["reads"]

    # ---------------------------------------------------------------------------------------------- walk
    def run(self) -> None:
        # attention's scratch (each chunk's max, sum and weighted values), sized per call (the caches' sizes)
        self.io.append({"name": "attention scratch", "kind": "scratch", "dtype": torch.float32})
        inputs = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                meta = node.meta["val"]
                if meta.dim() == 3:  # every value has the step's rows (batch x tokens); a draft's context does not
                    raise UnsupportedError(f"input %{node.name} {tuple(meta.shape)}: the megakernel takes steps "
                                           f"whose only rows are the tokens' (ids, positions and caches as inputs)")
                self.values[node] = Value("io", dtype_name(meta.dtype), index=len(self.io))
                self.io.append({"name": node.name, "kind": "input", "dtype": meta.dtype, "shape": tuple(meta.shape),
                                "input": inputs})
                inputs += 1
            elif node.op == "get_attr":
                if node.target not in self.weight_index:
                    self.weight_index[node.target] = len(self.weights)
                    self.weights.append(node.target)
                meta = node.meta["val"]
                self.values[node] = Value("w", dtype_name(meta.dtype), index=self.weight_index[node.target])
            elif node.op == "call_function" and node.target is operator.getitem:
                continue  # resolved through (producer, index)
            elif node.op == "call_function":
                name = op_name(node.target)
                handler = getattr(self, f"op_{name}", None) if name else None
                if handler is None:
                    raise UnsupportedError(f"%{node.name}: tilec.{name or node.target} has no megakernel task")
                handler(node, *node.args)
        for out in self.outputs:
            if not isinstance(out, fx.Node) or self.arg(out).src != "io" or self.io[self.arg(out).index]["kind"] != \
                    "output":
                raise UnsupportedError(f"the graph returns {out}, which is not an op's output")
        if self.phases:
            self.phases[-1]["sync"] = False  # the launch's end orders the last phase
        self.schedule_prefetch()

    def scratch(self) -> Value:
        index = next(i for i, io in enumerate(self.io) if io["name"] == "attention scratch")
        return Value("io", "float32", index=index)

    def shared(self, nbytes: int, why: str) -> None:
        """A phase needs ``nbytes`` of shared memory a block, for ``why`` (named where the plan takes too much)."""
        if nbytes > self.smem:
            self.smem, self.smem_why = nbytes, why

    def _k_ok(self, node: fx.Node, *ks: int) -> None:
        for k in ks:
            if k % 8:
                raise UnsupportedError(f"%{node.name}: an inner dimension of {k} is not a multiple of 8")

    # ----------------------------------------------------------------------------------------------- ops
    def op_embedding(self, node, ids, weight):
        v, h = weight.meta["val"].shape
        self._dtype_ok(node, ids.meta["val"].dtype, _ID_TYPES)
        self.phase(node, "embedding", ids=self.arg(ids), table=self.arg(weight),
                   out=self.result(node, node.meta["val"]), H=h, V=v)

    def _foldable(self, carriers: list, out_meta, sum_dtype: torch.dtype, sum_users: list) -> bool:
        """Whether an RMSNorm's output (carried by the fx nodes ``carriers``) can be left to its consumers: each one
        stages it as its activations (x, its first argument, and no other), and always can (max_rows rows of it fit
        in shared memory, and it has the sum's dtype, which the staging holds between its passes); the graph does
        not return it; and its sum (if any) is first read after the first consumer, which stores it."""
        users = [u for c in carriers for u in c.users]
        if not users or any(c in self.outputs for c in carriers) or out_meta.dtype != sum_dtype \
                or self.max_rows * out_meta.shape[-1] * out_meta.dtype.itemsize > XS_BYTES:
            return False
        for u in users:
            if u.op != "call_function" or op_name(u.target) not in _STAGING_OPS or u.args[0] not in carriers \
                    or any(a in carriers for a in u.args[1:] if isinstance(a, fx.Node)):
                return False
        first = min(self.order[u] for u in users)
        return all(self.order[u] > first for u in sum_users)

    def _norm(self, node, x, residual, weight, eps, out_meta, sum_meta) -> None:
        """tilec.rms_norm (``residual`` None) or add_rms_norm: folded into its consumers' phases where it can be,
        else a phase of its own."""
        h = out_meta.shape[-1]
        self._k_ok(node, h)
        getters = {i: [g for g in node.users if g.target is operator.getitem and g.args[1] == i] for i in (0, 1)}
        carriers = [node] if residual is None else getters[0]
        sum_users = [u for g in getters[1] for u in g.users]
        total = self.result(node, sum_meta, 1) if residual is not None else None
        sum_dtype = sum_meta.dtype if sum_meta is not None else x.meta["val"].dtype  # what x + res is rounded to
        if self._foldable(carriers, out_meta, sum_dtype, sum_users):
            self.folded[node if residual is None else (node, 0)] = {"node": node.name, "sum_stored": False, "source": {
                "norm": True, "x": self.arg(x).ctx(), "res": self.arg(residual).ctx() if residual is not None else None,
                "weight": self.arg(weight).ctx(), "sum": total.ctx() if total is not None else None,
                "sum_dtype": dtype_name(sum_dtype), "eps": float(eps)}}
            return
        out = self.result(node, out_meta) if residual is None else self.result(node, out_meta, 0)
        self.phase(node, "rms_norm", reads=(weight,), x=self.arg(x), res=self.arg(residual), weight=self.arg(weight),
                   out=out, sum=total, H=h, eps=float(eps))

    def op_rms_norm(self, node, x, weight, eps):
        self._norm(node, x, None, weight, eps, node.meta["val"], None)

    def op_add_rms_norm(self, node, x, residual, weight, eps):
        self._norm(node, x, residual, weight, eps, *node.meta["val"])

    def op_add(self, node, a, b):
        meta = node.meta["val"]
        if a.meta["val"].shape != meta.shape or b.meta["val"].shape != meta.shape:
            raise UnsupportedError(f"%{node.name}: tilec.add with broadcasting")
        self.phase(node, "add", a=self.arg(a), b=self.arg(b), out=self.result(node, meta),
                   N=math.prod(meta.shape[2:]))

    def op_cat(self, node, tensors, dim):
        meta = node.meta["val"]
        if dim not in (-1, meta.dim() - 1):
            raise UnsupportedError(f"%{node.name}: tilec.cat along dim {dim} (the megakernel joins the last dim)")
        out, col = self.result(node, meta), 0
        for i, t in enumerate(tensors):
            n = t.meta["val"].shape[-1]
            self.phase(node, "copy_cols", sync=i == len(tensors) - 1, src=self.arg(t), out=out, N=n,
                       N_out=meta.shape[-1], col0=col)
            col += n

    def op_linear(self, node, x, weight, bias):
        n, k = weight.meta["val"].shape
        self._k_ok(node, k)
        self.phase(node, "linear", reads=(weight, bias), w=self.arg(weight), bias=self.arg(bias), x=self.source(x),
                   y=self.result(node, node.meta["val"]), K=k, N=n)

    def op_qkv_rope(self, node, x, wq, wk, wv, bq, bk, bv, start_pos, head_dim, rotary_dim, theta):
        k = wq.meta["val"].shape[1]
        self._k_ok(node, k)
        projections, item0 = [], 0
        for i, (w, b, rope) in enumerate(((wq, bq, True), (wk, bk, True), (wv, bv, False))):
            n = w.meta["val"].shape[0]
            heads, d, rd = (n // head_dim, head_dim, rotary_dim) if rope else (1, n, 0)
            projections.append({"w": self.arg(w).ctx(), "bias": self.arg(b).ctx() if b is not None else None,
                                "y": self.result(node, node.meta["val"][i], i).ctx(), "heads": heads, "D": d,
                                "rotary_dim": rd, "item0": item0})
            item0 += heads * (rd // 2 + d - rd)
        self.phase(node, "qkv_rope", reads=(wq, wk, wv, bq, bk, bv), x=self.source(x), pos=self.arg(start_pos),
                   projections=projections, K=k, theta=float(theta))

    def op_attention(self, node, q, k, v, k_cache, v_cache, start_pos, sinks, num_heads, head_dim, v_head_dim,
                     window, scale, value_scale, causal=True):
        kc = k_cache.meta["val"]
        hkv = kc.shape[1]
        if v_head_dim > 256:
            raise UnsupportedError(f"%{node.name}: value head dim {v_head_dim} > 256")
        if k_cache.op != "placeholder" or v_cache.op != "placeholder":
            raise UnsupportedError(f"%{node.name}: caches must be the step's inputs")
        cache = len(self.attention)
        self.attention.append({"node": node.name, "k_cache": self.io[self.arg(k_cache).index]["input"],
                               "window": int(window), "hkv": hkv, "group": num_heads // hkv, "dv": v_head_dim})
        if head_dim % 8 or v_head_dim % 8:
            raise UnsupportedError(f"%{node.name}: head dims {head_dim} / {v_head_dim} are not multiples of 8")
        sink_kind = 0 if sinks is None else _SINK_KINDS.get(sinks.meta["val"].dtype)
        if sink_kind is None:
            raise UnsupportedError(f"%{node.name}: attention sinks of dtype {sinks.meta['val'].dtype} (the megakernel "
                                   f"takes {', '.join(map(str, _SINK_KINDS))})")
        # One phase: each chunk's partial state to scratch; the last block of a (batch row, kv head) to finish (an
        # arrival count each, max_rows x hkv of them) merges them and then stores the step's rows in the cache.
        self.phase(node, "attention", q=self.arg(q), k=self.arg(k), v=self.arg(v), k_cache=self.arg(k_cache),
                   v_cache=self.arg(v_cache), pos=self.arg(start_pos), scratch=self.scratch(), sinks=self.arg(sinks),
                   out=self.result(node, node.meta["val"]), counts=self.counts, window=int(window),
                   flags=int(bool(causal)) | 2 * sink_kind, scale=float(scale), value_scale=float(value_scale),
                   HQ=num_heads, HKV=hkv, D=head_dim, DV=v_head_dim, cache=cache)
        self.counts += self.max_rows * hkv
        # the chunk's keys and values in the cache's dtype (rows padded to an odd count of 16 bytes), a row of q a warp;
        # and the merge's room for at least one row's chunk state (the task merges as many rows and chunks at a time
        # as fit; plan() gives it room for all rows where the block has it)
        item = kc.dtype.itemsize
        self.shared(CHUNK * sum((w * item // 16 | 1) * 16 for w in (head_dim, v_head_dim))
                    + 4 * (THREADS // 32) * head_dim, f"%{node.name}: attention's keys and values of a chunk")
        self.shared(4 * attention_merge_floats(1, v_head_dim, 1), f"%{node.name}: attention's merge of one query row")
        self.merge_bytes = max(self.merge_bytes, 4 * attention_merge_floats(num_heads // hkv * self.max_rows,
                                                                            v_head_dim, 1))

    def op_moe_router(self, node, x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scaling):
        e, h = weight.meta["val"].shape
        self._k_ok(node, h)
        if n_group > 32 or top_k > 32:
            raise UnsupportedError(f"%{node.name}: {n_group} groups / top-{top_k} (the megakernel takes up to 32)")
        scores = self.workspace(torch.float32, e)
        self.phase(node, "router_scores", reads=(weight,), w=self.arg(weight), x=self.source(x), scores=scores, H=h,
                   E=e)
        w_meta, i_meta = node.meta["val"]
        choice = dict(scores=scores, bias=self.arg(bias), weights=self.result(node, w_meta, 0),
                      ids=self.result(node, i_meta, 1), E=e, n_group=n_group, topk_group=topk_group,
                      norm=bool(norm_topk_prob), scaling=float(scaling))
        # The choice goes into the experts' phase when the experts are the first to read it (their first half reads
        # the ids; block 0 stores both outputs for the second half and any later reader): a phase and a barrier fewer.
        readers = sorted({u for g in node.users for u in g.users}, key=self.order.__getitem__)
        if FOLD_ROUTER and readers and op_name(readers[0].target) in ("moe_experts", "mxfp4_moe_experts") and \
                set(readers[0].args[1:3]) == set(node.users):
            self.routes[node] = {k: (v.ctx() if isinstance(v, Value) else v) for k, v in choice.items()}
            self.route_floats = max(self.route_floats, self.max_rows * top_k + (THREADS // 32) * e)
            return
        self.shared(4 * (THREADS // 32) * e, f"%{node.name}: the router's choice over {e} experts")
        self.phase(node, "router_topk", K=top_k, **choice)

    def _experts(self, node, x, weights, ids, hidden, inter, gate_up: dict, down: dict, mxfp4: tuple = ()):
        """The experts' two phases; ``mxfp4``: the MXFP4 weights' nodes (gate/up blocks and scales, down blocks and
        scales), for the tensor-core tasks over their re-laid fragments."""
        xm = x.meta["val"]
        k = ids.meta["val"].shape[-1]
        self._k_ok(node, hidden, inter)
        act = self.workspace(xm.dtype, k * inter)
        if k > 16:
            raise UnsupportedError(f"%{node.name}: top-{k} experts a row (the megakernel takes up to 16)")
        src = self.source(x)  # the norm first, then the router's choice: the order the phase computes them in
        router = ids.args[0] if ids.op == "call_function" and ids.target is operator.getitem else None
        route = self.routes.pop(router, None)
        if route is not None:
            self.folding.append(router.name)
        # the mma's operands are bf16, and its weights are re-laid once, so they must be the model's parameters
        mma = MXFP4_MMA and bool(mxfp4) and xm.dtype == torch.bfloat16 and all(w.op == "get_attr" for w in mxfp4)
        if mma and hidden % mma_layout.CHUNK_K == 0 and 2 * inter % mma_layout.TILE_N == 0:
            self.mma_scales.append(mxfp4[1])
            words, scales = (self.derived(w, layout) for w, layout in zip(mxfp4[:2], mma_layout.EXPERT_LAYOUTS[:2]))
            self.phase(node, "experts_gate_up_mma", x=src, ids=self.arg(ids), route=route, act=act, H=hidden,
                       I=inter, K=k, words=words, scales=scales, depth=_depth(hidden // mma_layout.CHUNK_K))
        else:
            self.phase(node, "experts_gate_up", x=src, ids=self.arg(ids), route=route, act=act, H=hidden, I=inter,
                       K=k, xdtype=dtype_name(xm.dtype), **gate_up)
        self.staging(k * inter * xm.dtype.itemsize)  # experts_down stages a row's k activations
        if mma and inter % mma_layout.CHUNK_K == 0 and hidden % mma_layout.TILE_N == 0:
            self.mma_scales.append(mxfp4[3])
            words, scales = (self.derived(w, layout) for w, layout in zip(mxfp4[2:], mma_layout.EXPERT_LAYOUTS[2:]))
            self.route_floats = max(self.route_floats, 16 * k)  # each slot's 16 sums, past the staging
            self.phase(node, "experts_down_mma", act=act, weights=self.arg(weights), ids=self.arg(ids),
                       out=self.result(node, node.meta["val"]), H=hidden, I=inter, K=k, words=words, scales=scales,
                       depth=_depth(inter // mma_layout.CHUNK_K))
        else:
            self.phase(node, "experts_down", act=act, weights=self.arg(weights), ids=self.arg(ids),
                       out=self.result(node, node.meta["val"]), H=hidden, I=inter, K=k, xdtype=dtype_name(xm.dtype),
                       **down)

    def op_moe_experts(self, node, x, weights, ids, gate_up, down):
        e, two_i, h = gate_up.meta["val"].shape
        self._experts(node, x, weights, ids, h, two_i // 2, {"mxfp4": False, "w": self.arg(gate_up)},
                      {"mxfp4": False, "w": self.arg(down)})

    def op_mxfp4_moe_experts(self, node, x, weights, ids, gu_blocks, gu_scales, d_blocks, d_scales):
        e, two_i, half_h = gu_blocks.meta["val"].shape
        self._experts(node, x, weights, ids, 2 * half_h, two_i // 2,
                      {"mxfp4": True, "blocks": self.arg(gu_blocks), "scales": self.arg(gu_scales)},
                      {"mxfp4": True, "blocks": self.arg(d_blocks), "scales": self.arg(d_scales)},
                      (gu_blocks, gu_scales, d_blocks, d_scales))

    def op_swiglu(self, node, x, w_gate, w_up, w_down):
        inter, h = w_gate.meta["val"].shape
        self._k_ok(node, h, inter)
        act = self.workspace(x.meta["val"].dtype, inter)
        self.phase(node, "swiglu_gate_up", reads=(w_gate, w_up), wg=self.arg(w_gate), wu=self.arg(w_up),
                   x=self.source(x), act=act, H=h, I=inter)
        self.staging(inter * x.meta["val"].dtype.itemsize)
        self.phase(node, "linear", reads=(w_down,), w=self.arg(w_down), bias=None, x={"norm": False, "x": act.ctx()},
                   y=self.result(node, node.meta["val"]), K=inter, N=w_down.meta["val"].shape[0])

    def op_lm_head_argmax(self, node, x, weight):
        v, h = weight.meta["val"].shape
        self._k_ok(node, h)
        best_v = self.workspace(torch.float32, self.max_rows, rows=MAX_GRID)
        best_i = self.workspace(torch.int32, self.max_rows, rows=MAX_GRID)
        self.phase(node, "head_argmax_partial", reads=(weight,), w=self.arg(weight), x=self.source(x), best_v=best_v,
                   best_i=best_i, H=h, V=v,
                   logit_dtype=dtype_name(torch.result_type(x.meta["val"], weight.meta["val"])))
        self.phase(node, "head_argmax_final", best_v=best_v, best_i=best_i, out=self.result(node, node.meta["val"]))


def plan(gm: fx.GraphModule, max_rows: int, stage: str = "") -> Plan:
    """The megakernel's plan for ``gm``'s steps of up to ``max_rows`` rows; raises `UnsupportedError` naming what the
    megakernel lacks."""
    if max_rows > MAX_ROWS:
        raise UnsupportedError(f"steps of {max_rows} rows (batch x rows); the megakernel takes up to {MAX_ROWS}")
    p = _Planner(gm, max_rows)
    p.run()
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    result = Plan(p.weights, p.io, p.phases, p.attention, [p.arg(o).index for o in p.outputs],
                  isinstance(out, (tuple, list)), max(p.ws, ALIGN), 1 + -(-p.counts // 2), p.smem, p.xs, max_rows,
                  stage, info(gm).description,
                  # the scale codes as compiled (scale_fold_exact's caveat: weights edited later need a new compile)
                  bool(p.mma_scales) and scale_fold_exact([attr(gm, n.target) for n in p.mma_scales]))
    p.shared(4 * (result.area_floats + p.route_floats), f"activations staged for a GEMV phase ({p.xs} bytes) and a "
             f"folded router's choice ({4 * p.route_floats} bytes)")
    table = 8 * max(len(p.weights), 1)  # the weight table's static copy in each block
    # attention's merge: all of a (batch row, kv head)'s query rows at a time where they fit, else blocks of them
    p.shared(min(p.merge_bytes, MAX_SMEM_BYTES - table), "attention's merge of all of a kv head's query rows")
    result.smem_bytes = p.smem
    if result.smem_bytes + table > MAX_SMEM_BYTES:
        raise UnsupportedError(f"{result.smem_bytes} bytes of shared memory a block, for {p.smem_why}, beside the "
                               f"weight table's {table}: more than a block may take ({MAX_SMEM_BYTES})")
    return result


class _Build:
    """One build of the megakernel: its plan (steps of up to ``plan.max_rows`` rows), its source and module name, and
    once it runs, its modules and per-device state (weight table, workspace, barrier count, attention's scratch)."""

    def __init__(self, plan: Plan, name: str):
        self.plan, self.name = plan, name
        self.source = render("cuda/megakernel.cu.j2", ctx=plan.context())
        self.module = self.timeline_module = None
        self.state: dict[int, dict] = {}

    @property
    def file(self) -> str:
        return self.name.removeprefix("tilec_") + ".cu"

    def timeline_source(self) -> str:
        return render("cuda/megakernel.cu.j2", ctx=self.plan.context(timeline=True))


class MegakernelProgram(TritonProgram):
    """The ``cuda`` target's program: steps of up to ``max_rows`` rows as one launch of the megakernel (where the
    graph has a plan), every other step on the Triton kernels it extends. With ONE_ROW_BUILD, steps of one row run a
    second build of it, planned for one row."""

    def __init__(self, base: TritonProgram, gm: fx.GraphModule, stage: str, max_rows: int):
        self.__dict__.update(base.__dict__)
        self.builds: list[_Build] = []  # by max_rows, ascending: a step runs the first that takes its rows
        try:
            self.plan: Plan | None = plan(gm, max_rows, stage=stage)
            self.unsupported: str | None = None
        except UnsupportedError as exc:
            self.plan, self.unsupported = None, str(exc)
        if self.plan is not None:
            if ONE_ROW_BUILD and max_rows > 1:
                try:  # a plan for max_rows rows has one for a row (less staging and merge); if not, none is needed
                    self.builds.append(_Build(plan(gm, 1, stage=stage), "tilec_megakernel_1row"))
                except UnsupportedError:
                    pass
            self.builds.append(_Build(self.plan, "tilec_megakernel"))
        # the re-laid weights the megakernel reads (``<target>@<layout>`` in its table), derived when it loads
        self.derived = {**self.derived, **{name: tuple(name.split("@")) for b in self.builds
                                           for name in b.plan.weights if "@" in name}}
        self.launches = 0  # megakernel launches (a CUDA graph's replays not counted), for tests and benchmarks

    @property
    def megakernel_source(self) -> str | None:
        """The source of the build for up to max_rows rows (None without a plan)."""
        return self.builds[-1].source if self.builds else None

    @property
    def sources(self) -> dict[str, str]:
        return {**super().sources, **{b.file: b.source for b in self.builds}}

    def describe(self) -> dict:
        """The report's view: whether decode steps run as the megakernel, its phases, or why not."""
        if self.plan is None:
            return {"runs": False, "why": self.unsupported}
        return {"runs": True, "file": self.builds[-1].file, "max_rows": self.plan.max_rows,
                "phases": len(self.plan.phases), "barriers": sum(p["sync"] for p in self.plan.phases),
                "workspace_bytes": self.plan.workspace_bytes, "shared_memory_bytes": self.plan.smem_bytes,
                "schedule": self.plan.schedule(),
                "builds": [{"file": b.file, "max_rows": b.plan.max_rows} for b in self.builds]}

    def build_for(self, rows: int) -> _Build:
        """The build that runs a step of ``rows`` rows (batch x tokens, at most max_rows)."""
        return next(b for b in self.builds if rows <= b.plan.max_rows)

    def fits(self, inputs: tuple) -> bool:
        """Whether this step runs as the megakernel: a plan, a GPU, and at most max_rows rows (batch x tokens)."""
        if self.plan is None or not isinstance(inputs[0], torch.Tensor) or not inputs[0].is_cuda:
            return False
        ids = inputs[0]
        if ids.dim() != 2 or ids.shape[0] * ids.shape[1] > self.plan.max_rows:
            return False
        return True

    def __call__(self, *inputs):
        if not self.fits(inputs):
            return super().__call__(*inputs)
        return self._launch(self.dense_inputs(inputs))

    def _setup(self, device: torch.device, build: _Build) -> dict:
        index = device.index if device.index is not None else torch.cuda.current_device()
        state = build.state.get(index)
        if state is None:
            from tilec.codegen.cuda_build import CudaModule

            if build.module is None:
                build.module = CudaModule(build.source, build.name)
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            if sms > MAX_GRID:
                raise TargetError(f"the megakernel's grid is one block an SM, at most {MAX_GRID}; this GPU has {sms}")
            self.derive_weights()
            table = torch.tensor([self.weights[name].data_ptr() for name in build.plan.weights] or [0],
                                 dtype=torch.int64, device=device)
            state = {"sms": sms, "table": table,
                     "workspace": torch.empty(build.plan.workspace_bytes, dtype=torch.uint8, device=device),
                     "sync": torch.zeros(build.plan.sync_words, dtype=torch.int64, device=device), "scratch": None}
            build.state[index] = state
        return state

    def precompile(self, arch: str, timeline: bool = False) -> list[str]:
        """Compile the megakernel's builds for ``arch`` (``cuda_build.arch_of(device)``, e.g. ``sm_90a``) into the
        kernel cache now, and with ``timeline`` also the variants `timeline` runs, so that their first launches load
        them from there: a program built on a machine without its GPU, or several builds compiled side by side
        (benchmarks/ab_megakernel.py). Returns the names of the modules compiled (none without a plan)."""
        from tilec.codegen.cuda_build import compile_cubin

        modules = []
        for b in self.builds:
            modules.append((b.name, b.source))
            if timeline:
                modules.append((f"{b.name}_timeline", b.timeline_source()))
        for name, source in modules:
            compile_cubin(source, name, arch)
        return [name for name, _ in modules]

    def timeline(self, *inputs) -> tuple:
        """Diagnostics (benchmarks/profile_megakernel.py): run one step on a variant of the kernel that stamps
        %globaltimer in every block when each phase's work is done and after its barrier, and in attention the
        steps of each block's first item (MK_ATTENTION_STAMPS in megakernel_tasks.cuh). Returns the step's outputs,
        the phases' stamps, int64 [blocks, phases, 2] in ns (the phases of ``build_for(rows).plan``), and
        attention's, int64 [attention ops, blocks, 8]."""
        from tilec.codegen.cuda_build import CudaModule

        if not self.fits(inputs):
            raise TargetError("this step does not run as the megakernel (see the report's megakernel section)")
        build = self.build_for(inputs[0].numel())
        if build.timeline_module is None:
            build.timeline_module = CudaModule(build.timeline_source(), f"{build.name}_timeline")
        sms = self._setup(inputs[0].device, build)["sms"]
        phases, ops = sms * len(build.plan.phases) * 2, len(build.plan.attention) * sms * 8
        stamps = torch.zeros(phases + ops, dtype=torch.int64, device=inputs[0].device)
        out = self._launch(self.dense_inputs(inputs), stamps)
        return out, stamps[:phases].view(sms, -1, 2), stamps[phases:].view(-1, sms, 8)

    def _launch(self, inputs: tuple, stamps: torch.Tensor | None = None):
        from tilec.codegen.cuda_build import pointer

        ids = inputs[0]
        device = ids.device
        b, t = ids.shape
        build = self.build_for(b * t)
        plan_, state = build.plan, self._setup(device, build)
        args, outputs, caps = [], {}, []
        for a in plan_.attention:
            cap = inputs[a["k_cache"]].shape[2]
            nch = (-(-(a["window"] - 1 + t) // CHUNK) + 1) if a["window"] else -(-(cap + t) // CHUNK)
            caps.append((cap, nch))
        # attention's scratch: each op's max, sum and weighted values of every (batch row, kv head, chunk, query row)
        need = max([b * a["hkv"] * nch * a["group"] * t * (2 + a["dv"]) for a, (_, nch) in
                    zip(plan_.attention, caps)] or [1])
        if state["scratch"] is None or state["scratch"].numel() < need:
            state["scratch"] = torch.empty(need, dtype=torch.float32, device=device)
        for i, io in enumerate(plan_.io):
            if io["kind"] == "input":
                args.append(pointer(inputs[io["input"]]))
            elif io["kind"] == "output":
                outputs[i] = torch.empty((b, t, *io["shape"][2:]), dtype=io["dtype"], device=device)
                args.append(pointer(outputs[i]))
            else:
                args.append(pointer(state["scratch"]))
        for cap, nch in caps:
            args += [ctypes.c_int32(cap), ctypes.c_int32(nch)]
        if stamps is not None:
            args.append(pointer(stamps))
        args += [ctypes.c_int32(b), ctypes.c_int32(t)]
        module = build.module if stamps is None else build.timeline_module
        module.launch("tilec_megakernel", (state["sms"],), THREADS,
                      [pointer(state["table"]), pointer(state["workspace"]), pointer(state["sync"]), *args], device,
                      smem=plan_.smem_bytes)
        self.launches += 1
        result = [outputs[i] for i in plan_.outputs]
        return tuple(result) if plan_.output_tuple else result[0]


def lower(gm: fx.GraphModule, device: torch.device, stage: str, max_rows: int) -> MegakernelProgram:
    """The Triton program of ``gm`` (every step's fallback, and prefill's kernels) with the megakernel for steps of
    up to ``max_rows`` rows."""
    return MegakernelProgram(lower_triton(gm, device, stage), gm, stage, max_rows)
