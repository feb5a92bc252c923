"""MoE FFN: the reference against a per-token loop, the kernel backends against the float64 reference
(output and every gradient), edge cases, determinism, MoELayer (losses, bias update, loaders,
torch.compile, CUDA graphs) and bad input."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

from onerec_fast.backends import resolve_backend
from onerec_fast.modules import MoEAuxLoss, MoELayer
from onerec_fast.ops.moe import moe_backends, moe_ffn, moe_ffn_ref
from onerec_fast.ops.moe_routing import moe_aux_loss, moe_z_loss
from tests.helpers import DEVICES, TOL, TRITON_DEVICES, rel_err, requires_cuda, skip_unless_runs, tol

KERNEL_BACKENDS = [b for b in moe_backends() if b != "reference"]
DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16, torch.float16, torch.float32]}

# (T, d, f, E, k, router, norm_topk). The CPU (Triton interpreter) runs CPU_CASES; CUDA runs all.
CASES = [
    (7, 40, 72, 5, 2, "softmax", True),  # d, f not multiples of the tiles: masked paths
    (1, 32, 32, 5, 4, "sigmoid", False),
    (7, 32, 32, 24, 1, "softmax", True),  # most experts get no token
    (20, 64, 32, 8, 6, "sigmoid", True),
    (333, 128, 96, 24, 2, "softmax", True),
    (333, 64, 128, 64, 6, "sigmoid", True),
    (4096, 256, 512, 24, 2, "softmax", True),
    (4096, 128, 256, 64, 6, "sigmoid", False),
    (4096, 192, 320, 5, 4, "softmax", False),
    (1, 256, 256, 64, 1, "softmax", True),
]
CPU_CASES = 4


def make_inputs(T, d, f, E, device, dtype, seed=0, requires_grad=True):
    """Quantised x and router weight: the fp32 router logits are exact in every backend, so expert
    selection cannot flip between the kernels and the float64 reference on near-ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, (T, d), generator=g) / 4
    rw = torch.randint(-8, 9, (E, d), generator=g) / 64
    w1 = torch.randn(E, d, f, generator=g) / d**0.5
    w3 = torch.randn(E, d, f, generator=g) / d**0.5
    w2 = torch.randn(E, f, d, generator=g) / f**0.5
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in (x, rw, w1, w3, w2)]


def naive_moe(x, rw, w1, w3, w2, k, router, norm, bias):
    """Per-token loop: route each token, run its k experts one by one, sum with the gate weights."""
    rows = []
    for t in range(x.shape[0]):
        logit = rw @ x[t]
        s = torch.softmax(logit, 0) if router == "softmax" else torch.sigmoid(logit)
        sel = s if bias is None else s + bias.to(s.dtype)
        top = sorted(range(rw.shape[0]), key=lambda e: (-float(sel[e].detach()), e))[:k]
        gates = torch.stack([s[e] for e in top])
        if norm:
            gates = gates / gates.sum()
        y = 0
        for gw, e in zip(gates, top):
            y = y + gw * ((F.silu(x[t] @ w1[e]) * (x[t] @ w3[e])) @ w2[e])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("T,E,k,router,norm", [(6, 5, 2, "softmax", True), (5, 7, 3, "sigmoid", False),
                                               (3, 4, 4, "softmax", False), (4, 6, 1, "sigmoid", True)])
def test_moe_ffn_ref_matches_per_token_loop(T, E, k, router, norm):
    inputs = make_inputs(T, 12, 10, E, "cpu", torch.float64, seed=E)
    bias = torch.randn(E) * 0.1 if router == "sigmoid" else None
    out, routing = moe_ffn_ref(*inputs, k, router, norm, bias)
    want = naive_moe(*inputs, k, router, norm, bias)
    assert rel_err(out, want) < 1e-12
    gy = torch.randn_like(out)
    got_g = torch.autograd.grad((out * gy).sum(), inputs)
    want_g = torch.autograd.grad((want * gy).sum(), inputs)
    for name, a, b in zip(("x", "router", "w1", "w3", "w2"), got_g, want_g):
        # absolute near zero: with k=1 and norm_topk the gate is 1 and the router gradient vanishes
        assert (a - b).norm() <= 1e-12 * max(b.norm().item(), 1.0), name


