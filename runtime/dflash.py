"""The DFlash loop: draft a block, verify it in one target step, accept losslessly, roll back, repeat.

Positions. The target has processed positions < p; the last accepted token x_p, not yet fed to it, sits at p. A
drafter proposes d_1..d_{n-1} for positions p+1..p+n-1; the target runs [x_p, d_1, ..., d_{n-1}] at p..p+n-1 in one
step, its row j giving the distribution of position p+j+1. Accepting a of the proposals yields a+1 tokens (the last
is the target's own: the correction on a rejection, the bonus when all were accepted); the target's length rolls back
to p+a+1 and its hidden states of rows 0..a become the draft's next context.

Acceptance (`accept_greedy`, `accept_sampling`) keeps the output exactly the target's: greedy takes the longest prefix
equal to the target's argmax plus its next choice; sampling accepts d with probability min(1, p(d)/q(d)) and on a
rejection draws from norm(max(0, p - q)), so each emitted token is distributed as the target's p given the tokens
before it.

Batches. The KV cache keeps one length for all rows, so a batch moves in lockstep: each round every row keeps the
shortest acceptance of the batch (rows that accepted more drop the rest of their accepted run). That stays lossless,
since whether a row keeps a token depends only on draws made before that token, and it needs no per-row lengths; it
costs acceptance when rows disagree, so batch 1 is where DFlash pays off.

Drafters (`Drafter`): the DFlash model (`DFlashDrafter`, a compiled `tilec.models.dflash` draft run through its own
session), `OracleDraft` (proposes a known continuation: the acceptance ceiling), or any object with the same
attributes and methods.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol

import torch
from torch import Tensor

from tilec.errors import ShapeError, TilecError
from tilec.ops.core import sampling_probs
from tilec.runtime.generation import GenerationStats, choose

TokensCallback = Callable[[Tensor], None]


# ------------------------------------------------------------------------------------------- sampling, proposals
@dataclasses.dataclass(frozen=True)
class Sampler:
    """How tokens are chosen: greedy when ``temperature`` is 0, else draws from the top-p nucleus of
    softmax(logits / temperature) with ``generator``."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        return sampling_probs(logits, self.temperature, self.top_p)

    def draw(self, logits: Tensor) -> "Proposal":
        """Proposals from logits [B, n, V]: the argmax (greedy), or one draw per position from its distribution."""
        if self.greedy:
            return Proposal(torch.argmax(logits, dim=-1))
        q = self.probs(logits)
        tokens = torch.multinomial(q.reshape(-1, q.shape[-1]), 1, generator=self.generator).view(q.shape[:-1])
        return Proposal(tokens, q)


@dataclasses.dataclass
class Proposal:
    """A drafter's block: ``tokens`` [B, n] for the positions after the last accepted token, and ``q`` [B, n, V],
    the distributions they were drawn from (None: chosen deterministically, i.e. q is one-hot at the token)."""

    tokens: Tensor
    q: Tensor | None = None


class Drafter(Protocol):
    """What the loop needs from a drafter.

    ``block_size``: rows per verify step (the last accepted token plus block_size - 1 proposals).
    ``target_layer_ids``: target layers whose hidden states it reads as context (empty: none).
    ``reset(batch, max_seq_len)``: forget everything; a new generation starts.
    ``propose(tokens, context, sampler)``: ``tokens`` [B, p+1] are all tokens so far, the last one (at position p) not
    yet seen by the target; ``context`` [B, Tc, K*H] the target hidden states of positions p-Tc..p-1 not given to the
    drafter before (None without target_layer_ids). Returns a `Proposal` of block_size - 1 tokens.
    """

    block_size: int
    target_layer_ids: tuple[int, ...]

    def reset(self, batch: int, max_seq_len: int) -> None: ...

    def propose(self, tokens: Tensor, context: Tensor | None, sampler: Sampler) -> Proposal: ...


# ----------------------------------------------------------------------------------------------------- acceptance
def accept_greedy(draft: Tensor, target_out: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification. ``draft`` [B, k] proposals; ``target_out`` the target's logits [B, k+1, V] (or its argmax
    ids [B, k+1]) over [last token, draft]. Returns (accepted [B], tokens [B, k+1]): row b emits
    tokens[b, :accepted[b] + 1], i.e. the matching proposals and then the target's own choice."""
    choice = target_out if not target_out.is_floating_point() else torch.argmax(target_out, dim=-1)
    k = draft.shape[1]
    accepted = (draft == choice[:, :k]).to(torch.int64).cumprod(dim=1).sum(dim=1)
    return accepted, choice


