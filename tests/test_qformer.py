"""QFormer and QFormerCrossAttention: jagged vs padded memory, triton vs reference backend (same
weights), torch.compile over the reference path, and bad input."""

import pytest
import torch

from onerec_fast.modules.qformer import QFormer, QFormerCrossAttention
from tests.helpers import DEVICES, assert_close, requires_cuda, skip_unless_runs

LENGTHS = [0, 3, 17, 40]
D_KV = 48


def _memory(lengths, d_kv, device, dtype=torch.float32, seed=0):
    """Jagged ``values [total, d_kv]`` + ``offsets [B+1]`` and the same memory padded ``[B, L, d_kv]``."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(lengths), d_kv, generator=g).to(device, dtype)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(lengths).cumsum(0)
    padded = torch.randn(len(lengths), max(lengths) + 3, d_kv, generator=g).to(device, dtype)  # noise past the ends
    for b, n in enumerate(lengths):
        padded[b, :n] = values[offsets[b]:offsets[b + 1]]
    return values, offsets.to(device), padded, torch.tensor(lengths).to(device)


def _grads(module, out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    params = [p for _, p in sorted(module.named_parameters())]
    return torch.autograd.grad((out.double() * w).sum(), params + list(inputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_qformer_jagged_equals_padded(device, backend):
    skip_unless_runs(backend, device)
    torch.manual_seed(0)
    model = QFormer(64, num_queries=8, num_blocks=1, num_heads=2, d_kv=D_KV, backend=backend).to(device)
    values, offsets, padded, lengths = _memory(LENGTHS, D_KV, device)
    values.requires_grad_()
    jag = model(values, offsets=offsets)
    pad = model(padded, lengths=lengths)
    assert jag.shape == (len(LENGTHS), 8, 64)
    assert_close("padded vs jagged", pad, jag, torch.float32, device)
    g_jag = _grads(model, jag, [])
    g_pad = _grads(model, pad, [])
    for a, b in zip(g_jag, g_pad):
        assert_close("parameter gradient", a, b, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_qformer_triton_matches_reference(device):
    """Same weights, two backends: output and the gradient of every parameter and of the memory."""
    skip_unless_runs("triton", device)
    torch.manual_seed(0)
    blocks = 1 if device == "cpu" else 2
    ref = QFormer(64, num_queries=8, num_blocks=blocks, num_heads=2, d_kv=D_KV, backend="reference").double()
    tri = QFormer(64, num_queries=8, num_blocks=blocks, num_heads=2, d_kv=D_KV, backend="triton").to(device)
    tri.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    values, offsets, _, _ = _memory(LENGTHS, D_KV, device)
    values.requires_grad_()
    v64 = values.detach().cpu().double().requires_grad_()
    out, want = tri(values, offsets=offsets), ref(v64, offsets=offsets.cpu())
    assert_close("out", out, want, torch.float32, device)
    for a, b in zip(_grads(tri, out, [values]), _grads(ref, want, [v64])):
        assert_close("gradient", a, b, torch.float32, device)


def test_cross_attention_compiles_fullgraph_reference():
    """Dynamo captures the reference path whole: jagged memory (shared queries, with the gradient)
    given max_seqlen, and padded memory (per-row queries)."""
    torch.manual_seed(0)
    attn = QFormerCrossAttention(64, num_heads=4, d_kv=D_KV, num_kv_heads=2, backend="reference")
    values, offsets, padded, lengths = _memory(LENGTHS, D_KV, "cpu")
    values.requires_grad_()
    # aot_eager: dynamo must capture the whole graph and AOT autograd trace it; Inductor's C++
    # codegen would only add minutes of CPU compile time to CI (CUDA tests compile with Inductor).
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 64)
    got, want = compiled(x, values, offsets, max_seqlen=max(LENGTHS)), attn(x, values, offsets)
    assert_close("compiled jagged", got, want, torch.float32, "cpu")
    w = torch.randn(got.shape)
    assert_close("compiled gradient", torch.autograd.grad((got * w).sum(), values)[0],
                 torch.autograd.grad((want * w).sum(), values)[0], torch.float32, "cpu")
    x = torch.randn(len(LENGTHS), 8, 64)
    got = compiled(x, padded, lengths=lengths)
    assert_close("compiled padded", got, attn(x, padded, lengths=lengths), torch.float32, "cpu")


def test_qformer_compiles_without_max_len_reference():
    """Jagged memory without max_len traces with no data-dependent size: the longest length read on
    the host (int(lengths.max()) -> item()) became an unbacked size that Inductor could not lower in
    the backward (GuardOnDataDependentSymNode). Checked on the captured graph (fast); same outputs
    and gradients as eager."""
    torch.manual_seed(0)
    model = QFormer(32, num_queries=4, num_blocks=1, num_heads=2, d_kv=D_KV, d_ff=32, backend="reference")
    values, offsets, _, _ = _memory(LENGTHS, D_KV, "cpu")
    values.requires_grad_()
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, inputs):
        graphs.append(gm)
        return aot_eager(gm, inputs)

    torch._dynamo.reset()  # another test's cached compile would bypass the backend
    got = torch.compile(model, fullgraph=True, backend=backend)(values, offsets=offsets)
    host_reads = [n for gm in graphs for n in gm.graph.nodes
                  if n.target in ("item", "tolist", torch.ops.aten._local_scalar_dense.default)]
    assert graphs and not host_reads, host_reads
    want = model(values, offsets=offsets)
    assert_close("compiled out", got, want, torch.float32, "cpu")
    w = torch.randn(got.shape)
    assert_close("compiled gradient", torch.autograd.grad((got * w).sum(), values)[0],
                 torch.autograd.grad((want * w).sum(), values)[0], torch.float32, "cpu")


@requires_cuda
def test_qformer_bf16_triton_vs_reference_cuda():
    torch.manual_seed(0)
    lengths = [int(n) for n in torch.randint(0, 2049, (16,), generator=torch.Generator().manual_seed(0))] + [0]
    ref = QFormer(512, num_queries=128, num_blocks=2, num_heads=8, d_kv=256, backend="reference").cuda()
    tri = QFormer(512, num_queries=128, num_blocks=2, num_heads=8, d_kv=256, backend="triton").cuda()
    tri.load_state_dict(ref.state_dict())
    values, offsets, _, _ = _memory(lengths, 256, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, want = tri(values, offsets=offsets), ref(values, offsets=offsets)
    assert_close("out", out.float(), want.float(), torch.bfloat16, "cuda")
    compiled = torch.compile(tri, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = compiled(values, offsets=offsets, validate=False)
    assert_close("compiled out", got.float(), want.float(), torch.bfloat16, "cuda")


def test_bad_input_raises():
    model = QFormer(64, num_queries=4, num_blocks=1, num_heads=2, d_kv=D_KV, backend="reference")
    values, offsets, padded, lengths = _memory(LENGTHS, D_KV, "cpu")
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        model(values)
    with pytest.raises(ValueError, match="needs cu_seqlens .*and no lengths"):
        model(values, offsets=offsets, lengths=lengths)
    with pytest.raises(ValueError, match="takes lengths"):
        model(padded, offsets=offsets)
    with pytest.raises(ValueError, match="memory must have d_kv = 48"):
        model(values[:, :32], offsets=offsets)
    with pytest.raises(ValueError, match="must equal the number of packed rows"):
        model(values[:-1], offsets=offsets)
    with pytest.raises(ValueError, match="num_heads .* must divide d_model"):
        QFormerCrossAttention(64, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads .* must divide num_heads"):
        QFormerCrossAttention(64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_blocks must be at least 1"):
        QFormer(64, num_blocks=0)
