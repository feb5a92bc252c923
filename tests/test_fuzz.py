"""Property-based fuzzing (hypothesis) of the fused ops against their oracles (issue 17): MoE and varlen
attention, Triton (the interpreter on CPU, fp32) against the float64 reference, output and every gradient;
trie-constrained beam search against brute-force enumeration of the trie's items.

Examples are bounded and derandomized (the same examples on every run, no example database), so CI on two cores
stays fast and a failure reproduces; hypothesis prints the failing arguments.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from onerec_fast.decoding import SemanticIDTrie, constrained_beam_search, constrained_beam_search_ref  # noqa: E402
from onerec_fast.ops.varlen_attention import varlen_cross_attention, varlen_cross_attention_ref  # noqa: E402
from tests.helpers import TRITON_DEVICES, assert_close  # noqa: E402
from tests.test_beam_search import NEG_INF, TableDecoder, brute_force, check_dead_and_real, random_codes  # noqa: E402
from tests.test_moe import _check_against_ref  # noqa: E402
from tests.test_varlen_attention import _assert_lse, _f64, _make, _run  # noqa: E402

# The interpreter runs each example in about a second: 25 examples per kernel property.
KERNEL_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                           suppress_health_check=[HealthCheck.too_slow])
needs_triton_cpu = pytest.mark.skipif("cpu" not in TRITON_DEVICES, reason="the Triton interpreter is not active")


@needs_triton_cpu
@KERNEL_SETTINGS
@given(T=st.integers(1, 12), d=st.integers(4, 40), f=st.integers(4, 40), E=st.integers(1, 6), data=st.data(),
       router=st.sampled_from(["softmax", "sigmoid"]), norm=st.booleans(), seed=st.integers(0, 2**16))
def test_moe_triton_matches_reference(T, d, f, E, data, router, norm, seed):
    """Output, the aux/z losses' routing terms and the gradients of x, the router and the three expert weights."""
    k = data.draw(st.integers(1, E), label="top_k")
    _check_against_ref("cpu", "triton", torch.float32, T, d, f, E, k, router, norm, seed=seed)


@needs_triton_cpu
@KERNEL_SETTINGS
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4), kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2]), seqlen_q=st.integers(1, 9), shared=st.booleans(),
       scale=st.sampled_from([None, 1.0, 0.05]), seed=st.integers(0, 2**16))
def test_varlen_attention_triton_matches_reference(lengths, kv_heads, group, seqlen_q, shared, scale, seed):
    """Ragged and empty rows, shared or per-row queries, GQA (one-pass and two-kernel backwards), any scale."""
    heads = kv_heads * group
    (q, k, v), cu = _make(lengths, heads, kv_heads, seqlen_q, 32, shared, torch.float32, "cpu", seed=seed)
    out, lse, dq, dk, dv = _run(
        lambda q, k, v: varlen_cross_attention(q, k, v, cu, scale, backend="triton", return_lse=True), q, k, v)
    r_out, r_lse, r_dq, r_dk, r_dv = _run(lambda q, k, v: varlen_cross_attention_ref(q, k, v, cu, scale),
                                          *_f64(q, k, v))
    assert_close("out", out, r_out, torch.float32, "cpu")
    _assert_lse(lse, r_lse, torch.float32, "cpu")
    for name, got, want in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
        assert_close(name, got, want, torch.float32, "cpu")


@settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True)
@given(vocab=st.lists(st.integers(1, 6), min_size=1, max_size=3), n=st.integers(1, 30), batch=st.integers(1, 3),
       extra_beam=st.integers(-8, 3), normalize=st.sampled_from(["full", "valid"]), ref=st.booleans(),
       seed=st.integers(0, 2**16))
def test_beam_search_matches_brute_force(vocab, n, batch, extra_beam, normalize, ref, seed):
    """Every returned item is real and scored as brute-force enumeration scores it, best first; a beam holding
    every item returns exactly the enumeration's ranking (then dead slots)."""
    vocab = tuple(vocab)
    codes = random_codes(n, vocab, seed=seed)
    trie = SemanticIDTrie(codes, vocab)
    items = trie.num_nodes[-1]
    beam = max(1, items + extra_beam)
    dec = TableDecoder(batch, vocab, seed=seed + 1)
    res = (constrained_beam_search_ref if ref else constrained_beam_search)(dec, trie, batch, beam, normalize)
    check_dead_and_real(trie, res, codes)
    oracle = brute_force(dec, codes, normalize)
    for row in range(batch):
        score_of = {code: s for s, code in oracle[row]}
        live = res.scores[row] > NEG_INF
        got = [tuple(c) for c in res.codes[row][live].tolist()]
        assert len(set(got)) == len(got), "an item came out twice"
        torch.testing.assert_close(res.scores[row][live].double(), torch.tensor([score_of[c] for c in got],
                                                                                dtype=torch.float64),
                                   rtol=0, atol=1e-5)
        if beam >= items:
            assert len(got) == items
            torch.testing.assert_close(res.scores[row][live].double(),
                                       torch.tensor([s for s, _ in oracle[row]], dtype=torch.float64),
                                       rtol=0, atol=1e-5)
