"""Import MiMo-V2 weights from HF transformers, and write HF checkpoints of tilec's MiMo.

`from_hf` reads an in-memory ``MiMoV2FlashForCausalLM`` or a safetensors checkpoint directory. Accepted names (one
checkpoint may mix them):

- HF's in-memory names: packed experts ``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
  ``mlp.experts.down_proj`` [E, H, I]; ``self_attn.sinks``.
- Hub names, as ``save_pretrained`` and the released checkpoints write them: per-expert
  ``mlp.experts.N.{gate,up,down}_proj.weight`` and ``self_attn.attention_sink_bias``.
- FP8 (e4m3) weights with block scales in ``<prefix>.weight_scale_inv`` (DeepSeek / MiMo format), dequantised.
- MXFP4 experts in the gpt-oss / HF layout: ``mlp.experts.{gate_up,down}_proj_blocks`` uint8 [E, N, K/32, 16] and
  ``..._scales`` uint8 [E, N, K/32] (N output rows, K input features; gate rows then up rows). A layer holding them
  gets an `MXFP4Experts` module and keeps them as they are, never re-quantised; `save_checkpoint` writes them back
  bit for bit.

Ignored: MTP layers (``model.mtp.*``), RoPE ``inv_freq`` buffers, FP8 activation scales. The loader first plans
which checkpoint tensors make each model tensor and checks names, shapes and scales from metadata alone, so every
CheckpointError comes before any tensor data is read; then it fills a meta-device model one tensor at a time, so a
checkpoint is never held twice in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tilec import mxfp4
from tilec.artifact import staged_directory
from tilec.errors import CheckpointError
from tilec.models import parallel
from tilec.models.config import MiMoConfig
from tilec.models.mimo import MiMoForCausalLM
from tilec.models.mxfp4_experts import KEYS as _MXFP4_KEYS, MXFP4Experts, use_checkpoint_experts
from tilec.runtime.distributed import TensorParallel

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8}
_IGNORED_SUFFIXES = ("inv_freq", ".activation_scale", ".input_scale")
_PACKED = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
_SINK_HUB_NAME = "attention_sink_bias"


def read_config_json(root: Path, what: str) -> dict:
    """``root/config.json`` parsed; a CheckpointError saying ``what`` a directory should hold when it is missing or
    not JSON."""
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root} has no config.json; {what}")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from None


class _Tensors:
    """Checkpoint tensors by name, read on demand from safetensors shards or from an in-memory state dict."""

    def __init__(self, files: dict[str, Path], memory: dict[str, Tensor], stack: contextlib.ExitStack):
        self._files, self._memory, self._stack, self._open = files, memory, stack, {}

    def keys(self) -> list[str]:
        return list(self._memory) + list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._files

    def _handle(self, key: str):
        path = self._files[key]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def shape(self, key: str) -> tuple[int, ...]:
        t = self._memory.get(key)
        return tuple(t.shape) if t is not None else tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype | None:
        t = self._memory.get(key)
        return t.dtype if t is not None else _ST_DTYPES.get(self._handle(key).get_slice(key).get_dtype())

    def get(self, key: str) -> Tensor:
        return self._memory[key] if key in self._memory else self._handle(key).get_tensor(key)


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """How one model tensor is made. Each row's keys are concatenated on dim 0; if ``stacked`` the rows form a new
    dim 0 (one row per expert), otherwise there is a single row holding a single key, used as it is."""

    rows: list[list[tuple[str, tuple[int, ...]]]]
    stacked: bool


# ---------------------------------------------------------------------------------------------------- loading
def from_hf(src, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            tp: TensorParallel | None = None) -> MiMoForCausalLM:
    """tilec's MiMo holding the weights of ``src``: a transformers ``MiMoV2FlashForCausalLM`` or a checkpoint directory.

    dtype: the ``dtype`` argument, else (directories) config.json's ``dtype``/``torch_dtype``, else the checkpoint
    tensors' float dtype (bf16 for FP8 checkpoints); from an in-memory model, its tensors' dtype.
    ``e_score_correction_bias`` stays fp32. Tensors of an in-memory model already in that dtype and on ``device`` are
    shared with it, not copied. Raises CheckpointError, naming the key and shapes, for anything it cannot load.
    With ``tp`` (several ranks), rank ``tp``'s shard (models/parallel.py): each whole tensor is made on the CPU, sliced,
    and only the slice is kept, so no more than one whole tensor is held at a time.
    """
    with contextlib.ExitStack() as stack:
        config, tensors = _open_source(src, stack)
        cfg = MiMoConfig.from_dict(config)
        qc = config.get("quantization_config") or {}
        if qc.get("quant_method", "fp8") not in ("fp8", "mxfp4"):
            raise CheckpointError(f"quantization method {qc['quant_method']!r} is not supported; tilec reads float "
                                  f"checkpoints, FP8 checkpoints with block scales (quant_method 'fp8') and MXFP4 "
                                  f"experts (quant_method 'mxfp4')")
        block = tuple(qc.get("weight_block_size") or (128, 128))
        target = dtype or cfg.torch_dtype or _tensor_dtype(tensors)
        cfg = dataclasses.replace(cfg, dtype=str(target).removeprefix("torch."))
        with torch.device("meta"):
            model = MiMoForCausalLM(cfg, target)
        use_checkpoint_experts(model, tensors.__contains__)
        shapes = {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
        stored = {n: _stored_shape(n, s) for n, s in shapes.items()}
        recipes = _plan(stored, cfg, tensors, block)
        sharding = tp is not None and tp.world > 1
        out = parallel.skeleton(model, tp) if sharding else model
        for name, recipe in recipes.items():
            want = torch.float32 if name.endswith("e_score_correction_bias") else \
                torch.uint8 if name.endswith(_MXFP4_KEYS) else target
            built = _build(recipe, stored[name], tensors, want, torch.device("cpu" if sharding else device), block)
            built = built.reshape(shapes[name])  # MXFP4 blocks: [..., K/32, 16] -> [..., K/2]
            if sharding:  # a copy of the slice: the whole tensor is freed
                built = parallel.slice_tensor(name, built, cfg, tp).to(device, copy=True)
            _assign(out, name, built)
    if cfg.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    return out.eval()


def _open_source(src, stack: contextlib.ExitStack) -> tuple[dict, _Tensors]:
    """The config dict and the tensors of an in-memory HF model or a checkpoint directory."""
    if not isinstance(src, (str, Path)):
        model_type = getattr(getattr(src, "config", None), "model_type", None)
        if model_type != "mimo_v2_flash" or not hasattr(src, "state_dict"):
            raise CheckpointError(f"from_hf takes a transformers MiMoV2FlashForCausalLM or a checkpoint directory; "
                                  f"got {type(src).__name__} (model_type {model_type!r})")
        config = src.config.to_dict()
        config.pop("dtype", None)  # the tensors say what the model holds now, the config what it was made with
        return config, _Tensors({}, dict(src.state_dict()), stack)
    root = Path(src)
    config = read_config_json(root, "a MiMo checkpoint directory holds config.json and model*.safetensors")
    cfg_path = root / "config.json"
    if config.get("model_type") not in ("mimo_v2_flash", "mimo_v2"):
        raise CheckpointError(f"{cfg_path} has model_type {config.get('model_type')!r}; tilec.models.from_hf loads "
                              f"MiMo-V2 checkpoints (model_type 'mimo_v2_flash')")
    return config, _Tensors(_shard_map(root), {}, stack)


def _shard_map(root: Path) -> dict[str, Path]:
    """Which file holds each tensor: from model.safetensors.index.json, else from every *.safetensors in ``root``."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard(s) missing from {root}: {', '.join(missing)}")
        return {key: root / f for key, f in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{root} has no *.safetensors files (and no model.safetensors.index.json)")
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in where:
                    raise CheckpointError(f"tensor {key!r} is in both {where[key].name} and {path.name}")
                where[key] = path
    return where


def _tensor_dtype(tensors: _Tensors) -> torch.dtype:
    """The checkpoint's float dtype: bf16 if it holds FP8 weights, else its most common float dtype."""
    counts = Counter(tensors.dtype(k) for k in tensors.keys() if not k.endswith("e_score_correction_bias"))
    if any(d in _FP8 for d in counts):
        return torch.bfloat16
    floats = [d for d, _ in counts.most_common() if d is not None and d.is_floating_point]
    return floats[0] if floats else torch.float32


def _plan(shapes: dict[str, tuple[int, ...]], cfg: MiMoConfig, tensors: _Tensors,
          block: tuple[int, int]) -> dict[str, _Recipe]:
    """A recipe for every model tensor; raises on missing, misshapen, unscaled or unexpected checkpoint tensors."""
    recipes, used = {}, set()
    for name, shape in shapes.items():
        recipes[name] = recipe = _recipe(name, shape, tensors)
        for row in recipe.rows:
            for key, key_shape in row:
                used |= _check(key, key_shape, tensors, block, name)
    ignored = {k for k in tensors.keys() if k.startswith("model.mtp.") or k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ignored.add("lm_head.weight")
    unexpected = sorted(set(tensors.keys()) - used - ignored)
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) this MiMo config does not use, e.g. "
                              f"{', '.join(unexpected[:5])}; check num_hidden_layers, layer_types and "
                              f"mlp_layer_types in config.json")
    return recipes


