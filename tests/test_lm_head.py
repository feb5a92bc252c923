"""Constrained LM head (kernels/lm_head.py, onerec_fast/ops/lm_head.py) against the float64 dense reference.

CPU: the Triton interpreter in float32 with small shapes. CUDA: every dtype at larger shapes, the fused LM head +
CUDA beam step, CUDA-graph capture, and a printed (not asserted) timing at OneRec's shape.
"""

import dataclasses

import pytest
import torch

from onerec_fast.ops.beam_step import beam_step_ref
from onerec_fast.ops.lm_head import (
    LMHeadCandidates, candidates_beam_step_ref, constrained_lm_head, constrained_lm_head_beam_step,
    constrained_lm_head_beam_step_ref, constrained_lm_head_ref,
)
from onerec_fast.trie import SemanticIDTrie
from tests.beam_step_helpers import NEG_INF, assert_same_step, median_us, poison_allocator
from tests.helpers import DEVICES, rel_err, requires_cuda, skip_unless_runs, tol


def make_trie(vocab, n, device, seed):
    """Random 3-level codes plus: every token at level 0 (the root has all V children) and one depth-1 node
    (first code 0) with all V children at level 1."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(0, vocab, (n, 3), generator=g)
    all_first = torch.stack([torch.arange(vocab), torch.randint(0, vocab, (vocab,), generator=g),
                             torch.randint(0, vocab, (vocab,), generator=g)], 1)
    all_second = torch.stack([torch.zeros(vocab, dtype=torch.long), torch.arange(vocab),
                              torch.randint(0, vocab, (vocab,), generator=g)], 1)
    return SemanticIDTrie(torch.cat([rand, all_first, all_second]).to(device), vocab)


def inputs(rows, vocab, dim, dtype, device, seed, level, trie):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=g) / dim ** 0.5).to(device, dtype)
    bias = torch.randn(vocab, generator=g).to(device, dtype)
    nodes = torch.randint(0, trie.num_nodes[level], (rows,), generator=g, dtype=torch.int32)
    nodes[0] = 0  # node 0: the root at level 0, the all-children node (first code 0) at level 1
    nodes[1] = -1  # a dead node: no children
    scores = torch.randn(rows, generator=g)
    scores[2] = NEG_INF  # a dead beam on a live node: skipped
    return hidden, weight, bias, nodes.to(device), scores.to(device)


def check_candidates(out: LMHeadCandidates, ref: LMHeadCandidates, dtype, device):
    assert out.child_logits.dtype == torch.float32 and out.lse.dtype == torch.float32
    assert out.child_logits.shape == ref.child_logits.shape and out.lse.shape == ref.lse.shape
    ok = ref.child_logits > NEG_INF  # the written entries: columns < each live row's fan-out
    t = tol(dtype, device)
    assert rel_err(out.child_logits[ok], ref.child_logits[ok]) <= t
    fin = ref.lse > NEG_INF
    assert torch.equal((out.lse == NEG_INF).cpu(), (~fin).cpu())
    assert rel_err(out.lse[fin], ref.lse[fin]) <= t


def shapes(device):
    # CPU (interpreter): R <= 16, V <= 128, d <= 64; CUDA: odd sizes around the tile edges
    return [(16, 128, 64), (13, 100, 40)] if device == "cpu" else [(300, 1000, 136), (4096, 8192, 256)]


def dtypes(device):
    return [torch.float32] if device == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


CASES = [(d, dt, s) for d in DEVICES for dt in dtypes(d) for s in shapes(d)]


@pytest.mark.parametrize("device,dtype,shape", CASES)
@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("normalize,method", [("full", "gemm"), ("valid", "gemm"), ("valid", "gather")])
def test_candidates_match_reference(device, dtype, shape, level, normalize, method):
    skip_unless_runs("triton", device)
    rows, vocab, dim = shape
    trie = make_trie(vocab, 4 * vocab, device, seed=vocab)
    hidden, weight, bias, nodes, scores = inputs(rows, vocab, dim, dtype, device, seed=level, level=level, trie=trie)
    use_bias = level != 1  # with and without bias
    b = bias if use_bias else None
    out = constrained_lm_head(hidden, weight, nodes, trie, level, normalize, bias=b, scores=scores,
                              backend="triton", method=method)
    ref = constrained_lm_head_ref(hidden.double(), weight.double(), nodes, trie, level, normalize,
                                  bias=b.double() if use_bias else None, scores=scores)
    check_candidates(out, ref, dtype, device)
    assert out.child_logits.shape[1] == trie.max_children[level]
    if level == 0:
        assert trie.max_children[0] == vocab  # the all-children node is exercised


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_gemm_chunked_epilogue_matches_reference(device, level, normalize):
    """The ``gemm`` method with its children gathered BLOCK_C at a time (config ``BLOCK_C`` > 0) instead of in
    one [BLOCK_M, BLOCK_N] gather: the same child logits and normalizer (a tile of a root with all V children
    needs every step; a sparse level needs one or none)."""
    skip_unless_runs("triton", device)
    from onerec_fast.kernels import lm_head as k

    rows, vocab, dim = (16, 128, 64) if device == "cpu" else (300, 1000, 136)
    trie = make_trie(vocab, 4 * vocab, device, seed=vocab)
    hidden, weight, bias, nodes, scores = inputs(rows, vocab, dim, torch.float32, device, seed=level, level=level,
                                                 trie=trie)
    base = k.get_config("gemm", hidden, rows, vocab, dim)
    ref = constrained_lm_head_ref(hidden.double(), weight.double(), nodes, trie, level, normalize,
                                  bias=bias.double(), scores=scores)
    for bc in (8, 16):
        logits, lse = k.lm_head_gemm(hidden, weight, bias, nodes, scores, trie.child_start[level],
                                     trie.child_tokens[level], trie.max_children[level], normalize == "valid",
                                     dataclasses.replace(base, BLOCK_C=bc))
        check_candidates(LMHeadCandidates(logits, lse), ref, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_without_scores_every_live_node_counts(device):
    skip_unless_runs("triton", device)
    vocab, dim, rows = 64, 32, 8
    trie = make_trie(vocab, 100, device, seed=1)
    hidden, weight, _, nodes, _ = inputs(rows, vocab, dim, torch.float32, device, seed=3, level=1, trie=trie)
    for normalize in ("full", "valid"):
        out = constrained_lm_head(hidden, weight, nodes, trie, 1, normalize, backend="triton")
        ref = constrained_lm_head_ref(hidden.double(), weight.double(), nodes, trie, 1, normalize)
        check_candidates(out, ref, torch.float32, device)


def _beam_inputs(batch, beam, vocab, dim, dtype, device, trie, level, seed):
    """hidden/weight and a realistic (nodes, scores) state after `level` reference steps."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(vocab, dim, generator=g) / dim ** 0.5).to(device, dtype)
    nodes = torch.zeros(batch * beam, dtype=torch.int32, device=device)
    scores = torch.full((batch, beam), NEG_INF, device=device)
    scores[:, 0] = 0.0
    scores = scores.view(-1)
    for t in range(level + 1):
        hidden = (torch.randn(batch * beam, dim, generator=g) * 2).to(device, dtype)
        if t == level:
            return hidden, weight, nodes, scores
        out = constrained_lm_head_beam_step_ref(hidden, weight, nodes, scores, trie, t, beam)
        nodes, scores = out.nodes.view(-1), out.scores.view(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["full", "valid"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_fused_step_matches_dense_beam_step(device, normalize, level):
    skip_unless_runs("triton", device)
    batch, beam, vocab, dim = (2, 8, 48, 32) if device == "cpu" else (8, 64, 2048, 256)
    trie = make_trie(vocab, 3 * vocab, device, seed=7)
    hidden, weight, nodes, scores = _beam_inputs(batch, beam, vocab, dim, torch.float32, device, trie, level, seed=2)
    out = constrained_lm_head_beam_step(hidden, weight, nodes, scores, trie, level, beam, normalize,
                                        backend="triton")
    ref = constrained_lm_head_beam_step_ref(hidden, weight, nodes, scores, trie, level, beam, normalize)
    assert_same_step(out, ref)
    assert out.tokens.dtype == torch.int64 and out.nodes.dtype == torch.int32


@pytest.mark.parametrize("device", DEVICES)
def test_candidates_step_with_fewer_candidates_than_beam(device):
    codes = torch.tensor([[0, 1, 2], [0, 3, 1], [4, 4, 4]], device=device)
    trie = SemanticIDTrie(codes, 6)
    batch, beam, dim = 2, 8, 16
    hidden, weight, nodes, scores = _beam_inputs(batch, beam, 6, dim, torch.float32, device, trie, 0, seed=5)
    cand = constrained_lm_head_ref(hidden, weight, nodes, trie, 0, "full", scores=scores)
    out = candidates_beam_step_ref(cand.child_logits, cand.lse, nodes, scores, trie.child_start[0],
                                   trie.child_tokens[0], beam)
    ref = beam_step_ref(hidden @ weight.t(), nodes, scores, trie, 0, beam, "full")
    assert_same_step(out, ref)
    assert int((out.scores > NEG_INF).sum()) == 2 * batch  # the root's 2 children per batch row


def test_bad_arguments_raise():
    trie = make_trie(16, 20, "cpu", seed=0)
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    nodes = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="weight must have size 8"):
        constrained_lm_head(h, torch.randn(16, 9), nodes, trie, 0)
    with pytest.raises(ValueError, match="vocab_size of level 0"):
        constrained_lm_head(h, torch.randn(15, 8), nodes, trie, 0)
    with pytest.raises(TypeError, match="weight must have the same dtype"):
        constrained_lm_head(h, w.half(), nodes, trie, 0)
    with pytest.raises(TypeError, match="nodes must have dtype"):
        constrained_lm_head(h, w, nodes.long(), trie, 0)
    with pytest.raises(ValueError, match="nodes must have size 4"):
        constrained_lm_head(h, w, nodes[:3], trie, 0)
    with pytest.raises(ValueError, match="normalize='valid'"):
        constrained_lm_head(h, w, nodes, trie, 0, "full", method="gather")
    with pytest.raises(ValueError, match="method must be one of"):
        constrained_lm_head(h, w, nodes, trie, 0, method="dense")
    with pytest.raises(ValueError, match="level must be"):
        constrained_lm_head(h, w, nodes, trie, 3)
    with pytest.raises(ValueError, match="bias must have size 16"):
        constrained_lm_head(h, w, nodes, trie, 0, bias=torch.randn(15))
    with pytest.raises(ValueError, match="multiple of beam"):
        constrained_lm_head_beam_step(h, w, nodes, torch.zeros(4), trie, 0, 3)


@requires_cuda
@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_cuda_graph_capture_and_poisoned_memory(normalize):
    batch, beam, vocab, dim = 4, 32, 1024, 128
    trie = make_trie(vocab, 4 * vocab, "cuda", seed=4)
    hidden, weight, nodes, scores = _beam_inputs(batch, beam, vocab, dim, torch.bfloat16, "cuda", trie, 1, seed=1)
    ref = constrained_lm_head_beam_step_ref(hidden, weight, nodes, scores, trie, 1, beam, normalize)
    poison_allocator()  # entries the kernels should write but do not would show as 3.4e38 / 0x7F7F7F7F
    eager = constrained_lm_head_beam_step(hidden, weight, nodes, scores, trie, 1, beam, normalize, backend="triton")
    assert_same_step(eager, ref, atol=2e-3)
    static_h = hidden.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = constrained_lm_head_beam_step(static_h, weight, nodes, scores, trie, 1, beam, normalize,
                                                 backend="triton")
    static_h.copy_(hidden)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@requires_cuda
def test_timing_onerec_shape(capsys):
    """Prints LM head + step latencies at 32 x 128 rows, V = 8192, d = 1024, bf16 (1M skewed items) next to
    the plain LM-head GEMM (targets: full <= 1.15x the GEMM; valid at levels 1-2 >= 10x faster)."""
    batch, beam, vocab, dim = 32, 128, 8192, 1024
    g = torch.Generator().manual_seed(0)
    first = (torch.rand(1_000_000, 1, generator=g) ** 4 * vocab).long()
    codes = torch.cat([first, torch.randint(0, vocab, (1_000_000, 2), generator=g)], 1)
    trie = SemanticIDTrie(codes.cuda(), vocab)
    lines = []
    for level in range(3):
        hidden, weight, nodes, scores = _beam_inputs(batch, beam, vocab, dim, torch.bfloat16, "cuda", trie, level,
                                                     seed=level)
        gemm = median_us(lambda: hidden @ weight.t())
        lines.append(f"level {level}: plain GEMM {gemm:7.1f} us (max fan-out {trie.max_children[level]})")
        for normalize, method in (("full", "gemm"), ("valid", "gemm"), ("valid", "gather")):
            head = median_us(lambda: constrained_lm_head(hidden, weight, nodes, trie, level, normalize, scores=scores,
                                                        backend="triton", method=method))
            fused = median_us(lambda: constrained_lm_head_beam_step(hidden, weight, nodes, scores, trie, level, beam,
                                                                   normalize, backend="triton", method=method))
            lines.append(f"  {normalize:5s} {method:6s}: head {head:7.1f} us, head + step {fused:7.1f} us "
                         f"({fused / gemm:.2f}x GEMM)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
