"""The GPU-only parts of the benchmark scripts, kept in step on the CPU: benchmarks/read_floor.py's floor kernels compile
for sm_90a without spills, timeline_experts.py reads the experts template's stamps as the template lays them out, and
fence_probe.py's kernels compile; bench_mxfp4_experts.py profiles kernels only after its timings,
ncu_stalls.py adds Nsight Compute's samples up by instruction, bench_dense_tiles.py runs (interpreter, tiny),
bench_decode.py sizes its sessions' caches as asked, and profile_megakernel.py rates a saved profile by
op.
(The split-K experiment that was tested here lost on the GPU, benchmarks/results/h100-2026-11-23e; it was on the
branch experiment/split-k, which this repository no longer has.)
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_read_floor_kernels_compile_without_spills(tmp_path):
    from read_floor import SOURCE, kernel_of, variants

    (tmp_path / "f.cu").write_text(SOURCE)
    proc = subprocess.run(["nvcc", "-cubin", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas",
                           "-v", "-o", str(tmp_path / "f.cubin"), str(tmp_path / "f.cu")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = set(re.findall(r"Compiling entry function '(\w+)'", proc.stderr))
    assert {kernel_of(v) for v in variants(132)} <= compiled  # every kernel the script launches
    assert not re.search(r"[1-9]\d* bytes spill stores", proc.stderr)


def test_timeline_reads_the_template_stamps():
    """timeline_experts.py reads the stamps with the template's layout, and names every point a kernel stamps (the
    last field of a block holds its SM)."""
    import timeline_experts as tl

    src = (Path(__file__).resolve().parents[1] / "templates" / "cuda" / "moe_experts_mxfp4.cu.j2").read_text()
    fields = int(re.search(r"#define TIMELINE_FIELDS (\d+)", src).group(1))
    blocks = int(re.search(r"#define TIMELINE_BLOCKS (\d+)", src).group(1))
    assert (tl.BLOCKS, tl.FIELDS) == (blocks, fields)
    stamps = re.findall(r"STAMP(?:_ANY)?\((\d), (\d+)\);", src)
    assert len(stamps) > 20
    for kernel, point in stamps:
        assert int(point) < min(len(tl.POINTS[tl.KERNELS[int(kernel)]]), fields - 1), (kernel, point)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_fence_probe_kernel_compiles(tmp_path):
    """benchmarks/fence_probe.py's kernel (a release timed with bulk copies in flight) compiles for sm_90a."""
    from fence_probe import RELEASES, SOURCE, defines

    for k in range(len(RELEASES)):  # each release it times
        (tmp_path / "f.cu").write_text(defines(k) + SOURCE)
        proc = subprocess.run(["nvcc", "-cubin", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-o",
                               str(tmp_path / "f.cubin"), str(tmp_path / "f.cu")], capture_output=True, text=True)
        assert proc.returncode == 0, (RELEASES[k], proc.stderr[-3000:])


def test_experts_bench_profiles_kernels_only_after_every_timing(monkeypatch):
    """bench_mxfp4_experts.py asks CUPTI for per-kernel times only once every timing is done (once CUPTI has run in a
    process, every later CUDA-graph call took about 0.9 us longer on the H100): a timed run is kept, not profiled,
    and collect() profiles each kept run once, into the dict its row holds. The run's calls are kept with it: they
    hold the inputs and modules a captured graph reads (replayed later without them, it read freed memory and the
    H100 reported an illegal address)."""
    import bench_mxfp4_experts as bench

    profiled = []

    def fake_times(run, reps):
        profiled.append(run)
        return {"experts_kernel": (1.0, 24.0 * (len(profiled)))}

    monkeypatch.setattr(bench.common, "kernel_gpu_times", fake_times)
    times = bench.KernelTimes()
    rows = [{}, {}]
    calls_a, calls_b = [object()] * 12, [object()] * 6
    times.later("run a", calls_a, rows[0])
    times.later("run b", calls_b, rows[1])
    assert times.pending[0][1] is calls_a  # alive until collected
    assert profiled == [] and rows == [{}, {}]  # nothing profiled while timing goes on
    times.collect()
    assert profiled == ["run a", "run b"]
    assert rows == [{"experts_kernel": 2.0}, {"experts_kernel": 8.0}]  # GPU us per call: per run over the calls
    times.collect()
    assert len(profiled) == 2  # each kept run once