def _check_against_ref(device, backend, dtype, T, d, f, E, k, router, norm, seed=0, recompute=False):
    inputs = make_inputs(T, d, f, E, device, dtype, seed=seed)
    bias = (torch.randint(0, 2, (E,)) * 2.0).to(device) if router == "sigmoid" else None  # steers whole experts
    out, routing = moe_ffn(*inputs, k, router=router, norm_topk=norm, expert_bias=bias, backend=backend,
                           recompute=recompute)
    assert out.dtype == dtype and out.shape == (T, d)
    g = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(T, d, generator=g).to(device)
    c_aux, c_z = 0.3, 0.05
    loss = (out.float() * gy).sum() + c_aux * moe_aux_loss(routing, T, k) + c_z * moe_z_loss(routing, T)
    grads = torch.autograd.grad(loss, inputs)

    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_routing = moe_ffn_ref(*ref_in, k, router, norm, bias)
    ref_loss = (ref_out * gy.double()).sum() + c_aux * moe_aux_loss(ref_routing, T, k) \
        + c_z * moe_z_loss(ref_routing, T)
    ref_grads = torch.autograd.grad(ref_loss, ref_in)

    assert torch.equal(routing.topk_ids.cpu(), ref_routing.topk_ids.cpu())
    bound = tol(dtype, device)
    assert rel_err(out, ref_out) <= bound, f"out {rel_err(out, ref_out):.2e}"
    for name, a, b in zip(("x", "router_weight", "w1", "w3", "w2"), grads, ref_grads):
        assert a.dtype == dtype
        # gradients reduce over more terms than the output: allow 2x the output bound
        assert rel_err(a, b) <= 2 * bound, f"grad {name}: {rel_err(a, b):.2e} > {2 * bound:.1e}"


