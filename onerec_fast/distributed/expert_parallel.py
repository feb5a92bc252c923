"""Expert parallelism: a :class:`~onerec_fast.modules.MoELayer` whose experts are split over a process group.

Each of the P ranks of the expert-parallel (EP) group holds ``E / P`` experts, rank r the global ids
``r * E/P ... (r+1) * E/P - 1`` (``w1, w3: [E/P, d, f]``, ``w2: [E/P, f, d]``); the router and
``expert_bias: [E]`` are replicated. Each rank feeds its own tokens ``x: [T_r, d]``. Forward:

1. route on the rank over all E experts; the ``T_r * k`` (token, slot) pairs come grouped by expert,
   hence by destination rank (a rank's experts have consecutive ids);
2. exchange the per-expert pair counts (``all_to_all_single`` of an int64 ``[E]`` tensor), giving
   ``recv[s, e]``: pairs rank s sends to local expert e. **One host sync**: a single ``.tolist()`` of
   the per-rank send and receive row counts, which ``all_to_all_single`` needs as Python ints for its
   split sizes (NCCL sends variable-size chunks only with host-known sizes);
3. dispatch: the rows ``x[token of pair]`` in expert order go out with ``all_to_all_single``; a rank
   receives ``N = sum(recv)`` rows ordered by (source rank, local expert);
4. the local experts run on them with :func:`~onerec_fast.ops.moe.moe_experts` (the Triton grouped
   GEMMs on GPU, the reference on CPU), grouped by local expert through a permutation computed from
   the exchanged counts (the GEMMs gather through it; no sort, no second copy of the rows);
5. combine: ``all_to_all_single`` back, rows to pair order, and the gate-weighted sum over each token's
   k slots in slot order, in fp32 (deterministic, no atomics).

The backward runs the transposed all-to-alls (the same splits, swapped). Gradients are those of the
**sum of the ranks' losses**: each rank's expert gradients already hold every rank's tokens, and (with
``reduce_router_grad``) the router gradient is summed over the group in the backward, so all ranks
keep the same router. Data-parallel wrappers must therefore not all-reduce ``w1, w3, w2`` over the EP
group, nor the router when ``reduce_router_grad`` is on. ``update_expert_bias`` sums the per-expert
load over the group first, so every rank computes the same bias. ``last_stats`` and ``aux_loss``
describe the rank's own tokens (as under plain data parallelism).

Every rank must call ``forward`` (also with zero tokens), ``backward`` and ``update_expert_bias`` of
its layers in the same order, and ``x.requires_grad`` must agree over the group (the backward of the
dispatch is a collective).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from onerec_fast.backends import resolve_backend
from onerec_fast.modules.moe import MoELayer, check_state_dict
from onerec_fast.ops.moe import moe_backends, moe_experts, router_logits
from onerec_fast.ops.moe_routing import MoERouting, moe_route

__all__ = ["ExpertParallelMoE", "shard_experts"]


def _group_size_rank(group) -> tuple[int, int]:
    if not dist.is_available():
        raise RuntimeError("ExpertParallelMoE needs a PyTorch build with torch.distributed")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None (the default group), "
                        f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("ExpertParallelMoE needs torch.distributed: call torch.distributed.init_process_group first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group must contain this process (torch.distributed.get_rank(group) is -1)")
    return dist.get_world_size(group), rank


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                timer: Callable[[], contextlib.AbstractContextManager] | None) -> torch.Tensor:
    """Rows of ``x: [sum(in_splits), ...]`` to the ranks (``in_splits[r]`` to rank r); returns the
    ``[sum(out_splits), ...]`` rows received, ``out_splits[r]`` from rank r, in rank order."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    with timer() if timer is not None else contextlib.nullcontext():
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable :func:`_all_to_all`: the backward sends the gradient rows back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, timer):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.timer = out_splits, in_splits, group, timer
        return _all_to_all(x, out_splits, in_splits, group, timer)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.in_splits, ctx.out_splits, ctx.group, ctx.timer), None, None, None, None