def test_ncu_stalls_adds_the_launches_by_instruction(tmp_path):
    """benchmarks/ncu_stalls.py reads Nsight Compute's source page export (one block a profiled launch) and adds the
    samples of each instruction over the launches, for every stall reason and for slices of instructions."""
    import ncu_stalls

    header = ["Address", "Source", ncu_stalls.ALL, "stall_wait", "stall_long_sb", "stall_wait (Not Issued)"]
    launch = [["0x10", "  LDG.E R2, [R4]", "5", "1", "4", "1"], ["0x20", "  HMMA R0, R2", "3", "3", "0", "3"]]
    again = [["0x10", "  LDG.E R2, [R4]", "2", "0", "2", "0"], ["0x20", "  HMMA R0, R2", "-", "-", "-", "-"]]
    path = tmp_path / "source.csv"
    with path.open("w", newline="") as f:
        w = __import__("csv").writer(f)
        for rows in (launch, again):
            w.writerow(["Kernel Name", "experts_kernel"])
            w.writerow(header)
            w.writerows(rows)
    sass, sums, reasons, offsets = ncu_stalls.read(path)
    assert sass == ["LDG.E R2, [R4]", "HMMA R0, R2"] and reasons == ["stall_wait", "stall_long_sb"]
    assert offsets == [0, 16]
    assert (sums[0][ncu_stalls.ALL], sums[0]["stall_long_sb"], sums[1]["stall_wait"]) == (7, 6, 3)
    assert ncu_stalls.summary(sums, reasons, 0, 1) == (7, [("long_sb", 6), ("wait", 1)])
    assert ncu_stalls.summary(sums, reasons, 0, 2)[0] == 10


