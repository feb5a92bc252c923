"""Hugging Face transformers MoE models on onerec_fast's MoE kernels: one call, nothing lost.

    from onerec_fast.integrations.transformers import use_onerec_experts

    model = AutoModelForCausalLM.from_pretrained(...)   # Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, ...
    use_onerec_experts(model)                           # backend="auto": Triton grouped GEMMs on GPU

* **transformers 5**: registers ``onerec_fast`` (``onerec_fast_<backend>`` for an explicit backend) with
  transformers' experts interface (``ExpertsInterface``) and selects it with
  ``model.set_experts_implementation``. Only the experts' GEMMs change: HF's weights
  (``experts.gate_up_proj``, ``experts.down_proj``), router (Mixtral/Qwen softmax with or without
  ``norm_topk_prob``, DeepSeek-V3's group-limited sigmoid routing and scaling), shared experts, aux loss
  (``output_router_logits``), ``state_dict``, ``save_pretrained`` and Trainer checkpoints stay HF's.
  ``model.set_experts_implementation("eager")`` turns it off.
* **transformers 4.5x** (no experts interface): every supported sparse MoE block is swapped for a
  :class:`HFMoEBlock`, a :class:`~onerec_fast.modules.MoELayer` (our fused routing and experts) plus HF's
  shared expert where the model has one, that keeps the block's contract (``(hidden [B, S, d],
  router_logits [B*S, E])`` out, so HF's aux loss works) and its ``state_dict`` layout (per-expert
  ``experts.{i}.*``, so checkpoints load in both directions and Trainer resumes restore the experts).
  Blocks whose routing ``MoELayer`` cannot reproduce (DeepSeek-V3, router jitter noise, a non-SiLU
  activation) raise ValueError naming the block instead of computing something else.

Weights in both directions outside a model: ``MoELayer.load_mixtral_state_dict`` /
``load_qwen_state_dict`` (per-expert or fused layout) and ``MoELayer.hf_state_dict(layout)``;
:func:`check_config` compares a ``MoELayer``'s conventions with a HF config.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from onerec_fast.modules.moe import MoELayer
from onerec_fast.ops.moe import moe_experts

__all__ = ["HFMoEBlock", "check_config", "experts_implementation_name", "moe_layer_from_config",
           "register_experts_implementation", "use_onerec_experts"]

BACKENDS = ("auto", "cuda", "triton", "reference")


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# --------------------------------------------------------------------------------------------------
# transformers 5: the experts interface


def experts_implementation_name(backend: str = "auto") -> str:
    """The experts-interface key of ``backend``: ``"onerec_fast"`` for auto, else ``"onerec_fast_<backend>"``."""
    _check_backend(backend)
    return "onerec_fast" if backend == "auto" else f"onerec_fast_{backend}"


def check_experts_module(module: nn.Module, name: str = "experts") -> None:
    """Raise ValueError (naming ``name``) unless ``module``, a transformers 5 experts module, computes
    ``down(silu(gate(x)) * up(x))`` from concatenated ``gate_up_proj`` / ``down_proj`` without biases."""
    problems = []
    if not getattr(module, "has_gate", False) or not hasattr(module, "gate_up_proj"):
        problems.append("no gate_up_proj (ungated experts)")
    if getattr(module, "has_bias", False):
        problems.append("biases")
    if getattr(module, "has_post_expert_norm", False):
        problems.append("a post-expert norm")
    if getattr(module, "_is_expert_parallel", False):
        problems.append("transformers' expert parallelism")
    act = getattr(getattr(module, "config", None), "hidden_act", "silu")
    if act not in ("silu", "swish"):
        problems.append(f"activation {act!r} (only SiLU)")
    # The decorator installs transformers' default [gate; up] split unless the class brings its own.
    if getattr(type(module)._apply_gate, "__name__", "") != "_default_apply_gate":
        problems.append("a custom _apply_gate")
    if problems:
        raise ValueError(f"{name}: onerec_fast's experts cannot run {type(module).__name__} with "
                         + ", ".join(problems))


def _swiglu_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w1, w3: [E, d, f]``, ``w2: [E, f, d]`` as views of HF's ``gate_up_proj`` / ``down_proj`` (their
    gradients flow back to HF's parameters)."""
    gate_up, down = module.gate_up_proj, module.down_proj
    if module.is_transposed:  # [E, d, 2f], [E, f, d]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    # now gate_up [E, 2f, d] (nn.Linear's [out, in]), down [E, d, f]
    if module.is_concatenated:
        f = gate_up.shape[1] // 2
        gate, up = gate_up[:, :f], gate_up[:, f:]
    else:  # interleaved rows: gate0, up0, gate1, up1, ...
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    return gate.transpose(1, 2), up.transpose(1, 2), down.transpose(1, 2)


