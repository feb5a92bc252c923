"""RMSNorm: the Triton kernels against the float64 reference (output, dx, dw) over shapes, dtypes and output
dtypes; non-finite inputs against the reference's policy; the custom ops (opcheck); the module as a drop-in
``nn.RMSNorm``; bad input."""

import pytest
import torch
from torch import nn

from onerec_fast.modules import RMSNorm
from onerec_fast.ops.rms_norm import rms_norm, rms_norm_ref
from tests.helpers import TRITON_DEVICES, rel_err, skip_unless_runs, tol

DTYPES = {"cpu": [torch.float32, torch.float16], "cuda": [torch.float32, torch.float16, torch.bfloat16]}
# (leading shape, d): one row, a row count no block divides, a 3-D input, width 1, non-power-of-two widths, the
# 0.015b model's 256 users x 199 slots at d = 160 (GPU only: the interpreter is slow), empty.
SHAPES = [((1,), 8), ((37,), 160), ((5, 3), 1000), ((9,), 1), ((70,), 96), ((0,), 64)]
GPU_SHAPES = [((256, 199), 160), ((4096,), 4096), ((3,), 16384)]


def _cases(device: str):
    return SHAPES + (GPU_SHAPES if device == "cuda" else [])


@pytest.mark.parametrize("device", TRITON_DEVICES or ["cpu"])
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no_weight"])
def test_forward_and_gradients_match_the_float64_reference(device, affine):
    skip_unless_runs("triton", device)
    gen = torch.Generator().manual_seed(0)
    for dtype in DTYPES[device]:
        for lead, d in _cases(device):
            for out_dtype in (None, torch.bfloat16 if device == "cuda" else torch.float16):
                x64 = (torch.randn(*lead, d, generator=gen, dtype=torch.float64) * 3).requires_grad_()
                w64 = (1 + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)).requires_grad_() if affine \
                    else None
                x = x64.detach().to(device, dtype).requires_grad_()
                w = w64.detach().to(device, torch.float32).requires_grad_() if affine else None
                where = f"{dtype} {lead} d={d} out={out_dtype}"
                y = rms_norm(x, w, 1e-6, out_dtype=out_dtype, backend="triton")
                assert y.dtype == (out_dtype or dtype) and y.shape == x.shape, where
                # the reference sees the inputs as rounded to dtype
                xr = x64.detach().to(dtype).double().requires_grad_()
                ref = rms_norm_ref(xr, w64, 1e-6)
                bound = max(tol(dtype, device), tol(y.dtype, device))
                assert rel_err(y, ref) <= bound, where
                if x.numel() == 0:
                    continue
                dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
                (y.double() * dy.to(device)).sum().backward()
                grads = torch.autograd.grad((ref * dy).sum(), [xr] + ([w64] if affine else []))
                assert x.grad.dtype == dtype, where
                if d > 1:  # at d = 1, y = sign(x) * w: dx is rounding alone, no relative error applies
                    assert rel_err(x.grad, grads[0]) <= bound, where
                if affine:
                    assert w.grad.dtype == torch.float32 and rel_err(w.grad, grads[1]) <= bound, where


@pytest.mark.parametrize("device", TRITON_DEVICES or ["cpu"])
def test_empty_rows_give_a_zero_weight_gradient(device):
    skip_unless_runs("triton", device)
    x = torch.empty(0, 12, device=device, requires_grad=True)
    w = torch.ones(12, device=device, requires_grad=True)
    rms_norm(x, w, backend="triton").sum().backward()
    assert x.grad.shape == (0, 12) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device", TRITON_DEVICES or ["cpu"])
