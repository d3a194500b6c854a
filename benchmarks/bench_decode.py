"""Batch-1 greedy decode of a MiMo preset (``mini`` by default): tilec against its peers, next to the HBM floor.

    python3 benchmarks/bench_decode.py --out DIR [--preset mini] [--contexts 256,4096]
        [--entries hf,reference,compile,triton,triton-mxfp4] [--steps 64] [--device cuda] [--seed 0]
    TRITON_INTERPRET=1 python3 benchmarks/bench_decode.py --preset tiny --device cpu --contexts 16,32 --steps 4 \
        --entries hf,reference,triton --out /tmp/benchsmoke          # smoke test without a GPU

Entries (each at each context: prefill a random prompt of ``context`` tokens, then greedy steps of one token):

- ``hf``: transformers' ``MiMoV2FlashForCausalLM`` (its default attention and experts implementations, recorded),
  sharing tilec's weight tensors; timed step by step through its DynamicCache (``model(input_ids=..,
  past_key_values=.., use_cache=True)``, which is what ``generate`` does per step minus its logits processors).
- ``reference``: ``tilec.compile(model, target="reference")``, decoded through a session.
- ``compile``: tilec's eager model under ``torch.compile(mode="reduce-overhead")`` with a static cache (gpt-fast
  style); tilec's ops are custom ops, so inductor treats them as opaque calls and the gain is CUDA graphs. If CUDA
  graphs cannot be captured the failure is recorded and the entry is retried with ``mode="default"``.
- ``compile-inline`` (not run by default): the same, with the model's ops swapped for their reference functions so
  that inductor sees and fuses plain torch code (closest to gpt-fast); costs a longer compile.
- ``triton``, ``triton-mxfp4``: ``tilec.compile(model, target="triton")`` (with ``Options(mxfp4=True)``), decoded
  through a session; recorded as skipped with tilec's message while the target (or the option) does not exist.
- ``cuda``, ``cuda-mxfp4``: the same with ``target="cuda"``: each decode step one launch of the megakernel.

Per entry and context the JSON holds the median, p10 and p90 of per-step times (CUDA events around each step, no
host synchronisation between steps, argmax included), the wall time per token, the first greedy tokens and whether
the first 4 agree with the reference entry's, and the relative error of the prefill and first decode logits against
the reference's. The floor is the bytes one step must read (``tilec.cost.step_bytes`` of the compiled graph at that
context) over the measured copy bandwidth; each entry's fraction is floor / median (1.0 = at the floor).

Writes ``DIR/bench_decode.json`` after every entry and context (a run cut off still leaves data),
``DIR/bench_decode.png`` (ms/token per entry and context, log scale, floors and the 1 ms goal drawn), and prints a
table last. ``--budget-s`` skips what would not finish in time, so the default run fits one 10-minute device call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the checkout's tilec, also when it is not installed

import common  # noqa: E402
import tilec  # noqa: E402
from tilec.cost import H100_COPY_BYTES_PER_S, step_bytes  # noqa: E402
from tilec.models import MiMoForCausalLM, preset_config  # noqa: E402

ENTRIES = ("hf", "reference", "compile", "triton", "triton-mxfp4", "cuda", "cuda-mxfp4")
OPTIONAL_ENTRIES = ("compile-inline",)
# Run order: the reference first (its tokens and logits are what the others are checked against), then the targets
# the goal is about, then the peers, slowest to set up last. Tables and charts list entries in ENTRIES order.
RUN_ORDER = ("reference", "triton", "triton-mxfp4", "cuda", "cuda-mxfp4", "hf", "compile", "compile-inline")
# Seconds an entry needs at one context on the GPU (a guess on the safe side, compiles included): an entry starts
# only when this much of --budget-s is left.
NEEDS_S = {"reference": 20, "triton": 60, "triton-mxfp4": 90, "cuda": 60, "cuda-mxfp4": 60, "hf": 30, "compile": 120,
           "compile-inline": 240}
GOAL_MS = 1.0  # the goal for the triton backend on mini, bf16, H100
AGREE_TOKENS = 4


def positions_used(context: int, warmup: int, steps: int) -> int:
    """The KV cache positions a decode of ``context`` uses: the prompt, the warm-up and timed steps, and a margin."""
    return context + warmup + steps + 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="directory for bench_decode.json and .png")
    p.add_argument("--preset", default="mini", help="MiMo preset of tilec.models (default mini)")
    p.add_argument("--contexts", default="256,4096", help="comma-separated prompt lengths (default 256,4096)")
    p.add_argument("--entries", default=",".join(ENTRIES),
                   help=f"comma-separated, from {', '.join(ENTRIES + OPTIONAL_ENTRIES)} (default: all but "
                        f"{', '.join(OPTIONAL_ENTRIES)})")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per entry and context (default 64)")
    p.add_argument("--hf-steps", type=int, default=32, help="timed steps for hf, which is slow (default 32)")
    p.add_argument("--warmup", type=int, default=6, help="untimed decode steps first (>= 3; default 6)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    p.add_argument("--cache-positions", type=int, default=0,
                   help="positions of every session's KV cache, as a server's max_seq_len (default 0: each "
                        "context's own, the context + warm-up + steps + 8). tilec and torch.compile entries only: "
                        "hf grows its cache as it goes. Changes that skip a cache's unused part show only here")
    p.add_argument("--bw-mib", type=int, default=None,
                   help="size of the bandwidth test's buffer (default 4096 MiB on cuda, 256 on cpu)")
    p.add_argument("--hf-experts", default=None,
                   help="transformers experts implementation for hf (default: what transformers picks)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="start no entry that would end after this many seconds of the run (default 480)")
    p.add_argument("--hard-limit-s", type=float, default=540.0,
                   help="stop whatever runs at this many seconds, then write the JSON, PNG and table (default "
                        "540; 0: none)")
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    args.entries = [e.strip() for e in args.entries.split(",") if e.strip()]
    unknown = [e for e in args.entries if e not in ENTRIES + OPTIONAL_ENTRIES]
    if unknown:
        p.error(f"unknown entries {unknown}; choose from {', '.join(ENTRIES + OPTIONAL_ENTRIES)}")
    if not args.contexts or min(args.contexts) < 1 or args.steps < 1 or args.hf_steps < 1:
        p.error("contexts, --steps and --hf-steps must be positive")
    if args.warmup < 3:
        p.error("--warmup must be >= 3 (torch.compile's CUDA graphs are recorded on the second call)")
    need = positions_used(max(args.contexts), args.warmup, max(args.steps, args.hf_steps))
    if args.cache_positions and args.cache_positions < need:
        p.error(f"--cache-positions {args.cache_positions} is too few for context {max(args.contexts)} with "
                f"{args.warmup} warm-up and {max(args.steps, args.hf_steps)} timed steps: at least {need}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU; use --device cpu for a smoke test")
    if args.bw_mib is None:
        args.bw_mib = 4096 if args.device == "cuda" else 256
    return args


# ------------------------------------------------------------------------------------------------------ the model
@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int) -> None:
    """``MiMoForCausalLM.init_weights``'s distributions, drawn on the model's own device (on the CPU, 7B normal draws
    and a copy take minutes): norms 1 + 0.1 N(0,1), router correction bias 0.05 N(0,1), sinks N(0,1), every other
    tensor initializer_range * N(0,1)."""
    std = model.config.initializer_range
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("norm.weight"):
            t.normal_(1.0, 0.1, generator=gen)
        elif name.endswith("e_score_correction_bias"):
            t.normal_(0.0, 0.05, generator=gen)
        elif name.endswith("sinks"):
            t.normal_(0.0, 1.0, generator=gen)
        else:
            t.normal_(0.0, std, generator=gen)


def build_model(preset: str, device: torch.device, seed: int) -> MiMoForCausalLM:
    cfg = preset_config(preset)
    with device:
        model = MiMoForCausalLM(cfg, cfg.torch_dtype or torch.float32)
    init_random_(model, seed)
    return model.eval()


def hf_sharing_weights(model: MiMoForCausalLM, experts_impl: str | None):
    """transformers' MiMoV2FlashForCausalLM over the very tensors of ``model`` (names are identical): built on the
    meta device, then given tilec's state dict with ``assign=True``; its RoPE tables, which no state dict holds, are
    made again on the device."""
    from transformers import MiMoV2FlashForCausalLM

    device = next(model.parameters()).device
    with torch.device("meta"):
        hf = MiMoV2FlashForCausalLM(model.config.to_hf())
    hf.load_state_dict(model.state_dict(), strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config).to(device)
    if experts_impl:
        hf.config._experts_implementation = experts_impl
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"HF model tensors left on the meta device: {left[:5]}")
    ours = {n: t.data_ptr() for n, t in model.state_dict().items()}
    copied = [n for n, t in hf.state_dict().items() if n in ours and t.data_ptr() != ours[n]]
    if copied:
        raise RuntimeError(f"HF model holds copies instead of tilec's tensors: {copied[:5]}")
    return hf.eval()


# ------------------------------------------------------------------------------------------------------- decoding
@dataclasses.dataclass
class Decoded:
    tokens: list[int]  # greedy tokens: the prefill's choice, then one per decode step
    samples_ms: list[float]  # one per timed step
    wall_ms_per_token: float
    prefill_ms: float
    prefill_logits: torch.Tensor  # [V] float32 on the CPU: the prompt's last row
    first_logits: torch.Tensor  # [V] of the first decode step


def decode(prefill, step, prompt: torch.Tensor, warmup: int, steps: int, device: torch.device) -> Decoded:
    """Prefill ``prompt``, then ``warmup`` untimed and ``steps`` timed greedy steps (argmax on the device, fed back
    without a host round trip). ``prefill(ids)`` and ``step(ids [1, 1])`` return logits [1, T, V]."""
    common.synchronize(device)
    t0 = time.perf_counter()
    logits = prefill(prompt)
    common.synchronize(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    prefill_logits = logits[0, -1].float().cpu()
    tok = logits[:, -1].argmax(-1, keepdim=True)
    toks, first_logits = [tok], None
    for i in range(warmup):
        logits = step(tok)
        if i == 0:
            first_logits = logits[0, -1].float().cpu()
        tok = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    common.synchronize(device)
    timer = common.StepTimer(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        timer.start()
        logits = step(tok)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        timer.stop()
        toks.append(tok)
    common.synchronize(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    return Decoded(torch.cat(toks, dim=1)[0].tolist(), timer.times_ms(), wall_ms, prefill_ms, prefill_logits,
                   first_logits)


# ---------------------------------------------------------------------------------------------- torch.compile
INLINE_OVERRIDES = {
    # Their references begin with a shape check that calls torch.result_type, which dynamo cannot trace; these are
    # the same arithmetic without the check.
    "add": lambda a, b: a + b,
    "silu_mul": lambda gate, up: torch.nn.functional.silu(gate) * up,
}


@contextlib.contextmanager
def ops_inlined():
    """Swap each op the model calls (``tilec.ops.<name>``) for its reference function, so dynamo traces plain torch
    code instead of opaque custom ops. Must stay on for every call of a function compiled under it (guards)."""
    import tilec.ops as ops_module

    saved = {}
    for name, op in ops_module.OPS.items():
        if getattr(ops_module, name, None) is op.overload:
            saved[name] = op.overload
            setattr(ops_module, name, INLINE_OVERRIDES.get(name, op.reference))
    try:
        yield
    finally:
        for name, overload in saved.items():
            setattr(ops_module, name, overload)


class CompiledDecoder:
    """tilec's eager model as ``decode_one(token [1, 1], start_pos [1], *caches) -> logits`` under torch.compile,
    with a static cache per context (gpt-fast style). The caches are marked static so that CUDA graphs may mutate
    them in place; a context of another cache size recompiles (dynamic=False)."""

    def __init__(self, model: MiMoForCausalLM, mode: str, inline: bool):
        self.model, self.mode, self.inline = model, mode, inline

        def decode_one(token, start_pos, *caches):
            return model(token, start_pos, list(caches))

        self.fn = torch.compile(decode_one, mode=mode, fullgraph=True, dynamic=False)
        self.first_call_s: list[float] = []

    def run(self, prompt: torch.Tensor, max_seq_len: int, warmup: int, steps: int, device) -> Decoded:
        caches = [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in self.model.cache_layout(1, max_seq_len)]
        for c in caches:
            torch._dynamo.mark_static_address(c)
        pos = torch.zeros(1, dtype=torch.int64, device=device)
        state = {"first": True}

        def prefill(ids):  # eager: one prompt-length compile would cost more than it shows
            out = self.model(ids, pos, caches)
            pos.fill_(ids.shape[1])
            return out

        def step(tok):
            torch.compiler.cudagraph_mark_step_begin()
            t0 = time.perf_counter()
            out = self.fn(tok, pos, *caches)
            if state["first"]:
                common.synchronize(device)
                self.first_call_s.append(time.perf_counter() - t0)
                state["first"] = False
            pos.add_(1)
            return out

        # A CUDA graph that cannot be captured raises (and the entry falls back) instead of running without one.
        strict = self.mode == "reduce-overhead" and hasattr(torch._inductor.config.triton, "cudagraph_or_error")
        with torch.no_grad(), torch._inductor.config.patch({"triton.cudagraph_or_error": True} if strict else {}):
            with ops_inlined() if self.inline else contextlib.nullcontext():
                return decode(prefill, step, prompt, warmup, steps, device)


# ---------------------------------------------------------------------------------------------------- the bench
class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.log = common.Log()
        self.json_path = args.out / "bench_decode.json"
        self.png_path = args.out / "bench_decode.png"
        steps_max = max(args.steps, args.hf_steps)
        self.max_seq_len = max(positions_used(max(args.contexts), args.warmup, steps_max), args.cache_positions)
        self.result: dict = {
            "benchmark": "bench_decode", "status": "running", "created": common.now_iso(),
            "environment": common.environment(self.device),
            "config": {"preset": args.preset, "contexts": args.contexts, "entries": args.entries,
                       "steps": args.steps, "hf_steps": args.hf_steps, "warmup": args.warmup, "seed": args.seed,
                       "device": args.device, "batch": 1, "options_max_seq_len": self.max_seq_len,
                       "cache_positions": args.cache_positions or "context + warmup + steps + 8",
                       "budget_s": args.budget_s},
            "method": {
                "timing": "CUDA events around each decode step (argmax included), no host sync between steps; "
                          "median, p10, p90 over the timed steps after the warm-up ones; on the CPU the host clock",
                "positions": "the prompt fills positions 0..context-1, the warm-up steps the next ones; timed steps "
                             "start at position context + warmup",
                "floor": "bytes one step must read (tilec.cost.step_bytes of the compiled graph at the context) / "
                         "measured copy bandwidth (bytes read + written); fraction_of_floor = floor_ms / median_ms",
                "agreement": f"first {AGREE_TOKENS} greedy tokens (prefill's choice first) against the reference "
                             "entry's; bf16 random-weight models are chaotic, so a late split is expected",
            },
            "runs": [], "notes": [], "timings_s": {},
        }
        self.reference_out: dict[int, Decoded] = {}
        self.floors: dict[int, dict] = {}
        self.prompts: dict[int, torch.Tensor] = {}
        self.current: tuple[str, int] | None = None  # the entry and context running now

    # -- bookkeeping
    def save(self) -> None:
        self.result["updated"] = common.now_iso()
        self.result["elapsed_s"] = round(self.log.elapsed(), 1)
        common.write_json(self.json_path, self.result)

    def note(self, text: str) -> None:
        self.log(f"note: {text}")
        self.result["notes"].append(text)

    def record(self, run: dict) -> dict:
        self.current = None
        self.result["runs"].append(run)
        self.save()
        return run

    def skip(self, entry: str, context: int, reason: str, **extra) -> None:
        self.log(f"{entry} @ {context}: skipped: {reason}")
        self.record({"entry": entry, "context": context, "status": "skipped", "reason": reason, **extra})

    def fail(self, entry: str, context: int, exc: BaseException, **extra) -> None:
        tb = traceback.format_exc().strip().splitlines()[-12:]
        self.log(f"{entry} @ {context}: FAILED: {type(exc).__name__}: {exc}")
        self.record({"entry": entry, "context": context, "status": "failed", "error": f"{type(exc).__name__}: "
                     f"{str(exc)[:2000]}", "traceback": tb, **extra})
        free_memory(self.device)

    def time_left_for(self, entry: str) -> bool:
        needs = NEEDS_S.get(entry, 30) if self.device.type == "cuda" else 0
        return self.log.elapsed() + needs <= self.args.budget_s

    def begin(self, entry: str, context: int) -> None:
        self.current = (entry, context)
        self.log(f"{entry} @ {context}: running")

    def prompt(self, context: int) -> torch.Tensor:
        if context not in self.prompts:
            gen = torch.Generator().manual_seed(self.args.seed * 100003 + context)
            vocab = self.model.config.vocab_size
            self.prompts[context] = torch.randint(0, vocab, (1, context), generator=gen).to(self.device)
        return self.prompts[context]

    def options(self, **changes) -> tilec.Options:
        return tilec.Options(max_seq_len=self.max_seq_len, **changes)

    # -- one timed run
    def finish(self, entry: str, context: int, out: Decoded, precision: str, **extra) -> dict:
        stats = common.summarize(out.samples_ms)
        floor = self.floors.get(context, {}).get(precision)
        run = {"entry": entry, "context": context, "status": "ok", "precision": precision,
               "steps": len(out.samples_ms), "ms_per_token": stats, "wall_ms_per_token": out.wall_ms_per_token,
               "prefill_ms": out.prefill_ms, "floor_ms": floor,
               "fraction_of_floor": floor / stats["median"] if floor else None,
               "tokens": out.tokens[:16], "samples_ms": [round(s, 5) for s in out.samples_ms], **extra}
        ref = self.reference_out.get(context)
        if ref is not None and entry != "reference":
            n = min(AGREE_TOKENS, len(ref.tokens), len(out.tokens))
            prefix = next((i for i in range(n) if ref.tokens[i] != out.tokens[i]), n)
            run["agreement"] = {"with": "reference", "compared": n, "matching_prefix": prefix, "agree": prefix == n}
            run["logits_rel_err"] = {"prefill": common.rel_err(out.prefill_logits, ref.prefill_logits),
                                     "first_decode": common.rel_err(out.first_logits, ref.first_logits)}
            if precision == "mxfp4":
                run["agreement"]["note"] = "quantised experts against the unquantised reference: agreement not expected"
        ms = stats["median"]
        frac = f", {run['fraction_of_floor']:.2f} of floor" if floor else ""
        agree = f", agree={run['agreement']['agree']}" if "agreement" in run else ""
        self.log(f"{entry} @ {context}: {ms:.3f} ms/token median (p10 {stats['p10']:.3f}, p90 {stats['p90']:.3f})"
                 f"{frac}{agree}")
        return self.record(run)

    # -- setup
    def setup(self) -> None:
        a, log = self.args, self.log
        log(f"device {self.result['environment'].get('device')}, torch {torch.__version__}; building {a.preset} "
            f"with random weights on {a.device}")
        t0 = time.perf_counter()
        self.model = build_model(a.preset, self.device, a.seed)
        common.synchronize(self.device)
        self.result["timings_s"]["build"] = round(time.perf_counter() - t0, 2)
        self.base = precision_name(self.model.dtype)  # the unquantised weights' precision: bf16 for mini
        counts = self.model.config.parameter_counts()
        self.result["config"].update(model=self.model.describe(), dtype=str(self.model.dtype).removeprefix("torch."),
                                     parameters=counts)
        log(f"built {self.model.describe()} in {self.result['timings_s']['build']} s")

        t0 = time.perf_counter()
        bw = common.measure_bandwidth(self.device, a.bw_mib * 2**20)
        self.result["bandwidth"] = {**bw, "floor_uses": "copy", "design_h100_copy_bytes_per_s": H100_COPY_BYTES_PER_S}
        self.result["timings_s"]["bandwidth"] = round(time.perf_counter() - t0, 2)
        log(f"bandwidth: copy {bw['copy']['bytes_per_s'] / 1e12:.3f} TB/s (read + write), read-only "
            f"{bw['read']['bytes_per_s'] / 1e12:.3f} TB/s, over {bw['nbytes'] / 2**30:.2f} GiB")

        t0 = time.perf_counter()
        self.reference = tilec.compile(self.model, target="reference", options=self.options())
        self.result["timings_s"]["compile_reference"] = round(time.perf_counter() - t0, 2)
        log(f"tilec reference compiled in {self.result['timings_s']['compile_reference']} s")
        self.set_floors(self.base, self.reference.graph, "reference compile")
        self.set_mxfp4_floors_from_meta()
        self.save()

    def set_floors(self, precision: str, graph, source: str) -> None:
        copy_bw = self.result["bandwidth"]["copy"]["bytes_per_s"]
        for context in self.args.contexts:
            nbytes = step_bytes(graph, context)
            entry = self.result.setdefault("contexts", {}).setdefault(str(context), {"bytes": {}, "floor_ms": {},
                                                                                    "floor_ms_at_3_TBps": {}})
            entry["bytes"][precision] = {**nbytes, "source": source}
            entry["floor_ms"][precision] = nbytes["total"] / copy_bw * 1e3
            entry["floor_ms_at_3_TBps"][precision] = nbytes["total"] / H100_COPY_BYTES_PER_S * 1e3
            self.floors.setdefault(context, {})[precision] = entry["floor_ms"][precision]
            self.log(f"context {context}: {precision} step reads {nbytes['total'] / 1e9:.4f} GB (weights "
                     f"{nbytes['weights'] / 1e9:.4f}, KV {nbytes['kv'] / 1e9:.4f}); floor "
                     f"{entry['floor_ms'][precision]:.4f} ms at the measured copy bandwidth")

    def set_mxfp4_floors_from_meta(self) -> None:
        """MXFP4 bytes from a shapes-only compile (meta device): the floor is known even before a target runs it."""
        if not has_mxfp4_option():
            self.note("tilec.Options has no mxfp4 field: no MXFP4 floor")
            return
        try:
            with torch.device("meta"):
                meta = MiMoForCausalLM(self.model.config, self.model.dtype)
            cm = tilec.compile(meta, target="reference", options=self.options(mxfp4=True))
            self.set_floors("mxfp4", cm.graph, "reference compile with Options(mxfp4=True) on the meta device")
        except Exception as exc:  # noqa: BLE001 - the floor is extra information, never a reason to stop
            self.note(f"no MXFP4 floor: {type(exc).__name__}: {exc}")

    # -- entries
    def cache_positions(self, context: int) -> int:
        """The KV cache's positions for a session at ``context``: --cache-positions, else just what it uses."""
        return self.args.cache_positions or positions_used(context, self.args.warmup, self.args.steps)

    def run_session_entry(self, entry: str) -> None:
        precision = "mxfp4" if entry.endswith("mxfp4") else self.base
        if entry.endswith("mxfp4") and not has_mxfp4_option():
            for c in self.args.contexts:
                self.skip(entry, c, "tilec.Options has no mxfp4 field (the MXFP4 issue has not landed)")
            return
        if entry == "reference":
            cm = self.reference
        elif not self.time_left_for(entry):
            for c in self.args.contexts:
                self.skip(entry, c, f"time budget ({self.args.budget_s:.0f} s) nearly spent")
            return
        else:
            try:
                t0 = time.perf_counter()
                opts = self.options(mxfp4=True) if precision == "mxfp4" else self.options()
                cm = tilec.compile(self.model, target=entry.split("-")[0], options=opts)
                self.result["timings_s"][f"compile_{entry}"] = round(time.perf_counter() - t0, 2)
                self.log(f"{entry} compiled in {self.result['timings_s'][f'compile_{entry}']} s")
            except tilec.TilecError as exc:
                for c in self.args.contexts:
                    self.skip(entry, c, f"{type(exc).__name__}: {exc}")
                return
            except Exception as exc:  # noqa: BLE001
                for c in self.args.contexts:
                    self.fail(entry, c, exc, stage="compile")
                return
            if precision == "mxfp4":
                self.set_floors("mxfp4", cm.graph, f"{entry} compile")
        try:
            for context in self.args.contexts:
                if not self.time_left_for(entry):
                    self.skip(entry, context, f"time budget ({self.args.budget_s:.0f} s) nearly spent")
                    continue
                self.begin(entry, context)
                try:
                    session = cm.new_session(1, self.cache_positions(context))
                    with torch.inference_mode():
                        out = decode(session.step, session.step, self.prompt(context), self.args.warmup,
                                     self.args.steps, self.device)
                    del session
                    if entry == "reference":
                        self.reference_out[context] = out
                    self.finish(entry, context, out, precision, method=f"tilec.compile(target={cm.target!r}) "
                                "then a DecodeSession: session.step(prompt), then session.step(token)")
                except Exception as exc:  # noqa: BLE001
                    self.fail(entry, context, exc)
        finally:
            del cm
            free_memory(self.device)

    def run_hf(self) -> None:
        a = self.args
        try:
            from transformers import DynamicCache, MiMoV2FlashForCausalLM  # noqa: F401
        except ImportError as exc:
            for c in a.contexts:
                self.skip("hf", c, f"transformers has no MiMo-V2-Flash model: {exc}")
            return
        if not self.time_left_for("hf"):
            for c in a.contexts:
                self.skip("hf", c, f"time budget ({a.budget_s:.0f} s) nearly spent")
            return
        try:
            t0 = time.perf_counter()
            hf = hf_sharing_weights(self.model, a.hf_experts)
            self.result["timings_s"]["build_hf"] = round(time.perf_counter() - t0, 2)
        except Exception as exc:  # noqa: BLE001
            for c in a.contexts:
                self.fail("hf", c, exc, stage="build")
            return
        impl = {"attn_implementation": hf.config._attn_implementation,
                "experts_implementation": getattr(hf.config, "_experts_implementation", None)}
        self.log(f"hf model shares tilec's weights ({impl})")
        for context in a.contexts:
            if not self.time_left_for("hf"):
                self.skip("hf", context, f"time budget ({a.budget_s:.0f} s) nearly spent")
                continue
            self.begin("hf", context)
            try:
                cache = DynamicCache(config=hf.config)

                def prefill(ids, cache=cache):
                    return hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

                def step(tok, cache=cache):
                    return hf(input_ids=tok, past_key_values=cache, use_cache=True).logits

                with torch.inference_mode():
                    out = decode(prefill, step, self.prompt(context), a.warmup, a.hf_steps, self.device)
                del cache
                self.finish("hf", context, out, self.base,
                            method="transformers MiMoV2FlashForCausalLM forward per step with a DynamicCache "
                                   "(generate's per-step work minus its logits processors)", **impl)
            except Exception as exc:  # noqa: BLE001
                self.fail("hf", context, exc, **impl)
        del hf
        free_memory(self.device)

    def run_compile(self, entry: str) -> None:
        inline = entry == "compile-inline"
        mode = "reduce-overhead"
        decoder = None
        failed: list[dict] = []
        for context in self.args.contexts:
            while True:
                if not self.time_left_for(entry):
                    self.skip(entry, context, f"time budget ({self.args.budget_s:.0f} s) nearly spent", mode=mode)
                    break
                self.begin(entry, context)
                try:
                    if decoder is None:
                        torch._dynamo.reset()
                        decoder = CompiledDecoder(self.model, mode, inline)
                    seq = self.cache_positions(context)
                    before = inductor_counts()
                    out = decoder.run(self.prompt(context), seq, self.args.warmup, self.args.steps, self.device)
                    counts = {k: v - before[k] for k, v in inductor_counts().items()}
                    graphs = (mode == "reduce-overhead" and self.device.type == "cuda"
                              and counts["cudagraph_skips"] == 0)
                    self.finish(entry, context, out, self.base, mode=mode, cuda_graphs=graphs, counters=counts,
                                first_call_s=round(decoder.first_call_s[-1], 2), failed_modes=failed,
                                method=("reference functions inlined (inductor fuses them)" if inline else
                                        "tilec custom ops opaque to inductor") +
                                f"; torch.compile(mode={mode!r}, fullgraph=True, dynamic=False) of "
                                "decode_one(token, start_pos, *static caches); prefill eager")
                    break
                except Exception as exc:  # noqa: BLE001
                    self.fail(entry, context, exc, mode=mode)
                    decoder = None
                    torch._dynamo.reset()
                    if mode != "reduce-overhead":
                        break
                    failed.append({"mode": mode, "context": context, "error": f"{type(exc).__name__}: "
                                   f"{str(exc)[:500]}"})
                    mode = "default"
                    self.note(f"{entry}: mode='reduce-overhead' failed ({type(exc).__name__}); retrying with "
                              "mode='default' (no CUDA graphs)")
        del decoder
        torch._dynamo.reset()
        free_memory(self.device)

    def run(self) -> None:
        self.setup()
        try:
            for entry in RUN_ORDER:
                if entry not in self.args.entries:
                    continue
                self.log(f"--- {entry}")
                if entry == "hf":
                    self.run_hf()
                elif entry.startswith("compile"):
                    self.run_compile(entry)
                else:
                    self.run_session_entry(entry)
                self.chart(quiet=True)
            self.result["status"] = "complete"
        except HardLimit as exc:
            if self.current:
                self.record({"entry": self.current[0], "context": self.current[1], "status": "stopped",
                             "reason": str(exc)})
            self.result["status"] = f"stopped: {exc}"
            self.note(f"stopped: {exc}; the entries not recorded did not run")
        signal.alarm(0)
        self.save()
        note = self.chart(quiet=False)
        if note:
            self.note(note)
            self.save()
        print(self.table(), flush=True)

    # -- output
    def ok_runs(self) -> list[dict]:
        return [r for r in self.result["runs"] if r["status"] == "ok"]

    def label(self, run: dict) -> str:
        mode = run.get("mode")
        if mode == "reduce-overhead" and run.get("cuda_graphs") is False:
            return f"{run['entry']}[no graphs]"  # CPU: reduce-overhead has no CUDA graph to capture
        return f"{run['entry']}[{mode}]" if mode and mode != "reduce-overhead" else run["entry"]

    def chart(self, quiet: bool) -> str | None:
        contexts = self.args.contexts
        order = {e: i for i, e in enumerate(ENTRIES + OPTIONAL_ENTRIES)}
        series: dict[str, list] = {}
        for run in sorted(self.ok_runs(), key=lambda r: order.get(r["entry"], 99)):
            values = series.setdefault(self.label(run), [None] * len(contexts))
            values[contexts.index(run["context"])] = run["ms_per_token"]["median"]
        group_lines = [(i, self.floors[c][p], f"HBM floor ({p}, measured copy BW)", "--" if p == "mxfp4" else "-")
                       for i, c in enumerate(contexts) for p in (self.base, "mxfp4") if p in self.floors.get(c, {})]
        env = self.result["environment"]
        lines = [(GOAL_MS, f"goal {GOAL_MS} ms/token", ":")] if self.device.type == "cuda" else []
        note = common.grouped_bar_chart(
            self.png_path, [f"context {c}" for c in contexts], series, group_lines=group_lines, lines=lines,
            title=f"{self.args.preset} batch-1 decode, {self.result['config'].get('dtype')}: median ms/token\n"
                  f"{env.get('device')}, torch {env.get('torch')}, {env.get('date', '')[:10]}",
            ylabel="ms / token (log scale)")
        if note is None and not quiet:
            self.log(f"wrote {self.png_path}")
        return note

    def table(self) -> str:
        bw = self.result["bandwidth"]
        head = [f"\n== bench_decode: {self.args.preset} on {self.result['environment'].get('device')} "
                f"(torch {torch.__version__}), {self.result['elapsed_s']} s ==",
                f"bandwidth: copy {bw['copy']['bytes_per_s'] / 1e12:.3f} TB/s, read "
                f"{bw['read']['bytes_per_s'] / 1e12:.3f} TB/s over {bw['nbytes'] / 2**30:.2f} GiB"]
        for c, info in self.result.get("contexts", {}).items():
            parts = [f"{p} {b['total'] / 1e9:.4f} GB -> floor {info['floor_ms'][p]:.4f} ms"
                     for p, b in info["bytes"].items()]
            head.append(f"context {c}: " + "; ".join(parts))
        order = {e: i for i, e in enumerate(ENTRIES + OPTIONAL_ENTRIES)}
        runs = sorted(self.result["runs"], key=lambda r: (order.get(r["entry"], 99), r["context"]))
        rows = []
        for r in runs:
            if r["status"] == "ok":
                ms = r["ms_per_token"]
                agree = r.get("agreement", {})
                agree_text = "ref" if r["entry"] == "reference" else (
                    f"{agree['matching_prefix']}/{agree['compared']}" if agree else "-")
                err = r.get("logits_rel_err", {}).get("prefill")
                rows.append([self.label(r), r["context"], "ok", ms["median"], ms["p10"], ms["p90"],
                             r["floor_ms"], r["fraction_of_floor"], agree_text,
                             f"{err:.1e}" if err is not None else "-"])
            else:
                why = r.get("reason") or r.get("error") or ""
                rows.append([self.label(r), r["context"], r["status"], None, None, None, None, None, "-",
                             why.replace("\n", " ")[:70]])
        table = common.format_table(["entry", "ctx", "status", "median_ms", "p10_ms", "p90_ms", "floor_ms",
                                     "frac_floor", f"agree{AGREE_TOKENS}", "logits_relerr | note"], rows)
        tail = [f"JSON: {self.json_path}", f"PNG: {self.png_path if self.png_path.exists() else '(not written)'}"]
        return "\n".join(head + [table] + tail)


def inductor_counts() -> dict[str, int]:
    """Counters that say what torch.compile did: CUDA graphs skipped, graphs compiled (recompiles included)."""
    from torch._dynamo.utils import counters

    return {"cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "graphs_compiled": counters["stats"]["unique_graphs"]}


def precision_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def has_mxfp4_option() -> bool:
    return "mxfp4" in {f.name for f in dataclasses.fields(tilec.Options)}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class HardLimit(BaseException):
    """Raised by SIGALRM at --hard-limit-s: not an Exception, so no entry's error handling swallows it."""


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)

    def stop(signum, frame):
        raise HardLimit(f"hard limit of {args.hard_limit_s:.0f} s reached")

    if args.hard_limit_s > 0:
        signal.signal(signal.SIGALRM, stop)
        signal.alarm(max(1, int(args.hard_limit_s)))
    try:
        bench.run()
    except BaseException as exc:
        bench.result["status"] = f"aborted: {type(exc).__name__}: {exc}"
        bench.save()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