def _experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, *, backend: str) -> torch.Tensor:
    """transformers' experts contract: ``hidden_states: [T, d]``, ``top_k_index: [T, k]`` (expert ids),
    ``top_k_weights: [T, k]`` -> ``[T, d]``, the gate-weighted sum of each token's k experts."""
    check_experts_module(module)
    T, d = hidden_states.shape
    k, E = top_k_index.shape[1], module.num_experts
    w1, w3, w2 = _swiglu_weights(module)
    ids = top_k_index.reshape(-1)
    # pair p = t * k + j is slot j of token t; the grouped GEMMs read pairs grouped by expert
    sorted_idx = torch.argsort(ids, stable=True).to(torch.int32)
    offsets = F.pad(torch.bincount(ids, minlength=E).cumsum(0), (1, 0)).to(torch.int32)
    y = moe_experts(hidden_states.repeat_interleave(k, dim=0), sorted_idx, offsets, w1, w3, w2, backend=backend)
    # gate and sum over the k slots in a fixed order, as transformers' batched/grouped implementations do
    out = (y.view(T, k, d) * top_k_weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
    return out.to(hidden_states.dtype)


def register_experts_implementation(backend: str = "auto") -> str:
    """Register onerec_fast's experts with transformers 5's ``ExpertsInterface`` (idempotent) and return
    the name to pass to ``set_experts_implementation`` / ``from_pretrained(experts_implementation=...)``."""
    from transformers.integrations.moe import ExpertsInterface

    name = experts_implementation_name(backend)
    fn = functools.partial(_experts_forward, backend=backend)
    ExpertsInterface.register(name, functools.update_wrapper(fn, _experts_forward))
    return name


def _fuse_per_expert_keys(experts: nn.Module, state_dict: dict, prefix: str) -> None:
    """In ``state_dict``, the per-expert keys of the transformers 5 MoE block at ``prefix`` (ending in its
    name, e.g. ``model.layers.0.mlp.``; ``experts`` its experts module): per-expert keys
    (``experts.{i}.w1/w3/w2.weight`` or ``gate_proj/up_proj/down_proj``, Mixtral's under
    ``block_sparse_moe.``) become the fused ``experts.gate_up_proj`` / ``experts.down_proj``.

    ``save_pretrained`` writes that legacy layout and ``from_pretrained`` converts it back, but Trainer's
    resume loads ``model.safetensors`` with a plain ``load_state_dict(strict=False)``: without this the
    experts and Mixtral's router stay as initialised, with a warning only (seen with transformers 5.23)."""
    src = prefix
    if not any(k.startswith(f"{prefix}experts.0.") for k in state_dict) and prefix.endswith("mlp."):
        src = prefix[:-len("mlp.")] + "block_sparse_moe."
    names = next((n for n in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))
                  if f"{src}experts.0.{n[0]}.weight" in state_dict), None)
    if names is None:
        return
    E = experts.num_experts
    gate, up, down = (torch.stack([state_dict.pop(f"{src}experts.{e}.{n}.weight") for e in range(E)])
                      for n in names)  # [E, f, d], [E, f, d], [E, d, f]
    if experts.is_concatenated:
        gate_up = torch.cat([gate, up], dim=1)
    else:
        gate_up = torch.stack([gate, up], dim=2).reshape(E, -1, gate.shape[2])
    if experts.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    for k in [k for k in state_dict if k.startswith(src)]:  # the router (and anything else) of the block
        state_dict[prefix + k[len(src):]] = state_dict.pop(k)
    state_dict[f"{prefix}experts.gate_up_proj"] = gate_up.contiguous()
    state_dict[f"{prefix}experts.down_proj"] = down.contiguous()


# --------------------------------------------------------------------------------------------------
# transformers 4.5x: the block swap


def _config_get(config, *names, default=None):
    for n in names:
        if getattr(config, n, None) is not None:
            return getattr(config, n)
    return default


