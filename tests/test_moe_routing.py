"""MoE top-k routing: the reference against a per-token loop, the kernels (triton; cuda on GPU) against
the reference, the routing gradient, edge cases and bad input."""

import pytest
import torch

from onerec_fast.backends import cuda_extension
from onerec_fast.kernels.moe_routing import moe_route_fwd as triton_route_fwd
from onerec_fast.ops.moe_routing import moe_aux_loss, moe_route, moe_route_bwd, moe_route_ref, moe_z_loss
from tests.helpers import DEVICES, HAS_CUDA, TRITON_DEVICES, poison_, rel_err, requires_cuda, skip_unless_runs

KERNEL_BACKENDS = ["triton"] + (["cuda"] if HAS_CUDA and hasattr(cuda_extension(), "moe_route_fwd") else [])

# (T, E, k, router, norm_topk); the CPU runs the Triton interpreter, so it takes the first few only.
CASES = [
    (5, 1, 1, "sigmoid", True),
    (7, 5, 2, "softmax", True),
    (1, 64, 6, "sigmoid", True),
    (45, 24, 4, "sigmoid", False),
    (30, 256, 8, "softmax", False),
    (333, 24, 1, "softmax", True),
    (333, 64, 6, "sigmoid", True),
    (4096, 24, 2, "softmax", True),
    (4096, 256, 8, "sigmoid", True),
    (4096, 5, 4, "softmax", False),
]
CPU_CASES = 5


def _cases(device):
    return CASES[:CPU_CASES] if device == "cpu" else CASES


def _logits(T, E, device, ties=False, seed=0):
    """Logits on a 1/64 grid (exact in fp16/bf16 for |x| < 4): distinct values differ enough that no
    exp/sigmoid rounding (fast-math included) can reorder them, equal ones tie exactly everywhere.
    ``ties``: a 1/2 grid, many exact ties per row."""
    g = torch.Generator().manual_seed(seed)
    step = 2 if ties else 64
    return ((torch.randn(T, E, generator=g) * step).round() / step).clamp(-3.9, 3.9).to(device)


def _bias(E, device):
    """Selection bias of 0 or 2 per expert: it reorders whole groups of experts, and no biased score
    can near-tie another (sigmoid scores differ by less than 1)."""
    return (torch.randint(0, 2, (E,), generator=torch.Generator().manual_seed(E)) * 2.0).to(device)


def naive_route(logits, top_k, router, norm_topk, bias):
    """Per-token Python loop: the routing contract written out directly."""
    T, E = logits.shape
    lf = logits.double()
    ids, weights = [], []
    for t in range(T):
        if router == "softmax":
            s = torch.softmax(lf[t], 0)
            sel = s
        else:
            s = torch.sigmoid(lf[t])
            sel = s + (bias.double() if bias is not None else 0)
        order = sorted(range(E), key=lambda e: (-float(sel[e]), e))[:top_k]
        w = torch.stack([s[e] for e in order])
        ids.append(order)
        weights.append(w / w.sum() if norm_topk else w)
    pairs = [(e, t * top_k + j) for t in range(T) for j, e in enumerate(ids[t])]
    counts = [sum(1 for e, _ in pairs if e == i) for i in range(E)]
    return ids, torch.stack(weights) if T else torch.zeros(0, top_k), counts, [p for _, p in sorted(pairs)]


@pytest.mark.parametrize("T,E,k,router,norm", [(9, 5, 2, "softmax", True), (6, 7, 3, "sigmoid", False),
                                               (1, 5, 5, "softmax", False), (0, 4, 2, "softmax", True),
                                               (12, 24, 6, "sigmoid", True)])
@pytest.mark.parametrize("ties", [False, True])
def test_route_ref_matches_per_token_loop(T, E, k, router, norm, ties):
    logits = _logits(T, E, "cpu", ties=ties, seed=T + E)
    bias = torch.randn(E) * 0.3 if router == "sigmoid" else None
    r = moe_route_ref(logits, k, router, norm, bias)
    ids, weights, counts, order = naive_route(logits, k, router, norm, bias)
    assert r.topk_ids.dtype == torch.int32 and r.topk_ids.tolist() == ids
    assert rel_err(r.topk_weights, weights) < 1e-6
    assert r.expert_counts.tolist() == counts
    assert r.expert_offsets.tolist() == [0] + torch.tensor(counts).cumsum(0).tolist()
    assert r.sorted_pair_idx.tolist() == order
    scores = torch.softmax(logits.double(), -1) if router == "softmax" else torch.sigmoid(logits.double())
    assert rel_err(r.prob_sum, (scores / scores.sum(-1, keepdim=True)).sum(0)) < 1e-6
    assert abs(r.lse_sq_sum.item() - torch.logsumexp(logits.double(), -1).square().sum().item()) < 1e-4 * (1 + T)


