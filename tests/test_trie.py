"""SemanticIDTrie: structure, membership and lookup against Python dicts/sets, walking, I/O, errors."""

import io
from collections import defaultdict

import pytest
import torch

from onerec_fast.decoding import SemanticIDTrie
from tests.helpers import DEVICES, requires_cuda


def random_codes(n, vocab, seed, device="cpu", dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, v, (n, 1), generator=g) for v in vocab]
    return torch.cat(cols, 1).to(device=device, dtype=dtype)


def item_dict(codes):
    """code tuple -> ascending item ids (the independent oracle)."""
    d = defaultdict(list)
    for i, row in enumerate(codes.tolist()):
        d[tuple(row)].append(i)
    return d


def queries(codes, vocab, seed):
    """Half present codes, half random (mostly absent) ones, plus out-of-range rows."""
    g = torch.Generator().manual_seed(seed)
    present = codes.cpu()[torch.randint(0, codes.shape[0], (40,), generator=g)]
    rand = torch.cat([torch.randint(0, v, (40, 1), generator=g) for v in vocab], 1)
    edge = torch.tensor([[-1] + [0] * (len(vocab) - 1), [v for v in vocab]])
    return torch.cat([present, rand, edge]).to(codes.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab,n,dense", [((7, 5, 9), 150, None), ((4, 4, 4), 300, False), ((3,), 5, True),
                                           ((2, 3, 2, 5), 40, None)])
def test_contains_lookup_match_python_dict(device, vocab, n, dense):
    codes = random_codes(n, vocab, seed=n, device=device)
    trie = SemanticIDTrie(codes, list(vocab), dense_root=dense)
    oracle = item_dict(codes)
    q = queries(codes, vocab, seed=1)
    got_c, got_l = trie.contains(q).tolist(), trie.lookup(q).tolist()
    for row, c, item in zip(q.tolist(), got_c, got_l):
        ids = oracle.get(tuple(row), [])
        assert c == bool(ids), row
        assert item == (ids[0] if ids else -1), row
    values, offsets = trie.lookup_all(q)
    assert offsets.shape == (q.shape[0] + 1,) and int(offsets[0]) == 0
    for m, row in enumerate(q.tolist()):
        assert values[offsets[m]:offsets[m + 1]].tolist() == oracle.get(tuple(row), []), row


@pytest.mark.parametrize("device", DEVICES)
def test_structure_matches_unique_prefixes(device):
    vocab = (6, 4, 5)
    codes = random_codes(200, vocab, seed=3, device=device)
    trie = SemanticIDTrie(codes, vocab)
    rows = codes.tolist()
    for depth in range(4):
        assert trie.num_nodes[depth] == len({tuple(r[:depth]) for r in rows})
    assert trie.num_levels == 3 and trie.vocab_sizes == vocab and trie.num_items == 200
    for lvl in range(3):
        cs, ct = trie.child_start[lvl], trie.child_tokens[lvl]
        assert cs.dtype == torch.int32 and ct.dtype == torch.int32
        assert cs.shape == (trie.num_nodes[lvl] + 1,) and ct.shape == (trie.num_nodes[lvl + 1],)
        assert int(cs[0]) == 0 and int(cs[-1]) == ct.numel()
        fan = cs.diff()
        assert (fan >= 1).all() and int(fan.max()) == trie.max_children[lvl]
        for node in range(trie.num_nodes[lvl]):
            toks = ct[cs[node]:cs[node + 1]]
            assert (toks.diff() > 0).all()  # strictly ascending within one node
    assert trie.leaf_start.dtype == torch.int32 and trie.leaf_items.dtype == torch.int64
    assert sorted(trie.leaf_items.tolist()) == list(range(200))
    assert int(trie.leaf_start[-1]) == 200
    # dense root: token -> depth-1 node
    for tok in range(vocab[0]):
        node = int(trie.dense_root[tok])
        assert (node >= 0) == any(r[0] == tok for r in rows)
        if node >= 0:
            assert int(trie.child_tokens[0][node]) == tok
    arrays = trie.child_start + trie.child_tokens + [trie.leaf_start, trie.leaf_items, trie.dense_root]
    expected = sum(t.numel() * t.element_size() for t in arrays)
    assert trie.nbytes() == expected and trie.bytes_per_item() == pytest.approx(expected / 200)


