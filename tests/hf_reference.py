"""HF transformers' MiMoV2FlashForCausalLM as the numbers reference: random models and their outputs."""

from __future__ import annotations

import torch

from tilec.models import MiMoConfig


def random_hf_model(cfg: MiMoConfig, seed: int = 0, std: float = 0.1, dtype=torch.float32):
    """An HF MiMo model with random weights, including non-zero sinks and router correction bias."""
    from transformers import MiMoV2FlashForCausalLM

    torch.manual_seed(seed)
    hf = MiMoV2FlashForCausalLM(cfg.to_hf()).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("sinks"):
                p.copy_(noise)
            else:
                p.copy_(std * noise)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))
    return hf.to(dtype)


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


def hf_generate(hf, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        # An explicit all-ones mask: otherwise HF infers padding from pad_token_id wherever that id appears.
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def hf_greedy(hf, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens from HF full forwards (no cache): the model's definition, independent of HF's cache code."""
    seq = ids
    for _ in range(new_tokens):
        seq = torch.cat([seq, hf_logits(hf, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def hf_reference_tokens(hf, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """HF's generate(), except for sliding_window=1 where HF's sliding cache (transformers 5.17) keeps the wrong
    keys and disagrees with HF's own full forward; there the full-forward greedy loop is the reference."""
    if hf.config.sliding_window == 1 and "sliding_attention" in hf.config.layer_types:
        return hf_greedy(hf, ids, new_tokens)
    return hf_generate(hf, ids, new_tokens)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