def _run_kernel_poisoned(backend, logits, k, router, norm, bias):
    """Call the kernel's launcher directly on NaN/sentinel-filled outputs, so unwritten slots show."""
    T, E = logits.shape
    dev = logits.device
    outs = [torch.empty(T, k, dtype=torch.int32, device=dev), torch.empty(T, k, device=dev),
            torch.empty(E, dtype=torch.int32, device=dev), torch.empty(E + 1, dtype=torch.int32, device=dev),
            torch.empty(T * k, dtype=torch.int32, device=dev), torch.empty(E, device=dev), torch.empty(1, device=dev)]
    for o in outs:
        poison_(o)
    sigmoid = router == "sigmoid"
    b = bias if sigmoid else torch.empty(0, device=dev)
    fwd = triton_route_fwd if backend == "triton" else cuda_extension().moe_route_fwd
    fwd(logits.contiguous(), b, k, sigmoid, norm, *outs)
    return outs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_route_kernel_matches_ref(device, backend, case):
    if case >= len(_cases(device)):
        pytest.skip("large routing case: CUDA only")
    skip_unless_runs(backend, device)
    T, E, k, router, norm = CASES[case]
    logits = _logits(T, E, device, ties=case % 2 == 1, seed=case)
    bias = _bias(E, device) if router == "sigmoid" else None
    ref = moe_route_ref(logits, k, router, norm, bias)
    outs = _run_kernel_poisoned(backend, logits, k, router, norm, bias)
    ids, w, counts, offsets, order, prob_sum, lse = outs
    assert torch.equal(ids.cpu(), ref.topk_ids.cpu())
    assert torch.equal(counts.cpu(), ref.expert_counts.cpu())
    assert torch.equal(offsets.cpu(), ref.expert_offsets.cpu())
    assert torch.equal(order.cpu(), ref.sorted_pair_idx.cpu())
    assert rel_err(w, ref.topk_weights) < 1e-5
    assert rel_err(prob_sum, ref.prob_sum) < 1e-5
    assert rel_err(lse, ref.lse_sq_sum) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_route_kernel_half_logits_and_all_to_one_expert(device, backend):
    skip_unless_runs(backend, device)
    T, E, k = 37, 6, 2
    logits = _logits(T, E, device, seed=3)
    logits[:, 4] += 8  # every token's first choice is expert 4
    for dtype in (torch.float16,) + ((torch.bfloat16,) if device == "cuda" else ()):
        lh = logits.to(dtype)
        r = moe_route(lh, k, backend=backend)
        ref = moe_route_ref(lh, k)
        assert (r.topk_ids[:, 0] == 4).all() and r.expert_counts[4].item() == T
        assert torch.equal(r.sorted_pair_idx, ref.sorted_pair_idx)
        assert rel_err(r.topk_weights, ref.topk_weights) < 1e-5


ROUTERS = [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)]


def _gradient_problem(device, router, norm):
    """Logits [11, 6] routed to k=3, the output gradients (of topk_weights [11, 3], prob_sum [6],
    lse_sq_sum [1]) and the float64 autograd gradient of the reference w.r.t. the logits."""
    T, E, k = 11, 6, 3
    logits = _logits(T, E, device, seed=7)
    bias = (torch.randn(E) * 0.3).to(device) if router == "sigmoid" else None
    g = torch.Generator().manual_seed(1)
    grads = (torch.randn(T, k, generator=g).to(device), torch.randn(E, generator=g).to(device),
             torch.randn(1, generator=g).to(device))
    l64 = logits.double().requires_grad_()
    ref = moe_route_ref(l64, k, router, norm, bias)
    (want,) = torch.autograd.grad(_routing_loss(ref, grads), l64)
    return logits, k, bias, grads, ref, want


