"""Data parallelism for the trainers over PyTorch's own ``torch.distributed``: torchrun detection, the process
group, and the model driven through DDP (default) or FSDP2 (``fully_shard``).

    torchrun --nproc-per-node 8 -m onerec_fast.cli train --preset 0.935b --parallel fsdp ...

* :func:`init_distributed` starts the process group when torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``) is present: NCCL with device ``cuda:LOCAL_RANK`` on GPUs, Gloo on CPU. Without it nothing
  happens and every helper here behaves as one process (the trainers then run exactly as before).
* :class:`ParallelModel` drives a model through a thin root module whose ``forward(fn, *args)`` runs
  ``fn(model, *args)``: any training computation (``model(batch)``, or the RL loop's encoder + teacher-forced
  decoder) goes through the wrapper's forward, so DDP's gradient reducer and FSDP2's all-gather hooks see it.
  One wrapper per model: a second trainer on the same model (RSFT, then ECPO) reuses it.
* DDP never re-broadcasts buffers before a forward (``forward_sync_buffers=False``, ``broadcast_buffers=False``
  on torch 2.11): the MoE layers' per-rank load counters must not be overwritten by rank 0's;
  :meth:`ParallelModel.sync_expert_load` all-reduces them instead, so the loss-free bias update sees the global
  load and every rank keeps the same ``expert_bias``.
* FSDP2 shards every encoder layer, the QFormer, and each decoder layer's attentions and FFN (the decoder
  calls those sub-modules' ``forward`` directly, not the layer's), plus the root for the rest (embeddings,
  heads). Generation and evaluation need whole parameters outside a forward: :meth:`ParallelModel.gathered`
  gives a replica loaded from the gathered full state.
* Expert parallelism (``expert_parallel=True``, DDP only, more than one rank): every ``MoELayer`` becomes an
  :class:`~onerec_fast.distributed.ExpertParallelMoE` over the whole world (rank r keeps experts
  ``r*E/P .. (r+1)*E/P - 1`` of the broadcast full layer). DDP ignores their ``w1, w3, w2``, whose gradients
  (every rank's tokens: the gradient of the *sum* of the ranks' losses) are divided by the world size in the
  backward, so they are the same mean as DDP's; the router stays a DDP parameter (its gradient is the rank's
  own: ``reduce_router_grad=False``). Clipping sums the expert gradients' squared norms over the ranks; the
  layers sum their own load in ``update_expert_bias`` (``sync_expert_load`` skips them); checkpoints hold the
  whole ``[E, ...]`` experts (:mod:`onerec_fast.train.checkpoint`), and :meth:`ParallelModel.gathered` and
  :meth:`ParallelModel.full_state_dict` give the model with full ``MoELayer`` s.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "PARALLEL_MODES",
    "DistInfo",
    "ParallelModel",
    "init_distributed",
    "shutdown_distributed",
    "dist_info",
    "is_distributed",
    "local_device",
    "shard_range",
    "broadcast_object",
    "broadcast_module",
    "all_reduce_sum",
    "main_process_output",
    "default_fsdp_units",
    "expert_shards",
]

PARALLEL_MODES = ("ddp", "fsdp")
_OWNS_GROUP = False  # True when init_distributed started the process group (shutdown_distributed ends it)
_ATTR = "_onerec_fast_parallel"  # where a model keeps its wrapper (in __dict__: not a submodule)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """True inside an initialized process group (any world size, torchrun's ``--nproc-per-node 1`` included)."""
    return dist.is_available() and dist.is_initialized()


def dist_info() -> DistInfo:
    return DistInfo(dist.get_rank(), dist.get_world_size()) if is_distributed() else DistInfo(0, 1)


def init_distributed(device: torch.device | str | None = None) -> DistInfo:
    """Start the process group if torchrun's environment says so (idempotent; a no-op without it).

    ``device`` picks the backend: CUDA (default when available) -> NCCL on ``cuda:LOCAL_RANK`` (made the
    current device), CPU -> Gloo.
    """
    global _OWNS_GROUP
    if is_distributed() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return dist_info()
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is cuda but CUDA is not available in this process")
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
    elif kind == "cpu":
        dist.init_process_group("gloo")
    else:
        raise ValueError(f"device must be cuda or cpu for torch.distributed, got {device!r}")
    _OWNS_GROUP = True
    return dist_info()


def shutdown_distributed() -> None:
    """End the process group if :func:`init_distributed` started it."""
    global _OWNS_GROUP
    if _OWNS_GROUP and is_distributed():
        dist.destroy_process_group()
    _OWNS_GROUP = False


def local_device(device: torch.device | str) -> torch.device:
    """``cuda`` without an index becomes this process's GPU (``cuda:LOCAL_RANK`` under torchrun)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return d


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most one)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (pickled; small objects only). Identity outside a process group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (same shapes everywhere)."""
    if not is_distributed():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns ``t``); identity outside a process group."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@contextlib.contextmanager