def test_ncu_stalls_adds_the_samples_up_by_function(tmp_path):
    """With the cubin that ran, ncu_stalls.py names the function of each sampled instruction (the kernel and the
    __noinline__ functions it calls share one code section) and adds the samples up by function."""
    import ncu_stalls
    from tilec.codegen.cuda_build import nvcc_cubin

    if ncu_stalls.tool("nvdisasm") is None or shutil.which("nvcc") is None:
        pytest.skip("needs nvcc and nvdisasm (on PATH or Triton's copy)")
    source = """
__device__ __noinline__ float twice(const float* p, int i) { return p[i] * 2.f; }
__device__ __noinline__ float plus3(const float* p, int i) { return p[i] + 3.f; }
extern "C" __global__ void k(float* p) { p[threadIdx.x] = twice(p, threadIdx.x + 1) + plus3(p, threadIdx.x + 2); }
"""
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(nvcc_cubin(source, "k", "sm_90a")[0])
    starts = ncu_stalls.function_starts(cubin)
    names = [name for _, name in starts]
    assert names[0] == "k" and len(starts) == 3
    assert any("twice" in n for n in names) and any("plus3" in n for n in names)
    assert [s for s, _ in starts] == sorted(s for s, _ in starts) and starts[0][0] == 0
    twice_at = next(s for s, n in starts if "twice" in n)
    # one sampled instruction in the kernel, two in the first callee (its first and its second instruction)
    sums = {0: {ncu_stalls.ALL: 4, "stall_wait": 4, "stall_long_sb": 0},
            1: {ncu_stalls.ALL: 5, "stall_wait": 1, "stall_long_sb": 4},
            2: {ncu_stalls.ALL: 1, "stall_wait": 0, "stall_long_sb": 1}}
    sums = {i: collections.Counter(c) for i, c in sums.items()}
    rows = ncu_stalls.by_function(sums, ["stall_wait", "stall_long_sb"], [0, twice_at, twice_at + 16], starts)
    assert rows[0][0] == next(n for n in names if "twice" in n) and rows[0][1] == 6
    assert rows[0][2][0] == ("long_sb", 5) and rows[1] == ("k", 4, [("wait", 4), ("long_sb", 0)])
    # the code that ran: the kernel's first instruction and twice's first (counts under EXECUTED), by function
    for i, n in ((0, 32), (1, 64), (2, 0)):
        sums[i][ncu_stalls.EXECUTED] = n
    offsets = list(range(0, starts[-1][0] + 64, 16))
    sums = {offsets.index(o): sums[i] for i, o in enumerate((0, twice_at, twice_at + 16))}
    code = ncu_stalls.executed_code(sums, offsets, starts)
    twice = next(n for n in names if "twice" in n)
    ends = {name: end for (_, name), (end, _) in zip(starts, starts[1:] + [(len(offsets) * 16, None)])}
    assert code["k"] == (ends["k"], 16) and code[twice] == (ends[twice] - twice_at, 16)
    assert sum(size for size, _ in code.values()) == len(offsets) * 16
    sums[offsets.index(twice_at + 32)] = collections.Counter({ncu_stalls.EXECUTED: 8, ncu_stalls.ALL: 2,
                                                             "stall_no_inst": 2})
    sass = [f"OP{i} R0" for i in range(len(offsets))]
    runs = ncu_stalls.executed_runs(sass, sums, offsets, starts, twice)  # the first and the third: two stretches
    assert [(r["offset"], r["n"], r["min"], r["max"], r["no_inst"]) for r in runs] == \
        [(twice_at, 1, 64, 64, 0), (twice_at + 32, 1, 8, 8, 2)]
    assert runs[0]["ops"] == [f"OP{offsets.index(twice_at)}"]


def test_icache_probe_kernel_is_straight_code_of_its_size_timed_by_every_warp(tmp_path):
    """benchmarks/icache_probe.py's kernel of SIZE KB: SIZE * 64 FFMAs in its pass loop (16 bytes each, none dropped),
    and each warp's clock read before and after them (a pass: the earliest start to the latest end over warps)."""
    import icache_probe
    import sass_diff
    from tilec.codegen.cuda_build import nvcc_cubin

    if sass_diff.tool("nvdisasm") is None or shutil.which("nvcc") is None:
        pytest.skip("needs nvcc and nvdisasm (on PATH or Triton's copy)")
    cubin = tmp_path / "probe.cubin"
    cubin.write_bytes(nvcc_cubin(icache_probe.kernel(4), "probe", "sm_90a")[0])
    body = sass_diff.functions(cubin, sass_diff.tool("nvdisasm"))["code_4"]
    clocks = [i for i, ins in enumerate(body) if "SR_CLOCKLO" in ins]
    assert len(clocks) == 2 and sum(ins.startswith("FFMA") for ins in body[clocks[0]:clocks[1]]) == 4 * 64


def test_sass_diff_counts_local_operations_by_function():
    """sass_diff.local_operations: each function's LDL / STL instructions (predicated ones too), by short name."""
    import sass_diff

    code = {"tilec_megakernel": ["STL [R1+0x70], R2", "LDL R2, [R1+0x70]", "FADD R1, R2, R3"],
            "$tilec_megakernel$_ZN2mk6linearILi8ENS_4bf16E": ["@P0 LDL.LU R3, [R1]", "FFMA R1, R2, R3, R4"],
            "$tilec_megakernel$_ZN2mk9attentionILi32E": ["LDS R3, [R1]", "STS [R2], R3"]}
    assert sass_diff.local_operations(code) == {"tilec_megakernel": 2, "linear": 1}