def _routing_loss(r, grads):
    gw, gp, gl = grads
    return (r.topk_weights * gw).sum() + (r.prob_sum * gp).sum() + (r.lse_sq_sum * gl).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("router,norm", ROUTERS)
def test_route_bwd_matches_autograd_of_ref(device, router, norm):
    """The plain-PyTorch backward the kernels' custom op registers, given the reference's selection."""
    logits, k, bias, grads, ref, want = _gradient_problem(device, router, norm)
    got = moe_route_bwd(logits, ref.topk_ids, ref.topk_weights.float().detach(), router == "sigmoid", norm, *grads)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("router,norm", ROUTERS)
def test_route_gradient_matches_autograd_of_ref(device, backend, router, norm):
    """Through the custom op's registered autograd, with the kernel's forward."""
    skip_unless_runs(backend, device)
    logits, k, bias, grads, _, want = _gradient_problem(device, router, norm)
    lt = logits.clone().requires_grad_()
    (got,) = torch.autograd.grad(_routing_loss(moe_route(lt, k, router, norm, bias, backend=backend), grads), lt)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_route_zero_tokens_and_losses(device, backend):
    skip_unless_runs(backend, device)
    r = moe_route(torch.empty(0, 5, device=device), 2, backend=backend)
    assert r.topk_ids.shape == (0, 2) and r.sorted_pair_idx.shape == (0,)
    assert r.expert_counts.tolist() == [0] * 5 and r.expert_offsets.tolist() == [0] * 6
    assert moe_aux_loss(r, 0, 2).item() == 0 and moe_z_loss(r, 0).item() == 0
    # Losses against their definitions.
    logits = _logits(9, 5, device, seed=2)
    r = moe_route(logits, 2, backend=backend)
    p = torch.softmax(logits.double(), -1)
    frac = r.expert_counts.double() / 18
    assert abs(moe_aux_loss(r, 9, 2).item() - (5 * (frac * p.mean(0)).sum()).item()) < 1e-5
    assert abs(moe_z_loss(r, 9).item() - torch.logsumexp(logits.double(), -1).square().mean().item()) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_route_kernel_is_deterministic(device, backend):
    skip_unless_runs(backend, device)
    T = 40 if device == "cpu" else 8192
    logits = _logits(T, 24, device, seed=5)
    a = moe_route(logits, 4, "sigmoid", backend=backend, expert_bias=torch.zeros(24, device=device))
    b = moe_route(logits, 4, "sigmoid", backend=backend, expert_bias=torch.zeros(24, device=device))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_route_bad_input_raises():
    logits = torch.randn(4, 5)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, 6)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(torch.randn(4, 16), 9)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, 0)
    with pytest.raises(ValueError, match="logits must have 2 dimensions"):
        moe_route(torch.randn(4), 1)
    with pytest.raises(ValueError, match="experts"):
        moe_route(torch.randn(2, 257), 2)
    with pytest.raises(TypeError, match="logits must have dtype"):
        moe_route(logits.int(), 2)
    with pytest.raises(ValueError, match="router"):
        moe_route(logits, 2, router="relu")
    with pytest.raises(ValueError, match="expert_bias"):
        moe_route(logits, 2, "sigmoid", expert_bias=torch.zeros(4))
    with pytest.raises(TypeError, match="expert_bias"):
        moe_route(logits, 2, "sigmoid", expert_bias=torch.zeros(5, dtype=torch.float64))
    for device in TRITON_DEVICES:  # the kernels take fp32/bf16/fp16 logits only (the reference also float64)
        with pytest.raises(TypeError, match="logits must have dtype"):
            moe_route(logits.to(device, torch.float64), 2, backend="triton")


@requires_cuda
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_route_cuda_graph_capture(backend):
    logits = _logits(4096, 24, "cuda", seed=9)
    ref = moe_route(logits, 2, backend=backend)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        moe_route(logits, 2, backend=backend)  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_route(logits, 2, backend=backend)
    logits.copy_(_logits(4096, 24, "cuda", seed=10))
    graph.replay()
    torch.cuda.synchronize()
    want = moe_route_ref(logits, 2)
    assert torch.equal(out.sorted_pair_idx, want.sorted_pair_idx)
    assert not torch.equal(out.sorted_pair_idx, ref.sorted_pair_idx)
