"""The first generate() after compiling: what it costs cold, and after `CompiledModel.warmup`, beside a warm call.

    python3 benchmarks/bench_first_call.py --out DIR [--preset mini] [--prompt 32] [--new-tokens 16] [--mxfp4]

In one process: compile the preset for the triton target, then time generate(prompt, new tokens) three times: the
first call on a model that has run nothing (Triton compiles its kernels, CUDA graphs are captured), a second call
(warm), and then, on a second compile of the same model, ``warmup([prompt])`` followed by its first generate(). The
kernels Triton compiled for the first model are in its on-disk cache by then, so the second model's warmup is what a
user pays once the cache is warm (a fresh machine pays the compile inside warmup instead). HF eager's first and second
generate over the same weights are the peer. Wall times, synchronised. Writes DIR/bench_first_call.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import common  # noqa: E402
import tilec  # noqa: E402
from bench_decode import build_model, hf_sharing_weights  # noqa: E402


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--mxfp4", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    model = build_model(args.preset, device, args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt),
                           generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    options = tilec.Options(mxfp4=args.mxfp4)
    result = {"environment": common.environment(device), "args": {k: str(v) for k, v in vars(args).items()}}

    compile_ms, cm = timed(lambda: tilec.compile(model, target="triton", options=options))
    cold_ms, cold = timed(lambda: cm.generate(prompt, args.new_tokens))
    cold_captures = cm.graph_captures
    warm_ms, _ = timed(lambda: cm.generate(prompt, args.new_tokens))
    result["cold"] = {"compile_ms": compile_ms, "first_generate_ms": cold_ms, "captures": cold_captures,
                      "second_generate_ms": warm_ms, "captures_after_second": cm.graph_captures}
    del cm
    compile2_ms, cm2 = timed(lambda: tilec.compile(model, target="triton", options=options))
    warmup_ms, captured = timed(lambda: cm2.warmup([args.prompt]))
    first_ms, tokens = timed(lambda: cm2.generate(prompt, args.new_tokens))
    result["warmed_up"] = {"compile_ms": compile2_ms, "warmup_ms": warmup_ms, "warmup_captures": captured,
                           "first_generate_ms": first_ms, "captures_in_first_generate": cm2.graph_captures - captured,
                           "same_tokens": bool(torch.equal(tokens, cold))}
    del cm2
    hf = hf_sharing_weights(model, None)
    kwargs = dict(max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens)
    with torch.inference_mode():
        hf_first, _ = timed(lambda: hf.generate(prompt, **kwargs))
        hf_second, _ = timed(lambda: hf.generate(prompt, **kwargs))
    result["hf_eager"] = {"first_generate_ms": hf_first, "second_generate_ms": hf_second}
    common.write_json(args.out / "bench_first_call.json", result)
    c, w, h = result["cold"], result["warmed_up"], result["hf_eager"]
    print(f"tilec cold: compile {c['compile_ms']:.0f} ms, first generate {c['first_generate_ms']:.0f} ms "
          f"({c['captures']} graphs captured), second {c['second_generate_ms']:.1f} ms")
    print(f"tilec warmed up: compile {w['compile_ms']:.0f} ms, warmup {w['warmup_ms']:.0f} ms ({w['warmup_captures']} "
          f"graphs), first generate {w['first_generate_ms']:.1f} ms ({w['captures_in_first_generate']} captured), "
          f"same tokens {w['same_tokens']}")
    print(f"HF eager: first generate {h['first_generate_ms']:.0f} ms, second {h['second_generate_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
