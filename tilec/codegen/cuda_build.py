"""Building and launching generated CUDA C++ (templates/cuda/*.cu.j2).

`compile_cubin` turns a source into machine code for one GPU architecture: through NVRTC (``cuda.core.Program``)
where its library is installed, else through ``nvcc``. Cubins are cached under the render cache by content hash, so a
kernel compiles once per machine. `CudaModule` loads a cubin on the current device and launches its kernels on
PyTorch's current stream (so they order with the Triton kernels and are captured by CUDA graphs), optionally with
programmatic dependent launch.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from tilec.codegen.render import cache_dir, source_hash
from tilec.errors import TargetError, TilecError


def arch_of(device: torch.device | None = None) -> str:
    """``sm_90a`` for Hopper (the arch-specific target: griddepcontrol, and bf16 multiplies need sm_90), else sm_XY."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}a" if major == 9 else f"sm_{major}{minor}"


@functools.lru_cache(maxsize=1)
def _nvrtc_available() -> bool:
    """cuda.core importable and the NVRTC library loadable."""
    try:
        import cuda.core  # noqa: F401
        from cuda.pathfinder import load_nvidia_dynamic_lib

        load_nvidia_dynamic_lib("nvrtc")
        return True
    except Exception:  # noqa: BLE001 - any failure means: not usable here
        return False


def _nvcc_path() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    return nvcc if nvcc and os.path.exists(nvcc) else None


def compiler_available() -> bool:
    """Whether `compile_cubin` can work here: NVRTC through cuda.core, or nvcc."""
    return _nvrtc_available() or _nvcc_path() is not None


def _nvrtc(source: str, name: str, arch: str) -> bytes:
    from cuda.core import Program, ProgramOptions

    try:
        program = Program(source, "c++", ProgramOptions(name=name, arch=arch, std="c++17"))
        return bytes(program.compile("cubin").code)
    except Exception as exc:  # noqa: BLE001 - the compiler's log names the error
        raise TilecError(f"NVRTC could not compile the generated CUDA source {name} for {arch}:\n{exc}") from exc


def nvcc_cubin(source: str, name: str, arch: str, ptxas_info: bool = False) -> tuple[bytes, str]:
    """``source`` compiled by nvcc for ``arch`` (e.g. ``sm_90a``): the cubin, and nvcc's messages (with
    ``ptxas_info``, ptxas's report of each function's registers, stack and spills)."""
    nvcc = _nvcc_path()
    if nvcc is None:
        raise TargetError(f"compiling the generated CUDA source {name} needs NVRTC (pip install cuda-core "
                          f"nvidia-cuda-nvrtc) or nvcc on PATH; neither was found")
    code = arch.replace("sm_", "compute_")
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / f"{name}.cu", Path(tmp) / f"{name}.cubin"
        src.write_text(source)
        proc = subprocess.run([nvcc, "-cubin", "-O3", "-std=c++17", f"-gencode=arch={code},code={arch}",
                               *(["-Xptxas", "-v"] if ptxas_info else []), "-o", str(out), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise TilecError(f"nvcc could not compile the generated CUDA source {name} for {arch}:\n"
                             f"{proc.stderr[-4000:]}")
        return out.read_bytes(), proc.stderr


def compile_cubin(source: str, name: str, arch: str) -> bytes:
    """Machine code of ``source`` for ``arch`` (e.g. ``sm_90a``), from the cache when compiled before."""
    path = cache_dir() / f"{name}_{arch}_{source_hash(source)}.cubin"
    if path.exists():
        return path.read_bytes()
    cubin = _nvrtc(source, name, arch) if _nvrtc_available() else nvcc_cubin(source, name, arch)[0]
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(cubin)
    os.replace(tmp, path)  # whole or not at all
    return cubin


def pointer(t: torch.Tensor) -> ctypes.c_uint64:
    """A tensor's device address as a kernel argument (cuda.core takes ctypes integers, not c_void_p)."""
    return ctypes.c_uint64(t.data_ptr())


class CudaModule:
    """The kernels of one generated source, loaded on first launch."""

    def __init__(self, source: str, name: str):
        self.source, self.name = source, name
        self._kernels: dict[tuple[int, str], object] = {}
        self._code: dict[int, object] = {}
        self._attrs: dict[tuple, int] = {}

    def kernel(self, fn: str, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, fn)
        if key not in self._kernels:
            from cuda.core import Device, ObjectCode

            Device(index).set_current()
            if index not in self._code:
                cubin = compile_cubin(self.source, self.name, arch_of(device))
                self._code[index] = ObjectCode.from_cubin(cubin, name=self.name)
            self._kernels[key] = self._code[index].get_kernel(fn)
        return self._kernels[key]

    def launch(self, fn: str, grid: tuple, block: int, args: list, device: torch.device, pdl: bool = False,
               smem: int = 0, cluster: int = 1) -> None:
        """Launch ``fn`` on PyTorch's current stream; ``args`` as ctypes values (`pointer`, ctypes.c_int32, ...).
        ``pdl``: programmatic dependent launch (the kernel may start before the previous one ends; it must wait with
        griddepcontrol.wait before reading that kernel's output). ``smem``: bytes of dynamic shared memory.
        ``cluster``: blocks a thread-block cluster along x (``grid`` still counts blocks, and must be a multiple)."""
        if cluster > 1 and grid[0] % cluster:
            raise TilecError(f"{self.name}.{fn}: a grid of {grid[0]} blocks is not whole clusters of {cluster}")
        from cuda.core import LaunchConfig, Stream, launch

        kernel = self.kernel(fn, device)
        if smem:  # needed past 48 KB of static and dynamic shared memory together, so always
            self._set(kernel, fn, device, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", smem)
        stream = Stream.from_handle(torch.cuda.current_stream(device).cuda_stream)
        # in a clustered launch, cuda.core's grid counts clusters, not blocks
        clustered = {"grid": (grid[0] // cluster, *grid[1:]), "cluster": cluster} if cluster > 1 else {"grid": grid}
        config = LaunchConfig(**clustered, block=block, shmem_size=smem, programmatic_stream_serialization=pdl)
        launch(stream, config, kernel, *args)

    def _set(self, kernel, fn: str, device: torch.device, attribute: str, value: int) -> None:
        """Set a kernel attribute on a device where it does not hold this value already (as this module set it)."""
        key = (fn, device.index, attribute)
        if self._attrs.get(key) == value:
            return
        from cuda.bindings import driver

        attr = getattr(driver.CUfunction_attribute, attribute)
        handle = kernel.handle
        index = device.index if device.index is not None else torch.cuda.current_device()
        if isinstance(handle, driver.CUkernel):
            err, = driver.cuKernelSetAttribute(attr, value, handle, driver.CUdevice(index))
        else:
            err, = driver.cuFuncSetAttribute(handle, attr, value)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise TargetError(f"{self.name}.{fn}: the GPU refused {attribute} = {value} ({err})")
        self._attrs[key] = value