def main_process_output():
    """Silence stdout on every rank but 0 (the CLIs' prints, tokenizer statistics, ...)."""
    if dist_info().is_main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def run_main(device: torch.device | str, main: Callable[[], int]) -> int:
    """``main()`` inside the process group torchrun asks for (none without torchrun), stdout on rank 0 only:
    the body of every CLI command that trains."""
    init_distributed(device)
    try:
        with main_process_output():
            return main()
    finally:
        shutdown_distributed()


def default_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """FSDP2 units of a ``OneRec``: encoder layers, the QFormer, and the decoder layers' ``self_attn``,
    ``cross_attn`` and ``ffn`` (whose ``forward`` the decoder calls); ``[]`` for a model of another layout
    (then the root unit holds everything)."""
    enc, dec = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if enc is None or dec is None:
        return []
    units = [*enc.layers, enc.qformer]
    for layer in dec.layers:
        units += [layer.self_attn, layer.cross_attn, layer.ffn]
    return units


def expert_shards(model: nn.Module) -> dict[str, nn.Module]:
    """The expert-parallel weights of ``model`` by name (``<layer>.w1``, ``.w3``, ``.w2`` of every
    ``ExpertParallelMoE``: this rank's ``[E/P, ...]`` rows, in rank order, of an ``[E, ...]`` tensor) -> their layer."""
    from onerec_fast.distributed.expert_parallel import ExpertParallelMoE

    return {f"{n}.{w}" if n else w: m for n, m in model.named_modules() if isinstance(m, ExpertParallelMoE)
            for w in ("w1", "w3", "w2")}


def _gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """``[sum of the ranks' rows, ...]``: every rank's ``t`` of ``group`` concatenated in rank order (collective)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _shard_moe_layers(model: nn.Module, world_size: int) -> None:
    """Replace every full ``MoELayer`` of ``model`` by its expert-parallel slice over the default group, in place
    (every rank must hold the same full layers); each expert weight's gradient is divided by ``world_size`` in
    the backward (the mean over the ranks' losses, as DDP averages the rest)."""
    from onerec_fast.distributed.expert_parallel import ExpertParallelMoE, shard_experts
    from onerec_fast.modules.moe import MoELayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)
              and not isinstance(m, ExpertParallelMoE)]
    if not layers:
        raise ValueError("expert_parallel needs a model with MoE layers (MoELayer), this one has none")
    for name, layer in layers:
        if layer.num_experts % world_size:
            raise ValueError(f"expert_parallel over {world_size} ranks needs every MoE layer's num_experts to be a "
                             f"multiple of {world_size}; layer {name!r} has {layer.num_experts}")
    for name, layer in layers:
        parent, _, attr = name.rpartition(".")
        # the router is a DDP parameter: its gradient here is this rank's own (it only routes this rank's tokens)
        ep = shard_experts(layer, group=None, reduce_router_grad=False)
        for w in (ep.w1, ep.w3, ep.w2):
            w.register_hook(lambda g, n=world_size: g / n)
        setattr(model.get_submodule(parent), attr, ep)


