"""onerec_fast: OneRec with fused Triton and CUDA kernels."""

from onerec_fast.backends import backends as available_backends

__version__ = "0.1.0"

__all__ = ["available_backends"]