def accept_sampling(draft: Tensor, q: Tensor | None, p: Tensor, generator: torch.Generator | None
                    ) -> tuple[Tensor, Tensor]:
    """Rejection sampling. ``draft`` [B, k] drawn from ``q`` [B, k, V] (None: one-hot, a deterministic drafter);
    ``p`` [B, k+1, V] the target's distributions over [last token, draft]. Proposal j is accepted with probability
    min(1, p_j(d)/q_j(d)) while all before it were; at the first rejection the token is drawn from
    norm(max(0, p_j - q_j)); when all k are accepted a bonus token is drawn from p_k. Returns (accepted [B],
    tokens [B, k+1]) as `accept_greedy` does. Draws the same number of random numbers whatever is accepted."""
    b, k = draft.shape
    rows = torch.arange(b, device=p.device)
    if k:
        p_x = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)
        q_x = torch.ones_like(p_x) if q is None else q.gather(-1, draft[..., None]).squeeze(-1)
        u = torch.rand((b, k), generator=generator, device=p.device)
        accepted = (u * q_x < p_x).to(torch.int64).cumprod(dim=1).sum(dim=1)
    else:
        accepted = torch.zeros(b, dtype=torch.int64, device=p.device)
    p_next = p[rows, accepted]
    dist = p_next
    if k:
        at = accepted.clamp(max=k - 1)
        q_at = q[rows, at] if q is not None else torch.nn.functional.one_hot(draft[rows, at], p.shape[-1]).to(p)
        residual = (p_next - q_at).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        # A rejection implies p(d) < q(d), hence mass > 0; only rounding can leave none, and then p itself is right.
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
        dist = torch.where((accepted < k)[:, None], residual, p_next)
    nxt = torch.multinomial(dist, 1, generator=generator)
    tokens = torch.cat((draft, nxt), dim=1).scatter(1, accepted[:, None], nxt)
    return accepted, tokens


# ------------------------------------------------------------------------------------------------------- drafters
class DFlashDrafter:
    """A compiled DFlash draft (``tilec.compile(draft)``) run through its own decode session."""

    def __init__(self, draft_cm):
        cfg = draft_cm.info.config
        if not hasattr(cfg, "target_layer_ids") or not hasattr(cfg, "mask_token_id"):
            raise TilecError(f"{draft_cm.info.description} is not a DFlash draft (its config has no target_layer_ids "
                             f"and mask_token_id)")
        if draft_cm.options.spec_rows < cfg.block_size:
            raise TilecError(f"the draft was compiled with spec_rows={draft_cm.options.spec_rows}, fewer than its "
                             f"block of {cfg.block_size}; compile it with Options(spec_rows={cfg.block_size})")
        self.cm, self.config = draft_cm, cfg
        self.block_size = cfg.block_size
        self.target_layer_ids = tuple(cfg.target_layer_ids)
        self.session = None

    def reset(self, batch: int, max_seq_len: int) -> None:
        self.session = None  # gone first, so the new session may take its caches (CompiledModel.new_session)
        self.session = self.cm.new_session(batch, max_seq_len)

    def propose(self, tokens: Tensor, context: Tensor | None, sampler: Sampler) -> Proposal:
        if context is None:
            raise TilecError("the DFlash draft needs the target's hidden states; run the target through "
                             "with_hidden_layers(draft.config.target_layer_ids)")
        batch, p = tokens.shape[0], tokens.shape[1] - 1
        start = p - context.shape[1]
        if self.session.length != start:
            raise TilecError(f"DFlash draft out of step: it has seen {self.session.length} positions, the context "
                             f"starts at {start}")
        block = torch.full((batch, self.block_size), self.config.mask_token_id, dtype=torch.int64,
                           device=tokens.device)
        block[:, 0] = tokens[:, -1]
        rows = context.shape[1]
        context_start = torch.full((batch,), start, dtype=torch.int64, device=tokens.device)
        out = self.session.step(block, context.contiguous(), context_start, start=p, advance=rows)
        if not out.is_floating_point():  # compiled with greedy=True: the graph returns ids
            if not sampler.greedy:
                raise TilecError("the draft was compiled with greedy=True (it returns token ids); sampling needs "
                                 "its logits: compile it without greedy")
            return Proposal(out[:, 1:])
        return sampler.draw(out[:, 1:])


