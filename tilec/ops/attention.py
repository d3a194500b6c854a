"""The attention op: GQA over a static KV cache, with sliding windows, sinks and several query rows.

Cache layout: ``k_cache`` [B, Hkv, C, D] and ``v_cache`` [B, Hkv, C, Dv]; position p lives in slot ``p % C``. A full
attention layer has C >= the longest sequence, so the modulo never wraps; a sliding-window layer may use a ring
whose capacity is ``window - 1 + spec_rows`` (see ``tilec.runtime.kv_cache``): enough that rolling back rejected
speculative rows never loses a key that is still visible.

One call handles T query rows at positions ``start_pos[b] + t``. Keys at positions before ``start_pos`` come from the
cache, the T new keys from ``k``/``v``; a query sees key positions in ``(q_pos - window, q_pos]`` (``window == 0`` means
no window). This is HF's ``sliding_window=W`` semantics: the query plus W - 1 keys before it. The cache is read before
the new rows are written, so a prefill longer than a ring is exact too.
"""

from typing import Optional

import torch
from torch import Tensor

from tilec.errors import ShapeError
from tilec.ops.registry import define


def _check(q, k, v, k_cache, v_cache, start_pos, sinks, num_heads, head_dim, v_head_dim, window) -> None:
    def fail(what: str) -> None:
        raise ShapeError(f"tilec.attention: {what}")

    if q.dim() != 3 or q.shape[-1] != num_heads * head_dim:
        fail(f"q must be [batch, rows, {num_heads}*{head_dim}], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        fail(f"caches must be [batch, kv_heads, capacity, dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, t = q.shape[:2]
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    if tuple(k_cache.shape) != (b, hkv, cap, head_dim):
        fail(f"k_cache {tuple(k_cache.shape)} should be ({b}, {hkv}, {cap}, {head_dim})")
    if tuple(v_cache.shape) != (b, hkv, cap, v_head_dim):
        fail(f"v_cache {tuple(v_cache.shape)} should be ({b}, {hkv}, {cap}, {v_head_dim})")
    if num_heads % hkv:
        fail(f"{num_heads} query heads are not a multiple of {hkv} kv heads")
    if tuple(k.shape) != (b, t, hkv * head_dim) or tuple(v.shape) != (b, t, hkv * v_head_dim):
        fail(f"k {tuple(k.shape)} / v {tuple(v.shape)} should be ({b}, {t}, {hkv * head_dim}) / ({b}, {t}, "
             f"{hkv * v_head_dim})")
    if start_pos.dim() != 1 or start_pos.shape[0] != b or start_pos.dtype not in (torch.int32, torch.int64):
        fail(f"start_pos must be an int tensor of shape ({b},), got {start_pos.dtype} {tuple(start_pos.shape)}")
    if sinks is not None and tuple(sinks.shape) != (num_heads,):
        fail(f"sinks must have shape ({num_heads},), got {tuple(sinks.shape)}")
    if window < 0:
        fail(f"window must be >= 0 (0 = full attention), got {window}")


def visible_mask(start_pos: Tensor, rows: int, capacity: int, window: int, causal: bool = True) -> Tensor:
    """Boolean [B, T, C + T]: which cache slots, then which new rows, each query row may attend to.

    Non-causal (a DFlash draft block): the new rows see each other both ways; the window then counts back from the
    block's first row, so every row of the block sees the same cached keys.
    """
    p0 = start_pos.to(torch.int64)[:, None]
    slots = torch.arange(capacity, device=start_pos.device)
    # Slot s holds the latest position p < p0 with p % C == s; it is empty when that position is negative.
    slot_pos = p0 - 1 - torch.remainder(p0 - 1 - slots, capacity)
    key_pos = torch.cat((slot_pos, p0 + torch.arange(rows, device=start_pos.device)), dim=1)  # [B, C+T]
    q_pos = p0 + torch.arange(rows, device=start_pos.device)  # [B, T]
    if not causal:
        mask = key_pos[:, None, :] >= 0  # every row sees the whole block and the cache
        if window:
            mask = mask & (key_pos[:, None, :] > p0[:, :, None] - window)
        return mask.expand(-1, rows, -1)
    mask = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= q_pos[:, :, None])
    if window:
        mask &= key_pos[:, None, :] > q_pos[:, :, None] - window
    return mask


def _fake(q, k, v, k_cache, v_cache, start_pos, sinks, num_heads, head_dim, v_head_dim, window, scale, value_scale,
          causal=True):
    _check(q, k, v, k_cache, v_cache, start_pos, sinks, num_heads, head_dim, v_head_dim, window)
    return q.new_empty((*q.shape[:2], num_heads * v_head_dim))


@define("attention", fake=_fake, mutates=("k_cache", "v_cache"))
def attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor, sinks: Optional[Tensor],
    num_heads: int, head_dim: int, v_head_dim: int, window: int, scale: float, value_scale: float,
    causal: bool = True,
) -> Tensor:
    """Attention of T query rows over the cache plus themselves; appends the new keys and values to the cache.

    q [B, T, Hq*D], k [B, T, Hkv*D], v [B, T, Hkv*Dv] -> [B, T, Hq*Dv]. Values are multiplied by ``value_scale``
    before they are cached (as HF does); ``sinks`` adds one learnable logit per head to the softmax denominator.
    ``causal=False`` lets the T rows see each other both ways (a DFlash draft block).
    """
    _check(q, k, v, k_cache, v_cache, start_pos, sinks, num_heads, head_dim, v_head_dim, window)
    b, t = q.shape[:2]
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // hkv
    k_new = k.view(b, t, hkv, head_dim).transpose(1, 2).to(k_cache.dtype)
    v_new = (v.view(b, t, hkv, v_head_dim) * value_scale).transpose(1, 2).to(v_cache.dtype)

    keys = torch.cat((k_cache, k_new), dim=2).to(torch.float32)  # [B, Hkv, C+T, D]
    values = torch.cat((v_cache, v_new), dim=2).to(torch.float32)
    qg = q.view(b, t, hkv, group, head_dim).permute(0, 2, 3, 1, 4).to(torch.float32)  # [B, Hkv, G, T, D]
    scores = torch.matmul(qg, keys[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, T, C+T]
    mask = visible_mask(start_pos, t, cap, window, causal)[:, None, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(torch.float32).view(1, hkv, group, 1, 1).expand(b, hkv, group, t, 1)
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values[:, :, None])  # [B, Hkv, G, T, Dv]

    _write_rows(k_cache, v_cache, k_new, v_new, start_pos)
    return out.permute(0, 3, 1, 2, 4).reshape(b, t, num_heads * v_head_dim).to(q.dtype)


def _write_rows(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, start_pos: Tensor) -> None:
    """Store rows [B, Hkv, T, D] at positions start_pos.. (slot = position % C). Only the last C rows can survive
    in a ring of capacity C, so only those are written (no duplicate slots)."""
    b, hkv, t = k_new.shape[:3]
    cap = k_cache.shape[2]
    n = min(t, cap)
    slots = torch.remainder(start_pos.to(torch.int64)[:, None] + torch.arange(t - n, t, device=k_new.device), cap)
    k_cache.scatter_(2, slots[:, None, :, None].expand(b, hkv, n, k_cache.shape[3]), k_new[:, :, t - n:])
    v_cache.scatter_(2, slots[:, None, :, None].expand(b, hkv, n, v_cache.shape[3]), v_new[:, :, t - n:])


def _kv_append_fake(k, v, k_cache, v_cache, start_pos, head_dim, v_head_dim, value_scale):
    b, t = k.shape[:2]
    hkv = k_cache.shape[1]
    if k_cache.dim() != 4 or tuple(k_cache.shape[::3]) != (b, head_dim) or tuple(v_cache.shape) != (
            b, hkv, k_cache.shape[2], v_head_dim):
        raise ShapeError(f"tilec.kv_append: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not fit batch "
                         f"{b}, head dims {head_dim} / {v_head_dim}")
    if tuple(k.shape) != (b, t, hkv * head_dim) or tuple(v.shape) != (b, t, hkv * v_head_dim):
        raise ShapeError(f"tilec.kv_append: k {tuple(k.shape)} / v {tuple(v.shape)} should be ({b}, {t}, "
                         f"{hkv * head_dim}) / ({b}, {t}, {hkv * v_head_dim})")
    if start_pos.dim() != 1 or start_pos.shape[0] != b:
        raise ShapeError(f"tilec.kv_append: start_pos must have shape ({b},), got {tuple(start_pos.shape)}")


@define("kv_append", fake=_kv_append_fake, mutates=("k_cache", "v_cache"))
def kv_append(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, start_pos: Tensor, head_dim: int,
              v_head_dim: int, value_scale: float) -> None:
    """Write T rows of keys and values (v times ``value_scale``) into the cache at positions start_pos.. .

    A DFlash draft appends the projected target hidden states of the accepted tokens this way: they become keys and
    values that the draft block attends to, without being queries themselves.
    """
    _kv_append_fake(k, v, k_cache, v_cache, start_pos, head_dim, v_head_dim, value_scale)
    b, t = k.shape[:2]
    hkv = k_cache.shape[1]
    k_new = k.view(b, t, hkv, head_dim).transpose(1, 2).to(k_cache.dtype)
    v_new = (v.view(b, t, hkv, v_head_dim) * value_scale).transpose(1, 2).to(v_cache.dtype)
    _write_rows(k_cache, v_cache, k_new, v_new, start_pos)