def test_strided_inputs(device):
    """A transposed input and a strided weight view give the reference's output and gradients."""
    skip_unless_runs("triton", device)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(24, 10, generator=gen).to(device)
    wbase = torch.randn(20, generator=gen).to(device)
    grads = []
    for fn in (rms_norm_ref, lambda *a, **k: rms_norm(*a, **k, backend="triton")):
        x = base.t().clone().t().requires_grad_()  # [24, 10] with strides (1, 24)
        wb = wbase.clone().requires_grad_()
        y = fn(x, wb[::2], 1e-6)
        (y * torch.arange(y.numel(), device=device).view_as(y).sin()).sum().backward()
        grads.append((y.detach(), x.grad, wb.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES or ["cpu"])
def test_weight_gradient_is_deterministic(device):
    """The weight gradient is summed from per-program partials in a fixed order: bitwise equal runs."""
    skip_unless_runs("triton", device)
    x = torch.randn(300, 48, device=device, requires_grad=True)
    w = torch.randn(48, device=device, requires_grad=True)
    dy = torch.randn(300, 48, device=device)
    grads = []
    for _ in range(2):
        w.grad = None
        (rms_norm(x, w, backend="triton") * dy).sum().backward()
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("device", TRITON_DEVICES or ["cpu"])
def test_non_finite_rows_follow_the_reference(device):
    """Policy (ops/rms_norm.py): no special case. A NaN row is NaN; an Inf row has rstd 0 (NaN where x is Inf,
    0 elsewhere); a row whose square overflows fp32 normalizes to 0 like the fp32 reference; other rows are
    untouched, and very negative values are just values."""
    skip_unless_runs("triton", device)
    x = torch.randn(6, 32, device=device)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2] = 1e25
    x[3] = -1e-30
    x[4] = -3e4
    w = torch.randn(32, device=device)
    y = rms_norm(x, w, 1e-6, backend="triton")
    ref = rms_norm_ref(x, w, 1e-6)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.isnan(y[0]).all() and torch.isnan(y[1, 5]) and not y[1, :5].any()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(y[fin], ref[fin], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(y[3:]).all()


@pytest.mark.parametrize("device", TRITON_DEVICES or ["cpu"])
def test_custom_ops_pass_opcheck(device):
    skip_unless_runs("triton", device)
    x = torch.randn(7, 24, device=device, requires_grad=True)
    w = torch.randn(24, device=device, requires_grad=True)
    for weight in (w, None):
        torch.library.opcheck(torch.ops.onerec_fast.rms_norm_fwd.default, (x, weight, 1e-6, torch.float32),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    y, rstd = torch.ops.onerec_fast.rms_norm_fwd(x.detach(), w.detach(), 1e-6, torch.float32)
    torch.library.opcheck(torch.ops.onerec_fast.rms_norm_bwd.default, (torch.randn_like(y), x.detach(), w.detach(),
                                                                      rstd), test_utils=("test_schema",
                                                                                         "test_faketensor"))


def test_module_is_a_drop_in_nn_rmsnorm():
    """Same parameter and state dict as ``nn.RMSNorm``; equal outputs (the CPU takes the reference, which is
    ``F.rms_norm``); under CPU bf16 autocast the output is bf16."""
    torch.manual_seed(0)
    ours, theirs = RMSNorm(40, eps=1e-5), nn.RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, nn.RMSNorm) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(3, 5, 40)
    assert torch.equal(ours(x), theirs(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, theirs(x).bfloat16())
    assert "backend='auto'" in repr(ours)
    with pytest.raises(ValueError, match="one dimension"):
        RMSNorm((4, 5))


def test_float64_runs_the_reference_and_triton_refuses_it():
    x = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(rms_norm(x, eps=1e-6), rms_norm_ref(x, eps=1e-6))
    if "cpu" in TRITON_DEVICES:
        with pytest.raises(ValueError, match="backend 'triton' supports dtypes"):
            rms_norm(x, backend="triton")


def test_bad_input_names_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have size 8 \(the last dimension d"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="x must have dtype"):
        rms_norm(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-empty last dimension"):
        rms_norm(torch.randn(4, 0))
    with pytest.raises(TypeError, match="out_dtype must be a float dtype"):
        rms_norm(x, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rms_norm(x, eps=-1.0)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        rms_norm(x, [1.0] * 8)


@pytest.mark.parametrize("device", TRITON_DEVICES or ["cpu"])
def test_module_compiles_without_graph_breaks(device):
    """``torch.compile(fullgraph=True)`` traces the module through the custom op (fake + autograd registered)."""
    skip_unless_runs("triton", device)
    torch.manual_seed(0)
    m = RMSNorm(16, backend="triton").to(device)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    torch.testing.assert_close(y, m(x))
    assert x.grad.shape == x.shape and m.weight.grad.shape == (16,)
