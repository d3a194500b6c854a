"""``tilec.compile`` and the `CompiledModel` it returns."""

from __future__ import annotations

import collections
import datetime
import json
import time
import weakref
from pathlib import Path
from typing import Sequence

import torch
import torch.fx as fx

from tilec import cost, pipeline, report as report_mod
from tilec.artifact import FORMAT, MANIFEST, write_atomic
from tilec.capture import as_tilec_model, capture, device_of
from tilec.errors import ShapeError, TargetError, UnsupportedError
from tilec.graph import attr, format_graph, info
from tilec.options import TARGETS, Options
from tilec.passmanager import PassContext, ProgressFn, StageRecord, run_pipeline
from tilec.runtime.kv_cache import layout_from_graph
from tilec.codegen.megakernel import lower as lower_megakernel
from tilec.codegen.triton import lower as lower_triton
from tilec.runtime.cuda_graph import GraphedStep
from tilec.runtime.generation import GenerationStats, generate_plain
from tilec.runtime.session import DecodeSession, RecomputeSession

BUILT_TARGETS = ("reference", "triton", "cuda")


def resolve_target(target: str, device: torch.device | None = None) -> str:
    """The target that will run. ``auto`` picks the fastest built one for the model's device (the Triton kernels on
    a GPU, the reference ops on a CPU, where Triton would only run in its slow interpreter). Unbuilt targets are an
    error, never a fallback."""
    if target not in TARGETS:
        raise TargetError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "auto":
        return "triton" if device is not None and device.type == "cuda" else "reference"
    if target not in BUILT_TARGETS:
        raise TargetError(f"target {target!r} is not built yet; use target='reference' (built: "
                          f"{', '.join(BUILT_TARGETS)})")
    return target


def compile(model, *, target: str = "reference", options: Options | None = None,  # noqa: A001 - the API's name
            progress: ProgressFn | None = None) -> "CompiledModel":
    """Compile a MiMo-family model: tilec's own module, a transformers ``MiMoV2FlashForCausalLM``, or a checkpoint
    directory. Returns a `CompiledModel`; with ``options.dump_dir`` (or ``TILEC_DUMP``) every stage is written there.
    """
    options = options or Options.from_env()
    resolve_target(target)  # refuse unknown and unbuilt targets before any work
    start = time.perf_counter()
    if progress:
        progress("capture", 0, 1)
    model = _shard(model, options) if options.tensor_parallel > 1 else as_tilec_model(model)
    resolved = resolve_target(target, device_of(model))
    gm = capture(model, batch=options.max_batch, rows=1, max_seq_len=options.max_seq_len,
                 spec_rows=options.spec_rows, hidden_layers=options.hidden_layers)
    first = StageRecord("capture", gm, gm.meta["tilec_capture_stats"], time.perf_counter() - start,
                        "trace the model, rewrite torch glue into tilec ops, propagate shapes")
    records = run_pipeline(gm, pipeline.stages(options, resolved), PassContext(options, resolved), first=first,
                           progress=progress)
    program = None
    if resolved in ("triton", "cuda"):
        if progress:
            progress("codegen", len(records), len(records))
        where = records[-1].graph.meta.get("device", torch.device("cpu"))
        program = (lower_triton(records[-1].graph, where, records[-1].name) if resolved == "triton" else
                   lower_megakernel(records[-1].graph, where, records[-1].name,
                                    max_rows=options.spec_rows * options.max_batch))
    rep = report_mod.build(records, target=resolved, options=options, seconds=time.perf_counter() - start)
    if program is not None:
        rep["kernels"] = [{"file": k.filename, "template": k.plan.template, "nodes": len(k.nodes),
                           **({"cuda": k.cuda_filename} if k.cuda_source is not None else {})}
                          for k in program.kernels]
        rep["launch"] = {"pdl": program.dev.pdl, "interpret": program.dev.interpret}
        if resolved == "cuda":
            rep["megakernel"] = program.describe()
        if program.derived:  # re-laid copies (the same bytes as their source) computed when the program loads
            rep["derived_weights"] = {name: {"from": target, "layout": layout,
                                             "bytes": cost.nbytes(attr(records[-1].graph, target))}
                                      for name, (target, layout) in program.derived.items()}
    compiled = CompiledModel(records, rep, resolved, options, source=model, program=program)
    if options.dump_dir is not None:
        compiled.save(options.dump_dir)
    return compiled


