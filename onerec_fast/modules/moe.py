"""``MoELayer``: a dropless mixture-of-experts SwiGLU FFN for training and inference.

Drop-in for the FFN of a transformer block: ``forward(x: [..., d]) -> [..., d]``. The experts run as
Triton grouped GEMMs on CUDA (``backend="auto"``), the plain-PyTorch reference on CPU. Load balancing
either loss-free (DeepSeek-V3: ``router="sigmoid"`` + :meth:`MoELayer.update_expert_bias`) or with the
Switch aux loss and the z-loss (:meth:`MoELayer.aux_loss`, added to the loss by the trainer;
:class:`MoEAuxLoss` sums them over several forwards, e.g. the micro-batches of gradient accumulation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from onerec_fast.ops.moe import moe_ffn
from onerec_fast.ops.moe_routing import MoERouting, moe_aux_loss, moe_z_loss

__all__ = ["MoEAuxLoss", "MoELayer", "MoEStats"]


def check_state_dict(state_dict: Mapping[str, torch.Tensor], want: Mapping[str, tuple[int, ...]], *, strict: bool,
                     prefix: str = "", optional: tuple[str, ...] = ()) -> None:
    """Check that ``state_dict`` has every key of ``want`` with that shape (KeyError / ValueError naming the key);
    with ``strict``, other keys under ``prefix`` (but for ``optional`` ones) raise KeyError."""
    missing = [k for k in want if k not in state_dict]
    if missing:
        raise KeyError(f"state_dict lacks {len(missing)} expected keys, e.g. {missing[:4]}")
    for k, shape in want.items():
        if tuple(state_dict[k].shape) != tuple(shape):
            raise ValueError(f"state_dict[{k!r}] must have shape {tuple(shape)}, got {tuple(state_dict[k].shape)}")
    if strict:
        extra = [k for k in state_dict if k.startswith(prefix) and k not in want and k not in optional]
        if extra:
            raise KeyError(f"unexpected keys under prefix {prefix!r} (pass strict=False to ignore): {extra[:4]}")


class MoEStats(NamedTuple):
    """Load statistics of the last forward (tensors on the layer's device; reading them syncs)."""

    tokens_per_expert: torch.Tensor  # int32 [E]: (token, expert) pairs routed to each expert
    aux_loss: torch.Tensor  # 0-d fp32 Switch load-balancing loss (unweighted, differentiable)
    z_loss: torch.Tensor  # 0-d fp32 router z-loss (unweighted, differentiable)
    routing: MoERouting  # everything the router produced (ids, gate weights, permutation)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward: a forward there is activation checkpointing's
    recompute (reentrant or not), whose routing the original forward already counted."""
    # torch.utils.checkpoint asks the engine the same way; under torch.compile no backward runs a forward.
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class _ForwardRecord:
    """The routing of a layer's last forward, kept for :attr:`MoELayer.last_stats` and
    :meth:`MoELayer.aux_loss`. Its tensors carry the forward's autograd graph, so they are not state:
    a deep copy (``copy.deepcopy``, ``AveragedModel``, EMA) or a pickle of the layer gets an empty record
    (``copy.deepcopy`` refuses tensors with a ``grad_fn``), and ``state_dict`` never sees it."""

    __slots__ = ("routing", "num_tokens")

    def __init__(self) -> None:
        self.routing: MoERouting | None = None
        self.num_tokens = 0

    def __deepcopy__(self, memo) -> _ForwardRecord:
        return _ForwardRecord()

    def __reduce__(self):
        return _ForwardRecord, ()


class MoELayer(nn.Module):
    """Mixture-of-experts SwiGLU FFN: ``num_experts`` experts ``(silu(x W1) * (x W3)) W2``, ``top_k`` per token.

    Args:
        d_model, d_ff: model width d and expert hidden width f.
        num_experts, top_k: E experts (1..256), k of them per token (1..min(E, 8)).
        router: "softmax" (fp32 softmax, top-k) or "sigmoid" (DeepSeek-V3: select on
            ``sigmoid + expert_bias``, weight with the unbiased sigmoid).
        norm_topk: divide each token's k gate weights by their sum.
        aux_loss_coef, z_loss_coef: weights of the Switch aux loss and the z-loss in :meth:`aux_loss`.
        backend: "auto", "cuda", "triton" or "reference" (see ``onerec_fast.backends``).

    Parameters: ``router`` (``nn.Linear(d, E, bias=False)``), ``w1, w3: [E, d, f]``, ``w2: [E, f, d]``;
    buffer ``expert_bias: [E]`` fp32. After each forward, :attr:`last_stats` gives :class:`MoEStats`.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, router: str = "softmax",
                 norm_topk: bool = True, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 backend: str = "auto", dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 1 <= top_k <= min(num_experts, 8):
            raise ValueError(f"top_k must be in 1..min(num_experts={num_experts}, 8), got {top_k!r}")
        if router not in ("softmax", "sigmoid"):
            raise ValueError(f"router must be 'softmax' or 'sigmoid', got {router!r}")
        self.d_model, self.d_ff, self.num_experts, self.top_k = d_model, d_ff, num_experts, top_k
        self.router_type, self.norm_topk, self.backend = router, norm_topk, backend
        self.aux_loss_coef, self.z_loss_coef = float(aux_loss_coef), float(z_loss_coef)
        factory = dict(dtype=dtype, device=device)
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        held = len(self.local_experts)
        self.w1 = nn.Parameter(torch.empty(held, d_model, d_ff, **factory))
        self.w3 = nn.Parameter(torch.empty(held, d_model, d_ff, **factory))
        self.w2 = nn.Parameter(torch.empty(held, d_ff, d_model, **factory))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        # Pairs routed to each expert by the training forwards since the last update_expert_bias.
        self.register_buffer("load_since_update", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self._record = _ForwardRecord()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        self.router.reset_parameters()
        for w, fan_in in ((self.w1, self.d_model), (self.w3, self.d_model), (self.w2, self.d_ff)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.expert_bias.zero_()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"router={self.router_type!r}, norm_topk={self.norm_topk}, backend={self.backend!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., d]`` -> ``[..., d]``; also sets :attr:`last_stats`."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [..., d_model={self.d_model}], got {shape}")
        weights = (self.router.weight, self.w1, self.w3, self.w2)
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            x, weights = x.to(dt), tuple(w.to(dt) for w in weights)
        x2 = x.reshape(-1, self.d_model)
        # .float(): Module.to(bfloat16) casts buffers too; selection wants the fp32 bias
        bias = self.expert_bias.float() if self.router_type == "sigmoid" else None
        out, routing = self._ffn(x2, *weights, bias)
        if not _in_backward():
            self._record.routing, self._record.num_tokens = routing, x2.shape[0]
            if self.training:
                self.load_since_update.add_(routing.expert_counts)
        return out.reshape(x.shape)

    @property
    def local_experts(self) -> range:
        """Global ids of the experts whose weights this module holds (``w1[i]`` is expert
        ``local_experts[i]``): all of them here, one rank's slice in an expert-parallel subclass."""
        return range(self.num_experts)

    def _ffn(self, x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
             w2: torch.Tensor, expert_bias: torch.Tensor | None) -> tuple[torch.Tensor, MoERouting]:
        """``(out [T, d], routing)`` of ``x: [T, d]`` with the (autocast) weights; the hook that
        ``onerec_fast.distributed.ExpertParallelMoE`` overrides."""
        return moe_ffn(x, router_weight, w1, w3, w2, self.top_k, router=self.router_type, norm_topk=self.norm_topk,
                       expert_bias=expert_bias, backend=self.backend)

    @property
    def last_stats(self) -> MoEStats | None:
        """:class:`MoEStats` of the last forward (None before any); the losses are computed on access, so
        a forward that nobody asks about pays nothing for them."""
        routing, T = self._record.routing, self._record.num_tokens
        if routing is None:
            return None
        return MoEStats(routing.expert_counts, moe_aux_loss(routing, T, self.top_k), moe_z_loss(routing, T), routing)

    def aux_loss(self) -> torch.Tensor:
        """``aux_loss_coef * aux + z_loss_coef * z`` of the last forward (0-d, differentiable); 0 before any.

        Not counted again by activation checkpointing's recompute. Under reentrant checkpointing the first
        forward runs without grad, so this has no gradient there (use ``use_reentrant=False``). Several
        forwards before one backward (gradient accumulation, a layer run twice): :class:`MoEAuxLoss`."""
        if self._record.routing is None or (self.aux_loss_coef == 0.0 and self.z_loss_coef == 0.0):
            return self.expert_bias.new_zeros(())
        st = self.last_stats
        return self.aux_loss_coef * st.aux_loss + self.z_loss_coef * st.z_loss

    def release_last_forward(self) -> None:
        """Forget the last forward's routing (``last_stats`` is None until the next forward). Its tensors keep
        that forward's autograd graph alive, and with it the weights' gradient accumulators; a trainer calls this
        after the backward, so that a CUDA-graph capture gets accumulators of its own rather than an eager
        step's (which belong to the legacy stream: the capture fails, "operation would make the legacy stream
        depend on a capturing blocking stream", H100, session 15)."""
        self._record = _ForwardRecord()

    @torch.no_grad()
    def update_expert_bias(self, rate: float) -> None:
        """Loss-free balancing (DeepSeek-V3): ``bias_e += rate * sign(mean_load - load_e)``, with the load
        counted over the training forwards since the previous call (then reset). Affects selection in
        sigmoid mode only. No host sync."""
        load = self.load_since_update.to(torch.float32)
        self.expert_bias.add_(rate * torch.sign(load.mean() - load))
        self.load_since_update.zero_()

    # ----------------------------------------------------------------------------------------------
    # The common MoE block layouts, in and out: per-expert nn.Linear weights (transformers 4.x files,
    # Mixtral's ``w1/w3/w2`` or Qwen/DeepSeek's ``gate/up/down_proj``) or fused 3-D experts (transformers
    # 5: ``experts.gate_up_proj [E, 2f, d]`` = [gate; up], ``experts.down_proj [E, d, f]``).

    def _resolve_prefix(self, state_dict: Mapping[str, torch.Tensor], prefix: str) -> str:
        """``prefix``, or its Mixtral twin when only that one is there: transformers 5 names the live block
        ``mlp.`` where files (and transformers 4) say ``block_sparse_moe.``."""
        if f"{prefix}gate.weight" in state_dict:
            return prefix
        for a, b in (("block_sparse_moe.", "mlp."), ("mlp.", "block_sparse_moe.")):
            if prefix.endswith(a) and f"{prefix[:-len(a)]}{b}gate.weight" in state_dict:
                return prefix[:-len(a)] + b
        return prefix

    def _load_layout(self, state_dict: Mapping[str, torch.Tensor], prefix: str, names: tuple[str, str, str],
                     strict: bool) -> None:
        E, d, f = self.num_experts, self.d_model, self.d_ff
        prefix = self._resolve_prefix(state_dict, prefix)
        shared = sorted({k[len(prefix):].split(".")[0] for k in state_dict
                         if k.startswith(prefix) and k[len(prefix):].startswith("shared_expert")})
        if shared:
            # strict=False would drop it and the output would silently lose a term.
            raise ValueError(f"state_dict has a shared expert under {prefix!r} ({', '.join(shared)}): MoELayer "
                             "holds the routed experts only; keep the shared expert beside it (see "
                             "onerec_fast.integrations.transformers) or remove its keys before loading")
        want = {f"{prefix}gate.weight": (E, d)}
        fused = f"{prefix}experts.gate_up_proj" in state_dict
        if fused:
            want[f"{prefix}experts.gate_up_proj"] = (E, 2 * f, d)
            want[f"{prefix}experts.down_proj"] = (E, d, f)
        else:
            for i in range(E):
                for n, shape in zip(names, ((f, d), (f, d), (d, f))):
                    want[f"{prefix}experts.{i}.{n}.weight"] = shape
        bias_key = f"{prefix}gate.e_score_correction_bias"  # DeepSeek-V3's loss-free balancing bias
        check_state_dict(state_dict, want, strict=strict, prefix=prefix, optional=(bias_key,))
        e = self.local_experts
        with torch.no_grad():
            self.router.weight.copy_(state_dict[f"{prefix}gate.weight"])
            if fused:
                gate_up = state_dict[f"{prefix}experts.gate_up_proj"][e.start:e.stop]
                self.w1.copy_(gate_up[:, :f].transpose(1, 2))
                self.w3.copy_(gate_up[:, f:].transpose(1, 2))
                self.w2.copy_(state_dict[f"{prefix}experts.down_proj"][e.start:e.stop].transpose(1, 2))
            else:
                for i, g in enumerate(e):
                    # nn.Linear stores [out, in]; the experts here are [in, out].
                    for dst, n in zip((self.w1, self.w3, self.w2), names):
                        dst[i].copy_(state_dict[f"{prefix}experts.{g}.{n}.weight"].t())
            if bias_key in state_dict:
                self.expert_bias.copy_(state_dict[bias_key])

    def load_mixtral_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                                strict: bool = True) -> MoELayer:
        """Load a Mixtral block: ``gate.weight [E, d]`` and either ``experts.{i}.w1/w3.weight [f, d]``,
        ``experts.{i}.w2.weight [d, f]`` (expert: ``w2(silu(w1(x)) * w3(x))``) or the fused
        ``experts.gate_up_proj [E, 2f, d]``, ``experts.down_proj [E, d, f]`` of transformers 5. A prefix
        ending in ``block_sparse_moe.`` also finds the live transformers 5 ``mlp.`` (and the reverse).
        A shared expert under ``prefix`` raises ValueError, whatever ``strict``. Returns self."""
        self._load_layout(state_dict, prefix, ("w1", "w3", "w2"), strict)
        return self

    def load_qwen_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "",
                             strict: bool = True) -> MoELayer:
        """Load a Qwen-MoE / DeepSeek-style block: ``gate.weight [E, d]`` and either
        ``experts.{i}.gate_proj/up_proj.weight [f, d]``, ``experts.{i}.down_proj.weight [d, f]`` (expert:
        ``down(silu(gate(x)) * up(x))``) or the fused transformers 5 experts (see
        :meth:`load_mixtral_state_dict`), and DeepSeek-V3's ``gate.e_score_correction_bias`` if present.
        Shared experts are not part of this layer: their keys raise ValueError, whatever ``strict``
        (``onerec_fast.integrations.transformers`` keeps them). Check the routing conventions
        (``norm_topk`` against ``norm_topk_prob``...) with ``integrations.transformers.check_config``.
        Returns self."""
        self._load_layout(state_dict, prefix, ("gate_proj", "up_proj", "down_proj"), strict)
        return self

    def hf_state_dict(self, layout: str = "fused", prefix: str = "") -> dict[str, torch.Tensor]:
        """This layer's weights in a Hugging Face block layout (new contiguous tensors), the inverse of the
        loaders: ``layout`` "fused" (transformers 5: ``experts.gate_up_proj [E, 2f, d]``,
        ``experts.down_proj [E, d, f]``), "mixtral" (``experts.{i}.w1/w3/w2.weight``) or "qwen"
        (``experts.{i}.gate_proj/up_proj/down_proj.weight``); plus ``gate.weight [E, d]`` and, for a sigmoid
        router, ``gate.e_score_correction_bias [E]``. Keys of the experts this module holds."""
        layouts = {"fused": None, "mixtral": ("w1", "w3", "w2"), "qwen": ("gate_proj", "up_proj", "down_proj")}
        if layout not in layouts:
            raise ValueError(f"layout must be one of {tuple(layouts)}, got {layout!r}")
        w1, w3, w2 = (w.detach() for w in (self.w1, self.w3, self.w2))
        out = {f"{prefix}gate.weight": self.router.weight.detach().clone()}
        if layout == "fused":
            out[f"{prefix}experts.gate_up_proj"] = torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous()
            out[f"{prefix}experts.down_proj"] = w2.transpose(1, 2).contiguous()
        else:
            for i, g in enumerate(self.local_experts):
                for w, n in zip((w1, w3, w2), layouts[layout]):
                    out[f"{prefix}experts.{g}.{n}.weight"] = w[i].t().contiguous()
        if self.router_type == "sigmoid":
            out[f"{prefix}gate.e_score_correction_bias"] = self.expert_bias.detach().clone()
        return out


class MoEAuxLoss:
    """Sums the weighted aux losses (:meth:`MoELayer.aux_loss`) of every training forward of the
    ``MoELayer`` modules in ``model`` while entered; :meth:`pop` hands the sum over and starts again.

    Where :meth:`MoELayer.aux_loss` sees only a layer's last forward, this sees all of them: a layer run
    several times per step, or all micro-batches of gradient accumulation when their losses go into one
    backward. With one backward per micro-batch, add ``pop()`` to each::

        with MoEAuxLoss(model) as aux:
            for micro in micro_batches:                    # N micro-batches, one optimizer step
                loss = task_loss(model(micro)) + aux.pop()
                (loss / N).backward()
            opt.step()

    Forwards in eval mode, without grad, or recomputed by activation checkpointing add nothing. The
    terms live here, not on the layers, so the layers stay deep-copyable; leave the ``with`` block or
    ``pop()`` so the graphs they hold are freed.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self._terms: list[torch.Tensor] = []
        self._hooks: list = []

    def _hook(self, layer: MoELayer, args, out) -> None:
        if layer.training and torch.is_grad_enabled() and not _in_backward():
            self._terms.append(layer.aux_loss())

    def __enter__(self) -> MoEAuxLoss:
        self._hooks = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._terms = [], []

    def pop(self) -> torch.Tensor:
        """Sum (0-d fp32, differentiable) of the weighted aux losses since the last ``pop``; 0 if none."""
        total = torch.stack(self._terms).sum() if self._terms else torch.zeros(())
        self._terms = []
        return total
