"""A decode session: one batch of sequences, its KV cache, and how many tokens the cache holds.

The session calls a step function ``step(input_ids [B, T], start_pos [B], *kv_caches)`` (a graph of any target)
returning logits [B, T, V], or ``(logits, hidden)`` when the graph also returns hidden states (kept in
``session.hidden``), and advances the length; `rollback` moves the length back, which is all a rejected speculative
block needs because the caches are sized for it (see kv_cache).
"""

from __future__ import annotations

from typing import Callable

import torch

from tilec.errors import ShapeError
from tilec.runtime.kv_cache import CacheSpec, KVCache


class DecodeSession:
    def __init__(self, step: Callable, specs: list[CacheSpec], *, batch: int, max_seq_len: int,
                 device: torch.device, cache_tensors: list[torch.Tensor] | None = None):
        self._step = step
        self.batch, self.device = batch, device
        self.cache = KVCache(specs, device, max_seq_len, cache_tensors)
        self.length = 0
        self.hidden: torch.Tensor | None = None

    def step(self, input_ids: torch.Tensor, *extra: torch.Tensor, start: int | None = None,
             advance: int | None = None) -> torch.Tensor:
        """Run T new tokens per sequence through the model at positions start..start+T-1 (start defaults to the
        length); ``extra`` are the graph's extra inputs (after the caches: any tensors, a CUDA graph copies them
        in). The length then grows by ``advance`` (default: to the end of these rows). Returns logits."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch:
            raise ShapeError(f"session expects input ids of shape [{self.batch}, T], got {tuple(input_ids.shape)}")
        rows = input_ids.shape[1]
        first = self.length if start is None else start
        self.cache.check_room(first, rows)
        pos = torch.full((self.batch,), first, dtype=torch.int64, device=self.device)
        ids = input_ids.to(self.device)
        pad = self._padding(rows, first) if not extra else 0
        if pad:  # rows after the last whose outputs are dropped (a prefill's CUDA graph replays for the padded shape)
            ids = torch.cat([ids, ids.new_zeros((self.batch, pad))], dim=1)
        with torch.inference_mode():
            out = self._step(ids, pos, *self.cache.tensors, *extra)
        self.length = first + rows if advance is None else self.length + advance
        if isinstance(out, tuple):
            out, self.hidden = out
            if pad:
                self.hidden = self.hidden[:, :rows]
        return out[:, :rows] if pad else out

    def _padding(self, rows: int, first: int) -> int:
        """Rows to pad a step with: what the step function asks for (`GraphedStep.prefill_rows_for`), where the
        cache has room for them (`KVCache.pad_room`); else none."""
        best = getattr(self._step, "prefill_rows_for", None)
        pad = best(rows) - rows if best is not None else 0
        return pad if 0 < pad <= self.cache.pad_room(first, rows) else 0

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    def rollback(self, length: int) -> None:
        """Forget every token at position >= length (their cache slots are overwritten by the next step)."""
        if not 0 <= length <= self.length:
            raise ShapeError(f"cannot roll back to length {length}: the session holds {self.length} tokens")
        self.length = length


class RecomputeSession:
    """The session of a model without a KV cache: each step runs the whole sequence again (slow, but the same)."""

    def __init__(self, forward: Callable, batch: int, max_seq_len: int):
        self._forward, self.batch, self.max_seq_len = forward, batch, max_seq_len
        self._tokens: torch.Tensor | None = None
        self.hidden = None

    @property
    def length(self) -> int:
        return 0 if self._tokens is None else self._tokens.shape[1]

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        self._tokens = input_ids if self._tokens is None else torch.cat([self._tokens, input_ids], dim=1)
        if self._tokens.shape[1] > self.max_seq_len:
            raise ShapeError(f"{self._tokens.shape[1]} tokens exceed max_seq_len {self.max_seq_len}")
        with torch.inference_mode():
            out = self._forward(self._tokens)
        if isinstance(out, tuple):
            out, self.hidden = out[0], out[1][:, -input_ids.shape[1]:]
        return out[:, -input_ids.shape[1]:]

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ShapeError(f"cannot roll back to length {length}: the session holds {self.length} tokens")
        self._tokens = self._tokens[:, :length]
