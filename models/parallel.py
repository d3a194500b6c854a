"""Tensor parallelism for MiMo: what each of ``world`` GPUs holds, and how a whole model is cut into shards.

The split is Megatron's, chosen for decode latency: every GPU reads 1/world of the attention, MLP and expert weights
a step needs (each chosen expert a slice on every GPU, so no GPU waits on another's share of the routing) and of the
lm_head; the embedding's row, the norms and the router are read whole on each.
- Attention: each rank holds ``heads / world`` query heads, their key/value heads (a slice when the kv heads divide
  among the ranks, else the one kv head its query heads share, repeated on the ranks that share it), their sinks,
  and the matching columns of the output projection. Its KV cache holds only those kv heads.
- Dense MLP and every routed expert: each rank holds a slice of the intermediate size (gate and up rows, down
  columns), so each expert chosen for a row is computed a slice per rank. The router is held whole and routes every
  row the same way on every rank.
- Each rank's attention and MLP outputs are partial sums; ``tilec.all_reduce`` adds them (two a layer).
- The lm_head: each rank holds a slice of the vocabulary, and ``tilec.all_gather`` joins the logits (an lm_head tied
  to the embedding stays whole). A DFlash draft, whole on each rank, gets the whole head gathered once.
- Embedding, norms and router are held whole on every rank, and computed the same on each.

MXFP4 experts split along whole 32-value blocks: each rank's slice of the expert size must be a multiple of 32.
"""

from __future__ import annotations

import torch

from tilec.errors import ConfigError
from tilec.mxfp4 import BLOCK as MXFP4_BLOCK
from tilec.runtime.distributed import TensorParallel


def head_ranges(cfg, layer: int, tp: TensorParallel | None) -> tuple[range, range]:
    """The query heads and kv heads of ``layer`` that rank ``tp`` holds (all of them without tensor parallelism)."""
    heads, kv = cfg.num_attention_heads, cfg.kv_heads(layer)
    if tp is None or tp.world == 1:
        return range(heads), range(kv)
    q = range(*tp.split(heads, "num_attention_heads"))
    if kv % tp.world == 0:
        return q, range(*tp.split(kv, f"the kv heads of layer {layer}"))
    if tp.world % kv == 0:  # fewer kv heads than ranks: each rank's query heads share one kv head
        group = heads // kv
        return q, range(q.start // group, q.start // group + 1)
    raise ConfigError(f"tensor parallel over {tp.world} GPUs: layer {layer} has {kv} kv heads, which neither divide "
                      f"among {tp.world} ranks nor divide {tp.world}; use a number of GPUs that divides or is a "
                      f"multiple of {kv}")


def inter_range(size: int, tp: TensorParallel | None, what: str) -> range:
    """Rank ``tp``'s slice of an MLP's intermediate size."""
    return range(size) if tp is None or tp.world == 1 else range(*tp.split(size, what))


def vocab_range(cfg, tp: TensorParallel | None) -> range:
    """Rank ``tp``'s slice of the lm_head's vocabulary: all of it without tensor parallelism, or where the lm_head is
    tied to the embedding (held whole for it)."""
    if tp is None or tp.world == 1 or cfg.tie_word_embeddings:
        return range(cfg.vocab_size)
    return range(*tp.split(cfg.vocab_size, "vocab_size"))


def check(cfg, tp: TensorParallel, mxfp4: bool = False) -> None:
    """Raise ConfigError where ``cfg`` cannot be split ``tp.world`` ways (``mxfp4``: the experts in MXFP4)."""
    for layer in range(cfg.num_hidden_layers):
        head_ranges(cfg, layer, tp)
    vocab_range(cfg, tp)
    if any(cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
        part = len(inter_range(cfg.moe_intermediate_size, tp, "moe_intermediate_size"))
        if mxfp4 and part % MXFP4_BLOCK:
            raise ConfigError(f"tensor parallel over {tp.world} GPUs: each rank's slice of the MXFP4 experts' "
                              f"intermediate size ({cfg.moe_intermediate_size} / {tp.world} = {part}) is not a "
                              f"multiple of {MXFP4_BLOCK}; use fewer GPUs")
    if any(not cfg.is_moe(i) for i in range(cfg.num_hidden_layers)):
        inter_range(cfg.intermediate_size, tp, "intermediate_size")


def shard_model(model, tp: TensorParallel, device: torch.device | str | None = None):
    """Rank ``tp``'s shard of a whole tilec MiMo (bf16/fp32 or MXFP4 experts), on ``device`` (the model's by
    default). The model is not changed. Where it already lies on ``device``, the shard shares its tensors (the whole
    ones, and slices as views where they are contiguous), so load the whole model on the CPU and shard it onto each
    GPU to hold only the shard there (or load a checkpoint directory with ``from_hf(path, tp=...)``, which never
    holds more than one whole tensor)."""
    from tilec.models.mimo import MiMoForCausalLM

    if not isinstance(model, MiMoForCausalLM):
        raise ConfigError(f"tensor parallelism splits tilec's MiMo; got {type(model).__name__}")
    if model.tp is not None and model.tp.world > 1:
        raise ConfigError(f"this model is already rank {model.tp.rank} of {model.tp.world}'s shard")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shard = skeleton(model, tp)
    state = {name: slice_tensor(name, t, model.config, tp).to(device).contiguous()
             for name, t in model.state_dict().items()}
    missing, unexpected = shard.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"shard of rank {tp.rank}: tensors missing {sorted(set(missing) - tied)}, unexpected "
                          f"{sorted(unexpected)}")
    if model.config.tie_word_embeddings:
        shard.lm_head.weight = shard.model.embed_tokens.weight
    return shard.eval()


def skeleton(model, tp: TensorParallel):
    """Rank ``tp``'s shard of ``model`` (a whole MiMo, on any device, the meta one included) on the meta device:
    the modules, MXFP4 experts where ``model`` has them, and no data. Raises ConfigError where the model does not
    split ``tp.world`` ways."""
    from tilec.models.mimo import MiMoForCausalLM
    from tilec.models.mxfp4_experts import MXFP4Experts

    cfg = model.config
    check(cfg, tp, any(isinstance(m, MXFP4Experts) for m in model.modules()))
    with torch.device("meta"):
        shard = MiMoForCausalLM(cfg, model.dtype, tp)
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, MXFP4Experts):
            part = len(inter_range(cfg.moe_intermediate_size, tp, "moe_intermediate_size"))
            shard.model.layers[i].mlp.experts = MXFP4Experts(experts.experts, experts.hidden, part, device="meta")
    shard.output_hidden_layers = model.output_hidden_layers
    return shard


