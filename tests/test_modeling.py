"""Upcycled models of every supported family: dense equivalence, stages, routing losses, save/load, generate."""

import json

import pytest
import torch
from conftest import assert_reloaded_logits, assert_same_state, tiny_dense
from transformers import AutoModel, AutoModelForCausalLM

from spri_hf import SpriConfig, SpriForCausalLM, SpriModel


ATOL = 1e-5


@pytest.mark.parametrize(
    "settings",
    [dict(init="copy"), dict(principal_ratio=1.0), dict(diversity=0.0), dict(init="copy", stage=2)],
    ids=["copy", "principal_ratio=1", "diversity=0", "copy-stage2"],
)
def test_dense_equivalent_settings_reproduce_the_dense_logits(family, input_ids, settings):
    dense = tiny_dense(family)
    reference = dense(input_ids).logits
    model = SpriForCausalLM.from_dense(dense, num_experts=4, num_experts_per_tok=2, **settings)
    torch.testing.assert_close(model(input_ids).logits, reference, atol=ATOL, rtol=0)


def test_spri_changes_the_function_but_experts_average_to_the_dense_ffn(family, input_ids):
    dense = tiny_dense(family)
    model = SpriForCausalLM.from_dense(dense, num_experts=4, diversity=0.5, stage=2)
    assert (model(input_ids).logits - dense(input_ids).logits).abs().max() > 1e-4
    layout = model.ffn_layout
    matrices, _ = layout.layer_ffn_weights(dense, 0)
    experts = model.moe_blocks()[0].experts
    up = experts.gate_up_proj if layout.gated else experts.up_proj
    dense_up = torch.cat([matrices[p] for p in (("gate", "up") if layout.gated else ("up",))])
    torch.testing.assert_close(up.mean(0), dense_up, atol=1e-6, rtol=0)
    torch.testing.assert_close(experts.down_proj.mean(0), matrices["down"], atol=1e-6, rtol=0)


def test_stage1_trains_exactly_routers_and_residual_factors_and_matches_stage2(family, input_ids):
    model = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, diversity=0.5)
    assert model.config.stage == 1
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = set()
    for idx in model.config.upcycled_layers():
        prefix = f"{_block_name(model, idx)}"
        up = "gate_up" if model.ffn_layout.gated else "up"
        expected |= {f"{prefix}.router.weight"}
        expected |= {f"{prefix}.experts.{p}_residual_{f}" for p in (up, "down") for f in "ab"}
    assert trainable == expected
    stage1 = model(input_ids).logits
    model.set_stage(2)
    assert model.config.stage == 2
    torch.testing.assert_close(model(input_ids).logits, stage1, atol=ATOL, rtol=0)
    assert all(p.requires_grad for p in model.parameters())
    model.set_stage(2)  # idempotent
    with pytest.raises(ValueError, match="only transition is 1 -> 2"):
        model.set_stage(1)


def _block_name(model, idx):
    block = model.moe_blocks()[idx]
    return next(name for name, module in model.named_modules() if module is block)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_experts_implementations_agree(family, input_ids):
    model = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, stage=2, diversity=0.5)
    outputs = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        outputs[implementation] = model(input_ids).logits
    torch.testing.assert_close(outputs["batched_mm"], outputs["eager"], atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs["grouped_mm"], outputs["eager"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "llama-bias"])
def test_stage1_experts_dispatch_through_every_experts_implementation(family, input_ids):
    # eager is the low-rank form (shared base once per token); the kernels run on W_i = S + B_i A_i formed in forward
    model = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, diversity=0.5)
    assert model.config.stage == 1
    results = {}
    for implementation in ("eager", "batched_mm", "grouped_mm", None):
        model.config.stage1_experts_implementation = implementation
        model.zero_grad(set_to_none=True)
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[implementation] = (out.logits.detach(), grads)
    logits, grads = results["eager"]
    assert any("_residual_a" in name for name in grads) and not any("_shared" in name for name in grads)
    # the default on CPU is the low-rank form, exactly
    assert torch.equal(results[None][0], logits) and all(torch.equal(results[None][1][n], grads[n]) for n in grads)
    assert not torch.equal(results["grouped_mm"][0], logits)  # another computation (float rounding differs)
    for implementation in ("batched_mm", "grouped_mm"):
        other_logits, other_grads = results[implementation]
        torch.testing.assert_close(other_logits, logits, atol=ATOL, rtol=0)
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_experts_implementation_from_pretrained(tmp_path, input_ids):
    model = SpriForCausalLM.from_dense(tiny_dense("qwen3"), num_experts=4, stage=2, diversity=0.5)
    model.save_pretrained(tmp_path)
    reference = model(input_ids).logits
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=implementation)
        assert loaded.config._experts_implementation == implementation
        torch.testing.assert_close(loaded(input_ids).logits, reference, atol=ATOL, rtol=0)