class _Root(nn.Module):
    """``forward(fn, *args) = fn(model, *args)``: the module DDP/FSDP2 wrap, so that whatever the trainer
    computes with the model runs inside the wrapper's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args):
        return fn(self.model, *args)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # older layouts
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and persistent buffers are on the meta device (no memory);
    ``load_state_dict(full, assign=True)`` later fills it. Non-persistent buffers are copied for real."""
    memo = {}
    for t in model.state_dict(keep_vars=True).values():
        if isinstance(t, torch.Tensor):
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _no_forward_buffer_sync() -> dict:
    """DDP's keyword that stops rank 0's buffers overwriting the others' before every forward (the MoE load
    counters are per rank until :meth:`ParallelModel.sync_expert_load`): ``forward_sync_buffers=False`` where it
    exists (it still syncs them once at construction), ``broadcast_buffers=False`` (torch 2.11) before."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


# FSDP2 warns for every wrapped module that returns a view (MoELayer's reshape): our callers only use the
# outputs out of place (x = x + ffn(...)), which keeps the pre-backward hook.
_VIEW_WARNING = r"FSDP2-wrapped module .* returned a view tensor"


class ParallelModel:
    """``model`` as the trainers drive it in this process: plainly (no process group), or through DDP or FSDP2.

    Args:
        model: on ``device`` already; under FSDP2 it is sharded in place (its parameters become DTensors:
            build the optimizer after this).
        device: this rank's device.
        mode: ``"ddp"`` or ``"fsdp"`` (ignored without a process group).
        fsdp_units: the sub-modules FSDP2 shards as units (default :func:`default_fsdp_units`).
        expert_parallel: split every ``MoELayer``'s experts over the ranks (see the module docstring; in place:
            build the optimizer after this). Needs ``mode="ddp"`` and a process group of more than one rank,
            and every layer's ``num_experts`` a multiple of the world size (else ValueError).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, mode: str = "ddp",
                 fsdp_units: list[nn.Module] | None = None, *, expert_parallel: bool = False):
        if mode not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {mode!r}")
        self.model, self.device = model, torch.device(device)
        info = dist_info()
        self.rank, self.world_size = info.rank, info.world_size
        self.is_main = info.is_main
        self.mode = mode if is_distributed() else "single"
        self.expert_parallel = bool(expert_parallel)
        if self.expert_parallel and (self.mode != "ddp" or self.world_size == 1):
            raise ValueError("expert_parallel needs parallel='ddp' under torchrun with more than one process, got "
                             f"parallel={mode!r} with {self.world_size} process(es)")
        self._wrapper, self._skeleton = None, None
        if self.mode == "single":
            return
        held = model.__dict__.get(_ATTR)
        if held is not None:
            if (held.mode, held.expert_parallel) != (self.mode, self.expert_parallel):
                raise ValueError(f"the model is already wrapped for {held.mode!r} (expert_parallel="
                                 f"{held.expert_parallel}); cannot drive it with {mode!r} (expert_parallel="
                                 f"{self.expert_parallel})")
            self._wrapper, self._skeleton = held._wrapper, held._skeleton
            return
        broadcast_module(model)  # rank 0's parameters and buffers everywhere (DDP on torch 2.11 skips buffers)
        root = _Root(model)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.expert_parallel:
                self._skeleton = _meta_skeleton(model)  # full MoELayers, for gathered()
                _shard_moe_layers(model, self.world_size)  # after the broadcast: the same full layers to slice
                DDP._set_params_and_buffers_to_ignore_for_model(root, [f"model.{n}" for n in expert_shards(model)])
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._wrapper = DDP(root, device_ids=ids, **_no_forward_buffer_sync())
        else:
            from torch.distributed.device_mesh import init_device_mesh

            self._skeleton = _meta_skeleton(model)
            fully_shard = _fully_shard()
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for unit in default_fsdp_units(model) if fsdp_units is None else fsdp_units:
                fully_shard(unit, mesh=mesh)
            self._wrapper = fully_shard(root, mesh=mesh)
        model.__dict__[_ATTR] = self

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def __call__(self, fn: Callable, *args):
        """``fn(model, *args)``, inside the DDP/FSDP2 wrapper's forward when there is one."""
        if self._wrapper is None:
            return fn(self.model, *args)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_VIEW_WARNING)
            return self._wrapper(fn, *args)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients by their global norm (over every rank's shards under FSDP2, over every rank's
        experts with expert parallelism); returns the norm."""
        params = list(self.model.parameters())
        if not self.sharded and not self.expert_parallel:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        params = [p for p in params if p.grad is not None]
        if self.sharded:
            from torch.distributed.tensor import DTensor

            total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
            if isinstance(total, DTensor):
                total = total.full_tensor()
        else:
            # the replicated gradients are the same on every rank, the experts' are each rank's own rows
            experts = {id(self.model.get_parameter(n)) for n in expert_shards(self.model)}

            def square_norm(grads: list[torch.Tensor]) -> torch.Tensor:
                if not grads:
                    return torch.zeros((), dtype=torch.float32, device=self.device)
                return torch.nn.utils.get_total_norm(grads, 2.0).float().square()

            expert_sq = square_norm([p.grad for p in params if id(p) in experts])
            dist.all_reduce(expert_sq)
            total = (square_norm([p.grad for p in params if id(p) not in experts]) + expert_sq).sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    @torch.no_grad()
    def sync_expert_load(self) -> None:
        """Sum every MoE layer's ``load_since_update`` over the ranks (one all-reduce), so that
        ``update_expert_bias`` sees the global batch's load and keeps ``expert_bias`` identical on every rank.
        Expert-parallel layers are skipped: their ``update_expert_bias`` sums the load itself (summing twice
        would scale the load by the world size: the same sign of ``mean - load``, so the same bias, but one
        all-reduce too many)."""
        from onerec_fast.distributed.expert_parallel import ExpertParallelMoE
        from onerec_fast.model.layers import moe_layers

        layers = [m for m in moe_layers(self.model) if not isinstance(m, ExpertParallelMoE)]
        if self.world_size == 1 or not layers:
            return
        counts = [m.load_since_update for m in layers]
        flat = torch.cat(counts)
        dist.all_reduce(flat)
        for c, total in zip(counts, flat.split([c.numel() for c in counts])):
            c.copy_(total)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (a new tensor); ``t`` itself in one process."""
        if self.world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors of the model's state on every rank, the layout of the model without parallelism (an
        all-gather under FSDP2 and of the expert-parallel experts: call on every rank)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        state = self.model.state_dict()
        for name, layer in expert_shards(self.model).items():
            state[name] = _gather_rows(state[name], layer.ep_group)
        return state

    def gathered(self) -> nn.Module:
        """The model with whole parameters, for generation and evaluation outside a training forward: the
        model itself, or under FSDP2 and expert parallelism a replica (with full ``MoELayer`` s) refreshed from
        :meth:`full_state_dict` (call on every rank)."""
        if self._skeleton is None:
            return self.model
        self._skeleton.load_state_dict(self.full_state_dict(), assign=True)
        return self._skeleton
