"""Does torch.profiler (CUPTI), once used, slow down later CUDA-graph replays? Times the planner's experts kernel and
the read floor before and after one kernel_gpu_times call."""
import json, sys, os
from pathlib import Path
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch
import bench_mxfp4_experts as b
import common
from tilec.codegen.tuning import device_info
dev = torch.device("cuda"); shape = b.MINI; info = device_info(dev)
gen = torch.Generator(device=dev).manual_seed(0); cg = torch.Generator().manual_seed(0)
layers = b.make_layers("mxfp4", shape, dev, gen); plan = b.planned("mxfp4", layers)
frags = b.fragments_for("mxfp4", layers)
mod = b.launcher(b.kernel_module("mxfp4", shape, info, **plan), frags)
out = {}
def t(tag):
    for rows in (1, 8):
        r = b.measure("x", mod, "mxfp4", layers, shape, rows, "same", dev, cg, 50, True)
        out[f"{tag} experts {rows}"] = r["us"]
    fl = b.measure_read_floor(shape, ((1, "same"),), dev, cg, 50)
    out[f"{tag} floor 1"] = fl[0]["us"]
    print(tag, {k: round(v, 2) for k, v in out.items() if k.startswith(tag)}, flush=True)
t("before1"); t("before2")
r = b.measure("x", mod, "mxfp4", layers, shape, 1, "same", dev, cg, 50, True, per_kernel=True)
print("cupti kernel times", r["kernel_us"])
t("after1"); t("after2")
Path(os.environ["OUT"], "cupti_probe.json").write_text(json.dumps(out, indent=1))