def _recipe(name: str, shape: tuple[int, ...], tensors: _Tensors) -> _Recipe:
    """Where ``name`` comes from: itself, its hub name, or per-expert tensors stacked."""
    if name.endswith(".self_attn.sinks") and name not in tensors:
        hub = name.removesuffix("sinks") + _SINK_HUB_NAME
        return _Recipe([[(hub if hub in tensors else name, shape)]], stacked=False)
    if not name.endswith(_PACKED) or name in tensors:
        return _Recipe([[(name, shape)]], stacked=False)
    prefix, proj = name.rsplit(".", 1)
    if proj == "gate_up_proj":
        half = (shape[1] // 2, shape[2])
        rows = [[(f"{prefix}.{e}.gate_proj.weight", half), (f"{prefix}.{e}.up_proj.weight", half)]
                for e in range(shape[0])]
    else:
        rows = [[(f"{prefix}.{e}.down_proj.weight", shape[1:])] for e in range(shape[0])]
    present = [e for e, row in enumerate(rows) if any(key in tensors for key, _ in row)]
    if not present:
        raise CheckpointError(f"checkpoint has no tensor {name!r} (expected shape {shape}) and no per-expert "
                              f"tensors {prefix}.N.*_proj.weight for it")
    for e, row in enumerate(rows):
        for key, key_shape in row:
            if key not in tensors:
                raise CheckpointError(f"expert {e} of {prefix} is missing: no tensor {key!r} (expected shape "
                                      f"{key_shape}); the checkpoint has tensors for {len(present)} of the "
                                      f"{shape[0]} experts the config asks for")
    return _Recipe(rows, stacked=True)


def _stored_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a model tensor has in a checkpoint: MXFP4 blocks are [..., K/32, 16] there, [..., K/2] in memory."""
    if name.endswith((".gate_up_proj_blocks", ".down_proj_blocks")):
        return (*shape[:-1], shape[-1] // (mxfp4.BLOCK // 2), mxfp4.BLOCK // 2)
    return shape


def _check(key: str, shape: tuple[int, ...], tensors: _Tensors, block: tuple[int, int], name: str) -> set[str]:
    """The checkpoint keys that make ``key`` (itself, and its scale if FP8), after checking they exist and fit."""
    if key not in tensors:
        alt = f" (or {key.removesuffix('sinks') + _SINK_HUB_NAME!r})" if key.endswith(".sinks") else ""
        raise CheckpointError(f"checkpoint has no tensor {key!r}{alt}; expected shape {shape} for {name}")
    found = tensors.shape(key)
    if found != shape:
        raise CheckpointError(f"tensor {key!r} has shape {found}, expected {shape} for {name}; does config.json "
                              f"match the weights?")
    if name.endswith(_MXFP4_KEYS) and tensors.dtype(key) != torch.uint8:
        raise CheckpointError(f"MXFP4 tensor {key!r} has dtype {tensors.dtype(key)}, expected uint8 (packed E2M1 "
                              f"codes in *_blocks, E8M0 exponents in *_scales)")
    if tensors.dtype(key) not in _FP8:
        return {key}
    if len(shape) not in (2, 3):
        raise CheckpointError(f"FP8 tensor {key!r} has shape {shape}; only 2-D and 3-D weights can be block-scaled")
    scale_key = _scale_key(key)
    want = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    if scale_key not in tensors:
        raise CheckpointError(f"FP8 weight {key!r} has no scale tensor {scale_key!r} (expected shape {want} for "
                              f"{block[0]}x{block[1]} blocks)")
    if tensors.shape(scale_key) != want:
        raise CheckpointError(f"scale {scale_key!r} has shape {tensors.shape(scale_key)}, expected {want} for "
                              f"weight {key!r} of shape {shape} in {block[0]}x{block[1]} blocks")
    return {key, scale_key}


def _scale_key(key: str) -> str:
    # HF's fine-grained FP8 naming: x.weight -> x.weight_scale_inv, x.gate_up_proj -> x.gate_up_proj_scale_inv.
    return key.removesuffix(".weight") + ".weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"


def _build(recipe: _Recipe, shape: tuple[int, ...], tensors: _Tensors, dtype: torch.dtype, device: torch.device,
           block: tuple[int, int]) -> Tensor:
    """The model tensor ``recipe`` makes, in ``dtype`` on ``device``."""
    if not recipe.stacked:
        return _read(recipe.rows[0][0][0], tensors, dtype, device, block)
    out = torch.empty(shape, dtype=dtype, device=device)
    for e, row in enumerate(recipe.rows):
        offset = 0
        for key, key_shape in row:
            out[e, offset:offset + key_shape[0]].copy_(_read(key, tensors, dtype, device, block))
            offset += key_shape[0]
    return out


def _read(key: str, tensors: _Tensors, dtype: torch.dtype, device: torch.device, block: tuple[int, int]) -> Tensor:
    """One checkpoint tensor in ``dtype`` on ``device``; FP8 weights dequantised (fp32 math, then cast)."""
    weight = tensors.get(key)
    if weight.dtype not in _FP8:
        return weight.to(device=device, dtype=dtype)
    scale = tensors.get(_scale_key(key))
    if weight.dim() == 2:
        return dequantize_blocks(weight.to(device), scale.to(device), block).to(dtype)
    out = torch.empty(weight.shape, dtype=dtype, device=device)
    for e in range(weight.shape[0]):  # one expert at a time: fp32 copies of all experts would not fit
        out[e] = dequantize_blocks(weight[e].to(device), scale[e].to(device), block)
    return out


def dequantize_blocks(weight: Tensor, scale: Tensor, block: tuple[int, int] = (128, 128)) -> Tensor:
    """fp32 ``weight * scale``, each scale covering a block of rows x cols (partial blocks at the high edges)."""
    rows, cols = weight.shape[-2:]
    full = scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    return weight.float() * full.repeat_interleave(block[1], dim=-1)[..., :cols]


def _assign(model: nn.Module, name: str, tensor: Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


# ---------------------------------------------------------------------------------------------------- writing
def save_checkpoint(model: MiMoForCausalLM, directory: str | Path, *, expert_layout: str = "per_expert",
                    max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as an HF checkpoint: config.json plus safetensors, with an index when sharded.

    ``per_expert`` writes hub names (``mlp.experts.N.{gate,up,down}_proj.weight``), which
    ``transformers.MiMoV2FlashForCausalLM.from_pretrained`` and `from_hf` both load; ``packed`` keeps the packed
    expert tensors, which `from_hf` loads. Sinks are written under their hub name ``attention_sink_bias``.
    Experts held in MXFP4 (`MXFP4Experts`, e.g. from `tilec.mxfp4.quantize_model_experts`) are written in the gpt-oss
    layout, ``{gate_up,down}_proj_blocks`` [E, N, K/32, 16] and ``..._scales`` [E, N, K/32], bit for bit, with
    ``quantization_config`` {"quant_method": "mxfp4", ...} in config.json (transformers cannot load those; `from_hf`
    can). ``max_shard_bytes=None`` writes one file. The directory is written whole or not at all: everything goes to a
    temporary sibling that is renamed into place; an existing non-empty directory is refused, not overwritten.
    """
    if expert_layout not in ("per_expert", "packed"):
        raise CheckpointError(f"expert_layout {expert_layout!r} unknown; use 'per_expert' or 'packed'")
    tp = getattr(model, "tp", None)
    if tp is not None and tp.world > 1:
        raise CheckpointError(f"this model is rank {tp.rank} of {tp.world}'s tensor-parallel shard, which holds only "
                              "its slices; save the whole model")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory} already exists and is not an empty directory; choose a new one")
    tensors = _hub_tensors(model, expert_layout)
    if any(t.is_meta for t in tensors.values()):
        raise CheckpointError("the model has tensors on the meta device (shapes only); load weights before saving")
    shards = _shard(tensors, max_shard_bytes)
    config = {**model.config.to_dict(), "model_type": "mimo_v2_flash", "architectures": ["MiMoV2FlashForCausalLM"],
              "dtype": str(model.dtype).removeprefix("torch.")}  # the fields are HF's (see MiMoConfig)
    if any(isinstance(m, MXFP4Experts) for m in model.modules()):
        # As gpt-oss writes it: everything outside the experts stays in the model's dtype.
        dense = [f"model.layers.{i}.mlp" for i in range(model.config.num_hidden_layers) if not model.config.is_moe(i)]
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.embed_tokens", "model.layers.*.self_attn", "model.layers.*.mlp.gate", *dense, "lm_head"]}
    with staged_directory(directory, CheckpointError) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for file, keys in zip(names, shards):
            # Per-expert slices share storage with their packed tensor; safetensors wants each tensor on its own.
            save_file({k: tensors[k].detach().cpu().clone() for k in keys}, str(tmp / file), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                     "weight_map": {k: file for file, keys in zip(names, shards) for k in keys}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return directory


def _hub_tensors(model: MiMoForCausalLM, expert_layout: str) -> dict[str, Tensor]:
    """The model's tensors under the names the checkpoint gets (views, nothing copied)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if name.endswith(".self_attn.sinks"):
            out[name.removesuffix("sinks") + _SINK_HUB_NAME] = tensor
        elif name.endswith((".gate_up_proj_blocks", ".down_proj_blocks")):
            out[name] = mxfp4.blocks_to_checkpoint(tensor)
        elif expert_layout == "per_expert" and name.endswith(".mlp.experts.gate_up_proj"):
            prefix, half = name.removesuffix(".gate_up_proj"), tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :half]
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, half:]
        elif expert_layout == "per_expert" and name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def _shard(tensors: dict[str, Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Names grouped into shards of at most ``max_shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for name, tensor in tensors.items():
        if max_shard_bytes is not None and shards[-1] and size + _nbytes(tensor) > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += _nbytes(tensor)
    return shards


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
