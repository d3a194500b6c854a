"""Tensor parallelism across the GPUs of one node: who this process is, its process group, and how to start them.

A tensor-parallel model runs as one process per GPU, every process running the same steps on its own shard of the
weights (models/parallel.py says how a MiMo is split). Processes come from ``torchrun`` (or any launcher that sets
torch.distributed's environment variables), or from `launch`, which starts them from Python. `init` joins the
process group; `TensorParallel.current` describes this process's place in it to the compiler.

The graphs name their process group by a string (a custom op's argument must be one), looked up here at run time.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from tilec.errors import ConfigError, TilecError

# Process groups by the name graphs know them by.
_GROUPS: dict[str, object] = {}
WORLD = "world"


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """This process's place among ``world`` tensor-parallel ranks, and the name of their process group."""

    rank: int
    world: int
    group: str = WORLD

    def __post_init__(self) -> None:
        if not (isinstance(self.world, int) and self.world >= 1 and isinstance(self.rank, int)
                and 0 <= self.rank < self.world):
            raise ConfigError(f"tensor parallel rank {self.rank!r} of world {self.world!r}: need 0 <= rank < world")

    @classmethod
    def current(cls, world: int) -> "TensorParallel":
        """This process among ``world`` ranks: the initialised default process group must have exactly that size."""
        if not dist.is_available() or not dist.is_initialized():
            raise TilecError(f"tensor_parallel={world} needs torch.distributed's process group, one process per GPU: "
                             "start the processes with torchrun (then call tilec.runtime.distributed.init()) or "
                             "with tilec.runtime.distributed.launch")
        size = dist.get_world_size()
        if size != world:
            raise TilecError(f"tensor_parallel={world} but the process group has {size} processes; start "
                             f"{world} processes or set tensor_parallel={size}")
        return cls(dist.get_rank(), world)

    def split(self, size: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of ``size`` split evenly; an error naming ``what`` where it does not divide."""
        if size % self.world:
            raise ConfigError(f"tensor parallel over {self.world} GPUs: {what} ({size}) is not a multiple of "
                              f"{self.world}; use a number of GPUs that divides it")
        part = size // self.world
        return self.rank * part, (self.rank + 1) * part


def group(name: str):
    """The process group a graph calls ``name``."""
    if name not in _GROUPS:
        if name == WORLD and dist.is_available() and dist.is_initialized():
            _GROUPS[WORLD] = dist.group.WORLD
        else:
            raise TilecError(f"no tensor-parallel process group {name!r} in this process: this graph was compiled "
                             "for several GPUs; run it in each process of the same process group")
    return _GROUPS[name]


def init(backend: str | None = None) -> TensorParallel:
    """Join the process group described by torch.distributed's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``, as torchrun sets them), on GPU ``LOCAL_RANK`` where there are GPUs (backend
    NCCL; gloo on the CPU). Returns this process's `TensorParallel`."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TilecError(f"tilec.runtime.distributed.init: environment variables {', '.join(missing)} are not set; "
                         "start the processes with torchrun, or use tilec.runtime.distributed.launch")
    cuda = torch.cuda.is_available()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        if local >= torch.cuda.device_count():
            raise TilecError(f"local rank {local} but this machine has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = backend or ("nccl" if cuda else "gloo")
        # NCCL bound to this GPU from the start: its communicator is made now, not inside a CUDA graph's capture
        kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
        dist.init_process_group(backend, **kwargs)
    return TensorParallel.current(dist.get_world_size())


def device(model_device: torch.device) -> torch.device:
    """Where this process's shard of a model on ``model_device`` goes: this process's GPU when the model is on a GPU
    or the group runs NCCL, else the model's device."""
    cuda = model_device.type == "cuda" or (dist.is_initialized() and dist.get_backend() == "nccl")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else model_device


def all_reduce_(x: torch.Tensor, name: str) -> torch.Tensor:
    """The sum of ``x`` over the ranks of group ``name``: ``x`` itself, summed in place (NCCL or gloo), or, for a
    message of at most ONE_SHOT_BYTES on GPUs that can read each other's memory, a new tensor from a one-shot sum
    through symmetric memory (every rank reads every rank's copy; `all_reduce_method`)."""
    if all_reduce_method(x) == "one_shot" and name not in NO_ONE_SHOT:
        entry = _one_shot_buffers(x, name)
        if entry is not None:
            return _one_shot(x, name, entry)
    dist.all_reduce(x, group=group(name))
    return x


def all_gather_last(x: torch.Tensor, name: str) -> torch.Tensor:
    """The ranks' ``x`` of group ``name`` side by side along the last dim, in rank order (NCCL or gloo)."""
    world = group(name).size()
    parts = all_gather_rows(x.reshape(1, *x.shape), name)  # [world, *x.shape]
    return parts.movedim(0, -2).reshape(*x.shape[:-1], world * x.shape[-1])


def all_gather_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """The ranks' ``x`` of group ``name`` one after another along the first dim, in rank order."""
    pg = group(name)
    out = torch.empty((pg.size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    # torch 2.13 renamed all_gather_into_tensor (the name of 2.11 and 2.12) to all_gather_single
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=pg)
    return out


# The one-shot sum: each rank copies its partial sum into a buffer every rank can read (torch's symmetric memory),
# and one kernel on each rank reads them all and adds them up: one hop, where NCCL's ring takes several. Chosen for
# the small messages of decode steps, where latency is all; not yet measured against NCCL (bench_tp.py times both).
ONE_SHOT_BYTES = 512 * 1024
_SYMM: dict[tuple, list] = {}  # (group, numel, dtype, device) -> [buffers, next one to use]
NO_ONE_SHOT: dict[str, str] = {}  # groups whose ranks could not all set up the one-shot sum -> why


def all_reduce_method(x: torch.Tensor) -> str:
    """``one_shot`` or ``collective``: how `all_reduce_` sums ``x`` (``TILEC_ALL_REDUCE=nccl`` forces the
    collective)."""
    from tilec.options import all_reduce_requested

    asked = all_reduce_requested()
    if asked == "nccl" or x.device.type != "cuda" or x.numel() * x.element_size() > ONE_SHOT_BYTES:
        return "collective"
    return "one_shot" if _symm_available() else "collective"


def _symm_available() -> bool:
    return hasattr(torch.ops, "symm_mem") and hasattr(torch.ops.symm_mem, "one_shot_all_reduce")


def _one_shot_buffers(x: torch.Tensor, name: str) -> list | None:
    """The one-shot sum's buffers for ``x``'s size, made on first use (a collective: every rank meets each size in
    the same order, the same steps). Where any rank cannot make them (GPUs without peer access, a driver that refuses),
    every rank learns it through the process group's collective, and the group sums that way from then on."""
    key = (name, x.numel(), x.dtype, x.device)
    if key in _SYMM:
        return _SYMM[key]
    pg = group(name)
    try:
        buffers, why = _make_buffers(x, pg), ""
    except Exception as exc:  # noqa: BLE001 - whatever symmetric memory raises, the collective still works
        buffers, why = None, f"{type(exc).__name__}: {exc}"
    ready = torch.tensor([0 if buffers is None else 1], dtype=torch.int32, device=x.device)
    dist.all_reduce(ready, op=dist.ReduceOp.MIN, group=pg)  # the same choice on every rank
    if not int(ready.item()):
        NO_ONE_SHOT[name] = why or "another rank could not set up symmetric memory"
        warnings.warn(f"tilec: tensor-parallel sums of group {name!r} go through the process group's collective; "
                      f"the one-shot sum could not be set up: {NO_ONE_SHOT[name]}", RuntimeWarning, stacklevel=3)
        return None
    _SYMM[key] = [buffers, 0]
    return _SYMM[key]


def _make_buffers(x: torch.Tensor, pg) -> list[torch.Tensor]:
    import torch.distributed._symmetric_memory as symm_mem

    with warnings.catch_warnings():  # needed before torch 2.12 or so, deprecated (and harmless) after
        warnings.simplefilter("ignore", FutureWarning)
        getattr(symm_mem, "enable_symm_mem_for_group", lambda name: None)(pg.group_name)
    buffers = [symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device) for _ in range(2)]
    for b in buffers:
        symm_mem.rendezvous(b, pg.group_name)
    return buffers


def _one_shot(x: torch.Tensor, name: str, entry: list) -> torch.Tensor:
    buffer = entry[0][entry[1]]
    # Alternate two buffers, so a sum never overwrites the buffer a slower peer may still read for the sum before.
    # A CUDA graph replays the buffers its capture chose; a step makes an even number of sums (two a layer), so
    # consecutive sums alternate across replays too.
    entry[1] ^= 1
    buffer.copy_(x.reshape(-1))
    return torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", group(name).group_name).view(x.shape)


def launch(fn: Callable, world: int, *args, backend: str | None = None) -> None:
    """Run ``fn(tp, *args)`` in ``world`` new processes, one per GPU (or on the CPU through gloo where there is no
    GPU), each with its process group joined; ``tp`` is its `TensorParallel`. Returns when all have returned; an
    error in any process is raised here. ``fn`` and ``args`` must be picklable (``fn`` a module-level function)."""
    import torch.multiprocessing as mp

    if torch.cuda.is_available() and world > torch.cuda.device_count():
        raise TilecError(f"launch: {world} processes but this machine has {torch.cuda.device_count()} GPUs")
    port = _free_port()
    try:
        mp.start_processes(_worker, args=(fn, world, port, backend, args), nprocs=world, join=True,
                           start_method="spawn")
    except mp.ProcessRaisedException as exc:  # its message carries the process's traceback
        raise TilecError(f"tensor-parallel rank {exc.error_index} of {world} failed:\n{exc}") from None
    except mp.ProcessExitedException as exc:
        raise TilecError(f"tensor-parallel rank {exc.error_index} of {world} exited with code {exc.exit_code}"
                         f"{' (signal ' + str(exc.signal_name) + ')' if exc.signal_name else ''}") from None


def _worker(rank: int, fn: Callable, world: int, port: int, backend: str | None, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    tp = init(backend)
    fn(tp, *args)  # an exception ends this process, and launch() stops the others (they may wait in a collective)
    dist.barrier()
    dist.destroy_process_group()
    # End here, without the interpreter's teardown: once in six CI runs on 2026-11-24 a rank that had returned died
    # with SIGABRT ("terminate called without an active exception"), most likely a gloo thread torn down at exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