class OracleDraft:
    """Proposes a known continuation: give it the sequences the target itself produces (e.g. plain greedy
    ``cm.generate`` output, prompt included). Every proposal is accepted under greedy decoding, so acceptance is the
    block size: the ceiling of what any drafter can reach."""

    target_layer_ids: tuple[int, ...] = ()

    def __init__(self, sequences, block_size: int = 8):
        seqs = sequences if isinstance(sequences, Tensor) else torch.tensor(sequences)
        self.sequences = seqs[None] if seqs.dim() == 1 else seqs
        if block_size < 1:
            raise ShapeError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    def reset(self, batch: int, max_seq_len: int) -> None:
        if self.sequences.shape[0] != batch:
            raise ShapeError(f"the oracle knows {self.sequences.shape[0]} sequence(s) but the batch has {batch}")

    def propose(self, tokens: Tensor, context: Tensor | None, sampler: Sampler) -> Proposal:
        p, n = tokens.shape[1] - 1, self.block_size - 1
        known = self.sequences[:, p + 1:p + 1 + n].to(tokens.device)
        pad = torch.zeros((tokens.shape[0], n - known.shape[1]), dtype=torch.int64, device=tokens.device)
        return Proposal(torch.cat((known, pad), dim=1))


def compile_draft(draft, target_cm):
    """``draft`` (a DFlash module) compiled for the target of ``target_cm`` with its options, rings sized for the
    block; cached on the target so repeated generate calls compile once. A tensor-parallel target's draft is whole on
    every rank (it is small, and reads the target's summed hidden states), so every rank drafts the same block."""
    import tilec

    key = ("dflash_draft", id(draft))
    variants = target_cm._variants
    if key not in variants:
        block = draft.config.block_size
        options = target_cm.options.replace(hidden_layers=(), dump_dir=None, tensor_parallel=1,
                                            spec_rows=max(block, target_cm.options.spec_rows))
        variants[key] = tilec.compile(draft, target=target_cm.target, options=options)
    return variants[key]


def as_drafter(draft, target_cm) -> Drafter:
    """A drafter from what ``generate(draft=...)`` accepts: a DFlash module, its CompiledModel, or a Drafter."""
    from tilec.api import CompiledModel
    from tilec.models.dflash import DFlashDraft

    if isinstance(draft, DFlashDraft):
        draft = compile_draft(draft, target_cm)
    if isinstance(draft, CompiledModel):
        return DFlashDrafter(draft)
    if all(hasattr(draft, a) for a in ("block_size", "target_layer_ids", "reset", "propose")):
        return draft
    raise TilecError(f"draft must be a DFlash draft (tilec.models.dflash.build_draft / load_draft), its "
                     f"CompiledModel, or a Drafter (block_size, target_layer_ids, reset, propose); got "
                     f"{type(draft).__name__}")


