import logging

import pytest
import torch

import onerec_fast
from onerec_fast import backends as B  # the module; onerec_fast.available_backends() is the public report


def test_backends_report_every_backend_with_a_reason():
    st = onerec_fast.available_backends()
    assert set(st) == {"cuda", "triton", "reference"}
    assert st["reference"].available
    for s in st.values():
        assert s.reason
    if not torch.cuda.is_available():
        assert not st["cuda"].available and "CUDA" in st["cuda"].reason


def test_auto_on_cpu_picks_reference_and_never_the_interpreter():
    assert B.resolve_backend("moe", "auto", torch.device("cpu"), ("cuda", "triton", "reference")) == "reference"


def test_explicit_unavailable_backend_raises():
    with pytest.raises(RuntimeError, match="cuda.*unavailable"):
        B.resolve_backend("moe", "cuda", torch.device("cpu"), ("cuda", "triton", "reference"))


def test_unimplemented_backend_raises():
    with pytest.raises(RuntimeError, match="not implemented"):
        B.resolve_backend("trie", "triton", torch.device("cpu"), ("cuda", "reference"))


def test_bad_backend_name_raises_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        B.resolve_backend("moe", "fast", torch.device("cpu"), ("reference",))


def test_triton_on_cpu_only_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.resolve_backend("moe", "triton", torch.device("cpu"), ("triton", "reference")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        B.resolve_backend("moe", "triton", torch.device("cpu"), ("triton", "reference"))


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("ONEREC_FAST_BACKEND_MOE", "reference")
    assert B.resolve_backend("moe", "auto", torch.device("cpu"), ("triton", "reference")) == "reference"
    monkeypatch.setenv("ONEREC_FAST_BACKEND_MOE", "nonsense")
    with pytest.raises(ValueError, match="ONEREC_FAST_BACKEND"):
        B.resolve_backend("moe", "auto", torch.device("cpu"), ("triton", "reference"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fallback_on_cuda_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(B, "_available_on", lambda b, d: (b == "reference", f"{b} missing"))
    B._warned.discard(("fake_op", "reference"))
    with caplog.at_level(logging.WARNING, logger="onerec_fast"):
        for _ in range(3):
            assert B.resolve_backend("fake_op", "auto", torch.device("cuda"), ("cuda", "reference")) == "reference"
    assert sum("falls back" in r.message for r in caplog.records) == 1


def test_an_input_the_kernel_does_not_take(caplog):
    """Explicit triton raises with the reason; auto falls back to the reference, logged once on CUDA, never on CPU."""
    assert B.triton_unless_unsupported("fake_op", "auto", torch.device("cuda"), None) == "triton"
    with pytest.raises(ValueError, match="fake_op: backend 'triton' supports nothing"):
        B.triton_unless_unsupported("fake_op", "triton", torch.device("cuda"), "supports nothing")
    with caplog.at_level(logging.WARNING, logger="onerec_fast"):
        for device in ("cpu", "cuda", "cuda"):
            assert B.triton_unless_unsupported("fake_op", "auto", torch.device(device), "takes no x") == "reference"
    assert sum("fake_op falls back" in r.message for r in caplog.records) == 1
