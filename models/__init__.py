"""Model definitions in traceable form (MiMo target, DFlash draft), presets, and checkpoint import."""

from tilec.models.config import MiMoConfig  # noqa: F401
from tilec.models.mimo import PRESETS, MiMoForCausalLM, build_model, preset_config  # noqa: F401


def from_hf(src, **kwargs):
    """Load a MiMo model from a transformers ``MiMoV2FlashForCausalLM`` or an HF checkpoint directory."""
    from tilec.models.hf import from_hf as _from_hf

    return _from_hf(src, **kwargs)
