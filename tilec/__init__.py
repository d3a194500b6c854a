"""tilec: a compiler for low-latency decoding of MiMo-family Mixture-of-Experts models."""

from tilec.errors import TilecError  # noqa: F401
from tilec import ops  # noqa: F401  (registers torch.ops.tilec.*)

__version__ = "0.1.0"