def test_megakernel_gemv_loops_keep_their_weight_loads_in_one_batch(tmp_path):
    """In the mini megakernel as nvcc builds it for sm_90a (255 registers, the ceiling), every GEMV loop issues its
    lane's 8 weight loads before the FMAs that use them. Without the __syncwarp after the loads, ptxas split the
    experts' gate/up batch into 4 of 2 and the q/k/v projection's one-row batch into 5 and 3 (on the H100, gate/up
    went from 279 to 403 us a step: benchmarks/results/h100-2026-11-25b)."""
    import sass_diff

    if sass_diff.tool("nvdisasm") is None or shutil.which("nvcc") is None:
        pytest.skip("needs nvcc and nvdisasm (on PATH or Triton's copy)")
    source = sass_diff.megakernel_source("mini", None, False, None)
    cubin, regs = sass_diff.compile_cubin(source, tmp_path, "mini")
    batches = sass_diff.load_batches(cubin, sass_diff.tool("nvdisasm"))
    gemv = {"linear", "proj_rope", "router_scores", "swiglu_gate_up", "experts_gate_up", "experts_down"}
    assert gemv <= set(batches), batches.keys()
    assert all(lp["loads"] >= 8 for f in gemv for lp in batches[f])
    # streamed weights take no place in L1, where they would evict the body's spilled values (read again after each
    # call and barrier): with __ldg's allocating loads the step was 11% slower in bf16, 22% in MXFP4
    # (benchmarks/results/h100-2026-11-25f)
    assert all(lp["streamed"] == lp["loads"] for f in gemv for lp in batches[f]), batches
    assert sass_diff.split_batches(batches) == [], (regs, sass_diff.split_batches(batches))
    # nor do they touch local memory (spills): each would be a round trip a turn
    assert sass_diff.spilled_loops(batches) == [], sass_diff.spilled_loops(batches)
    # and the check itself sees a split batch: a loop whose loads come two between FMAs
    fake = {"f": [{"instructions": 40, "loads": 8, "streamed": 8, "batch": 2, "local": 0},
                  {"instructions": 40, "loads": 4, "streamed": 4, "batch": 4, "local": 2}]}
    assert sass_diff.split_batches(fake) == [("f", 8, 2)] and sass_diff.spilled_loops(fake) == [("f", 40, 2)]
    # the command line's check of tilec's templates alone (no --variant) says so and exits 0: here on the tiny
    # preset's fp32 build, whose warp sums' divergent fallbacks branch back into the code (not loops)
    done = subprocess.run([sys.executable, sass_diff.__file__, "--preset", "tiny", "--layers", "0"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "A: weight loads split by FMAs (loads / most in one batch): none" in done.stdout, (
        done.stdout + done.stderr)[-2000:]


@pytest.mark.parametrize("mma", [False, True])
def test_megakernel_mxfp4_experts_stream_blocks_and_scales_past_l1(tmp_path, monkeypatch, mma):
    """In the MXFP4 mini megakernel, the experts' gate/up and down phases load their weights with
    ld.global.nc.L1::no_allocate (LDG.E.NA), as the bf16 GEMV loops do (the check above): on the CUDA cores the
    blocks (16 bytes) and scales (a byte), on the tensor cores (megakernel.MXFP4_MMA) the re-laid fragments and
    their 16-bit scale pairs."""
    import sass_diff

    from tilec.codegen import megakernel

    if sass_diff.tool("nvdisasm") is None or shutil.which("nvcc") is None:
        pytest.skip("needs nvcc and nvdisasm (on PATH or Triton's copy)")
    monkeypatch.setattr(megakernel, "MXFP4_MMA", mma)
    cubin, _ = sass_diff.compile_cubin(sass_diff.megakernel_source("mini", None, True, None), tmp_path, "mini")
    functions = sass_diff.functions(cubin, sass_diff.tool("nvdisasm"))
    code = {sass_diff.short_name(name): body for name, body in functions.items()}
    tasks = ("experts_gate_up_mma", "experts_down_mma") if mma else ("experts_gate_up", "experts_down")
    scales = ".NA.U16." if mma else ".NA.U8."
    for task in tasks:
        streamed = [ins for ins in code[task] if re.match(sass_diff.STREAMED_LOAD, ins)]
        assert any(".NA.128." in ins for ins in streamed) and any(scales in ins for ins in streamed), code[task]


def test_dense_tiles_bench_runs_and_checks_every_variant(tmp_path):
    """bench_dense_tiles.py --smoke: every op and variant computed in the interpreter, each within fp32 rounding of
    the reference op (the script checks before it times), into a whole JSON file."""
    import json

    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" /
                                               "bench_dense_tiles.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_dense_tiles.json").read_text())
    seen = {(r["op"], r["variant"], r["rows"]) for r in report["results"]}
    for op in ("qkv_rope", "swiglu", "o_proj", "lm_head"):
        assert {(op, "planner", 1), (op, "planner", 3), (op, "vector (1 row only)", 1)} <= seen
    assert {("router", "planner", 1), ("router", "planner", 3)} <= seen
    assert all(r["rel_err"] < 1e-5 for r in report["results"]), report["results"]


