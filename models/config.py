"""`MiMoConfig`: the MiMo-V2 family's configuration, with HF transformers' field names and defaults.

HF's ``MiMoV2FlashConfig`` is the reference: ``MiMoConfig.from_dict(hf_config.to_dict())`` gives the same model, and
``to_hf()`` goes back. The checkpoints Xiaomi released with remote code spell some fields differently
(``hybrid_layer_pattern``, ``moe_layer_freq``, ``sliding_window_size``, ...); `from_dict` translates those where
their meaning is the same and refuses, with a ConfigError, where this model would compute something else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tilec.errors import ConfigError

FULL, SLIDING = "full_attention", "sliding_attention"
DENSE, SPARSE = "dense", "sparse"
DEFAULT_ROPE = {
    FULL: {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334},
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class MiMoConfig:
    """MiMo-V2 configuration (HF names). ``sliding_window`` counts the query: W means the query plus W - 1 keys."""

    vocab_size: int = 152576
    hidden_size: int = 4096
    intermediate_size: int = 16384
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 192
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    sliding_window: int = 128
    attention_value_scale: float | None = 0.707
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    rms_norm_eps: float = 1e-5
    routed_scaling_factor: float | None = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = [FULL if (i == 0 or (i + 1) % 6 == 0) else SLIDING for i in range(n)]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [DENSE] + [SPARSE] * (n - 1)
        if self.rope_parameters is None:
            self.rope_parameters = {k: dict(v) for k, v in DEFAULT_ROPE.items()}
        if self.routed_scaling_factor is None:
            self.routed_scaling_factor = 1.0
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        self.layer_types = list(self.layer_types)
        self.mlp_layer_types = list(self.mlp_layer_types)
        self.validate()

    # --------------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"MiMoConfig: {what}")

        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "v_head_dim", "sliding_window")
        for name in positive:
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive int, got {getattr(self, name)!r}")
        n = self.num_hidden_layers
        need(len(self.layer_types) == n, f"layer_types has {len(self.layer_types)} entries for {n} layers")
        need(len(self.mlp_layer_types) == n, f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {n} layers")
        bad = sorted(set(self.layer_types) - {FULL, SLIDING})
        need(not bad, f"layer_types {bad} unsupported; use {FULL!r} or {SLIDING!r}")
        bad = sorted(set(self.mlp_layer_types) - {DENSE, SPARSE})
        need(not bad, f"mlp_layer_types {bad} unsupported; use {DENSE!r} or {SPARSE!r}")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} unsupported; MiMo uses 'silu'")
        for kind in set(self.layer_types):
            rope = self.rope_parameters.get(kind)
            need(rope is not None, f"rope_parameters has no entry for {kind!r}")
            need(rope.get("rope_type", "default") == "default",
                 f"rope_type {rope.get('rope_type')!r} for {kind!r} unsupported; only 'default' RoPE is built")
            rd = self.rotary_dim_of(kind)
            need(rd % 2 == 0 and 0 <= rd <= self.head_dim,
                 f"int(head_dim * partial_rotary_factor) = {rd} for {kind!r} must be even and <= head_dim")
        for kind in set(self.layer_types):
            kv = self.kv_heads_of(kind)
            need(self.num_attention_heads % kv == 0,
                 f"{self.num_attention_heads} attention heads are not a multiple of {kv} kv heads on {kind} layers")
        if SPARSE in self.mlp_layer_types:
            need(self.n_routed_experts > 0 and self.moe_intermediate_size > 0, "sparse layers need experts")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..n_routed_experts")
            need(self.n_routed_experts % self.n_group == 0 and 1 <= self.topk_group <= self.n_group,
                 f"{self.n_routed_experts} experts cannot form {self.n_group} groups choosing {self.topk_group}")
        if DENSE in self.mlp_layer_types:
            need(self.intermediate_size > 0, "dense layers need intermediate_size > 0")
        need(self.dtype is None or self.dtype in _DTYPES, f"dtype {self.dtype!r} unsupported; use one of "
                                                          f"{sorted(_DTYPES)}")

    # -------------------------------------------------------------------------------------- per-layer facts
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def is_moe(self, layer: int) -> bool:
        return self.mlp_layer_types[layer] == SPARSE

    def kv_heads_of(self, kind: str) -> int:
        # HF MiMo: sliding-window layers have twice the kv heads of full-attention layers.
        return self.num_key_value_heads * (2 if kind == SLIDING else 1)

    def kv_heads(self, layer: int) -> int:
        return self.kv_heads_of(self.layer_types[layer])

    def window(self, layer: int) -> int:
        """Keys a query sees including itself (HF ``sliding_window``); 0 for full attention."""
        return self.sliding_window if self.is_sliding(layer) else 0

    def has_sinks(self, layer: int) -> bool:
        return self.is_sliding(layer)

    def rotary_dim_of(self, kind: str) -> int:
        return int(self.head_dim * self.rope_parameters[kind].get("partial_rotary_factor", 0.334))

    def rotary_dim(self, layer: int) -> int:
        return self.rotary_dim_of(self.layer_types[layer])

    def rope_theta(self, layer: int) -> float:
        return float(self.rope_parameters[self.layer_types[layer]]["rope_theta"])

    @property
    def value_scale(self) -> float:
        return 1.0 if self.attention_value_scale is None else float(self.attention_value_scale)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.dtype) if self.dtype else None

    # ------------------------------------------------------------------------------------------- conversion
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MiMoConfig":
        """From an HF config dict (``config.json``), translating the remote-code field names where needed."""
        d = _translate_remote_code_fields(dict(d))
        model_type = d.get("model_type")
        if model_type not in (None, "mimo_v2_flash", "mimo_v2"):
            raise ConfigError(f"config model_type {model_type!r} is not a MiMo-V2 model (expected 'mimo_v2_flash')")
        if "torch_dtype" in d and "dtype" not in d:
            d["dtype"] = d["torch_dtype"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, hf_config) -> "MiMoConfig":
        return cls.from_dict(hf_config.to_dict())

    def to_hf(self):
        """The equivalent ``transformers.MiMoV2FlashConfig`` (needs transformers >= 5.17)."""
        from transformers import MiMoV2FlashConfig

        d = self.to_dict()
        dtype = d.pop("dtype")
        cfg = MiMoV2FlashConfig(**d)
        if dtype:
            cfg.dtype = dtype
        return cfg

    # ----------------------------------------------------------------------------------------------- counts
    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those one token reads (top-k experts only, one embedding row)."""
        h, n = self.hidden_size, self.num_hidden_layers
        total = active = 0
        for i in range(n):
            kv = self.kv_heads(i)
            attn = h * self.num_attention_heads * self.head_dim + h * kv * (self.head_dim + self.v_head_dim)
            attn += self.num_attention_heads * self.v_head_dim * h + 2 * h
            attn += self.num_attention_heads if self.has_sinks(i) else 0
            if self.attention_bias:
                attn += self.num_attention_heads * self.head_dim + kv * (self.head_dim + self.v_head_dim)
            if self.is_moe(i):
                expert = 3 * h * self.moe_intermediate_size
                router = self.n_routed_experts * (h + 1)
                total += attn + router + self.n_routed_experts * expert
                active += attn + router + self.num_experts_per_tok * expert
            else:
                mlp = 3 * h * self.intermediate_size
                total += attn + mlp
                active += attn + mlp
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total += self.vocab_size * h + head + h
        active += h + self.vocab_size * h + h  # one embedding row, the lm_head, the final norm
        return {"total": total, "active": active}


