"""PEFT LoRA on SPRI models: injection, `Trainer` runs, adapter save/reload, merging, experts implementations.

Stage-2 experts are fused 3D tensors (`gate_up_proj` (E, 2I, H) or `up_proj` (E, I, H), and `down_proj` (E, H, I)),
which PEFT adapts through `LoraConfig(target_parameters=[...])`: one `ParamWrapper` per parameter, with E
independent rank-r updates, applied as a parametrization around the experts' own forward, so every experts
implementation (eager, batched_mm, grouped_mm) sees the adapted weights. Attention projections are ordinary
`target_modules`.

The stage-2 matrix (`CASES`) runs one lifecycle per family in a module-scoped fixture (build -> wrap -> train with
`Trainer` -> save adapter), and the tests below check each step of it. Stage 1 gets attention-only LoRA (see
`test_stage1_attention_lora_trains`).
"""

import peft
import pytest
import torch
from conftest import progression_dataset, tiny_dense
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from spri_hf import SpriForCausalLM


# family -> (attention target_modules, expert target_parameters). GPT-2's attention is `Conv1D`, which PEFT adapts
# only with `fan_in_fan_out=True`; PEFT < 0.22 refused that flag beside expert parameters (see
# `test_gpt2_conv1d_attention_and_expert_parameters_in_one_adapter`), so its case adapts the experts alone.
CASES = {
    "llama": (["q_proj", "v_proj"], ["experts.gate_up_proj", "experts.down_proj"]),
    "qwen3": (["q_proj", "v_proj"], ["experts.gate_up_proj", "experts.down_proj"]),
    "gpt_neox": (["query_key_value"], ["experts.up_proj", "experts.down_proj"]),  # plain FFN with biases
    "gpt2": (None, ["experts.up_proj", "experts.down_proj"]),  # plain FFN with biases, Conv1D attention
}
IMPLEMENTATIONS = ["eager", "batched_mm", "grouped_mm"]
TRAIN_STEPS = 12


def _train(model, output_dir, steps=TRAIN_STEPS, lr=2e-2):
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=progression_dataset(n=32))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _lora_config(family, **overrides):
    target_modules, target_parameters = CASES[family]
    settings = dict(
        r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=target_modules, target_parameters=target_parameters
    )
    settings.update(overrides)
    return LoraConfig(**settings)


def _logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module", params=list(CASES))
def lifecycle(request, tmp_path_factory):
    """One stage-2 model per family, wrapped with LoRA, trained a few steps, base and adapter saved.

    Returns a dict: family, `peft_model` (trained), `base_logits` / `initial_logits` (before training, without and
    with the fresh adapter), snapshots of base / LoRA parameters before training, losses, and the saved folders.
    """
    family = request.param
    root = tmp_path_factory.mktemp(f"peft-{family}")
    input_ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    spri = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, num_experts_per_tok=2, stage=2, diversity=0.3)
    spri.save_pretrained(root / "base")  # the base weights, as a reloadable SPRI checkpoint
    base_logits = _logits(spri, input_ids)
    peft_model = get_peft_model(spri, _lora_config(family))
    initial_logits = _logits(peft_model, input_ids)
    base_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    lora_before = _lora_state(peft_model)
    losses = _train(peft_model.train(), root / "run")
    peft_model.save_pretrained(root / "adapter")
    return dict(
        family=family, root=root, input_ids=input_ids, peft_model=peft_model.eval(), base_logits=base_logits,
        initial_logits=initial_logits, base_before=base_before, lora_before=lora_before, losses=losses,
    )