def test_attention_bench_runs_and_checks_every_variant(tmp_path):
    """bench_attention.py --smoke: the planner's attention over a ring and a full cache, each within fp32 rounding of
    the reference op and leaving the same cache, into a whole JSON file."""
    import json

    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" /
                                               "bench_attention.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_attention.json").read_text())
    seen = {(r["kind"], r["variant"]) for r in report["results"]}
    assert {("sliding", "planner"), ("full", "planner")} <= seen
    assert all("error" not in r and r["rel_err"] < 1e-5 and r["cache_equal"] for r in report["results"]), \
        report["results"]


def test_bench_decode_cache_positions(tmp_path):
    """bench_decode.py --cache-positions: every session's cache gets that many positions (a server's max_seq_len,
    where changes that skip a cache's unused part show), the compile option at least as many; too few for the
    largest context and its steps is refused with the count that would do."""
    from bench_decode import Bench, parse_args

    args = parse_args(["--out", str(tmp_path), "--device", "cpu", "--contexts", "16,32", "--steps", "4",
                       "--cache-positions", "256"])
    bench = Bench(args)
    assert [bench.cache_positions(c) for c in (16, 32)] == [256, 256] and bench.max_seq_len == 256
    plain = Bench(parse_args(["--out", str(tmp_path), "--device", "cpu", "--contexts", "16,32", "--steps", "4"]))
    assert [plain.cache_positions(c) for c in (16, 32)] == [16 + 6 + 4 + 8, 32 + 6 + 4 + 8]
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--device", "cpu", "--contexts", "16,32", "--steps", "4",
                    "--cache-positions", "60"])  # 32 + 6 + 32 (hf steps) + 8 = 78 needed


def test_bench_prefill_smoke(tmp_path):
    """bench_prefill.py runs on the CPU (tiny, the reference target) and writes one timed row a prompt length, its
    median among its runs."""
    import json

    from bench_prefill import main

    assert main(["--smoke", "--out", str(tmp_path), "--prompts", "4,9", "--repeats", "3"]) == 0
    data = json.loads((tmp_path / "bench_prefill.json").read_text())
    assert [(r["entry"], r["prompt"]) for r in data["results"]] == [("reference", 4), ("reference", 9)]
    for r in data["results"]:
        assert len(r["wall_ms_runs"]) == 3 and r["wall_ms"] == sorted(r["wall_ms_runs"])[1] and r["gpu_ms"] is None


