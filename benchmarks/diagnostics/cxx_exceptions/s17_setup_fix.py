"""Build for onerec_fast.

Pure Python + Triton always; the CUDA extension ``onerec_fast._C`` (every ``csrc/**/*.cu`` plus
``csrc/bindings.cpp``) only when a CUDA-enabled torch and nvcc are present.

Environment:
  ONEREC_FAST_NO_CUDA=1       skip the CUDA extension even where it could be built
  TORCH_CUDA_ARCH_LIST=...    architectures to build for (default "9.0a": Hopper with wgmma)
  MAX_JOBS=N                  parallel nvcc jobs (ninja)
  ONEREC_FAST_CXX=PATH        C++ driver that compiles the .cpp files and links the extension
                              (default: $CXX, else torch's choice, ``c++`` on PATH)
  ONEREC_FAST_LDFLAGS="..."   extra link flags for the extension (after ``-shared-libgcc``)

Install without build isolation (``pip install --no-build-isolation -e .``) so the build sees the
torch already installed instead of downloading another one.
"""

import glob
import os
import shlex
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"onerec_fast setup: {msg}", file=sys.stderr)


def _toolchain(cpp_extension) -> list[str]:
    """Pins one C++ driver for compiling and linking the extension; returns the extra link flags.

    torch's cpp_extension compiles the .cpp files with ``$CXX`` (``c++`` on PATH when unset), but
    setuptools links a C++ extension with the driver Python itself was built with (sysconfig ``CXX``)
    unless ``$CXX`` is set, so the objects of one GCC could be linked by another (with its crt files and
    libgcc). Issue 17: on the GPU image the extension was linked by /opt/gcc/bin/g++ and every C++
    exception thrown inside onerec_fast._C killed the process with SIGSEGV. Setting ``CXX`` here makes
    both steps use the same driver, and ``-shared-libgcc`` keeps C++ unwinding in libgcc_s.so.1 (the one
    libstdc++ and torch use) rather than a private static copy in the extension.
    """
    cxx = (os.environ.get("ONEREC_FAST_CXX") or os.environ.get("CXX")
           or getattr(cpp_extension, "get_cxx_compiler", lambda: "c++")())
    os.environ["CXX"] = cxx  # read by torch (compile) and by setuptools (link)
    flags = ["-shared-libgcc"] + shlex.split(os.environ.get("ONEREC_FAST_LDFLAGS", ""))
    _say(f"C++ driver for compile and link: {shutil.which(cxx) or cxx}; link flags: {' '.join(flags)}")
    return flags


def _cuda_extension():
    """Return ([ext_modules], cmdclass) for the CUDA extension, or ([], {}) with the reason said once."""
    if os.environ.get("ONEREC_FAST_NO_CUDA", "0") not in ("", "0"):
        _say("ONEREC_FAST_NO_CUDA is set: building pure Python + Triton + reference")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
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
        extra_link_args=_toolchain(cpp_extension),
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
