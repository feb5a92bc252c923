"""The sdist carries what a build needs (CUDA sources, Triton kernels and their tuned configs, LICENSE,
py.typed), and the version has one source."""

import importlib.metadata
import os
import subprocess
import sys
import tarfile

import onerec_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sdist_carries_build_sources(tmp_path):
    # setuptools' PEP 517 hook directly: no `build` package, no isolation, no torch import (NO_CUDA).
    # -I: the repo root must not be on sys.path, where its kernels/ folder would shadow an installed
    # distribution named `kernels` (Hugging Face's, whose setuptools plugin then fails to import).
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    env = {**os.environ, "ONEREC_FAST_NO_CUDA": "1"}
    name = subprocess.run([sys.executable, "-I", "-c", code], cwd=ROOT, env=env, check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        files = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    want = {"LICENSE", "MANIFEST.in", "setup.py", "onerec_fast/py.typed", "csrc/bindings.cpp",
            "kernels/moe_gemm.py", "kernels/configs/moe_gemm.json"}
    assert want <= files, want - files
    assert any(f.startswith("csrc/moe_routing/") and f.endswith(".cu") for f in files)
    assert not any("__pycache__" in f for f in files)
    assert name == f"onerec_fast-{onerec_fast.__version__}.tar.gz"


def test_one_version_source():
    assert importlib.metadata.version("onerec_fast") == onerec_fast.__version__
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'dynamic = ["version"]' in f.read()