def _shard(model, options: Options):
    """This process's shard of ``model`` for ``options.tensor_parallel`` GPUs, on this process's device: a checkpoint
    directory is read a tensor at a time, keeping only the shard; a model already sharded that way is taken as it is.
    """
    from tilec.models.mimo import MiMoForCausalLM
    from tilec.models.parallel import check, shard_model
    from tilec.runtime import distributed

    tp = distributed.TensorParallel.current(options.tensor_parallel)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from tilec.models import from_hf

        model = from_hf(model, tp=tp, device=distributed.device(torch.device("cpu")))
    model = as_tilec_model(model)
    if not isinstance(model, MiMoForCausalLM):
        raise UnsupportedError(f"tensor_parallel={options.tensor_parallel} splits tilec's MiMo (or an HF MiMo, or a "
                               f"checkpoint directory); got {type(model).__name__}")
    check(model.config, tp, options.mxfp4)  # before any slicing: the MXFP4 pass needs slices of whole blocks
    if model.tp is None or model.tp.world == 1:
        return shard_model(model, tp, distributed.device(device_of(model)))
    if model.tp != tp:
        raise UnsupportedError(f"this model is rank {model.tp.rank} of {model.tp.world}'s shard, but this process is "
                               f"rank {tp.rank} of {tp.world}")
    return model


