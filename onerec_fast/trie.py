"""The semantic-ID trie: which code sequences are real items, in a compact per-level CSR on the device.

Layout (the contract shared with the CUDA beam step and the Triton constrained LM head, see
``docs/TRIE_FORMAT.md``): nodes are numbered per depth, depth 0 holds only the root (node 0). For each
level ``l`` in ``0..L-1``

* ``child_start[l]``: int32 ``[num_nodes[l] + 1]``; the children of depth-``l`` node ``n`` are the entries
  ``child_start[l][n] : child_start[l][n + 1]`` of ``child_tokens[l]``;
* ``child_tokens[l]``: int32 ``[num_nodes[l + 1]]``; the code at level ``l`` of each child, strictly ascending
  within one node's range. Child entry ``i`` *is* depth-``(l + 1)`` node ``i``.

Leaves are the depth-``L`` nodes: ``leaf_items[leaf_start[n] : leaf_start[n + 1]]`` (int32 offsets, int64 item
ids, ascending) are the items whose codes end at leaf ``n``, so duplicate codes keep every item. The optional
``dense_root`` (int32 ``[V[0]]``) maps a first-level token straight to its depth-1 node, or -1.

Everything is built on the codes' device by one sort and per-level ``unique``-style boundary flags: there
is no Python loop over items.

A lower layer: the ops, the decoding and the model import this module; it imports only ``onerec_fast.checks``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from onerec_fast.checks import check_tensor

__all__ = ["SemanticIDTrie"]

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
# A dense first-level table costs 4 bytes per vocabulary entry; by default it is built when that is
# at most 4 MiB (V[0] = 8192 costs 32 KiB).
_DENSE_ROOT_MAX_VOCAB = 1 << 20


def _vocab_sizes(vocab_size, num_levels: int) -> tuple[int, ...]:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, Sequence)):
        raise TypeError(f"vocab_size must be an int or a sequence of ints (one per level), got {vocab_size!r}")
    sizes = (vocab_size,) * num_levels if isinstance(vocab_size, int) else tuple(vocab_size)
    if len(sizes) != num_levels:
        raise ValueError(f"vocab_size must have one entry per level ({num_levels}), got {len(sizes)}: {sizes}")
    for lvl, v in enumerate(sizes):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"vocab_size[{lvl}] must be a positive int, got {v!r}")
        if v > 2**31 - 1:
            raise ValueError(f"vocab_size[{lvl}] must fit in int32, got {v}")
    return sizes


def _check_codes(name: str, codes, num_levels: int | None = None) -> torch.Tensor:
    check_tensor(name, codes, ndim=2)
    if codes.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype (int8..int64), got {codes.dtype}")
    if num_levels is not None and codes.shape[1] != num_levels:
        raise ValueError(f"{name} must have {num_levels} columns (one code per level), got shape {tuple(codes.shape)}")
    return codes


def _lex_sort(codes: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """The stable lexicographic order of the rows of ``codes`` ``[N, L]`` (ties keep ascending row index)."""
    if math.prod(sizes) < 2**63:
        # One sort on the mixed-radix key when it fits in int64.
        key = torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
        for lvl, v in enumerate(sizes):
            key = key * v + codes[:, lvl]
        return torch.sort(key, stable=True).indices
    # Otherwise least-significant-digit first: stable sorts by each level, last level first.
    perm = torch.arange(codes.shape[0], device=codes.device)
    for lvl in reversed(range(codes.shape[1])):
        perm = perm[torch.sort(codes[perm, lvl], stable=True).indices]
    return perm


class SemanticIDTrie:
    """Trie over item codes ``codes: [N, L]`` (integer, ``0 <= codes[:, l] < V[l]``), item ``i`` = row ``i``.

    ``vocab_size`` is one int for every level or one per level. ``dense_root``: build the dense first-level
    table (None: when ``V[0] <= 2**20``). Construction reads ``N``, the node counts and the per-level maximum
    fan-out back to the host once (they size the arrays and bound the vectorized searches).

    Attributes (see the module docstring): ``child_start``, ``child_tokens`` (lists, one tensor per level),
    ``leaf_start``, ``leaf_items``, ``dense_root`` (tensor or None), ``num_nodes`` (L + 1 ints),
    ``num_levels``, ``vocab_sizes``, ``num_items``, ``max_children`` (largest fan-out at each level).
    """

    def __init__(self, codes: torch.Tensor, vocab_size: int | Sequence[int], dense_root: bool | None = None):
        _check_codes("codes", codes)
        n, num_levels = codes.shape
        if num_levels < 1:
            raise ValueError(f"codes must have at least one level (column), got shape {tuple(codes.shape)}")
        if n == 0:
            raise ValueError("codes must hold at least one item (got an empty item set, shape [0, L])")
        if n >= 2**31:
            raise ValueError(f"codes must hold fewer than 2**31 items (int32 offsets), got {n}")
        sizes = _vocab_sizes(vocab_size, num_levels)
        codes = codes.long()
        lo, hi = codes.amin(dim=0).tolist(), codes.amax(dim=0).tolist()
        for lvl, v in enumerate(sizes):
            if lo[lvl] < 0 or hi[lvl] >= v:
                bad = lo[lvl] if lo[lvl] < 0 else hi[lvl]
                raise ValueError(f"codes[:, {lvl}] (level {lvl}) must lie in [0, {v}) (vocab_size[{lvl}] = {v}), "
                                 f"found {bad}")
        device = codes.device
        perm = _lex_sort(codes, sizes)
        sc = codes.index_select(0, perm)  # [N, L] sorted lexicographically, duplicates in ascending item order

        # new_prefix[i]: sorted row i starts a new depth-(l+1) node (its prefix of length l+1 differs from row i-1).
        new_prefix = torch.zeros(n, dtype=torch.bool, device=device)
        new_prefix[0] = True
        parent_of_row = torch.zeros(n, dtype=torch.int64, device=device)  # depth-l node of each sorted row
        self.child_start: list[torch.Tensor] = []
        self.child_tokens: list[torch.Tensor] = []
        num_nodes = [1]
        first_rows = None
        for lvl in range(num_levels):
            new_prefix[1:] |= sc[1:, lvl] != sc[:-1, lvl]
            first_rows = torch.nonzero(new_prefix).squeeze(1)  # first sorted row of each depth-(l+1) node
            num_nodes.append(first_rows.numel())
            parents = parent_of_row.index_select(0, first_rows)  # non-decreasing: children of one node are contiguous
            self.child_tokens.append(sc[:, lvl].index_select(0, first_rows).to(torch.int32))
            bounds = torch.arange(num_nodes[lvl] + 1, device=device)
            self.child_start.append(torch.searchsorted(parents, bounds).to(torch.int32))
            parent_of_row = torch.cumsum(new_prefix, 0) - 1
        self.leaf_start = torch.cat([first_rows, first_rows.new_full((1,), n)]).to(torch.int32)
        self.leaf_items = perm.to(torch.int64)
        self.num_nodes = num_nodes
        self.num_levels = num_levels
        self.vocab_sizes = sizes
        self.num_items = n
        self.max_children = torch.stack([cs.diff().max() for cs in self.child_start]).tolist()
        if dense_root is None:
            dense_root = sizes[0] <= _DENSE_ROOT_MAX_VOCAB
        self.dense_root = self._dense_root() if dense_root else None

    def _dense_root(self) -> torch.Tensor:
        table = torch.full((self.vocab_sizes[0],), -1, dtype=torch.int32, device=self.device)
        table[self.child_tokens[0].long()] = torch.arange(self.num_nodes[1], dtype=torch.int32, device=self.device)
        return table

    # ------------------------------------------------------------------ properties, device, memory, I/O

    @property
    def device(self) -> torch.device:
        return self.leaf_items.device

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for lvl in range(self.num_levels):
            out[f"child_start.{lvl}"] = self.child_start[lvl]
            out[f"child_tokens.{lvl}"] = self.child_tokens[lvl]
        out["leaf_start"] = self.leaf_start
        out["leaf_items"] = self.leaf_items
        if self.dense_root is not None:
            out["dense_root"] = self.dense_root
        return out

    def nbytes(self) -> int:
        """Device memory of all arrays, in bytes."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def bytes_per_item(self) -> float:
        return self.nbytes() / self.num_items

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All arrays plus the sizes, as a flat dict of tensors (savable with torch.save / safetensors)."""
        out = dict(self._tensors())
        out["vocab_sizes"] = torch.tensor(self.vocab_sizes, dtype=torch.int64)
        out["num_nodes"] = torch.tensor(self.num_nodes, dtype=torch.int64)
        out["max_children"] = torch.tensor(self.max_children, dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
                        ) -> SemanticIDTrie:
        """Rebuild a trie saved by :meth:`state_dict` (on ``device``, default: where the arrays are)."""
        need = {"vocab_sizes", "num_nodes", "max_children", "leaf_start", "leaf_items"}
        missing = need - set(state)
        if missing:
            raise ValueError(f"state is not a SemanticIDTrie state_dict: missing {sorted(missing)}")
        self = cls.__new__(cls)
        self.vocab_sizes = tuple(int(v) for v in state["vocab_sizes"].tolist())
        self.num_levels = len(self.vocab_sizes)
        self.num_nodes = [int(v) for v in state["num_nodes"].tolist()]
        self.max_children = [int(v) for v in state["max_children"].tolist()]
        dev = torch.device(device) if device is not None else state["leaf_items"].device
        try:
            self.child_start = [state[f"child_start.{lvl}"].to(dev) for lvl in range(self.num_levels)]
            self.child_tokens = [state[f"child_tokens.{lvl}"].to(dev) for lvl in range(self.num_levels)]
        except KeyError as e:
            raise ValueError(f"state is not a SemanticIDTrie state_dict: missing {e}") from None
        self.leaf_start = state["leaf_start"].to(dev)
        self.leaf_items = state["leaf_items"].to(dev)
        self.dense_root = state["dense_root"].to(dev) if "dense_root" in state else None
        self.num_items = self.leaf_items.numel()
        if len(self.num_nodes) != self.num_levels + 1 or self.leaf_start.numel() != self.num_nodes[-1] + 1:
            raise ValueError("state is not a consistent SemanticIDTrie state_dict (node counts disagree)")
        return self

    def to(self, device: torch.device | str) -> SemanticIDTrie:
        """A copy on ``device`` (self when already there)."""
        if torch.device(device) == self.device:
            return self
        return SemanticIDTrie.from_state_dict(self.state_dict(), device)

    def __repr__(self) -> str:
        return (f"SemanticIDTrie(items={self.num_items}, levels={self.num_levels}, vocab={self.vocab_sizes}, "
                f"nodes={self.num_nodes}, dense_root={self.dense_root is not None}, "
                f"{self.bytes_per_item():.1f} B/item, device={self.device})")

    # ------------------------------------------------------------------ walking

    def _check_level(self, level: int) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"level must be an int in [0, {self.num_levels}), got {level!r}")

    def _check_index(self, name: str, t) -> torch.Tensor:
        check_tensor(name, t, ndim=1, device=self.device)
        if t.dtype not in _INT_DTYPES:
            raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
        return t.long()

    def children(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Children ranges ``(start, end)`` (int64 ``[R]``) in ``child_tokens[level]`` of depth-``level``
        ``nodes: [R]``; a node of -1 (dead) gets the empty range (0, 0)."""
        self._check_level(level)
        nodes = self._check_index("nodes", nodes)
        return self._children(level, nodes)

    def _children(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cs = self.child_start[level]
        live = (nodes >= 0) & (nodes < self.num_nodes[level])
        safe = torch.where(live, nodes, 0)
        start = torch.where(live, cs[safe].long(), 0)
        end = torch.where(live, cs[safe + 1].long(), 0)
        return start, end

    def step(self, level: int, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Walk one level: the depth-``(level+1)`` child of each depth-``level`` node with that token.

        ``nodes: [R]`` (-1 = dead), ``tokens: [R]`` -> int64 ``[R]``, -1 where the node is dead or has no such
        child (tokens outside the vocabulary simply match nothing). A vectorized bisection inside each
        node's children range: ``bit_length(max_children[level])`` rounds of elementwise ops, no host sync.
        """
        self._check_level(level)
        nodes = self._check_index("nodes", nodes)
        tokens = self._check_index("tokens", tokens)
        if tokens.shape != nodes.shape:
            raise ValueError(f"tokens must have the shape of nodes {tuple(nodes.shape)}, got {tuple(tokens.shape)}")
        return self.step_unchecked(level, nodes, tokens)

    def step_unchecked(self, level: int, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`step` without its argument checks, for hot paths whose arguments are already valid: ``level``
        an int in ``[0, num_levels)``, ``nodes`` and ``tokens`` int64 ``[R]`` on the trie's device."""
        ct = self.child_tokens[level]
        if level == 0 and self.dense_root is not None:
            ok = (nodes == 0) & (tokens >= 0) & (tokens < self.vocab_sizes[0])
            return torch.where(ok, self.dense_root[torch.where(ok, tokens, 0)].long(), -1)
        start, end = self._children(level, nodes)
        lo, hi = start, end
        last = ct.numel() - 1
        for _ in range(self.max_children[level].bit_length()):  # lower bound of `tokens` in ct[lo:hi]
            mid = (lo + hi) >> 1
            right = ct[mid.clamp(max=last)].long() < tokens
            active = lo < hi
            lo = torch.where(active & right, mid + 1, lo)
            hi = torch.where(active & ~right, mid, hi)
        found = (lo < end) & (ct[lo.clamp(max=last)].long() == tokens)
        return torch.where(found, lo, -1)

    def valid_mask(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """bool ``[R, V[level]]``: which tokens extend each depth-``level`` node (all False for -1).

        Gathers each node's children padded to ``max_children[level]`` and scatters them: no host sync.
        """
        self._check_level(level)
        nodes = self._check_index("nodes", nodes)
        v = self.vocab_sizes[level]
        if level == 0:  # only the root has children: one row, broadcast (the padded gather would be [R, V])
            # index_fill_ (not ``root[idx] = True``, which copies a CPU scalar: no CUDA-graph capture)
            root = torch.zeros(v, dtype=torch.bool, device=self.device).index_fill_(0, self.child_tokens[0].long(), True)
            return (nodes == 0)[:, None] & root
        tokens, ok = self.padded_children(level, nodes)
        mask = torch.zeros(nodes.numel(), v + 1, dtype=torch.bool, device=self.device)
        mask.scatter_(1, torch.where(ok, tokens, v), True)  # invalid padding lands in the spare column v
        return mask[:, :v]

    def child_nodes(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each node's children as depth-``(level+1)`` node ids, padded to the level's largest fan-out.

        ``nodes: [R]`` (-1 = dead) -> ``ids`` int64 ``[R, max_children[level]]`` (-1 on padding) and their
        ``tokens`` int64 of the same shape (0 on padding). No host sync."""
        self._check_level(level)
        nodes = self._check_index("nodes", nodes)
        start, end = self._children(level, nodes)
        idx = start[:, None] + torch.arange(self.max_children[level], device=self.device)
        ok = idx < end[:, None]
        safe = torch.where(ok, idx, 0)
        return torch.where(ok, safe, -1), torch.where(ok, self.child_tokens[level][safe].long(), 0)

    def padded_children(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The children tokens of each node padded to the level's largest fan-out (the STATIC-style dense view).

        Returns ``tokens`` int64 ``[R, max_children[level]]`` and ``ok`` bool of the same shape (False on
        padding, where ``tokens`` is 0). Entry ``[r, j]`` is child entry ``start_r + j``.
        """
        ids, tokens = self.child_nodes(level, nodes)
        return tokens, ids >= 0

    # ------------------------------------------------------------------ item queries

    def prefix_nodes(self, codes: torch.Tensor) -> torch.Tensor:
        """The node of every prefix of each row of ``codes: [M, L]``: int64 ``[M, L + 1]``, column ``l`` the
        depth-``l`` node of ``codes[:, :l]`` (column 0 the root, 0), -1 from the first code that leaves the
        trie on. No host sync."""
        _check_codes("codes", codes, self.num_levels)
        check_tensor("codes", codes, device=self.device)
        codes = codes.long()
        nodes = [torch.zeros(codes.shape[0], dtype=torch.int64, device=self.device)]
        for lvl in range(self.num_levels):
            nodes.append(self.step_unchecked(lvl, nodes[-1], codes[:, lvl]))
        return torch.stack(nodes, dim=1)

    def _walk(self, codes: torch.Tensor) -> torch.Tensor:
        """Leaf node of each row of ``codes: [M, L]`` (int64 ``[M]``, -1 when the code is no item's)."""
        return self.prefix_nodes(codes)[:, -1]

    def leaf_item(self, leaves: torch.Tensor) -> torch.Tensor:
        """First (smallest) item id of each leaf ``leaves: [M]`` (int64 ``[M]``; -1 where the leaf is -1)."""
        leaves = self._check_index("leaves", leaves)
        live = leaves >= 0
        first = self.leaf_start[torch.where(live, leaves, 0)].long()
        return torch.where(live, self.leaf_items[first], -1)

    def contains(self, codes: torch.Tensor) -> torch.Tensor:
        """bool ``[M]``: whether each row of ``codes: [M, L]`` is some item's code."""
        return self._walk(codes) >= 0

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """int64 ``[M]``: the item id of each row of ``codes: [M, L]`` (the smallest for duplicate codes,
        -1 where no item has that code)."""
        return self.leaf_item(self._walk(codes))

    def lookup_all(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item of each row of ``codes: [M, L]``, jagged: ``(values int64 [total], offsets int64 [M+1])``;
        row ``m``'s items (ascending) are ``values[offsets[m]:offsets[m+1]]`` (empty when absent).
        Sizes the output from the data: one host sync."""
        leaves = self._walk(codes)
        live = leaves >= 0
        safe = torch.where(live, leaves, 0)
        start = self.leaf_start[safe].long()
        counts = torch.where(live, self.leaf_start[safe + 1].long() - start, 0)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        row = torch.repeat_interleave(torch.arange(counts.numel(), device=self.device), counts)
        pos = torch.arange(row.numel(), device=self.device) - offsets[row] + start[row]
        return self.leaf_items[pos], offsets