@pytest.mark.parametrize("device", DEVICES)
def test_step_children_valid_mask(device):
    vocab = (5, 6, 4)
    codes = random_codes(60, vocab, seed=5, device=device)
    trie = SemanticIDTrie(codes, vocab, dense_root=False)
    rows = codes.tolist()
    # Map each depth-l prefix to its node id by walking the trie with step from the root.
    prefixes = {(): 0}
    for lvl in range(3):
        children = defaultdict(set)
        for r in rows:
            children[tuple(r[:lvl])].add(r[lvl])
        keys = sorted(prefixes)
        nodes = torch.tensor([prefixes[k] for k in keys] + [-1], device=device, dtype=torch.int32)
        mask = trie.valid_mask(lvl, nodes)
        tokens, ok = trie.padded_children(lvl, nodes)
        start, end = trie.children(lvl, nodes)
        assert mask.shape == (len(keys) + 1, vocab[lvl]) and not mask[-1].any()
        assert int(start[-1]) == int(end[-1]) == 0 and not ok[-1].any()
        for i, k in enumerate(keys):
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == children[k]
            assert tokens[i][ok[i]].tolist() == sorted(children[k])
            assert int(end[i] - start[i]) == len(children[k])
        # step: every (node, token) pair, valid or not, including out-of-vocabulary tokens.
        nn_ = nodes.long().repeat_interleave(vocab[lvl] + 2)
        tt = torch.arange(-1, vocab[lvl] + 1, device=device).repeat(len(keys) + 1)
        child = trie.step(lvl, nn_, tt).tolist()
        new = {}
        for p, tok, c in zip(nn_.tolist(), tt.tolist(), child):
            key = next((k for k in keys if prefixes[k] == p), None)
            valid = key is not None and tok in children[key]
            assert (c >= 0) == valid, (lvl, key, tok)
            if valid:
                assert int(trie.child_tokens[lvl][c]) == tok
                new[key + (tok,)] = c
        assert sorted(new.values()) == list(range(trie.num_nodes[lvl + 1]))
        # child_nodes: the same children as node ids, padded with -1
        ids, ctok = trie.child_nodes(lvl, nodes)
        assert ids.shape == ctok.shape == (len(keys) + 1, trie.max_children[lvl])
        assert bool((ids[-1] == -1).all())
        for i, k in enumerate(keys):
            got = {int(t): int(c) for t, c in zip(ctok[i], ids[i]) if c >= 0}
            assert got == {t: new[k + (t,)] for t in children[k]}
        prefixes = new
    # prefix_nodes: every depth's node of each row, the root first, -1 once a code leaves the trie
    walk = trie.prefix_nodes(codes)
    assert walk.shape == (60, 4) and bool((walk[:, 0] == 0).all())
    for lvl in range(3):
        assert torch.equal(walk[:, lvl + 1], trie.step(lvl, walk[:, lvl], codes[:, lvl].long()))
    bad = codes[:2].clone()
    bad[:, 0] = vocab[0] + 3  # out of the vocabulary: leaves at depth 1
    assert bool((trie.prefix_nodes(bad)[:, 1:] == -1).all())


def test_dense_root_and_lsd_sort_paths_agree():
    # Per-level vocabularies whose product overflows int64 take the LSD (one stable sort per level) path.
    big = (2**30,) * 3
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 4, (30, 3), generator=g) * (2**28)  # shared prefixes despite the huge vocabulary
    codes = torch.cat([base, base[:5], torch.tensor([[0, 2**30 - 1, 0], [2**30 - 1, 0, 2**30 - 1]])])
    trie = SemanticIDTrie(codes, big)
    assert trie.dense_root is None  # V[0] too large for the default dense table
    oracle = item_dict(codes)
    got = trie.lookup(codes).tolist()
    assert got == [oracle[tuple(r)][0] for r in codes.tolist()]
    small = random_codes(100, (9, 9, 9), seed=7)
    a, b = SemanticIDTrie(small, 9, dense_root=True), SemanticIDTrie(small, 9, dense_root=False)
    q = queries(small, (9, 9, 9), seed=2)
    assert torch.equal(a.lookup(q), b.lookup(q))