def test_bench_moe_prefill_smoke(tmp_path):
    """bench_moe_prefill.py runs in the interpreter at tiny shapes: both references and both tilec kernels at a
    prefill's size, each kernel checked against its reference."""
    import json

    from bench_moe_prefill import main

    assert main(["--smoke", "--out", str(tmp_path), "--reps", "1"]) == 0
    data = json.loads((tmp_path / "bench_moe_prefill.json").read_text())
    kernels = [(r["kernel"], r["rows"]) for r in data["results"]]
    assert sorted(kernels) == sorted([("reference dense", 40), ("reference mxfp4", 40), ("tilec mxfp4", 40),
                                      ("tilec dense", 40)])
    assert all(r["rel_err"] < 1e-5 for r in data["results"] if "rel_err" in r)


def test_profile_megakernel_rates_a_saved_profile_by_op():
    """profile_megakernel.py --from-json: a saved profile's phases joined with the bytes tilec.cost counts for their
    nodes (no GPU): every op of the step, its bytes as the decode floor counts them, and the rate."""
    import profile_megakernel as pm

    import tilec
    from tilec.cost import step_bytes
    from tilec.models import build_model

    results = Path(__file__).resolve().parents[1] / "benchmarks/results/h100-2026-11-24j"
    rates = {d["op"]: d for d in pm.from_json(results / "run7_profile/profile_megakernel.json")}
    graph = tilec.compile(build_model("mini", device="meta"), target="cuda").graph
    # every op with a phase; the norms (one before each of the 12 layers' attention and MLP, and the last) are
    # computed in their consumers' phases, so the ops' bytes are the floor's less the norms'
    norms = [n for n in graph.graph.nodes if n.op == "call_function" and "rms_norm" in (pm.op_name(n.target) or "")]
    assert len(norms) == 25 and "rms_norm" not in rates and "add_rms_norm" not in rates
    norm_bytes = sum(sum(pm.node_step_bytes(n, 256)) for n in norms)
    assert norm_bytes > 0
    assert sum(d["bytes"] for d in rates.values()) == step_bytes(graph, 256)["total"] - norm_bytes
    assert rates["qkv_rope"]["nodes"] == 12 and rates["moe_experts"]["phases"] == 22
    qkv = rates["qkv_rope"]
    assert qkv["tb_per_s"] == pytest.approx(qkv["bytes"] / (qkv["work_us"] * 1e-6) / 1e12)
    # by task: the slowest block's lead over the median one, the median counted as 0 where it had nothing to do
    phases = [{"task": "a", "work_us": 10.0, "work_p50_us": 4.0, "barrier_us": 1.0},
              {"task": "a", "work_us": 6.0, "work_p50_us": -3.0, "barrier_us": 1.5},
              {"task": "b", "work_us": 2.0, "work_p50_us": 2.0, "barrier_us": 0.0}]
    tasks = pm.by_task(phases)
    assert tasks["a"] == {"phases": 2, "work_us": 16.0, "lead_us": 12.0, "barrier_us": 2.5}
    assert tasks["b"]["lead_us"] == 0.0


