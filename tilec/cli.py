"""The ``tilec`` command line: ``tilec compile FILE.py``, ``tilec inspect DIR``, ``tilec generate FILE.py``."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import time
from pathlib import Path

from tilec.errors import TilecError, UnsupportedError


def load_model_file(path: str | Path, preset: str | None = None):
    """The model a Python file defines: ``build_model(preset)`` / ``build_model()``, or a module-level ``model``."""
    file = Path(path)
    if not file.is_file() or file.suffix != ".py":
        raise TilecError(f"{path}: not a Python file; pass FILE.py that defines build_model() or a module-level "
                         f"`model`")
    module = _import_file(file.resolve())
    build = getattr(module, "build_model", None)
    # A build_model defined in the file wins; a module-level `model` beats one merely imported into the file.
    if callable(build) and getattr(build, "__module__", None) != module.__name__ and hasattr(module, "model"):
        build = None
    if callable(build):
        if preset is None:
            return build()
        if "preset" not in inspect.signature(build).parameters and not _takes_positional(build):
            raise TilecError(f"{file}: build_model() takes no preset; drop --preset or add a `preset` parameter")
        return build(preset)
    if hasattr(module, "model"):
        if preset is not None:
            raise TilecError(f"{file}: --preset needs build_model(preset); this file only defines `model`")
        return module.model
    raise UnsupportedError(f"{file} defines neither build_model() nor a module-level `model`; add one of them "
                           f"(for example `def build_model(preset='tiny'): ...`)")


def _takes_positional(fn) -> bool:
    params = list(inspect.signature(fn).parameters.values())
    return bool(params) and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD,
                                               params[0].VAR_POSITIONAL)


def _import_file(file: Path):
    # A file inside the installed tilec package (models/mimo.py) is imported under its package name, so its classes
    # are the same objects tilec itself uses.
    import tilec.models

    pkg_dir = Path(tilec.models.__file__).resolve().parent
    if file.parent == pkg_dir:
        return importlib.import_module(f"tilec.models.{file.stem}")
    name = f"tilec_user_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except TilecError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's file failed: say where
        import traceback

        tb = [fr for fr in traceback.extract_tb(exc.__traceback__) if fr.filename == str(file)]
        where = f" (line {tb[-1].lineno}: {tb[-1].line})" if tb else ""
        raise TilecError(f"{file} failed to import{where}: {type(exc).__name__}: {exc}") from exc
    return module


def _cmd_compile(args) -> int:
    if args.mxfp4_scale_rule and not args.mxfp4:
        raise TilecError("--mxfp4-scale-rule needs --mxfp4 (it chooses how the MXFP4 experts are quantised)")
    return on_ranks(_compile, args)


def add_tensor_parallel(parser, what: str) -> None:
    """The ``--tensor-parallel N`` option of a command that `on_ranks` runs."""
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help=f"split the model over N GPUs, one process each; {what}")


def on_ranks(fn, args) -> int:
    """``fn(tp, args)``: here, with ``tp`` None, for ``--tensor-parallel 1``; else in N new processes, each with its
    `TensorParallel` (tilec.runtime.distributed.launch)."""
    if args.tensor_parallel < 1:
        raise TilecError(f"--tensor-parallel must be at least 1, got {args.tensor_parallel}")
    if args.tensor_parallel == 1:
        return fn(None, args)
    from tilec.runtime.distributed import launch

    launch(fn, args.tensor_parallel, args)
    return 0


def _compile(tp, args) -> int:
    """Compile in this process: the whole model, or (``tp``) one rank's shard, written to OUTPUT/rank<r>; rank 0
    prints the summary."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    import tilec
    from tilec.options import Options

    quiet = tp is not None and tp.rank > 0
    console = Console(stderr=True, quiet=quiet)
    output = Path(args.output) / f"rank{tp.rank}" if tp is not None and args.output else args.output
    options = Options.from_env(dump_dir=output, max_seq_len=args.max_seq_len, max_batch=args.batch,
                               verify=False if args.no_verify else None, mxfp4=True if args.mxfp4 else None,
                               mxfp4_scale_rule=args.mxfp4_scale_rule,
                               tensor_parallel=tp.world if tp is not None else None)
    start = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(f"loading {args.file}" + (f" (preset {args.preset})" if args.preset else ""))
        model = load_model_file(args.file, args.preset)
        bar.update(task, description="capturing")

        def progress(stage: str, i: int, n: int) -> None:
            bar.update(task, description=f"stage {stage} ({i}/{n})" if stage != "capture" else "capturing")

        compiled = tilec.compile(model, target=args.target, options=options, progress=progress)
    if not quiet:
        _print_summary(compiled.report, compiled.saved_to, time.perf_counter() - start)
        if tp is not None:
            print(f"each of the {tp.world} ranks holds such a shard" + (f"; artifacts in {args.output}/rank0 .. "
                                                                       f"rank{tp.world - 1}" if args.output else ""))
    return 0


