"""Which implementations of the fused ops are available, and the rule that picks one.

Three backends, in order of preference:

* ``cuda``      -- the compiled extension ``onerec_fast._C`` (CUDA C++ kernels from ``csrc/``);
* ``triton``    -- the Triton kernels in ``onerec_fast.kernels``; on CPU tensors only under the
                   Triton interpreter (``TRITON_INTERPRET=1``), which is how CI tests them;
* ``reference`` -- plain PyTorch (``<op>_ref`` beside each op), always available.

The choice is made per call from the tensor's device and the op's implemented backends:

* ``backend="auto"`` (the default) takes the first available backend of the op for that device.
  If that is not the best one the op implements (say the extension did not build), a warning is
  logged once per (op, backend) so a slow path is never silent.
* An explicit backend that is unavailable raises ``RuntimeError`` with the reason.
* The environment variable ``ONEREC_FAST_BACKEND`` (all ops) or ``ONEREC_FAST_BACKEND_<OP>``
  (one op, upper case, e.g. ``ONEREC_FAST_BACKEND_MOE``) overrides ``"auto"``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

__all__ = ["BACKENDS", "BackendStatus", "backends", "resolve_backend", "triton_interpret", "describe",
           "triton_unless_unsupported"]

log = logging.getLogger("onerec_fast")

BACKENDS = ("cuda", "triton", "reference")
_VALID = BACKENDS + ("auto",)


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str  # why it is (not) available, for humans


def triton_interpret() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cuda_extension() -> tuple[object | None, str]:
    if not torch.cuda.is_available():
        return None, "no CUDA device visible to torch"
    try:
        # Importing the module registers its ops with the dispatcher as torch.ops.onerec_fast_C.*
        from onerec_fast import _C  # type: ignore[attr-defined]
    except ImportError as e:  # not built: CPU-only install, ONEREC_FAST_NO_CUDA=1, or no nvcc at build time
        return None, f"extension onerec_fast._C not built ({e})"
    return torch.ops.onerec_fast_C, f"onerec_fast._C built for {getattr(_C, 'ARCH_LIST', '?')}"


def cuda_extension():
    """The namespace of the compiled CUDA ops (``torch.ops.onerec_fast_C``), or None when not built."""
    return _cuda_extension()[0]


@functools.lru_cache(maxsize=None)
def _triton_status(interpret: bool) -> BackendStatus:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return BackendStatus(False, f"triton not importable ({e})")
    if interpret:
        return BackendStatus(True, f"triton {triton.__version__} (interpreter, CPU tensors)")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    return BackendStatus(False, "no CUDA device and TRITON_INTERPRET is not set")


def backends() -> dict[str, BackendStatus]:
    """Availability of each backend on this machine, with the reason."""
    ext, why = _cuda_extension()
    return {
        "cuda": BackendStatus(ext is not None, why),
        "triton": _triton_status(triton_interpret()),
        "reference": BackendStatus(True, f"PyTorch {torch.__version__}"),
    }


def describe() -> str:
    """One line per backend, as printed by ``onerec-fast backends``."""
    return "\n".join(
        f"{name:<10} {'yes' if st.available else 'no ':<4} {st.reason}" for name, st in backends().items()
    )


def _available_on(backend: str, device: torch.device) -> tuple[bool, str]:
    if backend == "reference":
        return True, ""
    if backend == "cuda":
        if device.type != "cuda":
            return False, f"the cuda backend needs CUDA tensors, got {device.type}"
        ext, why = _cuda_extension()
        return ext is not None, why
    if backend == "triton":
        if device.type == "cuda":
            st = _triton_status(False)
            return st.available, st.reason
        if device.type == "cpu" and triton_interpret():
            st = _triton_status(True)
            return st.available, st.reason
        return False, f"triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (got {device.type})"
    raise AssertionError(backend)


_warned: set[tuple[str, str]] = set()


@torch.compiler.assume_constant_result
def resolve_backend(op: str, backend: str | None, device: torch.device, implemented: tuple[str, ...]) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``implemented`` lists the backends the op has, best first (always ending in ``"reference"``).
    Under ``torch.compile`` the choice is made once at trace time and baked into the graph
    (``assume_constant_result``), so Dynamo does not trace the cached availability probes.
    """
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(f"ONEREC_FAST_BACKEND_{op.upper()}") or os.environ.get("ONEREC_FAST_BACKEND") or "auto"
        if backend not in _VALID:
            raise ValueError(f"ONEREC_FAST_BACKEND(_{op.upper()}) must be one of {_VALID}, got {backend!r}")
    if backend != "auto":
        if backend not in implemented:
            raise RuntimeError(f"{op}: backend {backend!r} is not implemented (implemented: {implemented})")
        ok, why = _available_on(backend, device)
        if not ok:
            raise RuntimeError(f"{op}: backend {backend!r} requested but unavailable: {why}")
        return backend
    # auto: on CPU the interpreter is a test vehicle, far slower than the reference, so it is never chosen.
    candidates = [b for b in implemented if not (device.type == "cpu" and b == "triton")]
    for i, b in enumerate(candidates):
        ok, _ = _available_on(b, device)
        if ok:
            if i > 0 and device.type == "cuda" and (op, b) not in _warned:
                _warned.add((op, b))
                reasons = "; ".join(f"{c}: {_available_on(c, device)[1]}" for c in candidates[:i])
                log.warning("onerec_fast: %s falls back to the %s backend (%s)", op, b, reasons)
            return b
    raise AssertionError("reference is always available")


_unsupported_warned: set[tuple[str, str]] = set()


def triton_unless_unsupported(op: str, backend: str | None, device: torch.device, why: str | None) -> str:
    """After :func:`resolve_backend` chose "triton": "triton" when ``why`` is None (the kernel takes this input);
    otherwise an explicit ``backend="triton"`` raises ``ValueError`` saying ``why``, and "auto" falls back to
    "reference", logged once per (op, reason) on CUDA (a slow path is never silent)."""
    if why is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"{op}: backend 'triton' {why}")
    if device.type == "cuda" and (op, why) not in _unsupported_warned:
        _unsupported_warned.add((op, why))
        log.warning("onerec_fast: %s falls back to the reference backend: the triton kernel %s", op, why)
    return "reference"