# ------------------------------------------------------------------------------------------------------- the loop
class SpeculativeDecoder:
    """The state of one speculative generation: the target session, the tokens so far, the pending draft context.

    `prefill` feeds the prompt and chooses the first token; each `round` drafts, verifies and accepts. Nothing here
    knows about eos or token budgets (see `dflash_generate`), so tests can step rounds and inspect the caches.
    """

    def __init__(self, target_cm, drafter: Drafter, batch: int, max_seq_len: int, sampler: Sampler):
        self.drafter, self.sampler = drafter, sampler
        block = drafter.block_size
        if not isinstance(block, int) or block < 1:
            raise TilecError(f"the drafter's block_size must be a positive int, got {block!r}")
        if target_cm.options.spec_rows < block:
            raise TilecError(f"the target was compiled for spec_rows={target_cm.options.spec_rows} verify rows, fewer "
                             f"than the draft's block of {block}: its sliding-window rings would lose keys on a "
                             f"rollback; compile it with Options(spec_rows={block})")
        if not sampler.greedy and getattr(target_cm.options, "greedy", False):
            raise TilecError("the target was compiled with greedy=True (its graph returns token ids); sampling needs "
                             "its logits: compile it without greedy, or decode with temperature 0")
        layers = tuple(drafter.target_layer_ids)
        self.target = target_cm.with_hidden_layers(layers) if layers else target_cm
        self.session = self.target.new_session(batch, max_seq_len)
        drafter.reset(batch, max_seq_len + block)  # the draft block reaches block - 1 positions past the target
        self.tokens: Tensor | None = None  # [B, p+1]: everything so far; the last token is not in the target yet
        self.context: Tensor | None = None  # target hidden states the drafter has not seen

    def prefill(self, ids: Tensor) -> Tensor:
        """Run the prompt [B, T]; returns the first new token per row [B]."""
        out = self.session.step(ids)
        self.context = self.session.hidden
        if not out.is_floating_point():
            first = out[:, -1]
        else:
            first = choose(out[:, -1], self.sampler.temperature, self.sampler.top_p, self.sampler.generator)
        self.tokens = torch.cat((ids, first[:, None]), dim=1)
        return first

    def round(self, rows: int | None = None, done: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Draft, verify ``rows`` (default: the block) rows in one target step, accept. Returns (new tokens [B, m],
        accepted proposals per row [B]); rows flagged ``done`` do not limit m (their tokens are replaced anyway)."""
        n = self.drafter.block_size if rows is None else rows
        if not 1 <= n <= self.drafter.block_size:
            raise ShapeError(f"a round verifies 1..{self.drafter.block_size} rows, not {n}")
        if n > 1:
            proposal = self.drafter.propose(self.tokens, self.context, self.sampler)
            pending = None
        else:  # nothing to draft: keep the context for the drafter's next call
            proposal = Proposal(self.tokens[:, :0])
            pending = self.context
        draft = proposal.tokens[:, :n - 1].to(self.tokens.device)
        if draft.shape[1] != n - 1:
            raise TilecError(f"the drafter proposed {proposal.tokens.shape[1]} tokens; a block of {n} needs {n - 1}")
        start = self.session.length
        out = self.session.step(torch.cat((self.tokens[:, -1:], draft), dim=1))
        hidden = self.session.hidden
        if self.sampler.greedy:
            accepted, emitted = accept_greedy(draft, out)
        else:
            q = None if proposal.q is None else proposal.q[:, :n - 1]
            accepted, emitted = accept_sampling(draft, q, self.sampler.probs(out), self.sampler.generator)
        limit = accepted if done is None else torch.where(done, n - 1, accepted)
        m = int(limit.min()) + 1
        self.session.rollback(start + m)
        self.context = None if hidden is None else hidden[:, :m]
        if pending is not None and self.context is not None:
            self.context = torch.cat((pending, self.context), dim=1)
        new = emitted[:, :m]
        self.tokens = torch.cat((self.tokens, new), dim=1)
        return new, accepted


def session_length(target_cm, prompt: int, max_new_tokens: int, block: int) -> int:
    """The target's cache length for a speculative generation: room for a whole block at every round (a last round
    of fewer rows would be a step of a new shape, and on a GPU a new shape is a CUDA graph captured on the spot, tens
    of ms; tokens past max_new_tokens are verified and dropped), as generate() sizes it (CompiledModel.
    generation_length)."""
    return target_cm.generation_length(prompt + max_new_tokens + block - 1)


def dflash_generate(target_cm, draft, ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                    top_p: float = 1.0, generator: torch.Generator | None = None, eos: Tensor | None = None,
                    max_seq_len: int | None = None, on_tokens: TokensCallback | None = None
                    ) -> tuple[Tensor, GenerationStats]:
    """Speculative decoding of ``max_new_tokens`` after ``ids`` [B, T]; returns [B, T + N] and the stats
    (rounds = verify steps; the histogram counts tokens per round). Same eos rule as plain decoding: a row that
    emitted eos keeps emitting it, and decoding stops once all rows have. ``on_tokens`` gets each round's tokens."""
    drafter = as_drafter(draft, target_cm)
    batch, prompt = ids.shape
    length = max_seq_len or session_length(target_cm, prompt, max_new_tokens, drafter.block_size)
    sampler = Sampler(temperature, top_p, generator)
    stats = GenerationStats()
    has_eos = eos is not None and eos.numel() > 0
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    out = [ids]

    def emit(new: Tensor) -> bool:
        """Append tokens [B, m] one position at a time under the eos rule; True when generation is over."""
        kept = []
        for j in range(new.shape[1]):
            nxt = new[:, j]
            if has_eos:
                nxt = torch.where(done, eos[0], nxt)
                done.logical_or_(torch.isin(nxt, eos))
            kept.append(nxt[:, None])
            stats.new_tokens += 1
            if stats.new_tokens == max_new_tokens or (has_eos and bool(done.all())):
                break
        chunk = torch.cat(kept, dim=1)
        out.append(chunk)
        if on_tokens is not None:
            on_tokens(chunk)
        return stats.new_tokens == max_new_tokens or (has_eos and bool(done.all()))

    decoder = SpeculativeDecoder(target_cm, drafter, batch, length, sampler)
    _sync(ids)
    begin = time.perf_counter()
    finished = emit(decoder.prefill(ids)[:, None])
    while not finished:
        # A whole block while the cache has room for it (always, at the default length); where a caller's
        # max_seq_len leaves less, as many rows as fit, which is never fewer than the tokens still wanted.
        rows = min(drafter.block_size, length - decoder.session.length)
        new, _ = decoder.round(rows, done if has_eos else None)
        before = stats.new_tokens
        finished = emit(new)
        stats.record_round(stats.new_tokens - before)  # the tokens kept
    _sync(ids)
    stats.seconds = time.perf_counter() - begin
    return torch.cat(out, dim=1), stats


def _sync(t: Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
