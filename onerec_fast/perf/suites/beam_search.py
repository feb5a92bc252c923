"""Benchmark suite: trie-constrained beam search over semantic IDs (issue 5).

Setting: 32 users x beam 128 (4096 rows), V = 8192 per level, d = 1024, 3 levels, item sets of 1M and 10M
codes from :func:`zipf_clustered_codes`. Cases:

* ``trie build``: :class:`SemanticIDTrie` construction (sort + unique on the device); the case name carries
  the memory (bytes per item).
* ``step L<l>``: one beam step at level ``l`` on precomputed logits ``[4096, 8192]`` and beam states reached
  by real search steps;
* ``search 3 levels``: the whole search with a ``step_fn`` that returns precomputed logits (decoding cost
  only), and a small-batch case (1 user x 128 beams) that adds the Hugging Face-style baseline;
* ``lm_head+step L<l>`` and ``search 3 levels LM head``: from hidden states ``[4096, 1024]`` and the output
  embedding ``[8192, 1024]`` (bf16): the LM head plus the step, against the plain LM-head GEMM alone (the
  speedup column divides by ``gemm`` there).

Implementations (every one gets the same inputs):

* ``hf_prefix_fn``: Hugging Face ``prefix_allowed_tokens_fn`` style: a nested-dict Python trie queried per
  beam, a ``-inf`` mask filled row by row, ``log_softmax`` + ``topk`` over beam x V (small batch only);
* ``dense_mask``: dense PyTorch masking: a ``[rows, V]`` mask scattered from the trie, ``masked_fill`` +
  ``log_softmax`` + ``topk`` over beam x V;
* ``csr_gather``: STATIC-style vectorized CSR gather: children padded to the level's largest fan-out,
  gathered logits, log-sum-exp, ``topk`` over beam x fan-out (dense mask at the first level, as STATIC does);
* ``reference``: :func:`onerec_fast.ops.beam_step.beam_step_ref` (exact ties);
* ``cuda``: the fused beam step of ``csrc/beam_step/`` (after a plain bf16 GEMM in the LM-head cases);
* ``fused`` (LM-head cases): the Triton constrained LM head (``onerec_fast.ops.lm_head``, never writing
  ``[rows, V]`` logits) feeding the CUDA selection kernel; ``fused:gather`` forces its children-only method
  (``normalize="valid"``).

``quick=True`` (CPU): 2 users x beam 8, V = 64, d = 16, a few thousand items; the LM-head cases run one
level only (the Triton interpreter is slow).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from onerec_fast.decoding.beam_search import run_beam_search
from onerec_fast.ops.beam_step import BeamStepOutput, beam_step, beam_step_ref, cuda_beam_step_fn
from onerec_fast.ops.lm_head import constrained_lm_head_beam_step, constrained_lm_head_beam_step_ref
from onerec_fast.perf.flops import lm_head_flops
from onerec_fast.perf.harness import Case, Unavailable
from onerec_fast.perf.timing import capture_cuda_graph
from onerec_fast.trie import SemanticIDTrie

SUITE = "beam_search"
FULL = dict(users=32, beam=128, vocab=8192, levels=3, d=1024, item_sets=(1_000_000, 10_000_000),
            hf_items=1_000_000, lm_items=10_000_000, lm_levels=(0, 1, 2))
QUICK = dict(users=2, beam=8, vocab=64, levels=3, d=16, item_sets=(3_000,), hf_items=3_000, lm_items=3_000,
             lm_levels=(1,))


def zipf_clustered_codes(n: int, vocab: tuple[int, ...], alpha: float = 1.0, seed: int = 0,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """Synthetic item codes ``int64 [n, L]`` with skewed, clustered prefixes (no Python loop over items).

    Level 0 is a Zipf(``alpha``) draw over the vocabulary; at level ``l > 0`` an item's code is a Zipf(``alpha``)
    rank added to a pseudo-random offset hashed from its prefix (mod ``V[l]``), so each prefix's children
    cluster on a few popular codes and popular prefixes have many children. Duplicate codes occur, as with
    real residual-quantized IDs. With V = 8192 and 10M items: ~7.7M distinct codes, fan-out up to V.
    """
    g = torch.Generator(device).manual_seed(seed)
    prefix = torch.zeros(n, dtype=torch.int64, device=device)
    cols = []
    for v in vocab:
        weights = torch.arange(1, v + 1, dtype=torch.float64, device=device) ** -alpha
        cdf = torch.cumsum(weights, 0)
        rank = torch.searchsorted(cdf / cdf[-1], torch.rand(n, generator=g, dtype=torch.float64, device=device))
        h = (prefix % 2147483647) * 2654435761 + seed  # < 2**63: a multiplicative hash of the prefix
        h = h ^ (h >> 29)
        code = (h + rank.clamp(max=v - 1)) % v
        cols.append(code)
        prefix = prefix * v + code
    return torch.stack(cols, 1)


@functools.lru_cache(maxsize=2)
def item_set(n: int, vocab: int, levels: int, device: str) -> SemanticIDTrie:
    """The trie of ``n`` Zipf-clustered items (cached: the 10M set is shared by many cases)."""
    return SemanticIDTrie(zipf_clustered_codes(n, (vocab,) * levels, device=device), vocab)


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else str(n)


# ---------------------------------------------------------------------------------------------- baselines

def _finish(trie, level, nodes, beam, top, parents, tokens, new_nodes=None) -> BeamStepOutput:
    """Dead slots to -1 and the child nodes (found by the trie walk unless given)."""
    b = top.shape[0]
    dead = top == float("-inf")
    parent_rows = (torch.arange(b, device=top.device)[:, None] * beam + parents).view(-1)
    if new_nodes is None:
        new_nodes = trie.step(level, nodes[parent_rows].long(), tokens.view(-1)).view(b, beam)
    return BeamStepOutput(torch.where(dead, -1, tokens), torch.where(dead, -1, parents),
                          torch.where(dead, -1, new_nodes).int(), top)


def dense_mask_step(logits, nodes, scores, trie, level, beam, normalize) -> BeamStepOutput:
    """Dense PyTorch masking: scatter a ``[R, V]`` mask, masked_fill + log_softmax + topk over beam x V."""
    rows, v = logits.shape
    mask = trie.valid_mask(level, nodes)
    x = logits.float()
    if normalize == "valid":
        x = x.masked_fill(~mask, float("-inf"))
    logp = torch.log_softmax(x, -1).masked_fill(~mask, float("-inf"))
    top, flat = (scores[:, None] + logp).view(rows // beam, beam * v).topk(beam, dim=1)
    return _finish(trie, level, nodes, beam, top, flat // v, flat % v)


def csr_gather_step(logits, nodes, scores, trie, level, beam, normalize) -> BeamStepOutput:
    """STATIC-style vectorized CSR gather: children padded to the level's largest fan-out ``W``, their logits
    gathered, log-sum-exp, topk over beam x W. The first level uses the dense mask (STATIC's dense levels)."""
    if level == 0:
        return dense_mask_step(logits, nodes, scores, trie, level, beam, normalize)
    rows = logits.shape[0]
    tokens, ok = trie.padded_children(level, nodes)  # [R, W]
    start, _ = trie.children(level, nodes)
    w = tokens.shape[1]
    picked = logits.gather(1, tokens).float()
    lse = torch.logsumexp(picked.masked_fill(~ok, float("-inf")) if normalize == "valid" else logits.float(), -1)
    cand = (scores[:, None] + picked - lse[:, None]).masked_fill(~ok, float("-inf"))
    top, flat = cand.view(rows // beam, beam * w).topk(beam, dim=1)
    parents, j = flat // w, flat % w
    parent_rows = (torch.arange(rows // beam, device=logits.device)[:, None] * beam + parents).view(-1)
    chosen = tokens[parent_rows, j.view(-1)].view_as(j)
    return _finish(trie, level, nodes, beam, top, parents, chosen, (start[parent_rows] + j.view(-1)).view_as(j))


def cuda_step(logits, nodes, scores, trie, level, beam, normalize) -> BeamStepOutput:
    return beam_step(logits, nodes, scores, trie, level, beam, normalize, backend="cuda")


STEPS: dict[str, Callable[..., BeamStepOutput]] = {
    "dense_mask": dense_mask_step,
    "csr_gather": csr_gather_step,
    "reference": beam_step_ref,
    "cuda": cuda_step,
}


def python_trie(trie: SemanticIDTrie) -> dict:
    """The nested-dict trie ``{code: {code: ... {}}}`` a Hugging Face ``prefix_allowed_tokens_fn`` walks."""
    root: dict = {}
    n = trie.num_nodes[-1]
    leaves = torch.arange(n, device=trie.device)
    codes = [None] * trie.num_levels
    # Recover each leaf's code by walking up: child entry i of level l is depth-(l+1) node i.
    node = leaves
    for lvl in reversed(range(trie.num_levels)):
        codes[lvl] = trie.child_tokens[lvl][node]
        node = torch.searchsorted(trie.child_start[lvl], node.int(), right=True) - 1
    for row in torch.stack(codes, 1).tolist():
        d = root
        for c in row:
            d = d.setdefault(c, {})
    return root


def hf_prefix_fn_search(step_fn, allowed_trie: dict, batch: int, beam: int, levels: int, device):
    """Hugging Face-style constrained beam search: ``prefix_allowed_tokens_fn(batch_id, prefix)`` walks a
    Python trie per beam, a ``-inf`` mask is filled row by row, then log_softmax + mask + scores, topk."""

    def prefix_allowed_tokens_fn(batch_id: int, sent: list[int]) -> list[int]:
        d = allowed_trie
        for c in sent:
            d = d.get(c, {})
        return list(d)

    prefix = torch.zeros(batch, beam, 0, dtype=torch.int64, device=device)
    scores = torch.full((batch, beam), float("-inf"), device=device)
    scores[:, 0] = 0
    for _ in range(levels):
        logp = torch.log_softmax(step_fn(prefix).float(), -1)
        v = logp.shape[-1]
        mask = torch.full((batch * beam, v), float("-inf"), device=device)
        for r, sent in enumerate(prefix.view(batch * beam, -1).tolist()):
            mask[r, prefix_allowed_tokens_fn(r // beam, sent)] = 0
        cand = logp + mask.view(batch, beam, v) + scores[..., None]
        scores, flat = cand.view(batch, -1).topk(beam, dim=1)
        prefix = torch.cat([prefix.gather(1, (flat // v)[..., None].expand(-1, -1, prefix.shape[-1])),
                            (flat % v)[..., None]], -1)
    return prefix, scores


# ---------------------------------------------------------------------------------------------- cases

def _states(trie, users, beam, level, dtype, seed):
    """Logits [R, V] of ``level`` and the beam state after ``level`` real (reference) steps."""
    g = torch.Generator(trie.device).manual_seed(seed)
    r = users * beam
    scores = torch.full((users, beam), float("-inf"), device=trie.device)
    scores[:, 0] = 0
    scores, nodes = scores.view(-1), torch.zeros(r, dtype=torch.int32, device=trie.device)
    for t in range(level + 1):
        logits = (torch.randn(r, trie.vocab_sizes[t], generator=g, device=trie.device) * 2).to(dtype)
        if t < level:
            out = beam_step_ref(logits, nodes, scores, trie, t, beam, "full")
            scores, nodes = out.scores.view(-1), out.nodes.view(-1)
    return logits, nodes, scores


def _logits_fn(trie, users, beam, dtype, seed):
    """A step_fn returning fixed random logits per level (the decoder's cost left out)."""
    g = torch.Generator(trie.device).manual_seed(seed)
    table = [(torch.randn(users, beam, v, generator=g, device=trie.device) * 2).to(dtype) for v in trie.vocab_sizes]
    return lambda prefix: table[prefix.shape[-1]]


def _make(label: str, run: Callable[[dict], Callable[[], object]]):
    """The harness's ``inputs -> fn`` for ``label``: raises Unavailable when its backend is missing here;
    a ``*_graph`` label replays ``run``'s function from a CUDA graph."""

    def make(inputs: dict):
        dev = inputs["device"]
        if label.startswith("cuda"):
            if dev.type != "cuda" or cuda_beam_step_fn() is None:
                raise Unavailable("the fused beam_step kernel needs CUDA and onerec_fast._C built with csrc/beam_step")
        if label.startswith("fused"):
            from onerec_fast.backends import resolve_backend

            try:
                resolve_backend("lm_head", "triton", dev, ("triton", "reference"))
            except RuntimeError as e:
                raise Unavailable(str(e)) from None
        if label.endswith("_graph"):
            if dev.type != "cuda":
                raise Unavailable("CUDA graphs need a CUDA device")
            return capture_cuda_graph(run(inputs)).replay
        return run(inputs)

    return make


def _with_graphs(steps: dict[str, Callable]) -> dict[str, Callable]:
    """Add a ``<label>_graph`` twin after each fused implementation (``cuda``, ``fused``)."""
    out = {}
    for label, fn in steps.items():
        out[label] = fn
        if label in ("cuda", "fused"):
            out[f"{label}_graph"] = fn
    return out


def _build_case(n, cfg, device, dtype) -> Case:
    trie = item_set(n, cfg["vocab"], cfg["levels"], str(device))
    name = f"trie build N={_size(n)} ({trie.bytes_per_item():.1f} B/item, {trie.nbytes() / 2**20:.0f} MiB)"

    def setup():
        return {"codes": zipf_clustered_codes(n, (cfg["vocab"],) * cfg["levels"], device=device)}

    return Case(SUITE, name, 0.0, setup, {"sort+unique": lambda x: lambda: SemanticIDTrie(x["codes"], cfg["vocab"])},
                reference="sort+unique", dtype=dtype, params={"items": n, "bytes_per_item": trie.bytes_per_item()})


def _step_case(n, level, normalize, cfg, device, dtype) -> Case:
    users, beam = cfg["users"], cfg["beam"]

    def setup():
        trie = item_set(n, cfg["vocab"], cfg["levels"], str(device))
        logits, nodes, scores = _states(trie, users, beam, level, dtype, seed=level)
        return {"args": (logits, nodes, scores, trie, level, beam, normalize), "device": device}

    impls = {label: _make(label, lambda x, f=fn: (lambda: f(*x["args"])))
             for label, fn in _with_graphs(STEPS).items()}
    name = f"step L{level} N={_size(n)} {normalize} {users}x{beam} V{cfg['vocab']}"
    return Case(SUITE, name, 0.0, setup, impls, dtype=dtype, params={"items": n, "level": level})


def _search_case(n, normalize, users, cfg, device, dtype, hf: bool) -> Case:
    beam, levels = cfg["beam"], cfg["levels"]

    def setup():
        trie = item_set(n, cfg["vocab"], levels, str(device))
        inputs = {"trie": trie, "step_fn": _logits_fn(trie, users, beam, dtype, seed=7), "device": device}
        if hf:
            inputs["python_trie"] = python_trie(trie)
        return inputs

    impls = {label: _make(label, lambda x, f=fn: (lambda: run_beam_search(x["step_fn"], x["trie"], users, beam,
                                                                          normalize, None, None, f)))
             for label, fn in _with_graphs(STEPS).items()}
    if hf:
        impls = {"hf_prefix_fn": lambda x: (lambda: hf_prefix_fn_search(x["step_fn"], x["python_trie"], users, beam,
                                                                        levels, device)), **impls}
    name = f"search {levels} levels N={_size(n)} {normalize} {users}x{beam} V{cfg['vocab']}"
    return Case(SUITE, name, 0.0, setup, impls, dtype=dtype, params={"items": n, "users": users})


def _lm_inputs(trie, users, beam, d, dtype, seed):
    """Hidden states [B, beam, d] per level and the output embedding [V, d] (logits of std ~2)."""
    g = torch.Generator(trie.device).manual_seed(seed)
    v = trie.vocab_sizes[0]
    weight = (torch.randn(v, d, generator=g, device=trie.device) * (2 / d**0.5)).to(dtype)
    hidden = [torch.randn(users, beam, d, generator=g, device=trie.device).to(dtype) for _ in trie.vocab_sizes]
    return hidden, weight


def _gemm_then(step: Callable[..., BeamStepOutput]) -> Callable[..., BeamStepOutput]:
    """A logits-based step behind a plain LM-head GEMM (the logits [R, V] are written)."""

    def head_step(hidden, weight, nodes, scores, trie, level, beam, normalize):
        return step(hidden @ weight.t(), nodes, scores, trie, level, beam, normalize)

    return head_step


def _fused(method: str) -> Callable[..., BeamStepOutput]:
    def head_step(hidden, weight, nodes, scores, trie, level, beam, normalize):
        return constrained_lm_head_beam_step(hidden, weight, nodes, scores, trie, level, beam, normalize,
                                             backend="triton", method=method)

    return head_step


def _head_steps(normalize: str) -> dict[str, Callable[..., BeamStepOutput]]:
    steps = {label: _gemm_then(fn) for label, fn in STEPS.items() if label != "reference"}
    steps["reference"] = constrained_lm_head_beam_step_ref
    steps["fused"] = _fused("auto")
    if normalize == "valid":
        steps["fused:gather"] = _fused("gather")
    return steps


def _lm_step_case(n, level, normalize, cfg, device, dtype) -> Case:
    users, beam, d, v = cfg["users"], cfg["beam"], cfg["d"], cfg["vocab"]

    def setup():
        trie = item_set(n, v, cfg["levels"], str(device))
        _, nodes, scores = _states(trie, users, beam, level, dtype, seed=level)
        hidden, weight = _lm_inputs(trie, users, beam, d, dtype, seed=level)
        return {"args": (hidden[level].view(users * beam, d), weight, nodes, scores, trie, level, beam, normalize),
                "device": device}

    impls = {"gemm": lambda x: (lambda: x["args"][0] @ x["args"][1].t())}
    impls.update({label: _make(label, lambda x, f=fn: (lambda: f(*x["args"])))
                  for label, fn in _with_graphs(_head_steps(normalize)).items()})
    name = f"lm_head+step L{level} N={_size(n)} {normalize} {users}x{beam} d{d}"
    return Case(SUITE, name, lm_head_flops(users * beam, d, v), setup, impls, reference="gemm", dtype=dtype,
                params={"items": n, "level": level})


def _lm_search_case(n, normalize, cfg, device, dtype) -> Case:
    users, beam, d, v, levels = cfg["users"], cfg["beam"], cfg["d"], cfg["vocab"], cfg["levels"]

    def setup():
        trie = item_set(n, v, levels, str(device))
        hidden, weight = _lm_inputs(trie, users, beam, d, dtype, seed=9)
        return {"trie": trie, "hidden_fn": lambda prefix: hidden[prefix.shape[-1]], "weight": weight,
                "device": device}

    def run(head_step):
        return lambda x: (lambda: run_beam_search(None, x["trie"], users, beam, normalize, x["hidden_fn"],
                                                  x["weight"], None, head_step))

    impls = {label: _make(label, run(fn)) for label, fn in _with_graphs(_head_steps(normalize)).items()}
    name = f"search {levels} levels LM head N={_size(n)} {normalize} {users}x{beam} d{d}"
    return Case(SUITE, name, levels * lm_head_flops(users * beam, d, v), setup, impls, dtype=dtype,
                params={"items": n})


def cases(device: torch.device, quick: bool) -> list[Case]:
    cfg = QUICK if quick else FULL
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    out = []
    for n in cfg["item_sets"]:
        out.append(_build_case(n, cfg, device, dtype))
    for n in cfg["item_sets"]:
        for normalize in ("full", "valid"):
            out += [_step_case(n, level, normalize, cfg, device, dtype) for level in range(cfg["levels"])]
            out.append(_search_case(n, normalize, cfg["users"], cfg, device, dtype, hf=False))
    out.append(_search_case(cfg["hf_items"], "full", 1, cfg, device, dtype, hf=True))
    for normalize in ("full", "valid"):
        out += [_lm_step_case(cfg["lm_items"], level, normalize, cfg, device, dtype) for level in cfg["lm_levels"]]
        if not quick:
            out.append(_lm_search_case(cfg["lm_items"], normalize, cfg, device, dtype))
    return out
