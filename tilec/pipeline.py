"""The compile pipeline: the ordered list of stages a captured graph goes through.

Stage 0 is ``capture`` (tilec.capture: trace, rewrite torch glue into tilec ops, propagate shapes). The passes below
run in this order; each lives in its own file under ``passes/`` and says in its docstring what it keeps invariant.
"""

from __future__ import annotations

from tilec.passes import dead_code, fuse_add_rms_norm, fuse_qkv_rope, fuse_swiglu, greedy_head, mxfp4_experts
from tilec.options import Options
from tilec.passmanager import Pass


def stages(options: Options, target: str) -> list[Pass]:
    """The passes run after capture for ``target``."""
    passes = [Pass("dead_code", dead_code.run, "remove computation whose result is unused")]
    if options.fuse:
        passes += [
            Pass("fuse_add_rms_norm", fuse_add_rms_norm.run, "residual add + RMSNorm -> add_rms_norm"),
            Pass("fuse_qkv_rope", fuse_qkv_rope.run, "Q/K/V projections + partial RoPE -> qkv_rope"),
            Pass("fuse_swiglu", fuse_swiglu.run, "dense gate/up projections + SiLU*mul + down -> swiglu"),
        ]
    if options.mxfp4:
        passes.append(Pass("mxfp4_experts", mxfp4_experts.run, "MoE expert weights -> MXFP4 (32 E2M1 values per E8M0 "
                           "scale); everything else keeps its precision"))
    if options.greedy:
        passes.append(Pass("greedy_head", greedy_head.run, "return argmax ids; lm_head + argmax -> lm_head_argmax"))
    return passes
