"""``tilec generate``: decode from a model file or checkpoint directory, optionally with a DFlash draft, streaming
the tokens (ids, or text when the checkpoint ships a ``tokenizer.json``) and then the generation stats."""

from __future__ import annotations

import sys
from pathlib import Path

from tilec.errors import TilecError, UnsupportedError


def add_parser(sub) -> None:
    from tilec.options import TARGETS

    g = sub.add_parser("generate", help="generate tokens from FILE.py or a checkpoint directory, optionally with a "
                                        "DFlash draft")
    g.add_argument("file", help="a Python file defining build_model() or a module-level `model`, or an HF checkpoint "
                                "directory (config.json, safetensors, optionally tokenizer.json)")
    g.add_argument("--preset", help="passed to build_model(preset), e.g. tiny, mini")
    g.add_argument("--draft", help="a Python file defining build_draft(target) or a module-level `draft`, or a DFlash "
                                   "draft checkpoint directory (tilec.models.dflash.save_draft)")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint directory's tokenizer.json)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eos-token-id", type=int, help="stop after this token")
    g.add_argument("--target", default="reference", choices=TARGETS)
    g.add_argument("--max-seq-len", type=int, help="KV cache length (default: prompt + new tokens)")
    from tilec.cli import add_tensor_parallel

    add_tensor_parallel(g, "a checkpoint directory is read as shards")
    g.set_defaults(func=run)


def run(args) -> int:
    from tilec.cli import on_ranks

    return on_ranks(_generate, args)


def _generate(tp, args) -> int:
    """Generate in this process: all of it, or (``tp``) one rank of a tensor-parallel model; rank 0 prints."""
    import tilec
    from tilec.options import Options

    sharded = tp is not None and tp.world > 1
    # A checkpoint directory goes to compile() as it is when sharded, so each rank reads only its slices.
    model, tokenizer = _load_target(args.file, args.preset, keep_path=sharded)
    prompt = _prompt_ids(args, tokenizer)
    draft = _load_draft(args.draft, model) if args.draft and not isinstance(model, str) else None
    block = getattr(getattr(draft, "config", None), "block_size", 8)
    options = Options.from_env(max_seq_len=args.max_seq_len or len(prompt) + args.max_new_tokens,
                               spec_rows=max(8, block), tensor_parallel=tp.world if sharded else 1)
    cm = tilec.compile(model, target=args.target, options=options)
    if args.draft and draft is None:  # a sharded checkpoint: the draft shares the shard's whole embedding and head
        draft = _load_draft(args.draft, cm.source)
        block = draft.config.block_size
        if block > options.spec_rows:
            cm = tilec.compile(cm.source, target=args.target, options=options.replace(spec_rows=block))
    printer = _TokenPrinter(tokenizer) if not sharded or tp.rank == 0 else None
    _, stats = cm.generate([prompt], args.max_new_tokens, draft=draft, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed, eos_token_id=args.eos_token_id,
                           max_seq_len=args.max_seq_len, return_stats=True, on_tokens=printer)
    if printer is None:
        return 0
    printer.finish()
    hist = ", ".join(f"{n}: {c}" for n, c in sorted(stats.acceptance_histogram.items())) or "-"
    how = f"DFlash draft, block {block}" if draft is not None else "plain decoding"
    print(f"{stats.new_tokens} new tokens in {stats.seconds:.3f} s ({stats.tokens_per_s:.1f} tokens/s), {how}")
    print(f"rounds {stats.rounds}; mean acceptance {stats.mean_acceptance:.2f}; acceptance histogram "
          f"(tokens per round: rounds) {{{hist}}}" + (f"; {tp.world} GPUs" if sharded else ""))
    return 0


def _load_target(path: str, preset: str | None, keep_path: bool = False):
    """The model (``keep_path``: a checkpoint directory's path, unread) and, for a checkpoint directory with
    tokenizer.json, its tokenizer."""
    from tilec.cli import load_model_file

    if not Path(path).is_dir():
        return load_model_file(path, preset), None
    if preset is not None:
        raise TilecError(f"{path} is a checkpoint directory; --preset is for model files")
    from tilec.models import from_hf

    tokenizer_file = Path(path) / "tokenizer.json"
    tokenizer = _read_tokenizer(tokenizer_file) if tokenizer_file.is_file() else None
    return (str(path) if keep_path else from_hf(path)), tokenizer


def _read_tokenizer(file: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TilecError(f"reading {file} needs the `tokenizers` library: pip install tokenizers (or pass "
                         f"--prompt-ids)") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 - the library's own parse errors; say which file
        raise TilecError(f"{file} is not a tokenizer the `tokenizers` library can read: {exc}") from None


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt is not None:
        if tokenizer is None:
            where = "it is not a checkpoint directory" if not Path(args.file).is_dir() else "it has no tokenizer.json"
            raise TilecError(f"--prompt needs a tokenizer, and {args.file} offers none ({where}); pass --prompt-ids, "
                             f"or a checkpoint directory with tokenizer.json")
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise TilecError(f"the tokenizer turned prompt {args.prompt!r} into no tokens")
        return ids
    try:
        ids = [int(x) for x in args.prompt_ids.replace(" ", "").split(",") if x]
    except ValueError:
        raise TilecError(f"--prompt-ids takes comma-separated integers, got {args.prompt_ids!r}") from None
    if not ids:
        raise TilecError("--prompt-ids is empty; give at least one token id")
    return ids


def _load_draft(path: str, target):
    """A DFlash draft for ``target``: a checkpoint directory, or a file's build_draft(target) / module-level draft."""
    from tilec.cli import _import_file

    if Path(path).is_dir():
        from tilec.models.dflash import load_draft

        return load_draft(path, target)
    file = Path(path)
    if not file.is_file() or file.suffix != ".py":
        raise TilecError(f"--draft {path}: not a Python file or a draft checkpoint directory")
    module = _import_file(file.resolve())
    build = getattr(module, "build_draft", None)
    if callable(build):
        return build(target)
    if hasattr(module, "draft"):
        return module.draft
    raise UnsupportedError(f"{file} defines neither build_draft(target) nor a module-level `draft`")


class _TokenPrinter:
    """Streams tokens to stdout as they come: text when there is a tokenizer (decoding everything so far and
    printing what is new, so multi-token characters come out whole), else the ids."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, tokens) -> None:
        new = tokens[0].tolist()
        self.ids += new
        if self.tokenizer is None:
            sys.stdout.write("".join(f"{t} " for t in new))
        else:
            text = self.tokenizer.decode(self.ids)
            sys.stdout.write(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)
            self.shown = text
        sys.stdout.flush()

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
