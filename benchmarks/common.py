"""What tilec's benchmark scripts share: a timestamped progress log, per-call timing on the device, memory
bandwidth, the software and hardware a run saw, JSON written atomically, a plain-text table, and a grouped bar chart
(skipped with a note where matplotlib is missing: a benchmark never fails for want of a plot).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


class Log:
    """Prints ``[elapsed s] message`` and flushes, so a run cut off by a time limit still leaves a useful log."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times successive calls without synchronising between them.

    On a GPU each call is bracketed by CUDA events, so the host may queue steps ahead and a step's time is what the
    device saw from the start of one call to its end (idle gaps while the host lags included). On the CPU, where the
    work is synchronous, it is the host clock.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: list[tuple] = []
        self._host: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            self._events.append((begin, None))
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1] = (self._events[-1][0], end)
        else:
            self._host.append((time.perf_counter() - self._t0) * 1e3)

    def times_ms(self) -> list[float]:
        if self.device.type != "cuda":
            return list(self._host)
        synchronize(self.device)
        return [begin.elapsed_time(end) for begin, end in self._events]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(samples_ms: list[float]) -> dict:
    """Median, p10, p90, mean, min and max of timing samples in milliseconds."""
    return {"median": percentile(samples_ms, 50), "p10": percentile(samples_ms, 10),
            "p90": percentile(samples_ms, 90), "mean": sum(samples_ms) / len(samples_ms),
            "min": min(samples_ms), "max": max(samples_ms), "n": len(samples_ms)}


def time_calls(fn, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    timer = StepTimer(device)
    for _ in range(repeats):
        timer.start()
        fn()
        timer.stop()
    return timer.times_ms()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over all elements, in fp64 (0 / 0 reads as 0)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def capture(calls):
    """The calls (no-argument functions) captured into one CUDA graph, after a warm-up run of each (compiles
    kernels); returns its replay. The caller keeps the calls alive while it replays: a graph holds no reference to
    its inputs, nor to the module of its kernels."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay


def event_us(run, reps: int, calls: int = 1) -> float:
    """Median microseconds a call over ``reps`` runs of ``run`` (each making ``calls`` calls, a CUDA graph's replay for
    example), each run timed alone with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return percentile(times, 50)


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10, warmup: int = 3) -> dict:
    """Device memory bandwidth from a large copy (bytes read + bytes written) and a sum (bytes read), both over
    random data; medians of ``repeats`` timed runs."""
    numel = nbytes // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    out = {"nbytes": numel * 4, "repeats": repeats}
    for name, fn, moved in (("copy", lambda: dst.copy_(src), 2 * numel * 4), ("read", lambda: src.sum(), numel * 4)):
        samples = time_calls(fn, device, repeats, warmup)
        median = percentile(samples, 50)
        out[name] = {"bytes_moved": moved, "median_ms": median, "samples_ms": [round(s, 5) for s in samples],
                     "bytes_per_s": moved / (median / 1e3)}
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def kernel_gpu_times(run, reps: int) -> dict[str, tuple[float, float]]:
    """GPU kernel name -> (launches per ``run()``, GPU microseconds per ``run()``), from torch.profiler (CUPTI) over
    ``reps`` calls; it sees kernels inside CUDA-graph replays too. With programmatic dependent launch a kernel's time
    includes its wait for the one before. Call it after any timing in the same process: once CUPTI has run, every
    later CUDA-graph launch takes about 0.9 us longer on the H100 (results/h100-2026-11-23i/run3_cupti)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
    return {evt.key: (evt.count / reps, evt.device_time_total / reps) for evt in prof.key_averages()
            if evt.device_time_total > 0 and evt.count > 0}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing or broken package is just "not there"
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """The machine and software a run saw: device, versions, git commit (when the checkout has .git), date."""
    env = {"date": now_iso(), "python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": _version("triton"),
           "transformers": _version("transformers"), "matplotlib": _version("matplotlib"),
           "tilec": _version("tilec"), "cpu_count": os.cpu_count(), "device_type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   # whether the triton target launches a step's kernels with programmatic dependent launch
                   pdl=_pdl(device))
    else:
        env["device"] = platform.processor() or platform.machine()
    commit = _git("rev-parse", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        env["git_commit"] = commit
        env["git_dirty_files"] = len(dirty.splitlines()) if dirty else 0
    return env


def _pdl(device: torch.device) -> bool | None:
    """Whether the triton target launches a step's kernels with programmatic dependent launch on ``device`` (None
    where tilec is not importable)."""
    try:
        from tilec.codegen.tuning import device_info
    except ImportError:
        return None
    return device_info(device).pdl


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (a temporary file renamed over the target), so a reader or a run killed
    mid-write never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def format_table(headers: list[str], rows: list[list]) -> str:
    """A fixed-width text table; floats get 3 significant decimals, None prints as '-'."""
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in text]
    return "\n".join(line.rstrip() for line in lines)


def grouped_bar_chart(path: Path, groups: list[str], series: dict[str, list[float | None]], *, title: str,
                      ylabel: str, group_lines: list[tuple[int, float, str, str]] = (),
                      lines: list[tuple[float, str, str]] = (), log_scale: bool = True) -> str | None:
    """Bars per series within each group; ``group_lines`` are (group index, y, label, line style) segments spanning
    one group (e.g. its HBM floor), ``lines`` (y, label, style) span the whole chart. Returns None once written, or
    a note saying why no chart was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001 - no plot is a note, never a failure
        return f"no PNG: matplotlib is not importable ({type(exc).__name__}: {exc})"
    names = [name for name, values in series.items() if any(v is not None for v in values)]
    if not names:
        return "no PNG: no entry produced a timing"
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(names)) ** 0.5 + 3), 4.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        values = [v if v is not None else 0.0 for v in series[name]]
        bars = ax.bar(xs, values, width * 0.95, label=name)
        for bar, v in zip(bars, series[name]):
            if v is not None:
                ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                            fontsize=7, xytext=(0, 2), textcoords="offset points")
    seen: set[str] = set()
    for g, y, label, style in group_lines:
        ax.hlines(y, g - 0.45, g + 0.45, colors="black", linestyles=style, linewidth=1.4,
                  label=None if label in seen else label)
        seen.add(label)
    for y, label, style in lines:
        ax.axhline(y, color="tab:red", linestyle=style, linewidth=1.0, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log_scale:
        ax.set_yscale("log")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None
