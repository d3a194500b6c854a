"""Plain autoregressive generation (greedy or sampled) over a decode session, and the statistics every generation
loop reports (the DFlash loop fills the same record)."""

from __future__ import annotations

import dataclasses
import time

import torch

from tilec.ops.core import sampling_probs


@dataclasses.dataclass
class GenerationStats:
    """What a generation did: tokens, rounds (target steps after the prefill), acceptance, speed.

    ``acceptance_histogram[n]`` counts rounds that produced n tokens (for plain decoding every round makes 1).
    """

    new_tokens: int = 0
    rounds: int = 0
    seconds: float = 0.0
    acceptance_histogram: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def mean_acceptance(self) -> float:
        total = sum(self.acceptance_histogram.values())
        return sum(n * c for n, c in self.acceptance_histogram.items()) / total if total else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def record_round(self, produced: int) -> None:
        self.rounds += 1
        self.acceptance_histogram[produced] = self.acceptance_histogram.get(produced, 0) + 1

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "rounds": self.rounds, "seconds": round(self.seconds, 6),
                "tokens_per_s": round(self.tokens_per_s, 3), "mean_acceptance": round(self.mean_acceptance, 4),
                "acceptance_histogram": dict(sorted(self.acceptance_histogram.items()))}


def choose(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens from logits [B, V]: argmax when temperature is 0, else a draw from the top-p nucleus."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = sampling_probs(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_plain(session, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None, eos: torch.Tensor | None = None,
                   on_tokens=None) -> tuple[torch.Tensor, GenerationStats]:
    """Prefill ``ids`` [B, T] then decode one token per step; returns [B, T + N] and the stats.

    A sequence that emitted an eos id keeps emitting it; decoding stops when all have. ``on_tokens`` is called with
    each step's new tokens [B, 1] (for streaming).
    """
    stats = GenerationStats()
    batch = ids.shape[0]
    out, done = [ids], torch.zeros(batch, dtype=torch.bool, device=ids.device)
    _sync(ids)
    start = time.perf_counter()
    logits = session.step(ids)
    for i in range(max_new_tokens):
        nxt = choose(logits[:, -1], temperature, top_p, generator)
        if eos is not None and eos.numel():
            nxt = torch.where(done, eos[0], nxt)
            done |= torch.isin(nxt, eos)
        out.append(nxt[:, None])
        stats.new_tokens += 1
        if on_tokens is not None:
            on_tokens(nxt[:, None])
        if i + 1 == max_new_tokens or (eos is not None and eos.numel() and bool(done.all())):
            break
        logits = session.step(nxt[:, None])
        stats.record_round(1)
    _sync(ids)
    stats.seconds = time.perf_counter() - start
    return torch.cat(out, dim=1), stats


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
