"""GPU check of the greedy prefill's lm_head tiles: mini, a 4096-token prompt, greedy ids against the logits' argmax."""
import sys, time, torch
sys.path.insert(0, "benchmarks")
from bench_decode import build_model
import tilec

model = build_model("mini", torch.device("cuda"), 0)
opts = tilec.Options(max_seq_len=4200)
cm_l = tilec.compile(model, target="triton", options=opts)
cm_g = tilec.compile(model, target="triton", options=opts.replace(greedy=True))
gen = torch.Generator().manual_seed(1)
for T in (40, 1024, 4096):
    ids = torch.randint(0, 32768, (1, T), generator=gen).cuda()
    logits = cm_l.new_session(1, 4200).step(ids)
    got = cm_g.new_session(1, 4200).step(ids)
    want = logits.argmax(-1)
    top2 = logits.float().topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05
    same = (got == want)
    print(f"T {T}: ids equal {int(same.sum())}/{T}; where the top two logits are 0.05 apart: "
          f"{int(same[clear].sum())}/{int(clear.sum())}", flush=True)
    times = []
    for _ in range(5):
        torch.cuda.synchronize(); t = time.perf_counter()
        cm_g.new_session(1, 4200).step(ids); torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    times_l = []
    for _ in range(5):
        torch.cuda.synchronize(); t = time.perf_counter()
        cm_l.new_session(1, 4200).step(ids); torch.cuda.synchronize()
        times_l.append((time.perf_counter() - t) * 1e3)
    print(f"T {T}: greedy prefill {sorted(times)[2]:.2f} ms, logits prefill {sorted(times_l)[2]:.2f} ms", flush=True)
