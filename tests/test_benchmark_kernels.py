"""The CUDA kernels of the benchmark scripts, which only a GPU runs, kept building on the CPU.

benchmarks/splitk_experiment.py (an experiment, not part of the compiler): its re-laid down weights decode back to the
checkpoint's codes and scales under the lane mapping splitk_kernel.cu assumes, and its CUDA source (the experts template
with splitk_kernel appended) compiles for sm_90a without spills and within the H100's shared memory, so the experiment
stays runnable as the template changes. benchmarks/read_floor.py: every floor kernel compiles without spills.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tilec.codegen import mma_layout
from tilec.codegen.tuning import DeviceInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from splitk_experiment import VARIANTS, split_down, splitk_source, stage_bytes  # noqa: E402

H100 = DeviceInfo(interpret=False, sms=132, capability=(9, 0), smem_optin=232448)


@pytest.mark.parametrize("e,h,i", [(2, 128, 128), (3, 256, 64)])
def test_split_down_decodes_back(e, h, i):
    gen = torch.Generator().manual_seed(e * h + i)
    blocks = torch.randint(0, 256, (e, h, i // 2), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 256, (e, h, i // 32), dtype=torch.uint8, generator=gen)
    words, sc = split_down(mma_layout.fragment_words(blocks), mma_layout.fragment_scales(scales))
    assert words.shape == (e, i // 16, h // 64, 32, 4) and sc.shape == (e, i // 32, h)
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).reshape(e, h, i).to(torch.int64)
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(e, i // 16, h // 64, 8, 4, 4)  # [E, s, G, g, t, tile i]
    got = torch.empty((e, h // 64, 4, 2, 8, i // 16, 4, 4), dtype=torch.int64)  # [E, G, i, h, g, s, t, q]
    for hh in range(2):
        for q in range(4):
            j, half = hh + 2 * (q // 2), 16 * (q % 2)
            mag = (w >> (mma_layout.MAG_SHIFT[j] + half)) & 7
            sign = (w >> (mma_layout.SIGN_SHIFT[j] + half)) & 1
            got[:, :, :, hh, :, :, :, q] = (mag | (sign << 3)).permute(0, 2, 5, 3, 1, 4)
    # row 16 (4G + i) + 8h + g, column 16s + 4t + q
    assert torch.equal(got.reshape(e, h, i), codes)
    s = sc.reshape(e, i // 32, h // 64, 8, 4, 2)  # [E, block, G, g, i, h]
    assert torch.equal(s.permute(0, 2, 4, 5, 3, 1).reshape(e, h, i // 32), scales)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_splitk_source_compiles_without_spills(tmp_path):
    shape = {"E": 128, "H": 2048, "I": 768}
    for stages, warps, tail, copies, timeline in [(*v, False) for v in VARIANTS] + [(*VARIANTS[0], True)]:
        (tmp_path / "k.cu").write_text(splitk_source(shape, H100, {}, stages, timeline, warps, tail, copies))
        proc = subprocess.run(["nvcc", "-cubin", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a",
                               "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = re.search(r"Compiling entry function 'splitk_kernel'.*?(\d+) bytes spill stores.*?Used \d+ "
                         r"registers.*?(\d+) bytes smem", proc.stderr, re.S)
        assert info, proc.stderr[-2000:]
        assert int(info.group(1)) == 0, (stages, warps, tail, copies, timeline)
        assert int(info.group(2)) + stages * stage_bytes(shape) <= H100.smem_optin


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