class CompiledModel:
    """A compiled model: run it (``cm(ids)``, ``cm.generate``), read its stages and report, save it."""

    def __init__(self, records: list[StageRecord], report: dict, target: str, options: Options,
                 source: torch.nn.Module | None = None, program=None):
        self.records = records
        self.report = report
        self.target = target
        self.options = options
        self.source = source  # the tilec model compiled (weights shared), to recompile with other outputs
        self._variants: dict[tuple, CompiledModel] = {}
        self.graph: fx.GraphModule = records[-1].graph
        self.info = info(self.graph)
        self.device: torch.device = self.graph.meta.get("device", torch.device("cpu"))
        self.saved_to: Path | None = None
        # What runs a step: the graph itself (reference), or its generated kernels, replayed as CUDA graphs.
        self.program = program
        # A step's graph binds the caches (the first inputs after the tokens and positions; any others are copied in).
        caches = (len(layout_from_graph(self.graph, 1, options.max_seq_len, options.spec_rows))
                  if self.info.kind == "decoder" else None)
        self._executor = self.graph if program is None else (
            GraphedStep(program, max_rows=options.spec_rows, bound=caches, prefill_rows=options.prefill_graph_rows,
                        prefill_step=1 << (options.spec_rows.bit_length() - 1)) if self.device.type == "cuda"
            else program)
        # The caches of finished sessions, by layout (the SPARE_CACHES most recent), for the next session of that
        # layout: its steps then find the CUDA graphs captured on those very tensors.
        self._spare_caches: collections.OrderedDict[tuple, list[torch.Tensor]] = collections.OrderedDict()

    # ------------------------------------------------------------------------------------------- inspection
    @property
    def stages(self) -> dict[str, fx.GraphModule]:
        """Every stage's graph by name, in pipeline order (each one runnable)."""
        return {r.name: r.graph for r in self.records}

    def listing(self, stage: str | None = None) -> str:
        """A readable listing of one stage's graph (the last by default)."""
        record = self.records[-1] if stage is None else self._record(stage)
        return format_graph(record.graph, f"stage: {record.name}")

    def report_markdown(self) -> str:
        return report_mod.render_markdown(self.report)

    def _record(self, name: str) -> StageRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no stage {name!r}; stages are {', '.join(r.name for r in self.records)}")

    # ----------------------------------------------------------------------------------------------- running
    @property
    def vocab_size(self) -> int | None:
        cfg = self.info.config
        return getattr(cfg, "vocab_size", None)

    def _ids(self, input_ids) -> torch.Tensor:
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype not in (torch.int32, torch.int64):
            raise ShapeError(f"input ids must be integers of shape [batch, tokens] with at least one token, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        vocab = self.vocab_size
        if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ShapeError(f"token ids must be in 0..{vocab - 1}; got min {int(ids.min())}, max {int(ids.max())}")
        return ids.to(torch.int64).to(self.device)

    SPARE_CACHES = 2

    def new_session(self, batch: int = 1, max_seq_len: int | None = None) -> DecodeSession | RecomputeSession:
        """A fresh (zeroed) KV cache for ``batch`` sequences of up to ``max_seq_len`` tokens, ready to step.

        Once a session is gone (no references left), the model keeps its cache tensors, for up to SPARE_CACHES
        layouts, and gives them, zeroed, to the next session of the same layout. On a GPU each step shape's CUDA graph
        is captured on the cache tensors it was given, so a new session on new tensors would capture its graphs again
        (tens of ms each); on the same ones it replays them."""
        max_seq_len = max_seq_len or self.options.max_seq_len
        if self.info.kind != "decoder":
            return RecomputeSession(self._executor, batch, max_seq_len)
        specs = layout_from_graph(self.graph, batch, max_seq_len, self.options.spec_rows)
        key = (max_seq_len, tuple((tuple(s.shape), s.dtype) for s in specs))
        session = DecodeSession(self._executor, specs, batch=batch, max_seq_len=max_seq_len, device=self.device,
                                cache_tensors=self._spare_caches.pop(key, None))
        weakref.finalize(session, _keep_spare, self._spare_caches, key, session.cache.tensors, self.SPARE_CACHES)
        return session

    @property
    def graph_captures(self) -> int:
        """CUDA graphs its steps have captured so far, its variants' included (0 off the GPU): each capture is a
        step of a new shape, or on new cache tensors, and costs tens of ms."""
        return sum(getattr(m._executor, "captures", 0) for m in (self, *self._variants.values()))

    def warmup(self, prompt_lengths: Sequence[int] = (1,), *, batch: int = 1, max_seq_len: int | None = None,
               verify: bool = True) -> int:
        """Do, before the first generate(), what a first prompt of each of these lengths would otherwise pay for:
        compile the kernels its prefill and decode steps take and capture the CUDA graphs they replay (a short
        prompt's padded shape, from its second sighting; a decode step; with ``verify``, a verify step of spec_rows
        rows). Runs throwaway sessions of the cache layout generate() will use (``max_seq_len``: as generate's), whose
        caches the next sessions then reuse, with the graphs captured on them. Returns the graphs captured (0 where
        the model replays no CUDA graphs: the reference target, the CPU)."""
        if self.info.kind != "decoder":
            return 0
        before = self.graph_captures
        vocab = self.vocab_size or 1
        for length in sorted(set(prompt_lengths)):
            if length < 1:
                raise ShapeError(f"warmup prompt lengths must be at least 1, got {length}")
            needed = length + 1 + (self.options.spec_rows if verify else 0)
            for _ in range(2):  # a padded prompt's graph is captured the second time its shape is seen
                session = self.new_session(batch, max_seq_len or self.generation_length(needed))
                ids = torch.arange(length * batch, device=self.device).remainder(vocab).view(batch, length)
                session.step(ids)
                session.step(ids[:, -1:])
                if verify:
                    session.step(ids[:, -1:].expand(batch, self.options.spec_rows).contiguous())
                del session  # its caches go back to the model, for the next session of that layout
        return self.graph_captures - before

    def generation_length(self, needed: int) -> int:
        """The cache length generate() gives a session that needs ``needed`` positions: on a GPU at least
        Options.max_seq_len, so that calls of any prompt length share one cache layout, and with it (new_session's
        spare caches) the same cache tensors and CUDA graphs; elsewhere just what it needs."""
        return max(needed, self.options.max_seq_len) if self.device.type == "cuda" else needed

    def with_hidden_layers(self, layers: Sequence[int]) -> "CompiledModel":
        """This model compiled again to also return the hidden states after ``layers`` (cached; weights shared)."""
        layers = tuple(layers)
        if layers == self.options.hidden_layers:
            return self
        if self.source is None:
            raise TargetError("this CompiledModel keeps no source model, so it cannot be recompiled with hidden "
                              "outputs; compile with Options(hidden_layers=...)")
        key = ("hidden", layers)
        if key not in self._variants:
            self._variants[key] = compile(self.source, target=self.target,
                                          options=self.options.replace(hidden_layers=layers, dump_dir=None))
        return self._variants[key]

    def __call__(self, input_ids) -> torch.Tensor:
        """Logits [B, T, V] of a full forward over ``input_ids`` (no state kept between calls)."""
        ids = self._ids(input_ids)
        return self.new_session(ids.shape[0], ids.shape[1]).step(ids)

    def generate(self, input_ids, max_new_tokens: int, *, draft=None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | Sequence[int] | None = None,
                 max_seq_len: int | None = None, return_stats: bool = False, on_tokens=None):
        """Decode ``max_new_tokens`` after ``input_ids``; returns ``[B, T + N]`` token ids (prompt included).

        Greedy when ``temperature`` is 0, else sampling from the top-p nucleus of softmax(logits / temperature),
        seeded by ``seed``. With a DFlash ``draft`` (see tilec.models.dflash) each round drafts a block and verifies
        it in one target step; the output is exactly what the target alone gives (greedy) or has exactly its
        distribution (sampling). With ``eos_token_id``, a sequence that emitted it keeps emitting it and decoding
        stops when all have. ``return_stats=True`` also returns a `GenerationStats`. ``on_tokens`` (for streaming) is
        called with each step's or round's new tokens, a [B, n] tensor.
        """
        ids = self._ids(input_ids)
        if max_new_tokens < 0:
            raise ShapeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ShapeError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                           dtype=torch.int64, device=ids.device)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=ids.device)
            generator.manual_seed(0 if seed is None else seed)
        if max_new_tokens == 0:
            tokens, stats = ids, GenerationStats()
        elif draft is not None:
            from tilec.runtime.dflash import dflash_generate

            tokens, stats = dflash_generate(self, draft, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                                            generator=generator, eos=eos, max_seq_len=max_seq_len,
                                            on_tokens=on_tokens)
        else:
            session = self.new_session(ids.shape[0],
                                       max_seq_len or self.generation_length(ids.shape[1] + max_new_tokens))
            tokens, stats = generate_plain(session, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                                           generator=generator, eos=eos, on_tokens=on_tokens)
        return (tokens, stats) if return_stats else tokens

    # --------------------------------------------------------------------------------------------------- saving
    def artifact_files(self) -> dict[str, str]:
        """The files of this model's artifact (relative path -> text)."""
        files: dict[str, str] = {}
        for i, r in enumerate(self.records):
            stem = f"stages/{i:02d}_{r.name}"
            files[f"{stem}.txt"] = format_graph(r.graph, f"stage {i}: {r.name}")
            files[f"{stem}.py"] = r.graph.code
        if self.program is not None:
            files.update(self.program.sources)
        files["report.md"] = self.report_markdown()
        files["report.json"] = json.dumps(self.report, indent=2, default=str)
        manifest = {
            "format": FORMAT, "tilec_version": _version(), "target": self.target, "model": self.info.description,
            "stages": [r.name for r in self.records],
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": sorted(files),
        }
        files[MANIFEST] = json.dumps(manifest, indent=2)
        return files

    def save(self, directory: str | Path) -> Path:
        """Write the artifact (stages, report, manifest) to ``directory``, atomically."""
        self.saved_to = write_atomic(directory, self.artifact_files())
        return self.saved_to


def _keep_spare(spares: collections.OrderedDict, key: tuple, tensors: list[torch.Tensor], most: int) -> None:
    """A finished session's cache tensors become the spare of their layout (the newest first to stay)."""
    spares[key] = tensors
    spares.move_to_end(key)
    while len(spares) > most:
        spares.popitem(last=False)


def _version() -> str:
    from tilec import __version__

    return __version__
