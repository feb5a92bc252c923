"""onerec_fast.integrations.transformers against the real Hugging Face classes (tiny random configs,
fp32, CPU): same logits, aux loss and gradients as HF's own experts, weights in and out, conventions
that differ raise, and a Trainer run with resume. Skipped without transformers."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from onerec_fast.integrations import transformers as integ  # noqa: E402
from onerec_fast.modules import MoELayer  # noqa: E402
from tests.helpers import rel_err, skip_unless_runs  # noqa: E402

V5 = int(transformers.__version__.split(".")[0]) >= 5
requires_v5 = pytest.mark.skipif(not V5, reason="transformers 5 experts interface")
requires_v4 = pytest.mark.skipif(V5, reason="transformers 4.5x block swap")
COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=32, num_experts_per_tok=2)


def tiny(kind):
    """(config, model class) of a tiny random MoE causal LM."""
    if kind == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4), \
            transformers.MixtralForCausalLM
    if kind == "qwen2_moe":  # shared expert, norm_topk_prob=False
        return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=32, moe_intermediate_size=24,
                                           shared_expert_intermediate_size=32, num_experts=4,
                                           norm_topk_prob=False), transformers.Qwen2MoeForCausalLM
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**COMMON, intermediate_size=32, moe_intermediate_size=24, head_dim=8,
                                           num_experts=4, norm_topk_prob=True), transformers.Qwen3MoeForCausalLM
    if kind == "deepseek_v3":  # group-limited routing: 4 groups of 2 experts, 2 groups per token
        cfg = dict(COMMON, num_hidden_layers=2, num_key_value_heads=2)
        return transformers.DeepseekV3Config(**cfg, intermediate_size=32, moe_intermediate_size=24,
                                             n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=1,
                                             first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=None,
                                             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4,
                                             routed_scaling_factor=2.5), transformers.DeepseekV3ForCausalLM
    raise ValueError(kind)


def build(kind, seed=0):
    config, cls = tiny(kind)
    torch.manual_seed(seed)
    model = cls(config).float()
    with torch.no_grad():  # HF's init leaves some biases/experts at zero or near it: make every term count
        for name, p in model.named_parameters():
            if "experts" in name or "gate" in name:
                p.normal_(0, 0.3)
    return model


def loss_logits_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    loss = out.loss + (out.aux_loss if getattr(out, "aux_loss", None) is not None else 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), getattr(out, "aux_loss", None), grads


@requires_v5
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_experts_interface_matches_hf(kind, backend, monkeypatch):
    skip_unless_runs(backend, "cpu")
    model = build(kind)
    ids = torch.randint(0, 64, (2, 7))  # batch 2: the case a bare MoELayer got wrong
    model.set_experts_implementation("eager")
    want = loss_logits_grads(model, ids)
    calls = []
    real = integ.moe_experts
    monkeypatch.setattr(integ, "moe_experts", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert integ.use_onerec_experts(model, backend=backend) is model
    got = loss_logits_grads(model, ids)
    assert calls and calls[0]["backend"] == backend
    assert rel_err(got[1], want[1]) < 1e-5 and abs(got[0] - want[0]) < 1e-5
    if want[2] is not None:  # HF's load-balancing loss, from HF's router logits
        assert abs(got[2].item() - want[2].item()) < 1e-6
    assert got[3].keys() == want[3].keys()
    for n in want[3]:
        assert rel_err(got[3][n], want[3][n]) < 1e-4, n


@requires_v5
def test_experts_interface_refuses_what_it_cannot_compute():
    model = build("mixtral")
    model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="activation 'gelu'"):
        integ.use_onerec_experts(model)
    with pytest.raises(ValueError, match="backend"):
        integ.use_onerec_experts(build("mixtral"), backend="fast")
    with pytest.raises(ValueError, match="no transformers experts"):
        integ.use_onerec_experts(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)))


@requires_v5
def test_state_dict_adapters_on_live_v5_models():
    """The fused experts of a live transformers 5 state dict load into MoELayer and go back unchanged;
    Mixtral's file prefix block_sparse_moe finds the live .mlp; a shared expert is never dropped."""
    model = build("mixtral")
    sd = model.state_dict()
    block = model.model.layers[0].mlp
    layer = integ.moe_layer_from_config(model.config, backend="reference")
    layer.load_mixtral_state_dict(sd, prefix="model.layers.0.block_sparse_moe.", strict=False)
    x = torch.randn(1, 9, 16)
    assert rel_err(layer(x), block(x)) < 1e-6
    back = layer.hf_state_dict("fused", prefix="model.layers.0.mlp.")
    assert all(torch.equal(back[k], sd[k]) for k in back)
    per_expert = layer.hf_state_dict("mixtral")
    twin = integ.moe_layer_from_config(model.config).load_mixtral_state_dict(per_expert)
    assert torch.equal(twin.w2, layer.w2)

    qwen = build("qwen2_moe")
    layer = MoELayer(16, 24, 4, 2, norm_topk=True)
    with pytest.raises(ValueError, match="norm_topk=True .config: False"):
        integ.check_config(layer, qwen.config)
    with pytest.raises(ValueError, match="shared expert"):
        layer.load_qwen_state_dict(qwen.state_dict(), prefix="model.layers.0.mlp.", strict=False)
    with pytest.raises(ValueError, match="group-limited"):
        integ.moe_layer_from_config(build("deepseek_v3").config)


