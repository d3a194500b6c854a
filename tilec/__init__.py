"""tilec: a compiler for low-latency decoding of MiMo-family Mixture-of-Experts models.

    import tilec
    cm = tilec.compile(model)                  # tilec's MiMo, a transformers MiMoV2FlashForCausalLM, or a directory
    logits = cm(input_ids)                     # [B, T, V]
    tokens = cm.generate(input_ids, max_new_tokens=32)
    print(cm.listing()); cm.save("out/")       # every stage, the report
"""

from tilec.errors import TilecError  # noqa: F401
from tilec import ops  # noqa: F401  (registers torch.ops.tilec.*)
from tilec.options import Options  # noqa: F401
from tilec.capture import capture  # noqa: F401
from tilec.api import CompiledModel, compile  # noqa: F401

__version__ = "0.1.0"
__all__ = ["TilecError", "Options", "capture", "compile", "CompiledModel", "ops"]
