import os, torch, tilec
from tilec.models import build_model
os.environ.pop("TRITON_INTERPRET", None)
model = build_model("mini", device="cuda")
exact = build_model("mini", device="meta", dtype=torch.float32)
exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, assign=True)
truth, ref = tilec.compile(exact), tilec.compile(model)
tri, mk = tilec.compile(model, target="triton"), tilec.compile(model, target="cuda")
for n in (64, 256):
    ids = torch.randint(0, 32768, (1, n + 4), device="cuda", generator=torch.Generator("cuda").manual_seed(n))
    sessions = [c.new_session(1, n + 16) for c in (truth, ref, tri, mk)]
    for k, chunk in enumerate((ids[:, :n], ids[:, n:n + 1], ids[:, n + 1:n + 2], ids[:, n + 2:n + 3])):
        e, b, t, m = (s.step(chunk).float() for s in sessions)
        err = lambda x, y: float((x - y).norm() / y.norm())
        print(f"ctx {n} step {k}: from fp32: ref {err(b, e):.3e} triton {err(t, e):.3e} mk {err(m, e):.3e}; "
              f"mk-ref {err(m, b):.3e} triton-ref {err(t, b):.3e}; argmax fp32/ref/tri/mk "
              f"{int(e[0, -1].argmax())}/{int(b[0, -1].argmax())}/{int(t[0, -1].argmax())}/{int(m[0, -1].argmax())}",
              flush=True)