def test_profile_megakernel_times_the_steps_inside_attention():
    """profile_megakernel.py's attention table from the timeline build's stamps (no GPU): each step from the one
    before (the first from the previous phase's release), over the blocks that had an item; the merge and the
    stores only where the block was its head's last; and the same for the block that finished the phase last."""
    import profile_megakernel as pm

    phases = [{"task": "qkv_rope", "node": "q"}, {"task": "attention", "node": "att"}]
    st = torch.zeros((3, 2, 2), dtype=torch.int64)  # [blocks, phases, (done, released)]
    st[:, 0, 1] = torch.tensor([900, 1000, 950])  # the qkv phase's barrier released at 1000 ns
    st[:, 1, 0] = torch.tensor([5000, 9000, 1000])  # block 1 finished attention last
    att = torch.zeros((1, 3, 8), dtype=torch.int64)  # [attention ops, blocks, stamps]
    att[0, 0, :4] = torch.tensor([1100, 2100, 3100, 3600])  # not its head's last
    att[0, 1, :7] = torch.tensor([1200, 2200, 4200, 5200, 6200, 7200, 1])  # the last: merged and stored
    (row,) = pm.attention_steps(phases, [st], [att])  # block 2 had no item
    assert row["node"] == "att" and row["items"] == 2
    assert row["last_block_us"] == {"start": 0.2, "staged": 1.0, "stored": 2.0, "arrived": 1.0, "merged": 1.0,
                                    "appended": 1.0}
    assert row["median_us"]["staged"] == 1.0 and row["median_us"]["arrived"] == 1.0
    assert row["median_us"]["start"] == 0.2 and row["median_us"]["merged"] == 1.0  # the upper median; one block


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_sass_diff_names_the_task_functions_a_template_change_reaches(tmp_path):
    """sass_diff.py compiles the megakernel with tilec's templates and with a variant directory and compares each task
    function's SASS: a comment changes nothing; a change to the attention merge changes its machine code."""
    import sass_diff
    from tilec.codegen.render import template_dirs

    if sass_diff.tool("nvdisasm") is None:
        pytest.skip("needs nvdisasm (on PATH or Triton's copy)")
    tasks = (Path(template_dirs()[-1]) / "cuda" / "megakernel_tasks.cuh").read_text()
    assert "__expf(sink_s[r] - m_safe)" in tasks
    for name, text in (("comment", "// a comment\n" + tasks),
                       ("merge", tasks.replace("__expf(sink_s[r] - m_safe)", "expf(sink_s[r] - m_safe)"))):
        (tmp_path / name / "cuda").mkdir(parents=True)
        (tmp_path / name / "cuda" / "megakernel_tasks.cuh").write_text(text)
    builds = {}
    for name in (None, "comment", "merge"):
        source = sass_diff.megakernel_source("tiny", None, False, None if name is None else str(tmp_path / name))
        cubin, regs = sass_diff.compile_cubin(source, tmp_path, name or "base")
        assert regs > 0
        builds[name] = sass_diff.functions(cubin, sass_diff.tool("nvdisasm"))
    same = sass_diff.compare(builds[None], builds["comment"])
    assert {r["function"] for r in same} >= {"attention", "proj_rope", "experts_gate_up", "tilec_megakernel"}
    assert all(r["identical"] for r in same)
    merge = {r["function"]: r for r in sass_diff.compare(builds[None], builds["merge"])}
    assert not merge["attention"]["identical"] and merge["attention"]["opcodes_changed"]


