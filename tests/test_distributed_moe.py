"""Expert parallelism: ``moe_experts`` against a per-row loop; ``ExpertParallelMoE`` on 2 gloo processes
(CPU) against the single-process ``MoELayer`` on all ranks' tokens (output, gradients of x, router and
each rank's experts, load statistics, the loss-free bias update), edge cases and bad input."""

from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from onerec_fast.backends import backends, triton_interpret
from onerec_fast.distributed import ExpertParallelMoE, shard_experts
from onerec_fast.modules import MoELayer
from onerec_fast.ops.moe import moe_experts
from tests.helpers import rel_err, tol
from tests.test_moe import make_inputs

WORLD = 2
HAS_INTERPRETER = triton_interpret() and backends()["triton"].available  # Triton kernels on CPU tensors
needs_interpreter = pytest.mark.skipif(not HAS_INTERPRETER, reason="Triton kernels on CPU tensors need the interpreter")


# --------------------------------------------------------------------------------------------------
# moe_experts (single process)


def _grouped(N, E, seed, empty=()):
    """Random expert per row (none for the experts in ``empty``): (sorted_idx, offsets, row expert)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    row_expert = allowed[torch.randint(0, len(allowed), (N,), generator=g)]
    sorted_idx = torch.sort(row_expert, stable=True).indices.to(torch.int32)
    counts = torch.bincount(row_expert, minlength=E)
    return sorted_idx, F.pad(counts.cumsum(0), (1, 0)).to(torch.int32), row_expert


def _per_row(x, row_expert, w1, w3, w2):
    return torch.stack([(F.silu(x[r] @ w1[e]) * (x[r] @ w3[e])) @ w2[e] for r, e in enumerate(row_expert.tolist())])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("N,E,empty", [(13, 4, (2,)), (1, 3, (0, 2)), (40, 5, ())])
def test_moe_experts_matches_per_row_loop(backend, N, E, empty):
    dtype = torch.float64 if backend == "reference" else torch.float32
    x, _, w1, w3, w2 = make_inputs(N, 32, 40, E, "cpu", dtype, seed=N)
    sorted_idx, offsets, row_expert = _grouped(N, E, seed=E, empty=empty)
    out = moe_experts(x, sorted_idx, offsets, w1, w3, w2, backend=backend)
    want = _per_row(x.double(), row_expert, w1.double(), w3.double(), w2.double())
    bound = 1e-12 if dtype == torch.float64 else tol(dtype, "cpu")
    assert rel_err(out, want) <= bound
    gy = torch.randn(out.shape, dtype=dtype)
    got = torch.autograd.grad((out * gy).sum(), (x, w1, w3, w2))
    ref = torch.autograd.grad((want * gy.double()).sum(), (x, w1, w3, w2))
    for name, a, b in zip(("x", "w1", "w3", "w2"), got, ref):
        assert rel_err(a, b) <= bound, name
    for e in empty:  # an expert without rows gets a zero gradient
        assert got[1][e].abs().sum() == 0 and got[3][e].abs().sum() == 0


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_moe_experts_zero_rows(backend):
    x, _, w1, w3, w2 = make_inputs(0, 16, 16, 3, "cpu", torch.float32)
    out = moe_experts(x, torch.zeros(0, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), w1, w3, w2,
                      backend=backend)
    assert out.shape == (0, 16)
    for g in torch.autograd.grad(out.sum(), (w1, w3, w2)):
        assert g.shape[0] == 3 and g.abs().sum() == 0


def test_moe_experts_bad_input_raises():
    x, _, w1, w3, w2 = make_inputs(5, 8, 6, 3, "cpu", torch.float32, requires_grad=False)
    idx, off, _ = _grouped(5, 3, seed=0)
    with pytest.raises(TypeError, match="sorted_idx must have dtype"):
        moe_experts(x, idx.long(), off, w1, w3, w2)
    with pytest.raises(ValueError, match=r"sorted_idx must have shape \(5,\)"):
        moe_experts(x, idx[:4], off, w1, w3, w2)
    with pytest.raises(ValueError, match=r"expert_offsets must have shape \(4,\)"):
        moe_experts(x, idx, off[:3], w1, w3, w2)
    with pytest.raises(ValueError, match="w2 must have shape"):
        moe_experts(x, idx, off, w1, w3, w2[:, :5])
    with pytest.raises(ValueError, match=r"expert_offsets\[-1\] must equal"):
        moe_experts(x, idx, torch.tensor([0, 1, 2, 4], dtype=torch.int32), w1, w3, w2, backend="reference")
    with pytest.raises(ValueError, match="sorted_idx must be a permutation"):
        moe_experts(x, torch.zeros(5, dtype=torch.int32), off, w1, w3, w2, backend="reference")


# --------------------------------------------------------------------------------------------------
# ExpertParallelMoE on 2 gloo processes


def _worker(rank, pg_backend, fn, store, args):
    if pg_backend == "nccl":
        os.environ["NCCL_NVLS_ENABLE"] = "0"  # no NVLink multicast on the shared GPU machines
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # two processes on a 2-core CI machine
    dist.init_process_group(pg_backend, init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, pg_backend, fn, *args):
    """Run ``fn(rank, *args)`` on WORLD processes of a ``pg_backend`` group ("gloo": CPU, "nccl": one GPU
    each); an assertion failing in one fails the test."""
    mp.spawn(_worker, args=(pg_backend, fn, str(tmp_path / "store"), args), nprocs=WORLD, join=True)


# (E, k, router, norm_topk, tokens per rank, expert E-1 gets no token, 3-D input)
CASES = [
    (4, 2, "softmax", True, (7, 5), False, False),
    (6, 1, "sigmoid", True, (1, 9), True, False),  # T = 1 on rank 0
    (4, 1, "softmax", False, (6, 6), True, True),
    (6, 2, "sigmoid", False, (0, 5), False, True),  # no token on rank 0
    (2, 2, "softmax", True, (4, 3), False, False),  # one expert per rank: every token visits both ranks
]


def _full_layer(case, d, f, seed, device):
    """The single-process layer of a case, loaded with quantised weights (exact fp32 router logits, so the
    selection cannot depend on the batch) and the tokens of all ranks ``[sum(T), d]``."""
    E, k, router, norm, Ts, empty, _ = case
    x, rw, w1, w3, w2 = make_inputs(sum(Ts), d, f, E, "cpu", torch.float32, seed=seed, requires_grad=False)
    if empty:  # x[:, 0] = 1 and a very negative router weight there: expert E-1 never makes the top k < E
        x[:, 0] = 1.0
        rw[E - 1, 0] = -16.0
    layer = MoELayer(d, f, E, k, router=router, norm_topk=norm, backend="reference")
    with torch.no_grad():
        for p, v in ((layer.router.weight, rw), (layer.w1, w1), (layer.w3, w3), (layer.w2, w2)):
            p.copy_(v)
        if router == "sigmoid":
            layer.expert_bias.copy_(torch.randint(-4, 5, (E,), generator=torch.Generator().manual_seed(seed)) / 64)
    return layer.to(device), x.to(device)


def _check_matches_single_process(rank, backend, cases, d, f):
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    # fp32: 1e-5 on CPU (only the summation order differs), tf32-class on GPUs (Triton's fp32 dot)
    bound = tol(torch.float32, device)
    for i, case in enumerate(cases):
        E, k, _, _, Ts, empty, three_d = case
        full, x_all = _full_layer(case, d, f, i, device)
        ep = shard_experts(full)
        ep.backend = backend  # the single-process reference stays the ground truth
        lo, hi = sum(Ts[:rank]), sum(Ts[: rank + 1])
        gy_all = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(100 + i)).to(device)
        calls = []
        ep.comm_timer = lambda: calls.append(1) or contextlib.nullcontext()
        x = x_all[lo:hi].clone().view((1, hi - lo, d) if three_d else (hi - lo, d)).requires_grad_()
        out = ep(x)
        (out * gy_all[lo:hi].view(x.shape)).sum().backward()
        x_full = x_all.clone().requires_grad_()
        out_full = full(x_full)
        (out_full * gy_all).sum().backward()

        where = f"case {case} rank {rank}"
        assert out.shape == x.shape, where
        assert calls == [1] * 4, where  # two all-to-alls forward, two backward
        assert rel_err(out.view(-1, d), out_full[lo:hi]) <= bound, where
        assert rel_err(x.grad.view(-1, d), x_full.grad[lo:hi]) <= bound, where
        # absolute near zero: with k=1 and norm_topk the gate is 1 and the router gradient vanishes
        g_router, want_router = ep.router.weight.grad, full.router.weight.grad
        assert (g_router - want_router).norm() <= bound * max(want_router.norm().item(), 1.0), where
        e = ep.local_experts
        for name in ("w1", "w3", "w2"):
            got, want = getattr(ep, name).grad, getattr(full, name).grad[e.start:e.stop]
            assert rel_err(got, want) <= bound, f"{where} {name}"
        if empty and rank == WORLD - 1:  # the last expert got no token from any rank: zero gradients
            assert ep.w1.grad[-1].abs().sum() == 0 and ep.w2.grad[-1].abs().sum() == 0
        counts = ep.last_stats.tokens_per_expert.clone()
        assert counts.sum() == (hi - lo) * k, where
        dist.all_reduce(counts)
        assert torch.equal(counts, full.last_stats.tokens_per_expert), where
        if i == 0:  # repeatable: a second forward gives the same bits
            with torch.no_grad():
                assert torch.equal(ep(x), out), where


def _check_bias_update_and_errors(rank):
    E, d, rate = 6, 16, 0.125
    torch.manual_seed(0)  # the same full layer on every rank
    full = MoELayer(d, 24, E, 2, router="sigmoid", backend="reference")
    ep = shard_experts(full)
    assert ep.training and ep.w1.shape == (E // WORLD, d, 24) and ep.local_experts == range(3 * rank, 3 * rank + 3)
    g = torch.Generator().manual_seed(7)
    local_load = torch.zeros(E, dtype=torch.int64)
    for step in range(3):
        xs = [torch.randn(5 + step, d, generator=g) for _ in range(WORLD)]
        xs[0][:, :4] += 3.0  # rank 0's tokens lean to some experts: its own load differs from the total
        with torch.no_grad():
            ep(xs[rank])
            full(torch.cat(xs))
        local_load += ep.last_stats.tokens_per_expert
    ep.update_expert_bias(rate)
    full.update_expert_bias(rate)
    assert torch.equal(ep.expert_bias, full.expert_bias)
    biases = [torch.empty(E) for _ in range(WORLD)]
    dist.all_gather(biases, ep.expert_bias)
    assert all(torch.equal(b, biases[0]) for b in biases)
    local_only = rate * torch.sign(local_load.float().mean() - local_load.float())
    assert not torch.equal(local_only, full.expert_bias), "the data must make a local-only update wrong"
    assert ep.load_since_update.sum() == 0

    # the Mixtral-layout loader keeps this rank's experts too
    mixtral = {"gate.weight": full.router.weight.detach()}
    for i in range(E):
        for n, w in (("w1", full.w1), ("w3", full.w3), ("w2", full.w2)):
            mixtral[f"experts.{i}.{n}.weight"] = w[i].detach().t()
    loaded = ExpertParallelMoE(d, 24, E, 2, router="sigmoid").load_mixtral_state_dict(mixtral)
    for n in ("w1", "w3", "w2"):
        assert torch.equal(getattr(loaded, n), getattr(full, n)[3 * rank : 3 * rank + 3]), n
    assert torch.equal(loaded.router.weight, full.router.weight)

    with pytest.raises(ValueError, match="num_experts must be a multiple of the expert-parallel group size 2"):
        ExpertParallelMoE(8, 8, 5, 2)
    with pytest.raises(TypeError, match="layer must be a"):
        shard_experts(ep)
    sd = full.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['w2'\] must have shape"):
        ep.load_full_state_dict({**sd, "w2": sd["w2"][:3]})
    with pytest.raises(KeyError, match="lacks"):
        ep.load_full_state_dict({k: v for k, v in sd.items() if k != "w1"})
    with pytest.raises(KeyError, match="unexpected"):
        ep.load_full_state_dict({**sd, "extra": sd["w1"]})


def _check_on_cpu(rank, with_kernels):
    _check_matches_single_process(rank, "reference", CASES, 24, 20)
    _check_bias_update_and_errors(rank)
    if with_kernels:  # the local experts and the routing on the Triton kernels (interpreter), as on a GPU
        _check_matches_single_process(rank, "triton", CASES[:2], 32, 32)


def test_expert_parallel_on_gloo_matches_single_process(tmp_path):
    # one pair of processes for everything: starting them (importing torch) costs seconds
    _spawn(tmp_path, "gloo", _check_on_cpu, HAS_INTERPRETER)


@pytest.mark.skipif(torch.cuda.device_count() < WORLD or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_expert_parallel_nccl_matches_single_process(tmp_path):
    # auto backend: the Triton GEMMs (and the CUDA routing where the extension is built)
    _spawn(tmp_path, "nccl", _check_matches_single_process, "auto", CASES, 64, 96)


def test_expert_parallel_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(8, 8, 4, 2)
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        ExpertParallelMoE(8, 8, 4, 2, group="ep")