def test_router_is_never_zero_and_logits_are_returned(input_ids):
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4)
    for block in model.moe_blocks().values():
        assert block.router.weight.abs().min() > 0
    out = model(input_ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (input_ids.numel(), 4)
    assert out.aux_loss is not None and out.aux_loss > 0
    assert model(input_ids).router_logits is None
    built = SpriForCausalLM(model.config)  # from config only: routers random, never all zero
    assert all(b.router.weight.abs().max() > 0 for b in built.moe_blocks().values())


def test_aux_and_z_losses_are_added_with_labels_and_change_the_router_gradient(input_ids):
    dense = tiny_dense("llama")

    def router_grad(aux, z):
        model = SpriForCausalLM.from_dense(dense, num_experts=4, router_aux_loss_coef=aux, router_z_loss_coef=z)
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        return out, model.moe_blocks()[0].router.weight.grad.clone()

    plain, grad_plain = router_grad(0.0, 0.0)
    with_aux, grad_aux = router_grad(1.0, 0.0)
    with_z, grad_z = router_grad(0.0, 1.0)
    assert with_aux.aux_loss is not None
    torch.testing.assert_close(with_aux.loss, plain.loss + with_aux.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_z.loss, plain.loss + with_z.z_loss, atol=1e-6, rtol=0)
    assert (grad_aux - grad_plain).abs().max() > 1e-6
    assert (grad_z - grad_plain).abs().max() > 1e-6


def test_aux_loss_ignores_padding(input_ids):
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4)
    mask = torch.ones_like(input_ids)
    full = model(input_ids, attention_mask=mask, labels=input_ids).aux_loss
    mask[:, -3:] = 0
    padded = model(input_ids, attention_mask=mask, labels=input_ids).aux_loss
    assert not torch.allclose(full, padded)


@pytest.mark.parametrize("stage", [1, 2])
def test_save_load_and_automodel_round_trip(family, input_ids, tmp_path, stage):
    model = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, diversity=0.5, stage=stage)
    reference = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    for loader in (SpriForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, SpriForCausalLM) and loaded.config.stage == stage
        assert_same_state(loaded, model)
        assert_reloaded_logits(loaded(input_ids).logits, reference)
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
            n for n, p in model.named_parameters() if p.requires_grad
        }


def test_generate_with_cache_equals_generate_without(family, input_ids):
    model = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, diversity=0.5)
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(input_ids), pad_token_id=0)
    with_cache = model.generate(input_ids, use_cache=True, **kwargs)
    without_cache = model.generate(input_ids, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without_cache)


def test_copy_generates_exactly_the_dense_text(input_ids):
    dense = tiny_dense("qwen2")
    model = SpriForCausalLM.from_dense(dense, num_experts=4, init="copy")
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(input_ids), pad_token_id=0)
    assert torch.equal(model.generate(input_ids, **kwargs), dense.generate(input_ids, **kwargs))


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(input_ids, stage):
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, stage=stage).train()
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    checkpointed = model(input_ids, labels=input_ids).loss
    checkpointed.backward()
    torch.testing.assert_close(checkpointed, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-4)


def test_bf16_model(input_ids):
    dense = tiny_dense("llama").to(torch.bfloat16)
    model = SpriForCausalLM.from_dense(dense, num_experts=4, diversity=0.5)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(input_ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    model.set_stage(2)
    assert model.moe_blocks()[0].experts.gate_up_proj.dtype == torch.bfloat16
    torch.testing.assert_close(model(input_ids).logits.float(), logits.float(), atol=0.1, rtol=0.05)


def test_spri_model_backbone_and_automodel(tmp_path, input_ids):
    dense = tiny_dense("mistral")
    backbone = SpriModel.from_dense(dense, num_experts=4, init="copy")
    torch.testing.assert_close(
        backbone(input_ids).last_hidden_state, dense.model(input_ids).last_hidden_state, atol=ATOL, rtol=0
    )
    backbone.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, SpriModel)
    out = loaded(input_ids, output_router_logits=True)
    assert len(out.router_logits) == 2