def _translate_remote_code_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Map the field names of Xiaomi's remote-code config.json onto HF's, where the meaning is the same."""
    if "hybrid_layer_pattern" not in d and "sliding_window_size" not in d:
        return d
    if "hybrid_layer_pattern" in d and "layer_types" not in d:
        d["layer_types"] = [SLIDING if int(p) == 1 else FULL for p in d.pop("hybrid_layer_pattern")]
    if "moe_layer_freq" in d and "mlp_layer_types" not in d:
        d["mlp_layer_types"] = [SPARSE if p else DENSE for p in d.pop("moe_layer_freq")]
    if "sliding_window_size" in d:
        d["sliding_window"] = int(d.pop("sliding_window_size")) + 1  # remote code counts past keys only
    if "layernorm_epsilon" in d and "rms_norm_eps" not in d:
        d["rms_norm_eps"] = d.pop("layernorm_epsilon")
    if "rope_parameters" not in d and "rope_theta" in d:
        prf = d.get("partial_rotary_factor", 0.334)
        d["rope_parameters"] = {
            FULL: {"rope_type": "default", "rope_theta": d["rope_theta"], "partial_rotary_factor": prf},
            SLIDING: {"rope_type": "default", "rope_theta": d.get("swa_rope_theta", d["rope_theta"]),
                      "partial_rotary_factor": prf},
        }
    if "routed_scaling_factor" in d and d["routed_scaling_factor"] is None:
        d["routed_scaling_factor"] = 1.0
    same = {"swa_num_attention_heads": d.get("num_attention_heads"), "swa_head_dim": d.get("head_dim"),
            "swa_v_head_dim": d.get("v_head_dim"), "swa_num_key_value_heads": 2 * d.get("num_key_value_heads", 0)}
    for key, expected in same.items():
        if key in d and d[key] is not None and d[key] != expected:
            raise ConfigError(f"config {key}={d[key]} is not supported: tilec's MiMo (like HF's) needs {expected}")
    if d.get("add_full_attention_sink_bias"):
        raise ConfigError("config add_full_attention_sink_bias=true is not supported: sinks exist on "
                          "sliding-window layers only")
    if d.get("add_swa_attention_sink_bias") is False:
        raise ConfigError("config add_swa_attention_sink_bias=false is not supported: sliding-window layers "
                          "carry sinks")
    return d
