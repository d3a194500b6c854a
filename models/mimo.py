"""MiMo-V2 (Flash / 2.5-Pro) written with tilec ops, in traceable form.

Parameter names equal HF transformers' in-memory names (``model.layers.3.mlp.experts.gate_up_proj``,
``self_attn.sinks``, ...), so a state dict moves between the two unchanged. One forward is one step: T rows per
sequence at positions ``start_pos[b] + t`` (prefill: T = prompt length; decode: T = 1; verify: T = block size),
reading and appending the static KV cache passed in ``kv_caches`` (k and v per layer, see `cache_layout`).

``tilec compile models/mimo.py --preset tiny`` loads this file and calls `build_model`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tilec import ops
from tilec.errors import ConfigError
from tilec.models.config import DENSE, FULL, SLIDING, SPARSE, MiMoConfig
from tilec.models.parallel import head_ranges, inter_range, vocab_range
from tilec.runtime.distributed import TensorParallel
from tilec.runtime.kv_cache import CacheSpec, ring_capacity


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 tied: nn.Parameter | None = None):
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype) if tied is None else tied
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(vocab, hidden, dtype=dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return ops.embedding(ids, self.weight)


class MiMoAttention(nn.Module):
    """Attention with its output projection; under tensor parallelism (``tp``) this rank's heads only, the output
    a partial sum over the ranks' heads."""

    def __init__(self, cfg: MiMoConfig, layer: int, dtype: torch.dtype, tp: TensorParallel | None = None):
        super().__init__()
        q_heads, kv_heads = head_ranges(cfg, layer, tp)
        h, heads, kv = cfg.hidden_size, len(q_heads), len(kv_heads)
        self.num_heads, self.num_kv_heads, self.head_dim, self.v_head_dim = heads, kv, cfg.head_dim, cfg.v_head_dim
        self.window = cfg.window(layer)
        self.rotary_dim, self.theta = cfg.rotary_dim(layer), cfg.rope_theta(layer)
        self.scale, self.value_scale = cfg.head_dim ** -0.5, cfg.value_scale
        self.q_proj = Linear(h, heads * cfg.head_dim, cfg.attention_bias, dtype)
        self.k_proj = Linear(h, kv * cfg.head_dim, cfg.attention_bias, dtype)
        self.v_proj = Linear(h, kv * cfg.v_head_dim, cfg.attention_bias, dtype)
        self.o_proj = Linear(heads * cfg.v_head_dim, h, False, dtype)
        self.sinks = _param(heads, dtype=dtype) if cfg.has_sinks(layer) else None

    def forward(self, x: Tensor, start_pos: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        q = ops.rope(self.q_proj(x), start_pos, self.head_dim, self.rotary_dim, self.theta)
        k = ops.rope(self.k_proj(x), start_pos, self.head_dim, self.rotary_dim, self.theta)
        v = self.v_proj(x)
        out = ops.attention(q, k, v, k_cache, v_cache, start_pos, self.sinks, self.num_heads, self.head_dim,
                            self.v_head_dim, self.window, self.scale, self.value_scale)
        return self.o_proj(out)


class MiMoMLP(nn.Module):
    """Dense SwiGLU MLP (layer 0 of MiMo-V2-Flash); under tensor parallelism a slice of its intermediate size."""

    def __init__(self, cfg: MiMoConfig, dtype: torch.dtype, tp: TensorParallel | None = None):
        super().__init__()
        h, i = cfg.hidden_size, len(inter_range(cfg.intermediate_size, tp, "intermediate_size"))
        self.gate_proj, self.up_proj, self.down_proj = Linear(h, i, False, dtype), Linear(h, i, False, dtype), \
            Linear(i, h, False, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class MiMoRouter(nn.Module):
    def __init__(self, cfg: MiMoConfig, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype)
        # HF keeps the correction bias in fp32 whatever the model dtype.
        self.register_buffer("e_score_correction_bias", torch.empty(cfg.n_routed_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, float(cfg.routed_scaling_factor)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return ops.moe_router(x, self.weight, self.e_score_correction_bias, self.top_k, self.n_group,
                              self.topk_group, self.norm_topk_prob, self.scaling)


class MiMoExperts(nn.Module):
    """The routed experts; under tensor parallelism every expert's slice of its intermediate size."""

    def __init__(self, cfg: MiMoConfig, dtype: torch.dtype, tp: TensorParallel | None = None):
        super().__init__()
        e, h = cfg.n_routed_experts, cfg.hidden_size
        i = len(inter_range(cfg.moe_intermediate_size, tp, "moe_intermediate_size"))
        self.gate_up_proj = _param(e, 2 * i, h, dtype=dtype)
        self.down_proj = _param(e, h, i, dtype=dtype)

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        return ops.moe_experts(x, weights, indices, self.gate_up_proj, self.down_proj)


class MiMoMoE(nn.Module):
    def __init__(self, cfg: MiMoConfig, dtype: torch.dtype, tp: TensorParallel | None = None):
        super().__init__()
        self.gate = MiMoRouter(cfg, dtype)  # every rank routes the same rows the same way
        self.experts = MiMoExperts(cfg, dtype, tp)

    def forward(self, x: Tensor) -> Tensor:
        weights, indices = self.gate(x)
        return self.experts(x, weights, indices)


class MiMoDecoderLayer(nn.Module):
    def __init__(self, cfg: MiMoConfig, layer: int, dtype: torch.dtype, tp: TensorParallel | None = None):
        super().__init__()
        self.self_attn = MiMoAttention(cfg, layer, dtype, tp)
        self.mlp = MiMoMoE(cfg, dtype, tp) if cfg.is_moe(layer) else MiMoMLP(cfg, dtype, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # Under tensor parallelism the attention and MLP outputs are this rank's partial sums, added up across ranks.
        self.tp_group = tp.group if tp is not None and tp.world > 1 else None

    def _sum(self, partial: Tensor) -> Tensor:
        return partial if self.tp_group is None else ops.all_reduce(partial, self.tp_group)

    def forward(self, x: Tensor, start_pos: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        x = ops.add(x, self._sum(self.self_attn(self.input_layernorm(x), start_pos, k_cache, v_cache)))
        return ops.add(x, self._sum(self.mlp(self.post_attention_layernorm(x))))


class MiMoModel(nn.Module):
    def __init__(self, cfg: MiMoConfig, dtype: torch.dtype, tp: TensorParallel | None = None):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.ModuleList(MiMoDecoderLayer(cfg, i, dtype, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: Tensor, start_pos: Tensor, kv_caches: list[Tensor],
                hidden_layers: tuple[int, ...] = ()) -> tuple[Tensor, list[Tensor]]:
        x = self.embed_tokens(input_ids)
        hidden = []
        for i, layer in enumerate(self.layers):
            x = layer(x, start_pos, kv_caches[2 * i], kv_caches[2 * i + 1])
            if i in hidden_layers:
                hidden.append(x)
        return self.norm(x), hidden


class MiMoForCausalLM(nn.Module):
    """The MiMo-V2 causal LM. ``forward(input_ids [B, T], start_pos [B], kv_caches) -> logits [B, T, V]``.

    With ``output_hidden_layers`` set (to layer indices) it returns ``(logits, hidden)``, hidden [B, T, K*H] being
    the residual stream after each of those K layers, concatenated in the given order (what a DFlash draft reads).

    With ``tp`` (a `TensorParallel` of more than one rank) the module is one rank's shard (models/parallel.py):
    attention heads, MLP intermediate sizes and the lm_head's vocabulary split, the outputs summed or gathered across
    ranks; the rest held whole.
    """

    def __init__(self, config: MiMoConfig, dtype: torch.dtype | None = None, tp: TensorParallel | None = None):
        super().__init__()
        dtype = dtype or config.torch_dtype or torch.float32
        self.config, self.dtype, self.tp = config, dtype, tp
        self.output_hidden_layers: tuple[int, ...] = ()
        self.model = MiMoModel(config, dtype, tp)
        tied = self.model.embed_tokens.weight if config.tie_word_embeddings else None
        # Under tensor parallelism a slice of the vocabulary a rank (an untied head), the logits gathered after it.
        vocab = vocab_range(config, tp)
        self.vocab_group = tp.group if len(vocab) < config.vocab_size else None
        self.lm_head = Linear(config.hidden_size, len(vocab), False, dtype, tied=tied)

    def forward(self, input_ids: Tensor, start_pos: Tensor, kv_caches: list[Tensor]):
        layers = self.output_hidden_layers
        bad = [i for i in layers if not 0 <= i < self.config.num_hidden_layers]
        if bad:
            raise ConfigError(f"output_hidden_layers {bad} out of range: the model has "
                              f"{self.config.num_hidden_layers} layers")
        x, hidden = self.model(input_ids, start_pos, kv_caches, layers)
        logits = self.lm_head(x)
        if self.vocab_group is not None:
            logits = ops.all_gather(logits, self.vocab_group)
        if not layers:
            return logits
        by_layer = dict(zip(sorted(set(layers)), hidden))
        return logits, ops.cat([by_layer[i] for i in layers], -1)

    def describe(self) -> str:
        cfg = self.config
        counts = cfg.parameter_counts()
        shard = f", tensor-parallel rank {self.tp.rank} of {self.tp.world}" if self.tp and self.tp.world > 1 else ""
        return (f"MiMo {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts "
                f"top-{cfg.num_experts_per_tok}, {_count(counts['total'])} parameters "
                f"({_count(counts['active'])} active), {str(self.dtype).removeprefix('torch.')}{shard}")

    def cache_layout(self, batch: int, max_seq_len: int, spec_rows: int = 8) -> list[CacheSpec]:
        """The KV cache tensors `forward` expects, in order: k then v for each layer."""
        cfg, specs = self.config, []
        for i in range(cfg.num_hidden_layers):
            cap = ring_capacity(cfg.window(i), max_seq_len, spec_rows)
            kv = self.model.layers[i].self_attn.num_kv_heads  # this rank's under tensor parallelism
            specs.append(CacheSpec(f"k_cache_{i}", (batch, kv, cap, cfg.head_dim), self.dtype, cfg.window(i)))
            specs.append(CacheSpec(f"v_cache_{i}", (batch, kv, cap, cfg.v_head_dim), self.dtype, cfg.window(i)))
        return specs

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float | None = None) -> "MiMoForCausalLM":
        """Random weights (normal, HF's initializer_range by default); sinks and router bias non-zero on purpose."""
        std = self.config.initializer_range if std is None else std
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if tensor.is_meta:
                continue
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                values = 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
            elif name.endswith("e_score_correction_bias"):
                values = 0.05 * torch.randn(tensor.shape, generator=gen)
            elif name.endswith("sinks"):
                values = torch.randn(tensor.shape, generator=gen)
            else:
                values = std * torch.randn(tensor.shape, generator=gen)
            tensor.copy_(values.to(tensor.dtype))
        return self


# ------------------------------------------------------------------------------------------------------ presets
PRESETS: dict[str, dict] = {
    # Small enough for CPU tests; exercises both layer kinds, sinks, GQA, a dense and MoE layers, a short window.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=32, v_head_dim=16,
                 n_routed_experts=8, num_experts_per_tok=2, sliding_window=9,
                 layer_types=[FULL, SLIDING, SLIDING, FULL], mlp_layer_types=[DENSE, SPARSE, SPARSE, SPARSE],
                 dtype="float32"),
    # Exactly MiMoV2FlashConfig(vocab_size=32768, hidden_size=2048, ...): 6.98B parameters, 0.69B active.
    "mini": dict(vocab_size=32768, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=768,
                 num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=2, head_dim=192, v_head_dim=128,
                 n_routed_experts=128, num_experts_per_tok=8, sliding_window=129, attention_value_scale=0.707,
                 dtype="bfloat16"),
    # MiMo-V2-Flash (309B total, 15B active).
    "v2-flash": dict(vocab_size=152576, hidden_size=4096, intermediate_size=16384, moe_intermediate_size=2048,
                     num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=4, head_dim=192,
                     v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, sliding_window=129,
                     attention_value_scale=0.707, dtype="bfloat16"),
    # MiMo-V2.5-Pro (1.02T total, 42B active). Public facts: hidden 6144, 70 layers, 128 heads, 8 kv heads, 384
    # experts top-8 of size 2048, value scale 0.612, full attention at the layers listed. Assumed like V2-Flash
    # (not published in what tilec read): vocab, head dims 192/128, dense layer 0 of 16384, window 128 + query.
    "v2.5-pro": dict(vocab_size=152576, hidden_size=6144, intermediate_size=16384, moe_intermediate_size=2048,
                     num_hidden_layers=70, num_attention_heads=128, num_key_value_heads=8, head_dim=192,
                     v_head_dim=128, n_routed_experts=384, num_experts_per_tok=8, sliding_window=129,
                     attention_value_scale=0.612,
                     layer_types=[FULL if i in (0, 7, 15, 23, 31, 39, 47, 55, 62, 69) else SLIDING for i in range(70)],
                     dtype="bfloat16"),
}
_META_PRESETS = ("v2-flash", "v2.5-pro")


def preset_config(name: str, **overrides) -> MiMoConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown MiMo preset {name!r}; choose one of {', '.join(PRESETS)}")
    return MiMoConfig(**{**PRESETS[name], **overrides})


def build_model(preset: str = "tiny", *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                seed: int = 0, **overrides) -> MiMoForCausalLM:
    """A MiMo model with random weights from a preset (``tiny``, ``mini``, ``v2-flash``, ``v2.5-pro``).

    The two full-size presets default to the meta device (shapes only, nothing allocated).
    """
    cfg = preset_config(preset, **overrides)
    device = torch.device(device or ("meta" if preset in _META_PRESETS else "cpu"))
    with device:
        model = MiMoForCausalLM(cfg, dtype)
    return model.init_weights(seed).eval()


def _count(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"