def _print_summary(rep: dict, saved_to, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    out.print(f"[bold]tilec[/bold] compiled {rep['model']} for target [bold]{rep['target']}[/bold] "
              f"in {seconds:.1f} s")
    table = Table("#", "stage", "nodes", "what it did", "ops")
    for i, s in enumerate(rep["stages"]):
        did = _stats_line(s["stats"])
        ops = ", ".join(f"{k.removeprefix('tilec.')} {v}" for k, v in sorted(s["ops"].items()))
        table.add_row(str(i), s["name"], str(s["nodes"]), did, ops)
    out.print(table)
    out.print(f"parameters {rep['parameters']:,}; weights {rep['weight_bytes_total'] / 1e6:,.1f} MB; "
              f"KV cache {rep['kv_cache_bytes'] / 1e6:,.1f} MB")
    for d in rep["decode_step_bytes"]:
        out.print(f"decode step at context {d['context']}: {d['total'] / 1e6:,.2f} MB to read "
                  f"(HBM floor on H100 {d['floor_ms_h100']:.3f} ms)")
    mx = next((s["stats"] for s in rep["stages"] if s["name"] == "mxfp4_experts"), None)
    if mx is not None:
        err = "-" if mx["max_rel_err"] is None else f"{mx['max_rel_err']:.4f}"
        out.print(f"MXFP4 experts ({mx['scale_rule']}): {mx['quantized']} layer(s) quantised, {mx['kept']} kept; "
                  f"expert weights {mx['bytes_before'] / 1e6:,.2f} MB -> {mx['bytes_after'] / 1e6:,.2f} MB; largest "
                  f"relative weight error {err}")
    if saved_to:
        out.print(f"wrote {saved_to}")


def _stats_line(stats: dict) -> str:
    """A stage's stats in one table cell: the non-zero scalars (lists and dicts are details for the report)."""
    return ", ".join(f"{k} {v}" for k, v in stats.items() if v and not isinstance(v, (list, dict))) or "-"


def _cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tilec.artifact import read_manifest

    directory = Path(args.dir)
    manifest = read_manifest(directory)
    out = Console()
    if args.stage:
        names = manifest["stages"]
        if args.stage not in names:
            raise TilecError(f"{directory} has no stage {args.stage!r}; stages: {', '.join(names)}")
        # Plain text, unwrapped: the listing is meant to be read or piped as the stage file is.
        sys.stdout.write((directory / "stages" / f"{names.index(args.stage):02d}_{args.stage}.txt").read_text())
        return 0
    rep = json.loads((directory / "report.json").read_text())
    out.print(f"[bold]{directory}[/bold]: {manifest['model']}, target {manifest['target']}, tilec "
              f"{manifest['tilec_version']}, created {manifest['created']}")
    table = Table("#", "stage", "nodes", "what it did")
    for i, s in enumerate(rep["stages"]):
        table.add_row(str(i), s["name"], str(s["nodes"]), _stats_line(s["stats"]))
    out.print(table)
    out.print(f"parameters {rep['parameters']:,}; weights {rep['weight_bytes_total'] / 1e6:,.1f} MB")
    out.print("files: " + ", ".join(manifest["files"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tilec.options import TARGETS

    parser = argparse.ArgumentParser(prog="tilec", description="Compile MiMo-family MoE models for fast decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model defined in FILE.py")
    c.add_argument("file", help="a Python file defining build_model() or a module-level `model`")
    c.add_argument("--preset", help="passed to build_model(preset), e.g. tiny, mini, v2-flash, v2.5-pro")
    c.add_argument("--target", default="reference", choices=TARGETS)
    c.add_argument("-o", "--output", help="write the artifact (stages, report) to this directory")
    c.add_argument("--max-seq-len", type=int, help="KV cache length to plan for (default 4096)")
    c.add_argument("--batch", type=int, help="batch size to specialise for (default 1)")
    c.add_argument("--no-verify", action="store_true", help="skip the graph checks after each stage")
    c.add_argument("--mxfp4", action="store_true", help="hold the MoE experts' weights in MXFP4 (the rest keeps its "
                                                         "precision)")
    c.add_argument("--mxfp4-scale-rule", choices=("floor", "ceil"), help="MXFP4 scale rule: floor (OCP, default) or "
                                                                          "ceil (never clips)")
    add_tensor_parallel(c, "with -o, each rank's artifact in DIR/rank<r>")
    c.set_defaults(func=_cmd_compile)
    i = sub.add_parser("inspect", help="summarise a compile artifact")
    i.add_argument("dir", help="a directory written by `tilec compile -o`")
    i.add_argument("--stage", help="print this stage's graph")
    i.set_defaults(func=_cmd_inspect)
    from tilec import cli_generate

    cli_generate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TilecError as exc:
        print(f"tilec: error: {exc}", file=sys.stderr)
        return 2
