"""Every torch-free CUDA source ``csrc/**/*.cu`` compiles with plain nvcc for the H200 (sm_90a).

CI has nvcc but no GPU and a CPU-only torch, so the extension itself is never built there; this keeps
the kernels and launchers from breaking unnoticed. One test per file (other ops' files are checked
too); the compiles run concurrently, one per core. Skips cleanly when nvcc is not on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in CSRC.rglob("*.cu"))
NVCC = shutil.which("nvcc")
# The nvcc flags of setup.py's CUDAExtension (minus -lineinfo), for the H200 target.
NVCC_FLAGS = ["-c", "-std=c++20", "-gencode=arch=compute_90a,code=sm_90a", "-I", str(CSRC),
              "-O3", "--use_fast_math", "--expt-relaxed-constexpr"]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def _compile(src: str, out_dir: str) -> subprocess.CompletedProcess:
    obj = os.path.join(out_dir, src.replace("/", "_") + ".o")
    return subprocess.run([NVCC, *NVCC_FLAGS, str(ROOT / src), "-o", obj], capture_output=True, text=True)


@pytest.fixture(scope="module")
def compiled():
    """Starts every compile at once (one worker per core); maps source -> Future of its result."""
    with tempfile.TemporaryDirectory(prefix="onerec_csrc_") as out_dir, \
            ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        futures: dict[str, Future] = {src: pool.submit(_compile, src, out_dir) for src in SOURCES}
        yield futures
        for f in futures.values():
            f.cancel()


def test_csrc_has_cuda_sources():
    assert SOURCES, f"no .cu files under {CSRC}"


@pytest.mark.parametrize("src", SOURCES)
def test_cu_compiles_with_nvcc(src, compiled):
    res = compiled[src].result()
    assert res.returncode == 0, f"nvcc failed on {src}:\n{res.stderr[-6000:]}"
