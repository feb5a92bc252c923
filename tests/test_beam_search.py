"""Trie-constrained beam search: brute-force enumeration, a naive per-candidate Python search (tie rule,
parents), dead slots, duplicates, edges, stateful decoders, the hidden-state path, errors, and the CUDA
beam step against the reference."""

import math
from collections import defaultdict

import pytest
import torch

from onerec_fast.decoding import BeamSearchState, SemanticIDTrie, constrained_beam_search, constrained_beam_search_ref
from onerec_fast.ops.beam_step import beam_step, beam_step_ref, topk_lowest_index
from tests.helpers import DEVICES, HAS_CUDA, poison_, requires_cuda, skip_unless_runs

NEG_INF = float("-inf")


def random_codes(n, vocab, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(0, v, (n, 1), generator=g) for v in vocab], 1).to(device)


class TableDecoder:
    """A decoder whose next-code logits depend only on (batch row, prefix): one random table per level.

    ``ties=True`` draws integer logits from {-2..2} so equal candidate scores are common.
    """

    def __init__(self, batch, vocab, seed, device="cpu", ties=False):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.batch = vocab, batch
        self.tables = []
        for t, v in enumerate(vocab):
            shape = (batch, math.prod(vocab[:t]), v)
            tab = torch.randint(-2, 3, shape, generator=g).float() if ties else torch.randn(shape, generator=g) * 2
            self.tables.append(tab.to(device))

    def prefix_index(self, prefix):
        idx = torch.zeros(prefix.shape[:-1], dtype=torch.int64, device=prefix.device)
        for k in range(prefix.shape[-1]):
            idx = idx * self.vocab[k] + prefix[..., k]
        return idx

    def __call__(self, prefix):  # [B, beam, t] -> [B, beam, V_t]
        t = prefix.shape[-1]
        rows = torch.arange(self.batch, device=prefix.device)[:, None]
        return self.tables[t][rows, self.prefix_index(prefix)]

    def row_logits(self, row, prefix):  # float32 [V_t]
        return self(torch.tensor(prefix, dtype=torch.int64, device=self.tables[0].device).view(1, 1, -1).expand(
            self.batch, 1, len(prefix)))[row, 0]


def children_of(codes):
    kids = defaultdict(set)
    for r in codes.tolist():
        for t in range(len(r)):
            kids[tuple(r[:t])].add(r[t])
    return {k: sorted(v) for k, v in kids.items()}


def logp_row(lg, valid, normalize):
    """float32 [V] log-probs of one row (only entries in ``valid`` are used)."""
    if normalize == "full":
        return torch.log_softmax(lg.float(), -1)
    masked = torch.full_like(lg.float(), NEG_INF)
    masked[valid] = lg.float()[valid]
    return torch.log_softmax(masked, -1)


def naive_search(dec, codes, beam, normalize):
    """Per row, the candidates (parent slot, token) listed one by one and sorted by (-score, b * V + c)."""
    kids = children_of(codes)
    out = []
    for row in range(dec.batch):
        beams = [(torch.tensor(0.0), ())]
        for t, v in enumerate(dec.vocab):
            cands = []
            for b, (score, pre) in enumerate(beams):
                valid = kids.get(pre, [])
                lp = logp_row(dec.row_logits(row, pre).cpu(), valid, normalize)
                cands += [(score + lp[c], b * v + c, pre + (c,)) for c in valid]
            cands.sort(key=lambda x: (-float(x[0]), x[1]))
            beams = [(s, p) for s, _, p in cands[:beam]]
        out.append(beams)
    return out


def brute_force(dec, codes, normalize):
    """Every distinct item code of every row scored as the float64 sum of its per-level log-probs."""
    kids = children_of(codes)
    res = []
    for row in range(dec.batch):
        scored = []
        for code in sorted({tuple(r) for r in codes.tolist()}):
            s = 0.0
            for t in range(len(code)):
                s += float(logp_row(dec.row_logits(row, code[:t]).cpu(), kids[code[:t]], normalize)[code[t]])
            scored.append((s, code))
        scored.sort(key=lambda x: -x[0])
        res.append(scored)
    return res


