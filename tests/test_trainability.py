"""What trains in each stage is decided by module type (SPRI's routers and residual factors), not by parameter names:
a dense family may well have modules called `router` or parameters ending in `_residual_a`."""

import torch
from conftest import tiny_dense
from torch import nn

from spri_hf import SpriForCausalLM


def _with_look_alikes(model):
    """Give one dense attention block a submodule named `router` and a parameter named like a residual factor."""
    attention = model.model.model.layers[0].self_attn
    attention.router = nn.Linear(4, 4, bias=False)
    attention.register_parameter("look_residual_a", nn.Parameter(torch.zeros(2)))
    return model


def _trainable(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_stage1_trains_only_spri_routers_and_residual_factors_not_dense_modules_named_like_them():
    model = _with_look_alikes(SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="spri"))
    model.apply_stage_trainability()
    trainable = _trainable(model)
    assert "model.model.layers.0.self_attn.router.weight" not in trainable
    assert "model.model.layers.0.self_attn.look_residual_a" not in trainable
    routers = {name for name in trainable if name.endswith("mlp.router.weight")}
    factors = {name for name in trainable if "_residual_" in name and ".mlp.experts." in name}
    assert routers and factors and trainable == routers | factors
    assert all("_shared" not in name for name in trainable)  # the shared base stays frozen


def test_stage2_without_train_all_trains_the_moe_blocks_only():
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="copy", shared_expert="dense")
    model.config.stage2_train_all = False
    _with_look_alikes(model).apply_stage_trainability()
    trainable = _trainable(model)
    assert "model.model.layers.0.self_attn.router.weight" not in trainable
    assert trainable and all(".mlp." in name for name in trainable)
    assert any(".mlp.shared_expert." in name for name in trainable)
    assert any(".mlp.experts." in name for name in trainable) and any(".mlp.router." in name for name in trainable)


def test_the_switch_keeps_trainability_by_type():
    model = _with_look_alikes(SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="spri"))
    model.set_stage(2)
    assert all(param.requires_grad for param in model.parameters())  # stage2_train_all, the default