def slice_tensor(name: str, t: torch.Tensor, cfg, tp: TensorParallel) -> torch.Tensor:
    """Rank ``tp``'s part of the whole model's tensor ``name`` (a view where the part is one slice of ``t``)."""
    parts = name.split(".")
    if name == "lm_head.weight":
        return _rows(t, 0, vocab_range(cfg, tp), 1)
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return t  # embedding, final norm: whole
    layer, rest = int(parts[2]), ".".join(parts[3:])
    q, kv = head_ranges(cfg, layer, tp)
    if rest.startswith("self_attn."):
        proj = rest.removeprefix("self_attn.")
        if proj.startswith("q_proj."):
            return _rows(t, 0, q, cfg.head_dim)
        if proj.startswith("k_proj."):
            return _rows(t, 0, kv, cfg.head_dim)
        if proj.startswith("v_proj."):
            return _rows(t, 0, kv, cfg.v_head_dim)
        if proj == "o_proj.weight":
            return _rows(t, 1, q, cfg.v_head_dim)
        if proj == "sinks":
            return _rows(t, 0, q, 1)
        raise ConfigError(f"tensor parallelism does not know how to split {name!r}")
    if not rest.startswith("mlp."):
        return t  # the layer norms
    mlp = rest.removeprefix("mlp.")
    if mlp.startswith("gate."):
        return t  # the router: whole on every rank
    if mlp in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        i = inter_range(cfg.intermediate_size, tp, "intermediate_size")
        return _rows(t, 1 if mlp.startswith("down") else 0, i, 1)
    i = inter_range(cfg.moe_intermediate_size, tp, "moe_intermediate_size")
    inter = cfg.moe_intermediate_size
    # Expert tensors: gate_up rows (gate rows, then up rows) and down's columns; MXFP4 blocks hold two values a byte
    # and scales one per 32 values along the columns.
    if mlp in ("experts.gate_up_proj", "experts.gate_up_proj_blocks", "experts.gate_up_proj_scales"):
        return torch.cat([_rows(t, 1, i, 1), _rows(t, 1, range(inter + i.start, inter + i.stop), 1)], dim=1)
    if mlp == "experts.down_proj":
        return _rows(t, 2, i, 1)
    if mlp == "experts.down_proj_blocks":
        return _rows(t, 2, range(i.start // 2, i.stop // 2), 1)
    if mlp == "experts.down_proj_scales":
        return _rows(t, 2, range(i.start // MXFP4_BLOCK, i.stop // MXFP4_BLOCK), 1)
    raise ConfigError(f"tensor parallelism does not know how to split {name!r}")


def _rows(t: torch.Tensor, dim: int, heads: range, width: int) -> torch.Tensor:
    """``t``'s slices [h * width, (h + 1) * width) along ``dim`` for h in ``heads`` (consecutive)."""
    return t.narrow(dim, heads.start * width, len(heads) * width)