def _dataset():
    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = (torch.arange(8) * (i + 1)) % 64
            return {"input_ids": ids, "labels": ids}

    return Tokens()


@requires_v5
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_trainer_step_and_resume(kind, tmp_path):
    """Done-when of issue 18: one Trainer step on our kernels, and a resume from its checkpoint that
    continues exactly as the uninterrupted run."""
    backend = "triton"
    skip_unless_runs(backend, "cpu")
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, save_steps=1,
                report_to=[], use_cpu=True, learning_rate=1e-2, seed=0, disable_tqdm=True,
                logging_strategy="no")
    model = integ.use_onerec_experts(build(kind), backend=backend)
    model.config.output_router_logits = True  # HF's aux loss in the training loss
    init = {k: v.clone() for k, v in model.state_dict().items()}
    transformers.Trainer(model=model, args=transformers.TrainingArguments(**args), train_dataset=_dataset()).train()
    experts = [k for k in init if "experts.gate_up_proj" in k]
    assert experts and all(not torch.equal(init[k], model.state_dict()[k]) for k in experts)

    resumed = integ.use_onerec_experts(build(kind, seed=1), backend=backend)
    resumed.config.output_router_logits = True
    trainer = transformers.Trainer(model=resumed, args=transformers.TrainingArguments(**args),
                                   train_dataset=_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    for k, v in model.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k], v, atol=1e-6), k


@requires_v4
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_block_swap_matches_hf_v4(kind):
    model = build(kind)
    ids = torch.randint(0, 64, (2, 7))
    want = loss_logits_grads(model, ids)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = [type(m) for m in model.modules() if type(m).__name__ in integ._SWAPPABLE]
    integ.use_onerec_experts(model, backend="reference")
    swapped_blocks = [m for m in model.modules() if isinstance(m, integ.HFMoEBlock)]
    assert len(swapped_blocks) == len(blocks) and all(isinstance(m, blocks[0]) for m in swapped_blocks)
    assert integ.use_onerec_experts(model) is model  # a second call swaps nothing more
    got = loss_logits_grads(model, ids)
    assert rel_err(got[1], want[1]) < 1e-5 and abs(got[0] - want[0]) < 1e-5
    # HF's load-balancing loss from our block's router logits (an int 0 when HF collects none)
    assert want[2].item() > 0 and torch.is_tensor(got[2]) and abs(got[2].item() - want[2].item()) < 1e-6
    # gradients: everything outside the routed experts keeps its name; the router is moe.router
    renamed = {n.replace(".moe.router.", ".gate."): g for n, g in got[3].items()}
    common = [n for n in want[3] if n in renamed]
    assert any(n.endswith(".gate.weight") for n in common) and any("self_attn" in n for n in common)
    for n in common:
        assert rel_err(renamed[n], want[3][n]) < 1e-4, n
    # the state dict keeps HF's keys: a checkpoint of either loads into the other
    swapped = model.state_dict()
    assert swapped.keys() == sd.keys() and all(torch.equal(swapped[k], sd[k]) for k in sd)
    fresh = build(kind, seed=1)
    integ.use_onerec_experts(fresh, backend="reference")
    fresh.load_state_dict(sd)
    assert rel_err(fresh(input_ids=ids).logits, want[1]) < 1e-5
    with pytest.raises(ValueError, match="group-limited"):
        integ.use_onerec_experts(build("deepseek_v3"))
