"""The fused CUDA beam step (csrc/beam_step/) against the plain-PyTorch oracle ``beam_step_ref``.

Exact tie-breaking, dead beams, fewer candidates than beam, both normalizations, every logits dtype, strided
logits, unwritten outputs (poisoned allocator), bitwise-repeatable runs, CUDA-graph capture, the compact
child-logits entry (``beam_step_candidates``) and a printed (not asserted) timing at OneRec's shape.
GPU only: every test skips without CUDA or without the built kernel.
"""

import pytest
import torch

from onerec_fast.backends import cuda_extension
from onerec_fast.ops.beam_step import beam_step, beam_step_ref
from onerec_fast.trie import SemanticIDTrie
from tests.beam_step_helpers import NEG_INF, assert_same_step, median_us, poison_allocator
from tests.helpers import HAS_CUDA

_EXT = cuda_extension() if HAS_CUDA else None
pytestmark = pytest.mark.skipif(_EXT is None or not hasattr(_EXT, "beam_step"),
                                reason="needs CUDA and onerec_fast._C built with csrc/beam_step")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

def make_trie(n, vocab, levels, seed, skew=False):
    g = torch.Generator().manual_seed(seed)
    if skew:  # clustered prefixes: a few popular first codes with many children, a long tail
        first = (torch.rand(n, 1, generator=g) ** 4 * vocab).long()
        rest = torch.randint(0, vocab, (n, levels - 1), generator=g)
        codes = torch.cat([first, rest], 1)
    else:
        codes = torch.randint(0, vocab, (n, levels), generator=g)
    return SemanticIDTrie(codes.cuda(), vocab)


def random_logits(rows, vocab, dtype, seed, scale=3.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(rows, vocab, device="cuda", generator=g) * scale).to(dtype)


def states_at(trie, level, batch, beam, dtype, normalize, seed):
    """(nodes, scores) of a search after `level` reference steps (realistic parents, some dead)."""
    nodes = torch.zeros(batch * beam, dtype=torch.int32, device="cuda")
    scores = torch.full((batch, beam), NEG_INF, device="cuda")
    scores[:, 0] = 0.0
    scores = scores.view(-1)
    for t in range(level):
        logits = random_logits(batch * beam, trie.vocab_sizes[t], dtype, seed + t)
        out = beam_step_ref(logits, nodes, scores, trie, t, beam, normalize)
        nodes, scores = out.nodes.view(-1), out.scores.view(-1)
    return nodes, scores


def run_cuda(logits, nodes, scores, trie, level, beam, normalize):
    return _EXT.beam_step(logits, nodes, scores, trie.child_start[level], trie.child_tokens[level], trie.dense_root,
                          beam, normalize == "valid")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["full", "valid"])
@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("batch,beam,vocab,items,skew", [(3, 16, 64, 500, False), (2, 128, 512, 20000, True),
                                                       (5, 7, 33, 300, False), (1, 256, 1000, 50000, True)])
def test_matches_reference(dtype, normalize, level, batch, beam, vocab, items, skew):
    trie = make_trie(items, vocab, 3, seed=items, skew=skew)
    nodes, scores = states_at(trie, level, batch, beam, dtype, normalize, seed=level)
    logits = random_logits(batch * beam, vocab, dtype, seed=100 + level)
    ref = beam_step_ref(logits, nodes, scores, trie, level, beam, normalize)
    poison_allocator()
    assert_same_step(run_cuda(logits, nodes, scores, trie, level, beam, normalize), ref)
    # through the public op as well
    out = beam_step(logits, nodes, scores, trie, level, beam, normalize, backend="cuda")
    assert_same_step(tuple(out), ref)