def _skip_unless(device, backend, case=None):
    skip_unless_runs(backend, device)
    if backend not in KERNEL_BACKENDS:
        pytest.skip(f"the MoE op has no {backend} backend here (the extension lacks its routing kernel)")
    if case is not None and device == "cpu" and case >= CPU_CASES:
        pytest.skip("large case: CUDA only")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_moe_kernels_match_ref_output_and_grads(device, backend, case):
    _skip_unless(device, backend, case)
    # fp16 under the interpreter on one case (bf16 is not emulated faithfully there)
    dtypes = DTYPES[device] + ([torch.float16] if device == "cpu" and case == 0 else [])
    for dtype in dtypes:
        _check_against_ref(device, backend, dtype, *CASES[case], seed=case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_moe_all_tokens_to_one_expert_and_recompute(device, backend):
    _skip_unless(device, backend)
    T, d, f, E = (40, 32, 32, 5) if device == "cpu" else (4096, 256, 512, 24)
    x, rw, w1, w3, w2 = make_inputs(T, d, f, E, device, torch.float32, seed=4, requires_grad=False)
    x[:, 0] = 1.0
    rw[:, 0] = 0.0
    rw[3, 0] = 16.0  # expert 3 wins every token
    inputs = [t.requires_grad_() for t in (x, rw, w1, w3, w2)]
    out, routing = moe_ffn(*inputs, 1, backend=backend)
    assert routing.expert_counts.tolist() == [0, 0, 0, T, 0] + [0] * (E - 5)
    ref, _ = moe_ffn_ref(*[t.double() for t in inputs], 1)
    assert rel_err(out, ref) <= tol(torch.float32, device)
    # and the recompute path (no saved activations) gives the same gradients
    grads = torch.autograd.grad(out.sum(), inputs)
    out_r, _ = moe_ffn(*inputs, 1, backend=backend, recompute=True)
    grads_r = torch.autograd.grad(out_r.sum(), inputs)
    for a, b in zip(grads, grads_r):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
def test_moe_zero_tokens(device, backend):
    if backend != "reference":
        _skip_unless(device, backend)
    inputs = make_inputs(0, 16, 16, 5, device, torch.float32)
    out, routing = moe_ffn(*inputs, 2, backend=backend)
    assert out.shape == (0, 16) and routing.expert_counts.sum().item() == 0
    grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
    for g in grads[2:]:
        assert g is not None and g.abs().sum().item() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_moe_repeated_runs_are_bitwise_identical(device, backend):
    _skip_unless(device, backend)
    shape = (20, 32, 32, 6, 3) if device == "cpu" else (4096, 512, 1024, 24, 2)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    inputs = make_inputs(*shape[:4], device, dtype, seed=11)
    results = []
    for _ in range(2):
        out, _ = moe_ffn(*inputs, shape[4], backend=backend)
        results.append([out, *torch.autograd.grad((out.float() ** 2).sum(), inputs)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_moe_bad_input_raises():
    x, rw, w1, w3, w2 = make_inputs(4, 8, 6, 5, "cpu", torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="top_k"):
        moe_ffn(x, rw, w1, w3, w2, 6)
    with pytest.raises(ValueError, match="router_weight must have shape"):
        moe_ffn(x[:, :7], rw, w1, w3, w2, 2)
    with pytest.raises(ValueError, match="w1 must have shape"):
        moe_ffn(x, rw, w1[:, :7], w3, w2, 2)
    with pytest.raises(ValueError, match="w2 must have shape"):
        moe_ffn(x, rw, w1, w3, w2[:4], 2)
    with pytest.raises(ValueError, match="router_weight must have 2 dimensions"):
        moe_ffn(x, rw[None], w1, w3, w2, 2)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        moe_ffn(x[None], rw, w1, w3, w2, 2)
    with pytest.raises(TypeError, match="x must have dtype"):
        moe_ffn(x.long(), rw, w1, w3, w2, 2)
    with pytest.raises(TypeError, match="w3 must have the same dtype"):
        moe_ffn(x, rw, w1, w3.double(), w2, 2)
    with pytest.raises(ValueError, match="router"):
        moe_ffn(x, rw, w1, w3, w2, 2, router="topk")
    with pytest.raises(ValueError, match="backend"):
        moe_ffn(x, rw, w1, w3, w2, 2, backend="fast")
    with pytest.raises(ValueError, match="d_model"):
        MoELayer(8, 6, 5, 2)(torch.randn(3, 7))
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 6, 5, 6)
    for device in TRITON_DEVICES:  # the kernels take fp32/bf16/fp16 only (the reference also float64)
        with pytest.raises(TypeError, match="x must have dtype"):
            moe_ffn(*(t.to(device, torch.float64) for t in (x, rw, w1, w3, w2)), 2, backend="triton")


# --------------------------------------------------------------------------------------------------
# MoELayer


def test_layer_stats_losses_and_bias_update():
    torch.manual_seed(0)
    layer = MoELayer(16, 24, 6, 2, router="sigmoid", aux_loss_coef=0.1, z_loss_coef=0.01, backend="reference")
    assert layer.aux_loss().item() == 0.0  # before any forward
    x = torch.randn(2, 9, 16)
    y = layer(x)
    assert y.shape == x.shape
    st = layer.last_stats
    assert st.tokens_per_expert.sum().item() == 18 * 2
    logits = F.linear(x.reshape(-1, 16), layer.router.weight).double()
    s = torch.sigmoid(logits)
    frac = st.tokens_per_expert.double() / 36
    aux = 6 * (frac * (s / s.sum(-1, keepdim=True)).mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    assert abs(layer.aux_loss().item() - (0.1 * aux + 0.01 * z).item()) < 1e-5
    (g,) = torch.autograd.grad(layer.aux_loss(), layer.router.weight)
    assert g.abs().sum() > 0
    load = st.tokens_per_expert.float()
    layer.update_expert_bias(0.01)
    assert torch.equal(layer.expert_bias, 0.01 * torch.sign(load.mean() - load))
    # the bias steers selection: a large bias on expert 5 puts it in every token's top-k
    layer.expert_bias.fill_(0).index_fill_(0, torch.tensor([5]), 10.0)
    layer(x)
    assert layer.last_stats.tokens_per_expert[5].item() == 18
    layer.update_expert_bias(0.5)  # load counted since the previous update (one training forward)
    assert layer.expert_bias[5].item() == 9.5
    layer.to(torch.bfloat16)(x.bfloat16())  # a bf16 cast of the whole module keeps working


def test_release_last_forward_drops_the_routing_and_its_graph():
    """After release the layer holds nothing of the last forward: no stats, a zero aux loss, and no tensor of its
    routing (which carry its autograd graph: a CUDA-graph capture must not reuse it) stays alive."""
    torch.manual_seed(3)
    layer = MoELayer(8, 12, 4, 2, aux_loss_coef=0.1, backend="reference")
    x = torch.randn(2, 5, 8, requires_grad=True)
    (layer(x).square().sum() + layer.aux_loss()).backward()
    held = weakref.ref(layer.last_stats.routing.prob_sum)
    layer.release_last_forward()
    assert layer.last_stats is None and float(layer.aux_loss()) == 0.0
    gc.collect()
    assert held() is None


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_deepcopies_and_averages_after_a_training_forward(backend):
    skip_unless_runs(backend, "cpu")
    torch.manual_seed(3)
    layer = MoELayer(8, 12, 4, 2, aux_loss_coef=0.1, backend=backend)
    x = torch.randn(2, 5, 8, requires_grad=True)
    (layer(x).square().sum() + layer.aux_loss()).backward()
    twin = copy.deepcopy(layer)  # the last forward's routing carries its graph: not copied
    assert twin.last_stats is None and layer.last_stats is not None
    assert torch.equal(twin(x), layer(x))
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    swa = AveragedModel(layer)
    for step in range(2):
        layer(x).sum().backward()  # a training forward between updates, as in a training loop
        with torch.no_grad():
            layer.w1.add_(1.0)
        ema.update_parameters(layer)
        swa.update_parameters(layer)
    assert torch.allclose(ema.module.w1, layer.w1 - 0.9)  # first update copies, second: 0.9 old + 0.1 new
    assert torch.allclose(swa.module.w1, layer.w1 - 0.5)  # the mean of the two


@pytest.mark.parametrize("reentrant", [True, False])
def test_layer_checkpoint_recompute_counts_load_once(reentrant):
    torch.manual_seed(4)
    layer = MoELayer(8, 12, 4, 2, aux_loss_coef=0.1)
    x = torch.randn(3, 8, requires_grad=True)
    checkpoint(layer, x, use_reentrant=reentrant).sum().backward()
    counts = layer.last_stats.tokens_per_expert
    assert counts.sum() == 3 * 2 and torch.equal(layer.load_since_update, counts.long())


def test_aux_loss_accumulates_over_forwards():
    torch.manual_seed(5)
    model = nn.Sequential(MoELayer(8, 12, 4, 2, aux_loss_coef=0.1, z_loss_coef=0.01), nn.Linear(8, 8),
                          MoELayer(8, 12, 4, 2, aux_loss_coef=0.1))
    micro = [torch.randn(4, 8) for _ in range(3)]
    want = []
    for m in micro:
        model(m)
        want.append(sum(layer.aux_loss() for layer in (model[0], model[2])))
    with MoEAuxLoss(model) as aux:
        assert aux.pop().item() == 0.0
        for m in micro:
            model(m)
        got = aux.pop()
        assert torch.allclose(got, sum(want)) and got.requires_grad
        model.eval()
        model(micro[0])  # eval forwards add nothing
        assert aux.pop().item() == 0.0
    model.train()
    model(micro[0])
    assert not aux._terms  # hooks removed on exit


class MixtralBlock(nn.Module):
    """Mixtral's sparse MoE block written directly: softmax router, top-k, renormalise, per-expert loop."""

    def __init__(self, d, f, E, k, names=("w1", "w3", "w2"), norm=True):
        super().__init__()
        self.k, self.names, self.norm = k, names, norm
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(
            nn.ModuleDict({names[0]: nn.Linear(d, f, bias=False), names[1]: nn.Linear(d, f, bias=False),
                           names[2]: nn.Linear(f, d, bias=False)}) for _ in range(E))

    def forward(self, x):
        probs = torch.softmax(self.gate(x).to(torch.promote_types(x.dtype, torch.float32)), -1)
        w, sel = torch.topk(probs, self.k, -1)
        if self.norm:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            tok, slot = torch.where(sel == e)
            h = F.silu(ex[self.names[0]](x[tok])) * ex[self.names[1]](x[tok])
            out.index_add_(0, tok, w[tok, slot, None].to(x.dtype) * ex[self.names[2]](h))
        return out


@pytest.mark.parametrize("layout", ["mixtral", "qwen"])
def test_layer_loads_common_layouts(layout):
    torch.manual_seed(1)
    names = ("w1", "w3", "w2") if layout == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    norm = layout == "mixtral"  # Qwen2-MoE's default norm_topk_prob=False
    block = MixtralBlock(16, 20, 6, 2, names, norm).double()
    sd = {f"mlp.{k}": v for k, v in block.state_dict().items()}
    sd["other.weight"] = torch.zeros(1)
    layer = MoELayer(16, 20, 6, 2, norm_topk=norm, backend="reference", dtype=torch.float64)
    load = layer.load_mixtral_state_dict if layout == "mixtral" else layer.load_qwen_state_dict
    load(sd, prefix="mlp.")
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert rel_err(layer(x), block(x.reshape(-1, 16)).reshape(3, 5, 16)) < 1e-12
    with pytest.raises(KeyError, match="lacks"):
        load({k: v for k, v in sd.items() if "experts.3" not in k}, prefix="mlp.")
    with pytest.raises(KeyError, match="unexpected"):
        load({**sd, "mlp.extra.weight": torch.zeros(1)}, prefix="mlp.")
    for strict in (True, False):  # a dropped shared expert would silently change the output
        with pytest.raises(ValueError, match="shared expert"):
            load({**sd, "mlp.shared_expert.up_proj.weight": torch.zeros(1)}, prefix="mlp.", strict=strict)
    # back out in the same per-expert layout, and through the fused transformers 5 layout
    out = layer.hf_state_dict(layout, prefix="mlp.")
    assert all(torch.equal(out[k], sd[k]) for k in out) and len(out) == len(sd) - 1
    twin = MoELayer(16, 20, 6, 2, norm_topk=norm, backend="reference", dtype=torch.float64)
    load(layer.hf_state_dict("fused", prefix="model.layers.0.mlp."), prefix="model.layers.0.block_sparse_moe.")
    twin.load_mixtral_state_dict(layer.hf_state_dict("fused"))
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), layer.state_dict().values()))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_layer_compiles_fullgraph_on_cpu(backend):
    """No graph break: the reference traces as plain PyTorch, the kernels as opaque custom ops (fake
    impls give the shapes; Triton on GPU is covered by test_layer_compiles_fullgraph_on_cuda)."""
    skip_unless_runs(backend, "cpu")
    torch.manual_seed(2)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.moe = MoELayer(16, 32, 5, 2, router="sigmoid", aux_loss_coef=0.01, backend=backend)

        def forward(self, x):
            return x + self.moe(self.norm(x))

    block = Block()
    x = torch.randn(2, 7, 16, requires_grad=True)
    want = block(x)
    want_g = torch.autograd.grad((want**2).sum() + block.moe.aux_loss(), [x, block.moe.w1, block.moe.router.weight])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    got_g = torch.autograd.grad((got**2).sum() + block.moe.aux_loss(), [x, block.moe.w1, block.moe.router.weight])
    assert rel_err(got, want) < 1e-6
    for a, b in zip(got_g, want_g):
        assert rel_err(a, b) < 1e-5


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_layer_compiles_fullgraph_on_cuda(backend):
    _skip_unless("cuda", backend)
    layer = MoELayer(256, 512, 24, 2, backend=backend, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    want = layer(x)
    (want_g,) = torch.autograd.grad(want.float().square().sum(), x)
    got = torch.compile(layer, fullgraph=True)(x)
    (got_g,) = torch.autograd.grad(got.float().square().sum(), x)
    assert rel_err(got, want) <= TOL[torch.bfloat16] and rel_err(got_g, want_g) <= TOL[torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_layer_inference_cuda_graph(backend):
    _skip_unless("cuda", backend)
    layer = MoELayer(256, 512, 24, 2, backend=backend, device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            layer(x)  # compile the kernels outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, layer(x))


@requires_cuda
def test_layer_auto_backend_on_cuda_is_a_kernel():
    assert resolve_backend("moe", "auto", torch.device("cuda"), moe_backends()) != "reference"
    layer = MoELayer(64, 128, 8, 2, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(33, 64, device="cuda", dtype=torch.bfloat16)
    ref, _ = moe_ffn_ref(x, layer.router.weight, layer.w1, layer.w3, layer.w2, 2)
    assert rel_err(layer(x), ref) <= TOL[torch.bfloat16]


# --------------------------------------------------------------------------------------------------
# sm_90a compile check of the Triton kernels (no GPU needed): the interpreter cannot catch what only
# the compiler sees (unsupported constructs, register spills of the default tiles).

_I32_PTRS = {"pair_ptr", "offsets_ptr", "ids_ptr", "rank_ptr", "counts_part_ptr", "start_ptr", "counts_ptr",
             "sorted_ptr"}
_F32_PTRS = {"gate_ptr", "dgate_part_ptr", "bias_ptr", "weights_ptr", "prob_part_ptr", "lse_part_ptr",
             "prob_sum_ptr", "lse_sq_ptr"}
_UNALIGNED = {"E", "num_pid_m", "M", "T", "NB", "D"}  # ints the JIT may not see as multiples of 16


def _sm90_compile(fn, constexprs, num_warps, num_stages, f32_ptrs=()):
    """Compile ``fn`` for sm_90a as the JIT would for 16-byte aligned bf16 tensors; return ptxas -v output.

    The PTX is assembled by the ptxas Triton itself uses (``TRITON_PTXAS_PATH`` if set, else its bundled
    one), because Triton writes the PTX ``.version`` of that ptxas's CUDA release: with a CUDA 13 ptxas
    there (set in the environment, or by Inductor to a torch wheel's own ``torch/bin/ptxas``) it writes
    PTX 9.0, which Triton 3.6's bundled CUDA 12.8 ptxas rejects ("Unsupported .version 9.0").
    """
    import os
    import subprocess
    import tempfile

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = "*i32" if p.name in _I32_PTRS else "*fp32" if p.name in _F32_PTRS | set(f32_ptrs) else "*bf16"
        else:
            sig[p.name] = "i32"
        if p.name not in _UNALIGNED:
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = knobs.nvidia.ptxas
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    try:
        run = subprocess.run([ptxas.path, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                             text=True)
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas {ptxas.path} (CUDA {ptxas.version}) exited with {run.returncode} on "
                           f"{fn.__name__} {constexprs}:\n{run.stderr}{run.stdout}")
    return run.stderr


def _compile_default_kernels() -> dict[str, str]:
    """ptxas -v output of every kernel variant at its default (untuned) H200 config, by kernel name."""
    from onerec_fast.kernels import moe_gemm as g
    from onerec_fast.kernels import moe_routing as r

    shape = dict(T=16384, D=1024, F=2048, E=24, top_k=2, interpret=False)

    def tile(kernel, group=True):
        cfg = g.default_config(kernel, **shape)
        meta = {k: getattr(cfg, k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") + (("GROUP_M",) if group else ())}
        return meta, cfg.num_warps, cfg.num_stages

    def run(label, fn, consts, launch, f32_ptrs=()):
        return label, _sm90_compile(fn, consts, *launch, f32_ptrs)

    def gemm(label, fn, kernel, **consts):
        meta, w, st = tile(kernel)
        return run(label, fn, dict(consts, EVEN=True, E_PAD=32, **meta), (w, st))

    def wgrad(kernel, dw2):
        meta, w, st = tile(kernel, group=False)
        return run(kernel, g._moe_wgrad_kernel, dict(TOP_K=2, DW2=dw2, EVEN=True, **meta), (w, st))

    return dict([
        gemm("gemm1", g._moe_gemm1_fwd_kernel, "gemm1", TOP_K=2, STORE_ACT=True),
        gemm("gemm2", g._moe_scatter_gemm_kernel, "gemm2", HAS_SECOND=False, SCALE=True),
        gemm("dx", g._moe_scatter_gemm_kernel, "dx", HAS_SECOND=True, SCALE=False),
        gemm("dh", g._moe_dh_bwd_kernel, "dh", TOP_K=2),
        wgrad("dw13", False),
        wgrad("dw2", True),
        run("topk", r._moe_topk_kernel, dict(TOP_K=8, K_PAD=8, E_PAD=256, BLOCK_T=16, SIGMOID=True, NORM_TOPK=True),
            (8, 1), ("logits_ptr",)),
        run("scan", r._moe_route_scan_kernel, dict(E_PAD=32, BLOCK_B=128), (4, 1)),
        run("scatter", r._moe_route_scatter_kernel, dict(TOP_K=6, K_PAD=8, BLOCK_T=32), (4, 1)),
        run("router", r._router_logits_kernel, dict(IEEE=False, E_PAD=32, BLOCK_T=64, BLOCK_K=64), (4, 3),
            ("out_ptr",)),
    ])


def test_triton_kernels_compile_for_sm90_without_spills():
    """Compiled in a subprocess: under TRITON_INTERPRET=1 (this session on CPU) kernels are not JITFunctions."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import json, tests.test_moe as t; print(json.dumps(t._compile_default_kernels()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(logs) == 10
    for name, log in logs.items():
        assert " 0 bytes spill stores" in log, f"{name} spills registers at its default config:\n{log}"
