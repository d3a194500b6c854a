"""How far the triton target's logits are from fp32 truth, beside the bf16 reference's, on `mini` (GPU).

    python3 benchmarks/logits_error.py --out out/err

`mini` in bf16 and the same weights in fp32 are compiled (fp32 and bf16 on the reference target, bf16 on triton).
For prompts of 64, 256 and 1024 tokens, three steps run in each: the prefill, one decode row and an 8-row verify step.
Each step records the relative error (fp64 norms) of the bf16 reference and of triton against fp32, and of triton
against the bf16 reference. Two bf16 computations of one model differ by about as much as each differs from fp32,
so a kernel change is judged by its distance to fp32, not to the other bf16 result.
Writes DIR/logits_error.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from a source checkout
sys.path.insert(1, str(Path(__file__).resolve().parent))

from common import rel_err, write_json  # noqa: E402
import tilec  # noqa: E402
from tilec.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", default="64,256,1024")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    model = build_model("mini", device="cuda")
    exact = build_model("mini", device="meta", dtype=torch.float32)
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, assign=True)
    compiled = [tilec.compile(exact), tilec.compile(model), tilec.compile(model, target="triton")]
    results = {}
    for n in (int(p) for p in args.prompts.split(",")):
        ids = torch.randint(0, 32768, (1, n), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
        sessions = [c.new_session(1, n + 64) for c in compiled]
        rows = []
        for chunk in (ids, ids[:, -1:], ids[:, :8]):
            fp32, bf16, mine = (s.step(chunk).float() for s in sessions)
            rows.append({"rows": chunk.shape[1], "ref_vs_fp32": rel_err(bf16, fp32), "triton_vs_fp32": rel_err(mine, fp32),
                         "triton_vs_ref": rel_err(mine, bf16)})
            print(f"prompt {n:5d} rows {chunk.shape[1]:4d}: bf16 reference {rows[-1]['ref_vs_fp32']:.4f}, "
                  f"triton {rows[-1]['triton_vs_fp32']:.4f} from fp32; triton {rows[-1]['triton_vs_ref']:.4f} "
                  f"from the reference", flush=True)
        results[n] = rows
    write_json(args.out / "logits_error.json",
               {"benchmark": "logits_error", "device": torch.cuda.get_device_name(0), "results": results})


if __name__ == "__main__":
    main()