def _routing_of(config) -> dict:
    """MoELayer's settings for ``config`` (a HF MoE config), or ValueError naming what differs."""
    kind = getattr(config, "model_type", "")
    if kind.startswith("deepseek"):
        raise ValueError(f"{kind}: group-limited sigmoid routing with routed_scaling_factor is not MoELayer's "
                         "routing; use transformers >= 5, whose experts interface keeps HF's router")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{kind}: hidden_act={act!r}; MoELayer's experts are SwiGLU (silu)")
    if getattr(config, "router_jitter_noise", 0.0):
        raise ValueError(f"{kind}: router_jitter_noise={config.router_jitter_noise}; MoELayer adds no jitter")
    # Mixtral always renormalises the top-k weights; Qwen-MoE only with norm_topk_prob (default False).
    norm = True if kind == "mixtral" else bool(getattr(config, "norm_topk_prob", False))
    return dict(d_model=config.hidden_size,
                d_ff=_config_get(config, "moe_intermediate_size", "intermediate_size"),
                num_experts=_config_get(config, "num_local_experts", "num_experts", "n_routed_experts"),
                top_k=config.num_experts_per_tok, router="softmax", norm_topk=norm)


def moe_layer_from_config(config, **kwargs) -> MoELayer:
    """A :class:`MoELayer` routing as the HF MoE ``config`` does (ValueError where it cannot); ``kwargs``
    (backend, dtype, device, aux_loss_coef...) go to ``MoELayer``."""
    return MoELayer(**_routing_of(config), **kwargs)


def check_config(layer: MoELayer, config) -> None:
    """Raise ValueError naming each setting where ``layer`` would route or compute differently from the HF
    MoE ``config`` (sizes, top-k, ``norm_topk`` vs ``norm_topk_prob``, router, activation, jitter,
    DeepSeek-V3's group-limited routing)."""
    want = _routing_of(config)
    got = dict(d_model=layer.d_model, d_ff=layer.d_ff, num_experts=layer.num_experts, top_k=layer.top_k,
               router=layer.router_type, norm_topk=layer.norm_topk)
    diff = [f"{k}={got[k]!r} (config: {want[k]!r})" for k in want if got[k] != want[k]]
    if diff:
        raise ValueError(f"MoELayer differs from the {config.model_type} config: " + ", ".join(diff))


class HFMoEBlock(nn.Module):
    """A transformers 4.5x sparse MoE block on :class:`MoELayer`, keeping HF's contract.

    ``forward(hidden_states: [B, S, d]) -> (out [B, S, d], router_logits [B*S, E])``: ``out`` is the
    routed experts' output plus, where the model has one, HF's shared expert (``shared_expert(x)``, gated
    by ``sigmoid(shared_expert_gate(x))`` in Qwen2-MoE), unchanged modules. ``state_dict`` /
    ``load_state_dict`` use the replaced block's per-expert keys (``gate.weight``,
    ``experts.{i}.<names>.weight``, ``shared_expert.*``), so HF checkpoints load both ways.
    """

    def __init__(self, moe: MoELayer, layout: str, shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None):
        # nn.Module's, not super()'s: in a subclass of the HF block (see from_hf) the next __init__ in
        # the MRO is the HF block's, which builds its own experts from a config.
        nn.Module.__init__(self)
        if layout not in ("mixtral", "qwen"):
            raise ValueError(f"layout must be 'mixtral' or 'qwen' (per-expert key names), got {layout!r}")
        self.moe, self.layout = moe, layout
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate
        self.register_state_dict_post_hook(self._to_hf_layout)
        self.register_load_state_dict_pre_hook(self._from_hf_layout)

    @classmethod
    def from_hf(cls, block: nn.Module, config, backend: str = "auto") -> HFMoEBlock:
        """Build from a transformers 4.5x block (``gate``, ``experts``, optional ``shared_expert(_gate)``),
        copying its weights; ValueError where the routing differs (see :func:`moe_layer_from_config`).

        The result is also an instance of ``type(block)``: transformers 4.5x collects the router logits
        of Mixtral and Qwen3-MoE with hooks on the modules that are ``isinstance`` of the block class
        (``OutputRecorder``), so a plain HFMoEBlock gives no logits and HF's aux loss silently becomes 0.
        """
        p = next(block.parameters())
        moe = moe_layer_from_config(config, backend=backend, dtype=p.dtype, device=p.device)
        layout = "mixtral" if hasattr(block.experts[0], "w1") else "qwen"
        routed = {k: v for k, v in block.state_dict().items() if not k.startswith("shared_expert")}
        cls._loader(moe, layout)(routed, strict=True)
        return _as_subclass_of(cls, type(block))(moe, layout, getattr(block, "shared_expert", None),
                                                 getattr(block, "shared_expert_gate", None))

    @staticmethod
    def _loader(moe: MoELayer, layout: str):
        return moe.load_mixtral_state_dict if layout == "mixtral" else moe.load_qwen_state_dict

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        out = self.moe(x)
        # HF's load-balancing loss reads the logits; [T, E] again is cheap next to the experts
        logits = F.linear(x, self.moe.router.weight)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(shape), logits

    @staticmethod
    def _to_hf_layout(module: HFMoEBlock, state_dict: dict, prefix: str, local_metadata) -> None:
        for k in [k for k in state_dict if k.startswith(prefix + "moe.")]:
            del state_dict[k]
        state_dict.update(module.moe.hf_state_dict(module.layout, prefix))

    @staticmethod
    def _from_hf_layout(self: HFMoEBlock, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
        routed = {k: v for k, v in state_dict.items()
                  if k.startswith(prefix) and not k[len(prefix):].startswith(("shared_expert", "moe."))}
        if f"{prefix}gate.weight" not in routed:
            return  # our own layout (moe.*): the default loading handles it
        try:
            self._loader(self.moe, self.layout)(routed, prefix, strict=True)
        except (KeyError, ValueError) as e:
            error_msgs.append(f"{prefix}: {e}")
            return
        for k in routed:
            del state_dict[k]
        # the MoELayer's own keys now hold what was loaded, so the default loading finds them
        state_dict.update({f"{prefix}moe.{k}": v for k, v in self.moe.state_dict().items()})


@functools.cache
def _as_subclass_of(cls: type, hf_block: type) -> type:
    """``cls`` first (its forward and state-dict hooks win), then the HF block class for isinstance;
    cached so every swapped block of one HF class shares one class."""
    return type(f"{cls.__name__}_{hf_block.__name__}", (cls, hf_block), {"__module__": cls.__module__})


# Sparse MoE block class names of transformers 4.5x that HFMoEBlock reproduces.
_SWAPPABLE = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
_REFUSED = ("DeepseekV3MoE", "DeepseekV2MoE")


def _swap_blocks(model: nn.Module, backend: str) -> int:
    config = model.config
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__ in _SWAPPABLE + _REFUSED]
    for name, block in found:
        if type(block).__name__ in _REFUSED:
            _routing_of(config)  # raises, naming the model type
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, HFMoEBlock.from_hf(block, config, backend))
    return len(found)