def test_ab_megakernel_reads_a_profile_and_runs_each_tree_from_its_own_copy(tmp_path):
    """ab_megakernel.py: the step time and the by-task table of a profile_megakernel.py log saved on the H100; a dry
    A/B of two trees renders each tree's megakernel from its own flat copy (not the installed package) and writes
    ab.json whole (--warmup: the first build once more before them, not counted); --guard-s keeps a run from starting
    that would end past it; a --check line is read; an --order naming no tree is an error that says which."""
    import ab_megakernel

    root = Path(__file__).resolve().parents[1]
    log = (root / "benchmarks/results/h100-2026-11-25e/run1/log_main.txt").read_text()
    run = ab_megakernel.parse_profile(log)
    assert (run["preset"], run["dtype"], run["context"], run["rows"], run["step_us"]) == ("mini", "bf16", 256, 1,
                                                                                          1095.7)
    assert run["tasks"]["attention"] == {"phases": 12, "work_us": 144.5, "lead_us": 135.1, "barrier_us": 15.2}
    assert len(run["tasks"]) == 8  # the per-phase table after the blank line is not read as tasks
    assert "check_rel_err" not in run
    checked = ab_megakernel.parse_profile(log + "\ncheck: logits rel err 1.234e-02 against the triton target (one "
                                                "decode step)\n")
    assert checked["check_rel_err"] == 0.01234 and checked["step_us"] == 1095.7
    script = root / "benchmarks" / "ab_megakernel.py"
    done = subprocess.run([sys.executable, str(script), "--tree", f"a={root}", "--tree", f"b={root}", "--order",
                           "b,a,b", "--dry", "--mxfp4", "--warmup", "--out", str(tmp_path)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    ab = json.loads((tmp_path / "ab.json").read_text())
    runs = ab["runs"]
    assert [r["name"] for r in runs] == ["b", "a", "b"] and all(r["rc"] == 0 for r in runs)
    assert ab["warmup"]["name"] == "b" and (tmp_path / "logs/warmup_b.txt").is_file()  # --warmup: b once, uncounted
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["0_b.txt", "1_a.txt", "2_b.txt", "warmup_b.txt"]
    for r in runs:
        assert r["dry"].startswith(f"{tmp_path / 'packages' / r['name'] / 'tilec' / '__init__.py'}: megakernel.cu")
        assert r["dry"].endswith("MXFP4 experts True")  # --mxfp4 reaches the build
    assert "Mxfp4Rows" in (tmp_path / "packages/a/tilec/templates/cuda/megakernel_tasks.cuh").read_text()
    # the first run always starts; a second that would end past --guard-s (by the slowest run so far) does not
    short = subprocess.run([sys.executable, str(script), "--tree", f"a={root}", "--order", "a,a", "--dry",
                            "--guard-s", "1", "--out", str(tmp_path / "short")], capture_output=True, text=True)
    assert short.returncode == 0 and "would end past 1 s; 1 runs not started" in short.stdout, short.stdout
    assert len(json.loads((tmp_path / "short/ab.json").read_text())["runs"]) == 1
    bad = subprocess.run([sys.executable, str(script), "--tree", f"a={root}", "--order", "a,c", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode != 0 and "--order names ['c'], which no --tree gives (['a'])" in bad.stderr


def test_profile_megakernel_check_compares_the_build_with_the_triton_target(monkeypatch):
    """profile_megakernel.py --check (check_logits): one decode step's logits of the compiled model against the
    triton target's, compiled from the same model. On the CPU the cuda target runs the triton kernels, so the two
    agree exactly; against other weights (another seed) the check reads an error of the order of 1."""
    import profile_megakernel as pm

    import tilec
    from tilec.models import build_model

    cm = tilec.compile(build_model("tiny"), target="cuda", options=tilec.Options())
    assert pm.check_logits(cm, False) == 0.0
    compile_ = tilec.compile
    monkeypatch.setattr(pm.tilec, "compile", lambda model, **kw: compile_(build_model("tiny", seed=1), **kw))
    assert pm.check_logits(cm, False) > 0.1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_ab_megakernel_precompiles_each_tree_into_the_kernel_cache(tmp_path, monkeypatch):
    """ab_megakernel.precompile: each tree's copy compiles its production and timeline builds into the kernel cache
    (here for sm_90a without a GPU, tiny), under the names and sources the runs' modules will look up."""
    import ab_megakernel

    import tilec
    from tilec.codegen.render import source_hash
    from tilec.models import build_model

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("TILEC_CACHE_DIR", str(tmp_path / "cache"))
    pkg = ab_megakernel.flat_package(root, tmp_path / "packages" / "a")
    (tmp_path / "logs").mkdir()
    ab_megakernel.precompile({"a": pkg}, False, tmp_path / "logs", preset="tiny", arch="sm_90a")
    log = (tmp_path / "logs/precompile_a.txt").read_text()
    assert log.strip().endswith("compiled ['tilec_megakernel', 'tilec_megakernel_timeline']"), log[-2000:]
    program = tilec.compile(build_model("tiny"), target="cuda", options=tilec.Options()).program
    for name, source in (("tilec_megakernel", program.megakernel_source),
                         ("tilec_megakernel_timeline", program.builds[-1].timeline_source())):
        assert (tmp_path / "cache/kernels" / f"{name}_sm_90a_{source_hash(source)}.cubin").is_file()