def test_duplicates_single_item_and_edges():
    codes = torch.tensor([[3, 0, 7], [0, 0, 0], [3, 0, 7], [7, 7, 7], [3, 0, 7], [0, 0, 0]], dtype=torch.int32)
    trie = SemanticIDTrie(codes, 8)
    assert trie.lookup(codes).tolist() == [0, 1, 0, 3, 0, 1]
    values, offsets = trie.lookup_all(torch.tensor([[3, 0, 7], [1, 1, 1], [0, 0, 0]]))
    assert values.tolist() == [0, 2, 4, 1, 5] and offsets.tolist() == [0, 3, 3, 5]
    one = SemanticIDTrie(torch.tensor([[5, 2]]), (6, 3))
    assert one.num_nodes == [1, 1, 1] and one.lookup(torch.tensor([[5, 2], [5, 1]])).tolist() == [0, -1]


def test_state_dict_roundtrip():
    codes = random_codes(80, (6, 6, 6), seed=11)
    trie = SemanticIDTrie(codes, 6)
    buf = io.BytesIO()
    torch.save(trie.state_dict(), buf)
    buf.seek(0)
    back = SemanticIDTrie.from_state_dict(torch.load(buf))
    for name, t in trie.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    assert back.num_nodes == trie.num_nodes and back.max_children == trie.max_children
    q = queries(codes, (6, 6, 6), seed=3)
    assert torch.equal(back.lookup(q), trie.lookup(q))
    assert trie.to("cpu") is trie
    with pytest.raises(ValueError, match="missing"):
        SemanticIDTrie.from_state_dict({"leaf_items": trie.leaf_items})


def test_bad_input_raises():
    ok = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match=r"level 1.*\[0, 4\)"):
        SemanticIDTrie(ok, (8, 4, 8))
    with pytest.raises(ValueError, match="level 0"):
        SemanticIDTrie(torch.tensor([[-1, 0, 0]]), 8)
    with pytest.raises(ValueError, match="empty item set"):
        SemanticIDTrie(torch.zeros(0, 3, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="2 dimensions"):
        SemanticIDTrie(torch.zeros(3, dtype=torch.int64), 8)
    with pytest.raises(TypeError, match="integer dtype"):
        SemanticIDTrie(ok.float(), 8)
    with pytest.raises(TypeError, match="codes must be a torch.Tensor"):
        SemanticIDTrie([[0, 1, 2]], 8)
    with pytest.raises(ValueError, match="one entry per level"):
        SemanticIDTrie(ok, (8, 8))
    with pytest.raises(ValueError, match=r"vocab_size\[1\]"):
        SemanticIDTrie(ok, (8, 0, 8))
    trie = SemanticIDTrie(ok, 8)
    with pytest.raises(ValueError, match="3 columns"):
        trie.lookup(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer dtype"):
        trie.contains(ok.double())
    with pytest.raises(ValueError, match="level"):
        trie.step(3, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape of nodes"):
        trie.step(0, torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))


@requires_cuda
def test_cuda_build_equals_cpu_build():
    codes = random_codes(5000, (64, 64, 64), seed=13)
    cpu, gpu = SemanticIDTrie(codes, 64), SemanticIDTrie(codes.cuda(), 64)
    assert gpu.device.type == "cuda" and gpu.num_nodes == cpu.num_nodes
    for name, t in cpu.state_dict().items():
        assert torch.equal(t, gpu.state_dict()[name].cpu()), name
    moved = cpu.to("cuda")
    q = queries(codes, (64, 64, 64), seed=4)
    assert torch.equal(moved.lookup(q.cuda()).cpu(), cpu.lookup(q))