# --------------------------------------------------------------------------------------------------
# The one call


def use_onerec_experts(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Run the MoE experts of a Hugging Face transformers ``model`` on onerec_fast's kernels; returns it.

    transformers 5: selects the registered experts implementation (HF's weights, router, aux loss and
    checkpoints untouched); every experts module is checked first (ValueError naming it otherwise), and
    each MoE block learns to load the per-expert layout ``save_pretrained`` writes, so Trainer resumes
    restore the experts (see :func:`_fuse_per_expert_keys`).
    transformers 4.5x: swaps each sparse MoE block for an :class:`HFMoEBlock` (same outputs, router
    logits and state-dict keys). ValueError when the model has no MoE block we support.
    ``backend``: "auto" (Triton on GPU, the PyTorch reference on CPU), "triton", "cuda", "reference".
    """
    _check_backend(backend)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if _transformers_major() < 5:
        already = any(isinstance(m, HFMoEBlock) for m in model.modules())  # once, however often called
        if not _swap_blocks(model, backend) and not already:
            raise ValueError(f"model: no sparse MoE block of {_SWAPPABLE} in {type(model).__name__}")
        return model
    experts = [(n, m) for n, m in model.named_modules() if hasattr(m, "gate_up_proj") or
               (hasattr(m, "has_gate") and hasattr(m, "down_proj"))]
    if not experts:
        raise ValueError(f"model: {type(model).__name__} has no transformers experts module")
    for n, m in experts:
        check_experts_module(m, n)
    if not getattr(model, "_onerec_fast_fuse_hook", False):  # once, however often this is called
        # On the root: torch hands each child only the keys under its own name, and Mixtral's legacy
        # keys sit under a sibling name (block_sparse_moe) of the live block (mlp).
        blocks = [(n.rpartition(".")[0], m) for n, m in experts]

        def fuse(module, state_dict, prefix, *_):
            for block, m in blocks:
                _fuse_per_expert_keys(m, state_dict, f"{prefix}{block}." if block else prefix)

        model.register_load_state_dict_pre_hook(fuse)
        model._onerec_fast_fuse_hook = True
    model.set_experts_implementation(register_experts_implementation(backend))
    return model