def check_dead_and_real(trie, res, codes_cpu):
    alive = res.scores > NEG_INF
    assert torch.equal(res.item_ids >= 0, alive) and ((res.codes >= 0).all(-1) == alive).all()
    assert (res.codes[~alive] == -1).all()
    live_codes = res.codes[alive]
    if live_codes.numel():
        assert trie.contains(live_codes).all()  # 100% of returned codes are real items
        assert torch.equal(trie.lookup(live_codes), res.item_ids[alive])
    assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()  # best first, dead (-inf) slots last


def assert_same_scores(got, want, device):
    """Beam scores float32 [...]: bit-exact on CPU, where every path runs the same PyTorch log-softmax. On CUDA
    the device's log-softmax (PyTorch's or the fused beam step's) differs from the CPU's, or from another
    kernel's, in the last ulps (seen on the H200: -2.9389631748 vs -2.9389634132), so within 1e-5 there; a
    wrong normalisation or a missed term is off by far more."""
    t = 0.0 if torch.device(device).type == "cpu" else 1e-5
    torch.testing.assert_close(got, want, rtol=t, atol=t)


SEARCHES = [("ref", constrained_beam_search_ref), ("auto", constrained_beam_search)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["full", "valid"])
@pytest.mark.parametrize("search", SEARCHES, ids=[s[0] for s in SEARCHES])
def test_matches_brute_force_enumeration(device, normalize, search):
    vocab = (5, 4, 6)
    codes = random_codes(45, vocab, seed=1, device=device)
    trie = SemanticIDTrie(codes, vocab)
    dec = TableDecoder(3, vocab, seed=2, device=device)
    n_distinct = trie.num_nodes[-1]
    beam = n_distinct + 7  # every item fits: the beam search is exhaustive, hence the exact top-k
    res = search[1](dec, trie, 3, beam, normalize)
    assert res.codes.shape == (3, beam, 3) and res.codes.dtype == torch.int64
    assert res.scores.shape == (3, beam) and res.scores.dtype == torch.float32
    assert res.item_ids.dtype == torch.int64
    check_dead_and_real(trie, res, codes)
    oracle = brute_force(dec, codes.cpu(), normalize)
    for row in range(3):
        want = oracle[row]
        got_scores = res.scores[row, :n_distinct].double().cpu()
        assert torch.allclose(got_scores, torch.tensor([s for s, _ in want], dtype=torch.float64), atol=1e-5)
        assert [tuple(c) for c in res.codes[row, :n_distinct].tolist()] == [c for _, c in want]
        assert (res.scores[row, n_distinct:] == NEG_INF).all() and (res.item_ids[row, n_distinct:] == -1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["full", "valid"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("beam", [1, 3, 8])
def test_matches_naive_search_tie_rule(device, normalize, ties, beam):
    vocab = (4, 5, 3)
    codes = random_codes(30, vocab, seed=beam, device=device)
    trie = SemanticIDTrie(codes, vocab)
    dec = TableDecoder(2, vocab, seed=7 + beam, device=device, ties=ties)
    res = constrained_beam_search(dec, trie, 2, beam, normalize)
    check_dead_and_real(trie, res, codes)
    for row, beams in enumerate(naive_search(dec, codes.cpu(), beam, normalize)):
        # The tie rule, exactly: equal scores rank the lower flat index (parent slot * V + token) first.
        assert [tuple(c) for c in res.codes[row, :len(beams)].tolist()] == [p for _, p in beams]
        assert_same_scores(res.scores[row, :len(beams)].cpu(), torch.stack([s for s, _ in beams]), device)
        assert (res.scores[row, len(beams):] == NEG_INF).all()


@pytest.mark.parametrize("device", DEVICES)
def test_duplicates_single_item_and_vocab_edges(device):
    v = 6
    codes = torch.tensor([[0, 5, 5], [5, 0, 0], [0, 5, 5], [5, 5, 5], [0, 0, 0], [5, 0, 0]], device=device)
    trie = SemanticIDTrie(codes, v)
    dec = TableDecoder(2, (v, v, v), seed=3, device=device)
    res = constrained_beam_search(dec, trie, 2, 6, "full")
    check_dead_and_real(trie, res, codes)
    # 4 distinct codes; duplicates map to their smallest item id.
    first = {(0, 5, 5): 0, (5, 0, 0): 1, (5, 5, 5): 3, (0, 0, 0): 4}
    for row in range(2):
        live = [tuple(c) for c in res.codes[row, :4].tolist()]
        assert sorted(live) == sorted(first)
        assert res.item_ids[row, :4].tolist() == [first[c] for c in live]
        assert (res.item_ids[row, 4:] == -1).all()
    one = SemanticIDTrie(torch.tensor([[2, 0, 3]], device=device), 4)
    for normalize in ("full", "valid"):
        r = constrained_beam_search(TableDecoder(3, (4, 4, 4), seed=4, device=device), one, 3, 5, normalize)
        assert (r.codes[:, 0] == torch.tensor([2, 0, 3], device=device)).all() and (r.item_ids[:, 0] == 0).all()
        assert (r.item_ids[:, 1:] == -1).all() and (r.codes[:, 1:] == -1).all() and (r.scores[:, 1:] == NEG_INF).all()
        if normalize == "valid":  # the only continuation has probability 1
            assert (r.scores[:, 0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_stateful_step_fn_reorders_with_parents(device):
    vocab = (5, 5, 5)
    codes = random_codes(40, vocab, seed=9, device=device)
    trie = SemanticIDTrie(codes, vocab)
    dec = TableDecoder(3, vocab, seed=10, device=device)
    b, beam = 3, 6

    class CachedDecoder:
        """Rebuilds the prefixes from its own cache: reorder by state.flat_parents, append the new code."""

        def __call__(self, prefix, state):
            assert isinstance(state, BeamSearchState) and state.step == prefix.shape[-1]
            assert state.parents.shape == (b, beam) and state.nodes.dtype == torch.int32
            if state.step == 0:
                assert torch.equal(state.parents.cpu(), torch.arange(beam).expand(b, beam))
                self.cache = torch.zeros(b * beam, 0, dtype=torch.int64, device=device)
            else:
                last = prefix[..., -1].reshape(-1, 1)
                self.cache = torch.cat([self.cache.index_select(0, state.flat_parents), last], 1)
            alive = state.alive
            assert torch.equal(self.cache.view(b, beam, -1)[alive], prefix[alive])
            return dec(self.cache.view(b, beam, -1))

    got = constrained_beam_search(CachedDecoder(), trie, b, beam)
    want = constrained_beam_search(dec, trie, b, beam)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_hidden_fn_path_equals_logits_path(device, normalize):
    hid, weights, trie, codes = _hidden_problem(device)
    b, beam = hid.batch, 4
    got = constrained_beam_search(None, trie, b, beam, normalize, hidden_fn=hid, lm_head_weight=weights,
                                  backend="reference")
    want = constrained_beam_search(lambda p: hid(p).float() @ weights[p.shape[-1]].float().t(), trie, b, beam,
                                   normalize)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.item_ids, want.item_ids)
    assert_same_scores(got.scores, want.scores, device)
    check_dead_and_real(trie, got, codes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_hidden_fn_path_fused_lm_head_matches_reference(device, normalize):
    """The Triton constrained LM head (interpreter on CPU) feeding the selection: same beams as the reference."""
    skip_unless_runs("triton", device)
    hid, weights, trie, codes = _hidden_problem(device)
    b, beam = hid.batch, 4
    got = constrained_beam_search(None, trie, b, beam, normalize, hidden_fn=hid, lm_head_weight=weights,
                                  backend="triton")
    want = constrained_beam_search_ref(None, trie, b, beam, normalize, hidden_fn=hid, lm_head_weight=weights)
    assert torch.allclose(got.scores, want.scores, atol=1e-4, rtol=0)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.item_ids, want.item_ids)
    check_dead_and_real(trie, got, codes)


def _hidden_problem(device):
    """A TableDecoder of hidden states [B, beam, d] and one output embedding [V, d] per level."""
    vocab, d, b = (6, 5, 7), 8, 2
    codes = random_codes(50, vocab, seed=12, device=device)
    trie = SemanticIDTrie(codes, vocab)
    g = torch.Generator().manual_seed(13)
    weights = [torch.randn(v, d, generator=g).to(device) for v in vocab]
    hid = TableDecoder(b, (6, 5, 7), seed=14, device=device)
    hid.tables = [torch.randn(b, math.prod(vocab[:t]), d, generator=g).to(device) for t in range(3)]
    return hid, weights, trie, codes


def test_topk_lowest_index_breaks_ties_by_index():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 3, (5, 300), generator=g).float()
    x[0, :] = 1.0
    x[1, ::3] = NEG_INF
    x[2, 7] = -0.0  # -0.0 and +0.0 are one value
    vals, idx = topk_lowest_index(x, 40)
    for r in range(5):
        order = sorted(range(300), key=lambda i: (-float(x[r, i]), i))[:40]
        assert idx[r].tolist() == order and torch.equal(vals[r], x[r, order])


def test_beam_step_ref_dead_rows_and_outputs():
    codes = torch.tensor([[0, 1], [0, 2], [1, 0]])
    trie = SemanticIDTrie(codes, 3)
    # Two rows of beam 3 at level 1: row 0 has beams at nodes (0, -1, 1), row 1 all dead.
    nodes = torch.tensor([0, -1, 1, -1, -1, -1], dtype=torch.int32)
    scores = torch.tensor([-1.0, NEG_INF, -0.5, NEG_INF, NEG_INF, NEG_INF])
    logits = torch.randn(6, 3)
    out = beam_step_ref(logits, nodes, scores, trie, 1, 3, "valid")
    # Beam 2's node has one child (logp 0 under "valid"), beam 0's node two: (2, 0) first, then beam 0's.
    assert out.tokens[0, 0] == 0 and sorted(out.tokens[0, 1:].tolist()) == [1, 2]
    assert out.parents[0].tolist() == [2, 0, 0] and out.scores[0, 0] == -0.5
    assert out.tokens[1].tolist() == [-1] * 3 and out.parents[1].tolist() == [-1] * 3
    assert out.nodes[1].tolist() == [-1] * 3 and (out.scores[1] == NEG_INF).all()
    assert out.nodes.dtype == torch.int32 and out.tokens.dtype == torch.int64 and out.scores.dtype == torch.float32
    assert torch.equal(out.nodes[0], trie.step(1, nodes[out.parents[0] % 3].long(), out.tokens[0]).int())


def test_bad_input_raises():
    trie = SemanticIDTrie(torch.tensor([[0, 1, 2], [1, 1, 1]]), 4)
    dec = TableDecoder(2, (4, 4, 4), seed=0)
    for beam in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="beam_size"):
            constrained_beam_search(dec, trie, 2, beam)
    with pytest.raises(ValueError, match="batch_size"):
        constrained_beam_search(dec, trie, 0, 2)
    with pytest.raises(ValueError, match="normalize"):
        constrained_beam_search(dec, trie, 2, 2, "softmax")
    with pytest.raises(TypeError, match="SemanticIDTrie"):
        constrained_beam_search(dec, "trie", 2, 2)
    with pytest.raises(ValueError, match=r"step_fn must return shape \[2, 2, 4\] at level 0, got \[2, 2, 5\]"):
        constrained_beam_search(lambda p: torch.zeros(2, 2, 5), trie, 2, 2)
    with pytest.raises(ValueError, match="level 1"):
        constrained_beam_search(lambda p: torch.zeros(2, 2, 4 + p.shape[-1]), trie, 2, 2)
    with pytest.raises(TypeError, match="float tensor"):
        constrained_beam_search(lambda p: torch.zeros(2, 2, 4, dtype=torch.int64), trie, 2, 2)
    with pytest.raises(ValueError, match="exactly one"):
        constrained_beam_search(None, trie, 2, 2)
    with pytest.raises(ValueError, match="lm_head_weight"):
        constrained_beam_search(None, trie, 2, 2, hidden_fn=lambda p: torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match=r"lm_head_weight \(level 0\) must have 4 rows"):
        constrained_beam_search(None, trie, 2, 2, hidden_fn=lambda p: torch.zeros(2, 2, 3),
                                lm_head_weight=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="hidden_fn must return shape"):
        constrained_beam_search(None, trie, 2, 2, hidden_fn=lambda p: torch.zeros(2, 2, 2),
                                lm_head_weight=torch.zeros(4, 3))
    nodes, scores = torch.zeros(4, dtype=torch.int32), torch.zeros(4)
    with pytest.raises(ValueError, match="vocab_size of level 0"):
        beam_step(torch.zeros(4, 5), nodes, scores, trie, 0, 2)
    with pytest.raises(ValueError, match="multiple of beam"):
        beam_step(torch.zeros(4, 4), nodes, scores, trie, 0, 3)
    with pytest.raises(TypeError, match="nodes"):
        beam_step(torch.zeros(4, 4), nodes.long(), scores, trie, 0, 2)
    with pytest.raises(ValueError, match="level"):
        beam_step(torch.zeros(4, 4), nodes, scores, trie, 3, 2)
    with pytest.raises(RuntimeError, match="cuda"):
        beam_step(torch.zeros(4, 4), nodes, scores, trie, 0, 2, backend="cuda")


# ----------------------------------------------------------------------------------------------- GPU

def _has_cuda_beam_step():
    from onerec_fast.ops.beam_step import cuda_beam_step_fn

    return HAS_CUDA and cuda_beam_step_fn() is not None


requires_kernel = pytest.mark.skipif(not _has_cuda_beam_step(), reason="needs CUDA and the beam_step kernel")


def assert_same_beams(got, want, atol=1e-4):
    """Equal up to float rounding: scores close, and tokens/parents/nodes equal wherever the order is
    unambiguous: neighbours more than ``atol`` apart, or exactly tied (equal logits of one parent give equal
    scores in any implementation, so the tie rule decides), and dead slots."""
    assert torch.allclose(got.scores, want.scores, atol=atol, rtol=0)
    s = want.scores
    gap = torch.full_like(s, float("inf"))
    gap[:, 1:] = (s[:, 1:] - s[:, :-1]).abs()
    gap[:, :-1] = torch.minimum(gap[:, :-1], (s[:, :-1] - s[:, 1:]).abs())
    clear = (gap > atol) | (gap == 0) | torch.isinf(s)
    for name in ("tokens", "parents", "nodes"):
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a[clear].long(), b[clear].long()), name