def test_moe_layers_shared_expert_and_seed(input_ids):
    dense = tiny_dense("llama")
    model = SpriForCausalLM.from_dense(dense, num_experts=4, moe_layers=[1], shared_expert="dense", init="copy")
    assert list(model.moe_blocks()) == [1]
    assert type(model.model.model.layers[0].mlp).__name__ == "LlamaMLP"
    block = model.moe_blocks()[1]
    torch.testing.assert_close(block.shared_expert.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    hidden = torch.randn(5, 32)
    # copy experts + always-on dense copy: twice the dense FFN
    torch.testing.assert_close(block(hidden), 2 * dense.model.layers[1].mlp(hidden), atol=ATOL, rtol=0)

    a = SpriForCausalLM.from_dense(dense, num_experts=4, partition="random", seed=7).state_dict()
    b = SpriForCausalLM.from_dense(dense, num_experts=4, partition="random", seed=7).state_dict()
    c = SpriForCausalLM.from_dense(dense, num_experts=4, partition="random", seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("init", ["noise", "drop", "random"])
def test_baseline_inits_build_distinct_experts(init, input_ids):
    dense = tiny_dense("gpt_neox")
    model = SpriForCausalLM.from_dense(dense, num_experts=4, init=init)
    assert model.config.stage == 2
    experts = model.moe_blocks()[0].experts
    assert not torch.equal(experts.up_proj[0], experts.up_proj[1])
    assert torch.isfinite(model(input_ids).logits).all()


def test_principal_energy_setting(input_ids):
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, principal_energy=0.6, principal_ratio=0.5)
    assert model.config.residual_rank >= 1
    model.set_stage(2)
    assert torch.isfinite(model(input_ids).logits).all()


def test_config_round_trip_keeps_settings(tmp_path):
    model = SpriForCausalLM.from_dense(tiny_dense("phi3"), num_experts=4, spri_mode="partition", residual_scale=0.5)
    model.config.save_pretrained(tmp_path)
    config = SpriConfig.from_pretrained(tmp_path)
    assert config.spri_mode == "partition" and config.residual_scale == 0.5 and config.stage == 1
    assert config.base_config.model_type == "phi3" and config.residual_rank == model.config.residual_rank


# ---- what engines that read the text config see (vLLM's Transformers backend, tests/test_engines_vllm.py) -----------
@pytest.mark.parametrize(
    "family, stage, reason",
    [
        ("llama", 2, None),
        ("qwen3", 2, None),
        ("phi3", 2, None),
        ("llama", 1, "stage 1 keeps low-rank residual factors"),
        ("gpt2", 2, "not gated"),
        ("gemma2", 2, "'gelu_pytorch_tanh' activation"),
        ("llama-bias", 2, "biases"),
    ],
)
def test_decoder_config_is_its_own_text_config_and_says_what_a_fused_moe_cannot_run(family, stage, reason):
    model = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4).set_stage(stage)
    config, base = model.config, model.config.base_config
    assert config.get_text_config() is config
    # the MoE fields next to the dense ones, read through from the base config
    assert (config.num_experts, config.num_experts_per_tok) == (4, 2)
    for name in ("hidden_size", "num_hidden_layers", "vocab_size"):
        assert getattr(config, name) == getattr(base, name), name
    assert config.num_attention_heads == base.num_attention_heads
    with pytest.raises(AttributeError, match="no attribute 'not_a_field'"):
        _ = config.not_a_field
    got = config.fused_moe_unsupported_reason()
    assert (got is None) if reason is None else (reason in got), got
    # generation builds its cache from this text config
    ids = torch.tensor([[1, 5, 6, 7]])
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)


def test_encoder_decoder_text_config_is_the_base_models():
    from conftest import tiny

    from spri_hf import SpriForSeq2SeqLM

    config = SpriForSeq2SeqLM.from_dense(tiny("t5"), num_experts=4).config
    assert config.get_text_config() is config.base_config.get_text_config()
    assert config.get_text_config(decoder=True).num_hidden_layers == 2
    assert "decoder-only" in config.fused_moe_unsupported_reason()
    # dense fields read and write through, as on a native config
    assert config.d_model == 32 and config.num_attention_heads == 4
    config.use_cache = False
    assert config.base_config.use_cache is False and "use_cache" not in config.to_dict()
    with pytest.raises(AttributeError, match="nor has its base_config"):
        _ = config.no_such_field


def test_saved_causal_lm_names_its_backbone_for_automodel_and_returns_tuples(tmp_path):
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4).set_stage(2).eval()
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_spri.SpriModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_spri.SpriForCausalLM"
    backbone = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        hidden = backbone(ids, return_dict=False)  # as vLLM's Transformers backend calls it
        assert isinstance(hidden, tuple)
        torch.testing.assert_close(hidden[0], model.model.model(ids).last_hidden_state)
        logits = model(ids, return_dict=False)
        assert isinstance(logits, tuple) and torch.equal(logits[0], model(ids).logits)
