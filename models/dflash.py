"""The DFlash draft model (z-lab's block-diffusion drafter) written with tilec ops, and its checkpoints.

The draft has no embedding or lm_head of its own: it holds the target's ``model.embed_tokens.weight`` and
``lm_head.weight`` (the same Parameters). The hidden states of the target layers ``target_layer_ids`` are
concatenated, projected (``fc``: K*H -> H) and normed (``hidden_norm``) once, and every draft layer turns them into
extra keys and values. One non-causal forward over the block ``[last accepted token, MASK x (B-1)]`` predicts the
tokens after the last accepted one (row i predicts position start + i).

One forward is one drafting step, captured and compiled like the target::

    forward(input_ids [N, B], start_pos [N], kv_caches, context [N, Tc, K*H], context_start [N]) -> logits [N, B, V]

``context`` holds the target hidden states of positions ``context_start .. start_pos - 1`` (those the draft has not
seen yet); each layer appends their keys and values to its cache (``kv_append``) and then attends from the block over
cache plus block (``attention(causal=False)``), which also writes the block's own keys: those sit at positions
>= start_pos, which the next step's context overwrites before any query can see them. So the draft's cache length is
the number of context positions (a session steps with ``advance=Tc``) and the draft never needs a rollback.
``context_start`` is an input rather than ``start_pos - Tc`` because a tilec graph holds no shape arithmetic.

``save_draft`` / ``load_draft`` write and read a checkpoint directory: ``config.json`` (z-lab's layout: model fields
plus ``dflash_config`` with ``block_size``, ``mask_token_id``, ``target_layer_ids``) and ``model.safetensors`` with
the draft's own weights only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tilec import ops
from tilec.artifact import staged_directory
from tilec.errors import CheckpointError, ConfigError
from tilec.models.mimo import Linear, RMSNorm
from tilec.runtime.kv_cache import CacheSpec, ring_capacity

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARED_WEIGHTS = ("embed_tokens.weight", "lm_head.weight")  # the target's, never in a draft checkpoint
ARCHITECTURE = "DFlashDraftModel"


def default_target_layer_ids(num_target_layers: int, count: int) -> list[int]:
    """``count`` target layers spread evenly, as z-lab does: from layer 1 to layer L-3 on deep targets (the first
    and last layers say little about the next tokens), over all layers on shallow ones."""
    count = max(1, min(count, num_target_layers))
    lo, hi = (1, num_target_layers - 3) if num_target_layers >= 5 else (0, num_target_layers - 1)
    if count == 1:
        return [num_target_layers // 2]
    return sorted({int(round(lo + i * (hi - lo) / (count - 1))) for i in range(count)})


@dataclasses.dataclass
class DFlashConfig:
    """A DFlash draft's configuration. ``hidden_size`` and ``vocab_size`` are the target's (the draft reads the
    target's embedding and writes through its lm_head); ``sliding_window`` W > 0 lets the block see only the last
    W - 1 context positions before it (the attention op's non-causal window), 0 all of them."""

    hidden_size: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: list[int] | None = None
    num_hidden_layers: int = 5
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 8192
    block_size: int = 8
    mask_token_id: int | None = None
    sliding_window: int = 0
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.target_layer_ids is None:
            self.target_layer_ids = default_target_layer_ids(self.num_target_layers, self.num_hidden_layers)
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        if isinstance(self.dtype, torch.dtype):
            self.dtype = str(self.dtype).removeprefix("torch.")
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"DFlashConfig: {what}")

        for name in ("hidden_size", "vocab_size", "num_target_layers", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "intermediate_size", "block_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive int, got {getattr(self, name)!r}")
        need(bool(self.target_layer_ids), "target_layer_ids is empty; the draft reads at least one target layer")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        need(not bad, f"target_layer_ids {bad} out of range for a target of {self.num_target_layers} layers")
        need(0 <= self.mask_token_id < self.vocab_size,
             f"mask_token_id {self.mask_token_id} is not a token id of the vocabulary (0..{self.vocab_size - 1})")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"{self.num_attention_heads} attention heads are not a multiple of {self.num_key_value_heads} kv heads")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        need(self.sliding_window >= 0, f"sliding_window must be >= 0 (0 = no window), got {self.sliding_window}")
        need(self.dtype is None or self.dtype in _DTYPES, f"dtype {self.dtype!r} unsupported; use one of "
                                                          f"{sorted(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.dtype) if self.dtype else None

    def to_dict(self) -> dict[str, Any]:
        """config.json in z-lab's layout: model fields at the top, the DFlash ones under ``dflash_config``."""
        d = dataclasses.asdict(self)
        dflash = {k: d.pop(k) for k in ("block_size", "mask_token_id", "target_layer_ids")}
        return {"architectures": [ARCHITECTURE], "model_type": "dflash", **d, "dflash_config": dflash}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DFlashConfig":
        d = dict(d)
        d.update(d.pop("dflash_config", None) or {})
        if "torch_dtype" in d and "dtype" not in d:
            d["dtype"] = d["torch_dtype"]
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in ("hidden_size", "vocab_size", "num_target_layers") if n not in d)
        if missing:
            raise ConfigError(f"DFlash config has no {', '.join(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------------------- model
class SharedEmbedding(nn.Module):
    """The target's embedding table, read by the draft (the same Parameter)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, ids: Tensor) -> Tensor:
        return ops.embedding(ids, self.weight)


class DFlashAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig, dtype: torch.dtype):
        super().__init__()
        h, heads, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.head_dim, self.window, self.theta = heads, d, cfg.sliding_window, cfg.rope_theta
        self.q_proj = Linear(h, heads * d, False, dtype)
        self.k_proj = Linear(h, kv * d, False, dtype)
        self.v_proj = Linear(h, kv * d, False, dtype)
        self.o_proj = Linear(heads * d, h, False, dtype)

    def forward(self, x: Tensor, context: Tensor, start_pos: Tensor, context_start: Tensor, k_cache: Tensor,
                v_cache: Tensor) -> Tensor:
        d = self.head_dim
        # The injected context becomes keys and values at its own positions (same projections as the block's);
        # this must precede the attention below, which reads the cache (graph order keeps it).
        ops.kv_append(ops.rope(self.k_proj(context), context_start, d, d, self.theta), self.v_proj(context),
                      k_cache, v_cache, context_start, d, d, 1.0)
        q = ops.rope(self.q_proj(x), start_pos, d, d, self.theta)
        k = ops.rope(self.k_proj(x), start_pos, d, d, self.theta)
        out = ops.attention(q, k, self.v_proj(x), k_cache, v_cache, start_pos, None, self.num_heads, d, d,
                            self.window, d ** -0.5, 1.0, False)
        return self.o_proj(out)


class DFlashMLP(nn.Module):
    def __init__(self, cfg: DFlashConfig, dtype: torch.dtype):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj, self.up_proj = Linear(h, i, False, dtype), Linear(h, i, False, dtype)
        self.down_proj = Linear(i, h, False, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class DFlashLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig, dtype: torch.dtype):
        super().__init__()
        self.self_attn = DFlashAttention(cfg, dtype)
        self.mlp = DFlashMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x: Tensor, context: Tensor, start_pos: Tensor, context_start: Tensor, k_cache: Tensor,
                v_cache: Tensor) -> Tensor:
        x = ops.add(x, self.self_attn(self.input_layernorm(x), context, start_pos, context_start, k_cache, v_cache))
        return ops.add(x, self.mlp(self.post_attention_layernorm(x)))


class DFlashDraft(nn.Module):
    """A DFlash draft for one target. ``embed_weight`` / ``lm_head_weight`` are the target's Parameters (shared)."""

    def __init__(self, config: DFlashConfig, embed_weight: nn.Parameter, lm_head_weight: nn.Parameter,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or config.torch_dtype or embed_weight.dtype
        self.config, self.dtype = config, dtype
        h, k = config.hidden_size, len(config.target_layer_ids)
        for name, w in (("embedding", embed_weight), ("lm_head", lm_head_weight)):
            if tuple(w.shape) != (config.vocab_size, h):
                raise ConfigError(f"the target's {name} weight has shape {tuple(w.shape)}; a draft of hidden size {h} "
                                  f"and vocabulary {config.vocab_size} needs ({config.vocab_size}, {h})")
        self.embed_tokens = SharedEmbedding(embed_weight)
        self.fc = Linear(k * h, h, False, dtype)
        self.hidden_norm = RMSNorm(h, config.rms_norm_eps, dtype)
        self.layers = nn.ModuleList(DFlashLayer(config, dtype) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(h, config.rms_norm_eps, dtype)
        self.lm_head = Linear(h, config.vocab_size, False, dtype, tied=lm_head_weight)

    def forward(self, input_ids: Tensor, start_pos: Tensor, kv_caches: list[Tensor], context: Tensor,
                context_start: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        ctx = self.hidden_norm(self.fc(context))  # once for all layers
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, start_pos, context_start, kv_caches[2 * i], kv_caches[2 * i + 1])
        return self.lm_head(self.norm(x))

    def cache_layout(self, batch: int, max_seq_len: int, spec_rows: int = 8) -> list[CacheSpec]:
        """k and v per layer. A sliding-window ring holds window - 1 + block slots: the block's own keys, written
        past the context, must not overwrite context keys the next block still sees."""
        cfg, specs = self.config, []
        cap = ring_capacity(cfg.sliding_window, max_seq_len, max(spec_rows, cfg.block_size))
        for i in range(cfg.num_hidden_layers):
            shape = (batch, cfg.num_key_value_heads, cap, cfg.head_dim)
            specs += [CacheSpec(f"k_cache_{i}", shape, self.dtype, cfg.sliding_window),
                      CacheSpec(f"v_cache_{i}", shape, self.dtype, cfg.sliding_window)]
        return specs

    def extra_inputs(self, batch: int, rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The graph inputs after the caches: the target hidden states to inject, and the position of their first."""
        k = len(self.config.target_layer_ids)
        return {"context": ((batch, rows, k * self.config.hidden_size), self.dtype),
                "context_start": ((batch,), torch.int64)}

    def own_state_dict(self) -> dict[str, Tensor]:
        """The draft's own weights (what a checkpoint holds): everything but the target's embedding and lm_head."""
        return {k: v for k, v in self.state_dict().items() if k not in SHARED_WEIGHTS}

    def describe(self) -> str:
        cfg = self.config
        n = sum(t.numel() for t in self.own_state_dict().values())
        return (f"DFlash draft {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, block {cfg.block_size}, "
                f"target layers {cfg.target_layer_ids}, {n / 1e6:.3g}M own parameters, "
                f"{str(self.dtype).removeprefix('torch.')}")

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float | None = None) -> "DFlashDraft":
        """Random weights for the draft's own tensors (the shared target weights are left alone)."""
        std = self.config.initializer_range if std is None else std
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, tensor in self.own_state_dict().items():
            if tensor.is_meta:
                continue
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * torch.randn(tensor.shape, generator=gen)
            else:
                values = std * torch.randn(tensor.shape, generator=gen)
            tensor.copy_(values.to(tensor.dtype))
        return self


def _target_parts(target) -> tuple[Any, nn.Parameter, nn.Parameter]:
    """(config, embedding weight, lm_head weight) of a tilec MiMo (or the source of its CompiledModel)."""
    model = getattr(target, "source", None) if not isinstance(target, nn.Module) else target
    try:
        parts = model.config, model.model.embed_tokens.weight, model.lm_head.weight
    except AttributeError:
        raise ConfigError(f"a DFlash draft needs a target with config, model.embed_tokens and lm_head (tilec's "
                          f"MiMo or its CompiledModel); got {type(target).__name__}") from None
    group = getattr(model, "vocab_group", None)
    if group is None:
        return parts
    # A tensor-parallel shard holds a slice of the vocabulary's head; the draft, whole on every rank, needs all of it:
    # gathered once (every rank builds its draft, so every rank takes part) and kept beside the shard.
    if "_whole_lm_head" not in model.__dict__:
        from tilec.runtime.distributed import all_gather_rows

        model.__dict__["_whole_lm_head"] = nn.Parameter(all_gather_rows(parts[2].detach(), group),
                                                        requires_grad=False)
    return parts[0], parts[1], model.__dict__["_whole_lm_head"]


def draft_config_for(target, **overrides) -> DFlashConfig:
    """A DFlashConfig that fits ``target``: its hidden size, vocabulary, depth, heads, MLP size, norm eps, dtype."""
    cfg, embed, _ = _target_parts(target)
    heads = cfg.num_attention_heads
    defaults = dict(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, num_target_layers=cfg.num_hidden_layers,
                    num_attention_heads=heads, num_key_value_heads=cfg.num_key_value_heads,
                    head_dim=cfg.hidden_size // heads, intermediate_size=cfg.intermediate_size,
                    rms_norm_eps=cfg.rms_norm_eps, initializer_range=cfg.initializer_range,
                    dtype=str(embed.dtype).removeprefix("torch."))
    return DFlashConfig(**{**defaults, **overrides})


def build_draft(target, *, seed: int = 0, **overrides) -> DFlashDraft:
    """A randomly initialised DFlash draft that fits ``target`` (a tilec MiMo or its CompiledModel), on the target's
    device, sharing its embedding and lm_head. ``overrides`` are DFlashConfig fields (``num_hidden_layers=2``,
    ``block_size=4``, ``target_layer_ids=[1, 2]``, ``sliding_window=16``, ...)."""
    _, embed, head = _target_parts(target)
    cfg = draft_config_for(target, **overrides)
    with embed.device:
        draft = DFlashDraft(cfg, embed, head)
    return draft.init_weights(seed).eval()


# --------------------------------------------------------------------------------------------------- checkpoints
def save_draft(draft: DFlashDraft, directory: str | Path) -> Path:
    """Write ``draft`` as config.json plus model.safetensors (its own weights only), whole or not at all; an
    existing non-empty directory is refused."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory} already exists and is not an empty directory; choose a new one")
    config = {**draft.config.to_dict(), "dtype": str(draft.dtype).removeprefix("torch.")}
    with staged_directory(directory, CheckpointError) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in draft.own_state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return directory


def load_draft(directory: str | Path, target) -> DFlashDraft:
    """The draft saved in ``directory``, attached to ``target`` (a tilec MiMo or its CompiledModel): on its device,
    in its dtype, sharing its embedding and lm_head. Raises CheckpointError, naming the field or key and the shapes,
    for a draft that does not fit the target or a checkpoint with missing, misshapen or unexpected tensors."""
    from safetensors import safe_open

    from tilec.models.hf import read_config_json

    root = Path(directory)
    cfg_path = root / "config.json"
    raw = read_config_json(root, "a DFlash draft directory holds config.json and model.safetensors (see "
                                 "tilec.models.dflash.save_draft)")
    if "dflash_config" not in raw and raw.get("model_type") != "dflash":
        raise CheckpointError(f"{cfg_path} is not a DFlash draft config (no dflash_config)")
    target_cfg, embed, head = _target_parts(target)
    _check_fits(raw, target_cfg, cfg_path)
    try:
        cfg = DFlashConfig.from_dict({**raw, "dtype": str(embed.dtype).removeprefix("torch.")})
    except ConfigError as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from None
    with torch.device("meta"):
        draft = DFlashDraft(cfg, nn.Parameter(torch.empty(embed.shape, dtype=embed.dtype), requires_grad=False),
                            nn.Parameter(torch.empty(head.shape, dtype=head.dtype), requires_grad=False))
    want = {k: tuple(v.shape) for k, v in draft.own_state_dict().items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root} has no *.safetensors file with the draft's weights")
    with contextlib.ExitStack() as stack:
        where = {}
        for path in files:
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for key in handle.keys():
                where[key] = handle
        for key, shape in want.items():
            if key not in where:
                raise CheckpointError(f"draft checkpoint {root} has no tensor {key!r} (expected shape {shape})")
            found = tuple(where[key].get_slice(key).get_shape())
            if found != shape:
                raise CheckpointError(f"draft tensor {key!r} has shape {found}, expected {shape}; does "
                                      f"{cfg_path.name} match the weights?")
        unexpected = sorted(set(where) - set(want))
        if unexpected:
            raise CheckpointError(f"draft checkpoint has {len(unexpected)} tensor(s) this config does not use, e.g. "
                                  f"{', '.join(unexpected[:5])}" + (" (a draft checkpoint holds no embedding or "
                                                                    "lm_head: it uses the target's)"
                                                                    if set(unexpected) & set(SHARED_WEIGHTS) else ""))
        draft.embed_tokens.weight, draft.lm_head.weight = embed, head
        for key in want:
            path, _, leaf = key.rpartition(".")
            module = draft.get_submodule(path)
            value = where[key].get_tensor(key).to(device=embed.device, dtype=embed.dtype)
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    return draft.eval()


def _check_fits(raw: dict, target_cfg, cfg_path: Path) -> None:
    """A draft made for another target fails here, before any tensor is read, naming the field that differs."""
    merged = {**raw, **(raw.get("dflash_config") or {})}
    for field in ("hidden_size", "vocab_size"):
        if field in merged and merged[field] != getattr(target_cfg, field):
            raise CheckpointError(f"draft {field} {merged[field]} does not fit the target's {field} "
                                  f"{getattr(target_cfg, field)} ({cfg_path}); the draft shares the target's "
                                  f"embedding and lm_head")
    layers = target_cfg.num_hidden_layers
    if "num_target_layers" in merged and merged["num_target_layers"] != layers:
        raise CheckpointError(f"draft was made for a target of {merged['num_target_layers']} layers; this target has "
                              f"{layers} ({cfg_path})")
    bad = [i for i in merged.get("target_layer_ids") or [] if not 0 <= int(i) < layers]
    if bad:
        raise CheckpointError(f"draft target_layer_ids {bad} do not exist in a target of {layers} layers "
                              f"(valid: 0..{layers - 1}) ({cfg_path})")