@requires_kernel
@pytest.mark.parametrize("normalize", ["full", "valid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_cuda_beam_step_matches_reference(normalize, dtype, level):
    b, beam, v = 8, 128, 8192
    codes = random_codes(200_000, (v, v, v), seed=21, device="cuda")
    codes[:, 1] %= 64  # fan-out like real item sets: a few hundred children per node at deep levels
    trie = SemanticIDTrie(codes, v)
    g = torch.Generator(device="cuda").manual_seed(level)
    # Beam states: nodes of the level (some dead), finite scores.
    nodes = torch.randint(0, trie.num_nodes[level], (b * beam,), device="cuda", generator=g).int()
    if level == 0:
        nodes.zero_()
    scores = -torch.rand(b * beam, device="cuda", generator=g) * 5
    nodes[::7], scores[::7] = -1, NEG_INF
    logits = (torch.randn(b * beam, v, device="cuda", generator=g) * 3).to(dtype)
    want = beam_step_ref(logits, nodes, scores, trie, level, beam, normalize)
    got = beam_step(logits, nodes, scores, trie, level, beam, normalize, backend="cuda")
    for t, w in zip(got, want):
        assert t.dtype == w.dtype and t.shape == w.shape
    assert_same_beams(got, want)
    # Ties within one parent: integer logits resolve to the lower token in both.
    tied = torch.randint(-2, 3, (b * beam, trie.vocab_sizes[level]), device="cuda", generator=g).to(dtype)
    assert_same_beams(beam_step(tied, nodes, scores, trie, level, beam, normalize, backend="cuda"),
                      beam_step_ref(tied, nodes, scores, trie, level, beam, normalize))


@requires_kernel
@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_cuda_search_matches_reference_search(normalize):
    vocab = (64, 32, 48)
    codes = random_codes(20_000, vocab, seed=22, device="cuda")
    trie = SemanticIDTrie(codes, vocab)
    dec = TableDecoder(4, vocab, seed=23, device="cuda")
    got = constrained_beam_search(dec, trie, 4, 64, normalize, backend="cuda")
    want = constrained_beam_search_ref(dec, trie, 4, 64, normalize)
    assert torch.allclose(got.scores, want.scores, atol=1e-4)
    assert torch.equal(got.codes, want.codes) and torch.equal(got.item_ids, want.item_ids)


@requires_cuda
@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_search_is_cuda_graph_capturable(backend):
    if backend == "cuda" and not _has_cuda_beam_step():
        pytest.skip("needs the beam_step kernel")
    vocab = (256, 64, 64)
    codes = random_codes(50_000, vocab, seed=24, device="cuda")
    trie = SemanticIDTrie(codes, vocab)
    dec = TableDecoder(4, vocab, seed=25, device="cuda")
    eager = constrained_beam_search(dec, trie, 4, 32, backend=backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init)
        constrained_beam_search(dec, trie, 4, 32, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = constrained_beam_search(dec, trie, 4, 32, backend=backend)
    for t in captured:
        poison_(t)
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, eager):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# non-finite scores (issue 17, finding 3)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_beam_step_never_returns_nan_candidates(normalize):
    """A NaN among the logits a beam normalizes over makes its whole log-softmax NaN: the beam contributes no
    candidate, exactly as if its logits were all -inf, and no NaN score comes out ahead of a finite one."""
    vocab, beam = (6, 5, 4), 4
    trie = SemanticIDTrie(random_codes(60, vocab, seed=3), vocab)
    g = torch.Generator().manual_seed(5)
    state = beam_step_ref(torch.randn(2 * beam, vocab[0], generator=g), torch.zeros(2 * beam, dtype=torch.int32),
                          torch.tensor([0.0, NEG_INF, NEG_INF, NEG_INF] * 2), trie, 0, beam, normalize)
    nodes, scores = state.nodes.view(-1), state.scores.view(-1)
    logits = torch.randn(2 * beam, vocab[1], generator=g)
    valid_token = int(trie.valid_mask(1, nodes)[1].nonzero()[0])
    nan_logits, dead_logits = logits.clone(), logits.clone()
    nan_logits[1, valid_token] = float("nan")  # one NaN in a valid child of beam 1 of row 0
    nan_logits[beam] = float("nan")  # beam 0 of row 1: every logit NaN
    dead_logits[[1, beam]] = NEG_INF
    got = beam_step(nan_logits, nodes, scores, trie, 1, beam, normalize, backend="reference")
    want = beam_step(dead_logits, nodes, scores, trie, 1, beam, normalize, backend="reference")
    assert not torch.isnan(got.scores).any()
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def _nan_rows_decoder(decoder, rows, level):
    """``decoder`` whose logits of batch ``rows`` are NaN at ``level``."""
    def step(prefix):
        out = decoder(prefix).clone()
        if prefix.shape[-1] == level:
            out[rows] = float("nan")
        return out
    return step


@pytest.mark.parametrize("normalize", ["full", "valid"])
def test_search_with_nan_rows_warns_once_and_keeps_the_other_rows(normalize):
    from onerec_fast.numerics import NonFiniteWarning

    vocab, b, beam = (5, 4, 3), 3, 6
    trie = SemanticIDTrie(random_codes(40, vocab, seed=7), vocab)
    decoder = TableDecoder(b, vocab, seed=8)
    clean = constrained_beam_search(decoder, trie, b, beam, normalize)
    with pytest.warns(NonFiniteWarning, match=r"1 of 3 batch rows have no finite candidate \(rows 1\)") as record:
        got = constrained_beam_search(_nan_rows_decoder(decoder, [1], level=1), trie, b, beam, normalize)
    assert len(record) == 1, "one warning per search"
    assert torch.all(got.scores[1] == NEG_INF) and torch.all(got.item_ids[1] == -1) and torch.all(got.codes[1] == -1)
    for row in (0, 2):
        for name in got._fields:
            assert torch.equal(getattr(got, name)[row], getattr(clean, name)[row]), (row, name)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hidden_path_drops_nan_rows_as_the_logits_path_does(backend):
    """NaN hidden states of one batch row: the fused LM head's selection treats them as no candidate too."""
    from onerec_fast.numerics import NonFiniteWarning

    skip_unless_runs(backend, "cpu")
    vocab, b, beam, d = (8, 8, 8), 2, 4, 16
    trie = SemanticIDTrie(random_codes(50, vocab, seed=9), vocab)
    g = torch.Generator().manual_seed(10)
    weight, table = torch.randn(8, d, generator=g), torch.randn(b, d, generator=g)

    def hidden(prefix):
        h = (table[:, None, :] + prefix.sum(-1, keepdim=True).float() / 7).expand(b, beam, d).clone()
        h[1] = float("nan")
        return h

    with pytest.warns(NonFiniteWarning, match="rows 1"):
        got = constrained_beam_search(None, trie, b, beam, hidden_fn=hidden, lm_head_weight=weight, backend=backend)
    with pytest.warns(NonFiniteWarning, match="rows 1"):
        want = constrained_beam_search_ref(lambda p: hidden(p) @ weight.T, trie, b, beam)
    assert torch.all(got.item_ids[1] == -1) and not torch.isnan(got.scores).any()
    assert torch.equal(got.item_ids, want.item_ids)
    torch.testing.assert_close(got.scores, want.scores)
