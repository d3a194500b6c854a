"""MoE experts held in MXFP4: the module a pre-quantised MiMo holds in place of `MiMoExperts`.

Buffers, uint8 in the layout ``tilec.ops.mxfp4_moe_experts`` takes (row-major; see tilec/mxfp4.py for the format):
``gate_up_proj_blocks`` [E, 2I, H/2], ``gate_up_proj_scales`` [E, 2I, H/32] (gate rows then up rows, as
``gate_up_proj``), ``down_proj_blocks`` [E, H, I/2], ``down_proj_scales`` [E, H, I/32]. Their state-dict names are the
gpt-oss / HF checkpoint names (``model.layers.N.mlp.experts.gate_up_proj_blocks``); checkpoints hold the blocks as
[E, N, K/32, 16], a reshape done when saving and loading (models/hf.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from tilec import mxfp4, ops
from tilec.errors import CheckpointError, ConfigError
from tilec.models.mimo import MiMoExperts

KEYS = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")


class MXFP4Experts(nn.Module):
    """SwiGLU experts with MXFP4 weights; ``forward`` equals `MiMoExperts` on the dequantised weights exactly."""

    def __init__(self, experts: int, hidden: int, inter: int, device: str | torch.device | None = None):
        super().__init__()
        if hidden % mxfp4.BLOCK or inter % mxfp4.BLOCK:
            raise ConfigError(f"MXFP4 experts need hidden size and expert size multiples of {mxfp4.BLOCK}; got "
                              f"hidden {hidden}, expert size {inter}")
        self.experts, self.hidden, self.inter = experts, hidden, inter
        shapes = {"gate_up_proj": (experts, 2 * inter, hidden), "down_proj": (experts, hidden, inter)}
        for proj, (e, n, k) in shapes.items():
            self.register_buffer(f"{proj}_blocks", torch.empty(e, n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{proj}_scales", torch.empty(e, n, k // mxfp4.BLOCK, dtype=torch.uint8,
                                                               device=device))

    @classmethod
    def from_mxfp4(cls, gate_up: mxfp4.MXFP4Tensor, down: mxfp4.MXFP4Tensor) -> "MXFP4Experts":
        experts, two_i, hidden = gate_up.shape
        module = cls(experts, hidden, two_i // 2, device="meta")
        if down.shape != (experts, hidden, two_i // 2):
            raise ConfigError(f"MXFP4 down_proj of shape {down.shape} does not pair with gate_up_proj "
                              f"{gate_up.shape}: expected {(experts, hidden, two_i // 2)}")
        module.gate_up_proj_blocks, module.gate_up_proj_scales = gate_up.blocks, gate_up.scales
        module.down_proj_blocks, module.down_proj_scales = down.blocks, down.scales
        return module

    @classmethod
    def quantize(cls, experts: MiMoExperts, scale_rule: str = "floor", name: str = "experts") -> "MXFP4Experts":
        """The MXFP4 version of a `MiMoExperts` (its tensors are not changed)."""
        return cls.from_mxfp4(mxfp4.quantize(experts.gate_up_proj, scale_rule, name=f"{name}.gate_up_proj"),
                              mxfp4.quantize(experts.down_proj, scale_rule, name=f"{name}.down_proj"))

    @property
    def gate_up(self) -> mxfp4.MXFP4Tensor:
        return mxfp4.MXFP4Tensor(self.gate_up_proj_blocks, self.gate_up_proj_scales,
                                 (self.experts, 2 * self.inter, self.hidden))

    @property
    def down(self) -> mxfp4.MXFP4Tensor:
        return mxfp4.MXFP4Tensor(self.down_proj_blocks, self.down_proj_scales, (self.experts, self.hidden, self.inter))

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        return ops.mxfp4_moe_experts(x, weights, indices, self.gate_up_proj_blocks, self.gate_up_proj_scales,
                                     self.down_proj_blocks, self.down_proj_scales)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, hidden={self.hidden}, inter={self.inter}, mxfp4"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def quantize_experts_of(model: nn.Module, scale_rule: str = "floor") -> list[str]:
    """Replace every `MiMoExperts` of ``model`` by its `MXFP4Experts`, in place; returns the modules replaced."""
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, MiMoExperts):
            _replace(model, name, MXFP4Experts.quantize(module, scale_rule, name))
            done.append(name)
    return done


def use_checkpoint_experts(model: nn.Module, has_key: Callable[[str], bool]) -> list[str]:
    """Swap an empty (meta) `MXFP4Experts` into every experts module whose MXFP4 tensors the checkpoint holds
    (``has_key(name)``), so they load as they are; returns the modules swapped.

    Raises CheckpointError when a layer has some of the four MXFP4 tensors but not all, or sizes MXFP4 cannot hold.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, MiMoExperts):
            continue
        present = [k for k in KEYS if has_key(f"{name}.{k}")]
        if not present:
            continue
        missing = [f"{name}.{k}" for k in KEYS if k not in present]
        if missing:
            raise CheckpointError(f"{name} has MXFP4 expert tensors ({', '.join(present)}) but not "
                                  f"{', '.join(repr(m) for m in missing)}; an MXFP4 layer needs all of "
                                  f"{', '.join(KEYS)}")
        experts, two_i, hidden = module.gate_up_proj.shape
        try:
            _replace(model, name, MXFP4Experts(experts, hidden, two_i // 2, device="meta"))
        except ConfigError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
        swapped.append(name)
    return swapped
