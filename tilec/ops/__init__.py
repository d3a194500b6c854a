"""The tilec op set. Importing this package registers every op under ``torch.ops.tilec``.

Model code calls the ops through this module (``ops.linear(x, w, None)``); each name is the op's overload, which is
also the target of its FX node.
"""

from tilec.ops.registry import OPS, OpDef, op_name  # noqa: F401
from tilec.ops import core as _core, attention as _attention, moe as _moe  # noqa: F401  (registration)
from tilec.ops import mxfp4 as _mxfp4, parallel as _parallel  # noqa: F401  (registration)

embedding = OPS["embedding"].overload
rms_norm = OPS["rms_norm"].overload
add_rms_norm = OPS["add_rms_norm"].overload
add = OPS["add"].overload
cat = OPS["cat"].overload
linear = OPS["linear"].overload
rope = OPS["rope"].overload
qkv_rope = OPS["qkv_rope"].overload
silu_mul = OPS["silu_mul"].overload
swiglu = OPS["swiglu"].overload
attention = OPS["attention"].overload
kv_append = OPS["kv_append"].overload
moe_router = OPS["moe_router"].overload
moe_experts = OPS["moe_experts"].overload
mxfp4_moe_experts = OPS["mxfp4_moe_experts"].overload
argmax = OPS["argmax"].overload
lm_head_argmax = OPS["lm_head_argmax"].overload
sample = OPS["sample"].overload
all_reduce = OPS["all_reduce"].overload
all_gather = OPS["all_gather"].overload
