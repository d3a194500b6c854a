"""Static KV cache: one preallocated [B, Hkv, C, D] tensor pair per attention layer.

A model declares its cache layout (`CacheSpec` per tensor); the runtime allocates it once and the attention op
reads and appends in place. Position p lives in slot ``p % C``. Full-attention layers get C = max_seq_len. A
sliding-window layer of window W (query plus W - 1 keys) gets a ring of ``W - 1 + spec_rows`` slots: a verify step
writes up to ``spec_rows`` speculative rows, and rolling back after a rejection must not have overwritten any key a
later query still sees, so rollback is only moving the length back.
"""

from __future__ import annotations

import dataclasses

import torch

from tilec.errors import ShapeError


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """One cache tensor: its graph input name, shape [B, Hkv, C, D], dtype, and the attention window it serves (0:
    full attention)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    window: int = 0

    @property
    def capacity(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()


def ring_capacity(window: int, max_seq_len: int, spec_rows: int) -> int:
    """Slots a layer needs: all positions for full attention (window 0), else the window's ring."""
    if window == 0:
        return max_seq_len
    return min(max_seq_len, window - 1 + spec_rows)


class KVCache:
    """The allocated cache tensors of one model instance, in graph-input order, plus the filled length."""

    def __init__(self, specs: list[CacheSpec], device: torch.device | str, max_seq_len: int,
                 tensors: list[torch.Tensor] | None = None):
        """Zeroed tensors for ``specs``; ``tensors`` (of exactly those shapes and dtypes) are zeroed and used instead of
        new ones (a finished session's, see CompiledModel.new_session)."""
        self.specs = list(specs)
        self.max_seq_len = max_seq_len
        if tensors is None:
            self.tensors = [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in self.specs]
        else:
            if [(tuple(t.shape), t.dtype) for t in tensors] != [(tuple(s.shape), s.dtype) for s in self.specs]:
                raise ValueError("reused cache tensors do not match the cache's layout")
            self.tensors = [t.zero_() for t in tensors]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def check_room(self, start: int, rows: int) -> None:
        """Raise a ShapeError when rows at positions start.. would run past the cache."""
        if start + rows > self.max_seq_len:
            raise ShapeError(
                f"positions {start}..{start + rows - 1} do not fit a KV cache sized for {self.max_seq_len} tokens; "
                f"pass a larger max_seq_len (or Options(max_seq_len=...))")

    def pad_room(self, start: int, rows: int) -> int:
        """How many padding rows may follow rows start..start+rows-1 in one step, their outputs dropped and the length
        not counting them, without overwriting a key that this step's rows or a later step read. Their keys land at
        positions past the rows, which later steps overwrite before reading; but a position past the cache's end
        wraps onto a live slot, and in a ring of C slots serving a window of W keys (query included) the padding may
        reach C - W positions past the rows: the slot after that holds the first key the last row sees."""
        end = start + rows
        room = self.max_seq_len - end
        for s in self.specs:
            if s.window and s.capacity < self.max_seq_len:  # a ring that wraps
                room = min(room, s.capacity - s.window)
            else:
                room = min(room, s.capacity - end)
        return max(room, 0)

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.tensors]


def layout_from_graph(gm, batch: int, max_seq_len: int, spec_rows: int) -> list[CacheSpec]:
    """The cache a captured decoder graph needs for another batch size or sequence length.

    Read off the graph itself: each attention node names its cache placeholders and its window, so the runtime
    needs no model object to size a cache.
    """
    from tilec.ops import op_name

    windows: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and op_name(node.target) == "attention":
            window = node.args[10]
            for cache in (node.args[3], node.args[4]):
                windows[cache.target] = window
    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.target not in windows:
            continue
        val = node.meta["val"]
        cap = ring_capacity(windows[node.target], max_seq_len, spec_rows)
        specs.append(CacheSpec(node.target, (batch, val.shape[1], cap, val.shape[3]), val.dtype,
                               windows[node.target]))
    return specs
