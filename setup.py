"""Build for onerec_fast.

Pure Python + Triton always; the CUDA extension ``onerec_fast._C`` (every ``csrc/**/*.cu`` plus
``csrc/bindings.cpp``) only when a CUDA-enabled torch and nvcc are present.

Environment:
  ONEREC_FAST_NO_CUDA=1       skip the CUDA extension even where it could be built
  TORCH_CUDA_ARCH_LIST=...    architectures to build for (default "9.0a": Hopper with wgmma)
  MAX_JOBS=N                  parallel nvcc jobs (ninja)
  CXX=...                     C++ driver for the bindings and the link (default: torch's choice, replaced by
                              the system g++ when it would link libstdc++ statically, see _cxx_driver)

Install without build isolation (``pip install --no-build-isolation -e .``) so the build sees the
torch already installed instead of downloading another one.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"onerec_fast setup: {msg}", file=sys.stderr)


def _links_shared_libstdcxx(cxx: str) -> bool:
    """True when ``cxx`` finds a shared libstdc++ to link against (``-print-file-name`` answers a path)."""
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return os.path.isabs(found) and os.path.exists(found)


def _cxx_driver(cxx: str) -> str:
    """The C++ driver that compiles the bindings and links ``_C``: torch's choice ``cxx`` (``$CXX``, else
    ``c++``), unless that driver has no shared libstdc++ (issue 17).

    Such a driver links libstdc++.a into the extension, so ``_C`` carries a private C++ runtime
    (``__cxa_throw``, the personality routine) beside the system libstdc++.so.6 that torch uses, and the
    first ``c10::Error`` thrown inside ``_C`` killed the process with SIGSEGV. Measured on the H100 image
    (torch 2.11, CC/CXX=/opt/gcc/bin/*, whose ``-print-file-name=libstdc++.so`` finds nothing): every build
    linked by /opt/gcc/bin/g++ crashed on a failing TORCH_CHECK (with -shared-libgcc, -static-libgcc,
    --eh-frame-hdr alike); the same sources built and linked by /usr/bin/g++ (same GCC 13.3) raised
    RuntimeError (benchmarks/diagnostics/cxx_exceptions/s17.sh; benchmarks/RESULTS.md 2026-12-06 session 6)."""
    if _links_shared_libstdcxx(cxx):
        return cxx
    for other in ("/usr/bin/g++", "g++", "c++"):
        path = shutil.which(other)
        if path and _links_shared_libstdcxx(path):
            _say(f"{cxx} finds no shared libstdc++ (it would link a private static C++ runtime into _C, "
                 f"and C++ exceptions would crash): building with {path}")
            return path
    _say(f"WARNING: {cxx} finds no shared libstdc++ and no other C++ driver does: C++ exceptions thrown "
         "inside onerec_fast._C may crash the process (the public ops check their arguments in Python first)")
    return cxx


def _cuda_extension():
    """Return ([ext_modules], cmdclass) for the CUDA extension, or ([], {}) with the reason said once."""
    if os.environ.get("ONEREC_FAST_NO_CUDA", "0") not in ("", "0"):
        _say("ONEREC_FAST_NO_CUDA is set: building pure Python + Triton + reference")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension, get_cxx_compiler
    except ImportError as e:
        _say(f"torch not importable at build time ({e}): building pure Python + Triton + reference")
        return [], {}
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU build: building pure Python + Triton + reference")
        return [], {}
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        _say("nvcc not found: building pure Python + Triton + reference")
        return [], {}
    # Every .cu under csrc/ is torch-free (kernels + launchers); every .cpp is a thin torch binding.
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources = cu + sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not cu:
        _say("no CUDA sources: building pure Python + Triton + reference")
        return [], {}
    arch = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    # torch compiles the .cpp files with $CXX and setuptools links a C++ extension with $CXX when set:
    # pinning it makes one driver do both.
    os.environ["CXX"] = _cxx_driver(get_cxx_compiler())
    _say(f"building CUDA extension onerec_fast._C for TORCH_CUDA_ARCH_LIST={arch} from {len(sources)} sources")
    ext = CUDAExtension(
        name="onerec_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("ONEREC_FAST_ARCH_LIST", f'"{arch}"')],
        # No -std flag: torch's cpp_extension adds the standard torch itself was built with (C++20 for
        # torch >= 2.10). Forcing C++17 changed the layout of torch classes seen by the bindings and
        # segfaulted the first exception thrown from them (seen on the H200, torch 2.11).
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

packages = find_packages(include=["onerec_fast", "onerec_fast.*"]) + ["onerec_fast.kernels"]

setup(
    packages=packages,
    # Triton kernels live in the top-level kernels/ folder and ship as onerec_fast.kernels.
    package_dir={"onerec_fast.kernels": "kernels"},
    package_data={"onerec_fast": ["py.typed"], "onerec_fast.kernels": ["configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