@pytest.mark.parametrize("normalize", ["full", "valid"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties(normalize, dtype):
    """Identical logits rows and parent scores, few distinct logit values: everything ties, so the order is
    decided by (parent, token) alone and must equal the reference exactly."""
    vocab, beam, batch = 24, 32, 3
    # the full product code set: every depth-1 node has all vocab children (identical child sets)
    grid = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    trie = SemanticIDTrie(grid.cuda(), vocab)
    row = torch.randint(0, 4, (vocab,), device="cuda").float()
    logits = row.expand(batch * beam, vocab).to(dtype).contiguous()
    nodes = torch.randint(0, vocab, (batch * beam,), device="cuda", dtype=torch.int32)
    scores = torch.zeros(batch * beam, device="cuda")
    scores[1::5] = NEG_INF  # some dead parents between live ones
    ref = beam_step_ref(logits, nodes, scores, trie, 1, beam, normalize)
    assert_same_step(run_cuda(logits, nodes, scores, trie, 1, beam, normalize), ref, exact=True)
    # level 0 with a sparse root: ties inside beam 0's row
    trie0 = make_trie(200, vocab, 2, seed=3)
    s0 = torch.full((batch, beam), NEG_INF, device="cuda")
    s0[:, 0] = 0.0
    n0 = torch.zeros(batch * beam, dtype=torch.int32, device="cuda")
    ref0 = beam_step_ref(logits, n0, s0.view(-1), trie0, 0, beam, normalize)
    assert_same_step(run_cuda(logits, n0, s0.view(-1), trie0, 0, beam, normalize), ref0, exact=True)


@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_fewer_candidates_than_beam_and_dead_rows(normalize):
    codes = torch.tensor([[0, 1], [0, 3], [2, 2], [5, 0], [5, 4]], device="cuda")
    trie = SemanticIDTrie(codes, 6)
    beam, batch = 16, 4
    logits = random_logits(batch * beam, 6, torch.float32, seed=7)
    nodes = torch.zeros(batch * beam, dtype=torch.int32, device="cuda")
    scores = torch.full((batch, beam), NEG_INF, device="cuda")
    scores[:, 0] = 0.0
    scores[2] = NEG_INF  # batch row 2 entirely dead
    nodes.view(batch, beam)[3, 0] = -1  # a live score on a dead node gives nothing either
    scores = scores.view(-1)
    poison_allocator()
    out = run_cuda(logits, nodes, scores, trie, 0, beam, normalize)
    ref = beam_step_ref(logits, nodes, scores, trie, 0, beam, normalize)
    assert_same_step(out, ref)
    assert int((out[3] > NEG_INF).sum(1)[0]) == 3  # the root's three children
    assert (out[3][2] == NEG_INF).all() and (out[0][2] == -1).all()
    # level 1: parents = the three depth-1 nodes; 5 leaves in all < beam
    s1, n1 = out[3].reshape(-1).contiguous(), out[2].reshape(-1).contiguous()
    ref1 = beam_step_ref(logits, n1, s1, trie, 1, beam, normalize)
    assert_same_step(run_cuda(logits, n1, s1, trie, 1, beam, normalize), ref1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_unaligned_logits(dtype):
    trie = make_trie(3000, 96, 3, seed=5)
    beam, batch = 32, 3
    nodes, scores = states_at(trie, 1, batch, beam, dtype, "full", seed=9)
    wide = random_logits(batch * beam, 137, dtype, seed=11)
    for start in (0, 1, 3):  # row stride 137 elements and a base offset: no 16-byte alignment
        logits = wide[:, start:start + 96]
        ref = beam_step_ref(logits, nodes, scores, trie, 1, beam, "full")
        out = run_cuda(logits, nodes, scores, trie, 1, beam, "full")
        assert_same_step(out, ref)
        aligned = run_cuda(logits.contiguous(), nodes, scores, trie, 1, beam, "full")
        for a, b in zip(out, aligned):  # the scalar path reads the same elements per lane: same bits
            assert torch.equal(a, b)


@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_repeatable_and_graph_capturable(normalize):
    trie = make_trie(20000, 512, 3, seed=2, skew=True)
    beam, batch = 64, 4
    nodes, scores = states_at(trie, 1, batch, beam, torch.bfloat16, normalize, seed=3)
    logits = random_logits(batch * beam, 512, torch.bfloat16, seed=4, scale=0.5)
    first = run_cuda(logits, nodes, scores, trie, 1, beam, normalize)
    for _ in range(5):
        again = run_cuda(logits, nodes, scores, trie, 1, beam, normalize)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    static_logits, static_nodes, static_scores = logits.clone(), nodes.clone(), scores.clone()
    run_cuda(static_logits, static_nodes, static_scores, trie, 1, beam, normalize)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_cuda(static_logits, static_nodes, static_scores, trie, 1, beam, normalize)
    new_logits = random_logits(batch * beam, 512, torch.bfloat16, seed=5)
    static_logits.copy_(new_logits)
    graph.replay()
    torch.cuda.synchronize()
    eager = run_cuda(new_logits, nodes, scores, trie, 1, beam, normalize)
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("normalize", ["full", "valid"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_candidates_entry_matches_dense(normalize, level):
    """``beam_step_candidates`` on compact child logits [R, max_children] equals the dense kernel."""
    trie = make_trie(20000, 300, 3, seed=8, skew=True)
    beam, batch = 32, 3
    nodes, scores = states_at(trie, level, batch, beam, torch.float32, normalize, seed=6)
    logits = random_logits(batch * beam, 300, torch.float32, seed=12)
    tokens, ok = trie.padded_children(level, nodes)
    child = logits.gather(1, tokens).masked_fill(~ok, float("nan"))  # padding is never read
    lse = torch.logsumexp(logits, dim=1) if normalize == "full" else None
    out = _EXT.beam_step_candidates(child, lse, nodes, scores, trie.child_start[level], trie.child_tokens[level],
                                    beam, normalize == "valid")
    ref = beam_step_ref(logits, nodes, scores, trie, level, beam, normalize)
    assert_same_step(out, ref)
    if normalize == "valid":  # same values in the same lanes as the dense kernel: bit-identical
        for a, b in zip(out, run_cuda(logits, nodes, scores, trie, level, beam, normalize)):
            assert torch.equal(a, b)


def test_timing_onerec_shape(capsys):
    """Prints the per-level latency at 32 users x beam 128, V = 8192, bf16 logits (target <= 30 us)."""
    batch, beam, vocab = 32, 128, 8192
    trie = make_trie(1_000_000, vocab, 3, seed=0, skew=True)
    logits = random_logits(batch * beam, vocab, torch.bfloat16, seed=1)
    lines = []
    for normalize in ("full", "valid"):
        for level in range(3):
            nodes, scores = states_at(trie, level, batch, beam, torch.bfloat16, normalize, seed=2)
            us = median_us(lambda: run_cuda(logits, nodes, scores, trie, level, beam, normalize))
            lines.append(f"beam_step cuda {normalize:5s} level {level}: {us:7.1f} us "
                         f"(4096 x 8192 bf16, 1M skewed items)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