def test_only_lora_parameters_train_and_experts_are_wrapped(lifecycle):
    """LoRA A/B are the only trainable tensors; each targeted expert tensor gets one (nested) `ParamWrapper`."""
    model = lifecycle["peft_model"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    target_modules, target_parameters = CASES[lifecycle["family"]]
    spri = model.get_base_model()
    for block in spri.moe_blocks().values():
        wrapped = []
        layer = block.experts
        while isinstance(layer, ParamWrapper):
            # one rank-r update per expert: lora_A stacks E blocks of r rows
            assert layer.num_experts == spri.config.num_experts
            assert layer.lora_A["default"].weight.shape[0] == 4 * spri.config.num_experts
            wrapped.append(layer.parameter_name)
            layer = layer.base_layer
        assert sorted(wrapped) == sorted(name.split(".")[-1] for name in target_parameters)
    for target in target_modules or []:
        assert any(f".{target}.lora_A." in n for n in trainable), target


def test_fresh_adapter_is_the_identity(lifecycle):
    """LoRA B starts at zero, so the wrapped model reproduces the base model's logits exactly."""
    torch.testing.assert_close(lifecycle["initial_logits"], lifecycle["base_logits"], atol=0, rtol=0)


def test_trainer_moves_lora_weights_only(lifecycle):
    """A real `Trainer` run lowers the loss, changes every LoRA tensor and leaves the base weights bit-identical."""
    model, losses = lifecycle["peft_model"], lifecycle["losses"]
    assert len(losses) == TRAIN_STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    after = _lora_state(model)
    moved = [n for n, before in lifecycle["lora_before"].items() if not torch.equal(after[n], before)]
    assert moved == list(lifecycle["lora_before"])  # every A and B moved (B away from 0)
    for name, param in model.named_parameters():
        if name in lifecycle["base_before"]:
            assert torch.equal(param, lifecycle["base_before"][name]), name
    assert not torch.allclose(_logits(model, lifecycle["input_ids"]), lifecycle["base_logits"])


def test_adapter_reloads_on_a_fresh_base(lifecycle):
    """`save_pretrained` writes the adapter files; a reloaded SPRI base + `PeftModel.from_pretrained` is exact."""
    root = lifecycle["root"]
    assert (root / "adapter" / "adapter_model.safetensors").is_file()
    assert (root / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    assert isinstance(base, SpriForCausalLM)
    reloaded = PeftModel.from_pretrained(base, root / "adapter")
    expected = _logits(lifecycle["peft_model"], lifecycle["input_ids"])
    torch.testing.assert_close(_logits(reloaded, lifecycle["input_ids"]), expected, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())  # inference mode by default


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_experts_implementations_see_the_adapter(lifecycle, implementation):
    """eager / batched_mm / grouped_mm agree on the adapted experts, and all three back-propagate into LoRA."""
    model, input_ids = lifecycle["peft_model"], lifecycle["input_ids"]
    spri = model.get_base_model()
    expected = _logits(model, input_ids)  # eager: the default
    try:
        spri.set_experts_implementation(implementation)
        assert spri.config._experts_implementation == implementation
        torch.testing.assert_close(_logits(model, input_ids), expected, atol=1e-5, rtol=1e-5)
        model.zero_grad()
        model(input_ids, labels=input_ids).loss.backward()
        expert_grads = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_" in n]
        assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads)
        model.zero_grad()
    finally:
        spri.set_experts_implementation("eager")


def test_merge_and_unload_gives_a_plain_spri_model(lifecycle, tmp_path):
    """Merging folds LoRA into the fused expert tensors and attention weights: same logits, no LoRA left, and the
    merged model saves and reloads as an ordinary SPRI checkpoint."""
    root, input_ids = lifecycle["root"], lifecycle["input_ids"]
    expected = _logits(lifecycle["peft_model"], input_ids)
    # merge a reloaded copy so that the module-scoped trained model stays intact for the other tests
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter")
    merged = peft_model.merge_and_unload()
    assert type(merged) is SpriForCausalLM
    assert not any("lora" in name or "base_layer" in name for name, _ in merged.named_parameters())
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())
    reference = SpriForCausalLM.from_pretrained(root / "base")
    assert merged.state_dict().keys() == reference.state_dict().keys()
    torch.testing.assert_close(_logits(merged, input_ids), expected, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_logits(reloaded, input_ids), expected, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
def test_gpt2_conv1d_attention_and_expert_parameters_in_one_adapter(input_ids):
    """GPT-2's `Conv1D` attention forces `fan_in_fan_out=True` on the shared config. PEFT < 0.22 then refused the 3D
    expert LoRA (`ParamWrapper`); from 0.22 one adapter holds both, and its expert LoRA acts exactly as an
    experts-only adapter's with the same weights (the attention LoRA starts at zero)."""
    spri = SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4, stage=2)
    if Version(peft.__version__) < Version("0.22"):
        with pytest.raises(ValueError, match="fan_in_fan_out"):
            get_peft_model(spri, _lora_config("gpt2", target_modules=["c_attn"]))
        return
    both = get_peft_model(spri, _lora_config("gpt2", target_modules=["c_attn"]))
    alone = get_peft_model(SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4, stage=2), _lora_config("gpt2"))
    adapted = {name for name, _ in both.named_parameters() if "lora_" in name}
    assert any(".attn.c_attn.lora_" in name for name in adapted) and any(".experts." in name for name in adapted)
    experts_only = dict(alone.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in both.named_parameters():
            if "lora_" in name and ".experts." in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
                experts_only[name].copy_(param)
    dense_logits = _logits(SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4, stage=2), input_ids)
    assert (_logits(alone, input_ids) - dense_logits).abs().max() > 1e-3  # the expert LoRA is not a no-op
    torch.testing.assert_close(_logits(both, input_ids), _logits(alone, input_ids), atol=1e-6, rtol=0)


def test_stage1_attention_lora_trains(tmp_path, input_ids):
    """Stage 1 (`init="spri"`): attention-only LoRA with the routers as `modules_to_save` trains with `Trainer`.

    The stage-1 residual factors are already rank-k trainable factors, so LoRA on them (`target_parameters`) would be
    a low-rank update of a low-rank factor; and the shared base has no per-expert axis. PEFT freezes them like every
    other non-adapter weight. SPRI's own stage-1 recipe (train factors + routers natively) or LoRA after
    `set_stage(2)` are the two sensible routes; this test covers LoRA on top of a stage-1 model.
    """
    spri = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, diversity=0.3)
    assert spri.config.stage == 1
    base_logits = _logits(spri, input_ids)
    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                        modules_to_save=["router"])
    model = get_peft_model(spri, config)
    torch.testing.assert_close(_logits(model, input_ids), base_logits, atol=0, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any(".router." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model.train(), tmp_path / "run")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, diversity=0.3), tmp_path / "adapter"
    )
    torch.testing.assert_close(_logits(reloaded, input_ids), _logits(model, input_ids), atol=1e-6, rtol=0)
    # set_stage re-applies SPRI's trainability: under an adapter it would unfreeze the base, so it refuses
    with pytest.raises(ValueError, match="set_stage\\(2\\) before get_peft_model"):
        model.get_base_model().set_stage(2)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