class _GatherPairs(torch.autograd.Function):
    """``x: [T, d]`` -> ``x[sorted_pair_idx // k]: [T*k, d]`` (each pair's token row, in expert order).

    Backward: the pair gradients back to pair order, then each token's k rows summed in slot order,
    deterministic (index_select's own backward would add duplicate rows with atomics on CUDA)."""

    @staticmethod
    def forward(ctx, x, sorted_pair_idx, top_k):
        idx = sorted_pair_idx.long()
        ctx.save_for_backward(idx)
        ctx.top_k = top_k
        return x.index_select(0, idx // top_k)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        g_pairs = g.new_empty(g.shape).index_copy_(0, idx, g)
        return g_pairs.view(-1, ctx.top_k, g.shape[1]).sum(1), None, None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the backward all-reduces (sums) the gradient over ``group``, in fp32."""

    @staticmethod
    def forward(ctx, w, group):
        ctx.group = group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        g32 = g.to(torch.float32, copy=True)
        dist.all_reduce(g32, group=ctx.group)
        return g32.to(g.dtype), None


class ExpertParallelMoE(MoELayer):
    """:class:`MoELayer` with its experts split over the ranks of ``group`` (see the module docstring).

    Same arguments and API as :class:`MoELayer`, plus:

    Args:
        group: the expert-parallel ``ProcessGroup`` (None: the default group); ``num_experts`` must
            be a multiple of its size.
        reduce_router_grad: sum the router's gradient over ``group`` in the backward (turn off when a
            data-parallel wrapper already all-reduces the router over a group containing this one).

    Parameters: ``router`` ``[E, d]`` (replicated), ``w1, w3: [E/P, d, f]``, ``w2: [E/P, f, d]`` (this
    rank's experts, global ids :attr:`local_experts`); buffer ``expert_bias: [E]`` (replicated).
    ``comm_timer``: None, or a callable returning a context manager that is entered around each token
    all-to-all (two in the forward, two in the backward), for profiling.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, router: str = "softmax",
                 norm_topk: bool = True, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 backend: str = "auto", dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 *, group: dist.ProcessGroup | None = None, reduce_router_grad: bool = True):
        ep_size, ep_rank = _group_size_rank(group)
        if isinstance(num_experts, int) and not isinstance(num_experts, bool) and num_experts % ep_size:
            raise ValueError(f"num_experts must be a multiple of the expert-parallel group size {ep_size}, "
                             f"got {num_experts}")
        # Set before MoELayer.__init__, which sizes the expert weights by local_experts.
        self.ep_group, self.ep_size, self.ep_rank = group, ep_size, ep_rank
        super().__init__(d_model, d_ff, num_experts, top_k, router, norm_topk, aux_loss_coef, z_loss_coef, backend,
                         dtype, device)
        self.reduce_router_grad = bool(reduce_router_grad)
        self.comm_timer: Callable[[], contextlib.AbstractContextManager] | None = None

    @property
    def local_experts(self) -> range:
        n = self.num_experts // self.ep_size
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    def extra_repr(self) -> str:
        e = self.local_experts
        return (f"{super().extra_repr()}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local_experts={e.start}..{e.stop - 1}, reduce_router_grad={self.reduce_router_grad}")

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> ExpertParallelMoE:
        """Load the state dict of a full :class:`MoELayer` of the same shape (``router.weight [E, d]``,
        ``w1, w3 [E, d, f]``, ``w2 [E, f, d]``, ``expert_bias [E]``), keeping this rank's experts.
        ``strict``: other keys raise KeyError. Returns self."""
        E, d, f = self.num_experts, self.d_model, self.d_ff
        want = {"router.weight": (E, d), "w1": (E, d, f), "w3": (E, d, f), "w2": (E, f, d), "expert_bias": (E,)}
        check_state_dict(state_dict, want, strict=strict)
        e = self.local_experts
        self.router.weight.copy_(state_dict["router.weight"])
        self.expert_bias.copy_(state_dict["expert_bias"])
        for name in ("w1", "w3", "w2"):
            getattr(self, name).copy_(state_dict[name][e.start:e.stop])
        return self

    def _ffn(self, x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
             w2: torch.Tensor, expert_bias: torch.Tensor | None) -> tuple[torch.Tensor, MoERouting]:
        chosen = resolve_backend("moe", self.backend, x.device, moe_backends())
        if self.reduce_router_grad:
            router_weight = _SumGradOverGroup.apply(router_weight, self.ep_group)
        routing = moe_route(router_logits(x, router_weight), self.top_k, self.router_type, self.norm_topk,
                            expert_bias, backend=chosen)
        return self._experts_over_group(x, routing, w1, w3, w2, chosen), routing

    def _experts_over_group(self, x: torch.Tensor, routing: MoERouting, w1: torch.Tensor, w3: torch.Tensor,
                            w2: torch.Tensor, backend: str) -> torch.Tensor:
        """Dispatch, local experts, combine: ``[T, d]`` output of ``x: [T, d]`` routed by ``routing``."""
        T, d = x.shape
        k, P, group, timer = self.top_k, self.ep_size, self.ep_group, self.comm_timer
        n_local = len(self.local_experts)
        counts = routing.expert_counts.to(torch.int64)  # [E] pairs this rank routes to each expert
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=group)  # rank s's block: its pairs for my experts
        recv = recv.view(P, n_local)
        # The layer's one host sync: all_to_all_single takes the split sizes as Python ints.
        sizes = torch.cat([counts.view(P, n_local).sum(1), recv.sum(1)]).tolist()
        send_splits, recv_splits = sizes[:P], sizes[P:]
        n_recv = sum(recv_splits)

        x_recv = _AllToAll.apply(_GatherPairs.apply(x, routing.sorted_pair_idx, k), recv_splits, send_splits,
                                 group, timer)  # [n_recv, d], ordered by (source rank, local expert)
        # Group the received rows by local expert, each expert's rows in (source rank, arrival) order. The
        # counts fix the permutation (no sort): block (s, e) arrives at its exclusive prefix over the flat
        # (s, e) order and goes to expert e's offset plus the rows of e from ranks before s.
        blocks = recv.reshape(-1)
        offsets = F.pad(recv.sum(0).cumsum(0), (1, 0))
        dst_start = offsets[:-1] + recv.cumsum(0) - recv  # [P, n_local]
        shift = torch.repeat_interleave(dst_start.reshape(-1) - (blocks.cumsum(0) - blocks), blocks,
                                        output_size=n_recv)
        rows = torch.arange(n_recv, device=x.device)
        order = torch.empty_like(rows).scatter_(0, rows + shift, rows).to(torch.int32)
        y_recv = moe_experts(x_recv, order, offsets.to(torch.int32), w1, w3, w2, backend=backend)

        y_sorted = _AllToAll.apply(y_recv, send_splits, recv_splits, group, timer)  # [T*k, d], expert order
        pair_idx = routing.sorted_pair_idx.long()
        y_pairs = y_sorted.new_empty(y_sorted.shape).index_copy(0, pair_idx, y_sorted)
        dt = torch.promote_types(x.dtype, torch.float32)
        out = (y_pairs.view(T, k, d).to(dt) * routing.topk_weights.to(dt).unsqueeze(-1)).sum(1)
        return out.to(x.dtype)

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        """:meth:`MoELayer.update_expert_bias` on the load summed over the group (an all-reduce of
        ``[E]`` int64: call it on every rank), so every rank gets the same bias."""
        dist.all_reduce(self.load_since_update, group=self.ep_group)
        super().update_expert_bias(rate)


def shard_experts(layer: MoELayer, group: dist.ProcessGroup | None = None, *,
                  reduce_router_grad: bool = True) -> ExpertParallelMoE:
    """A new :class:`ExpertParallelMoE` over ``group`` with ``layer``'s configuration, router and bias
    and this rank's slice of its experts (same dtype, device and train/eval mode). Every rank must
    pass the same full ``layer`` (e.g. built from the same seed or checkpoint); ``layer`` is left as is."""
    if not isinstance(layer, MoELayer) or isinstance(layer, ExpertParallelMoE):
        raise TypeError(f"layer must be a (full) MoELayer, got {type(layer).__name__}")
    ep = ExpertParallelMoE(layer.d_model, layer.d_ff, layer.num_experts, layer.top_k, layer.router_type,
                           layer.norm_topk, layer.aux_loss_coef, layer.z_loss_coef, layer.backend,
                           dtype=layer.w1.dtype, device=layer.w1.device, group=group,
                           reduce_router_grad=reduce_router_grad)
    ep.load_full_state_dict(layer.state_dict())
    return ep.train(layer.training)
