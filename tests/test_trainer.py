"""SpriTrainer / SpriSeq2SeqTrainer: both stages in one run, the learning-rate curve, the carried optimizer state,
exact resume from any checkpoint, and the hand-built two-Trainer recipe's loss spike that the defaults avoid."""

import shutil

import pytest
import torch
from conftest import assert_same_state, progression_dataset, speech_dataset, tiny, tiny_dense
from datasets import Dataset
from transformers import AutoModelForMaskedLM, Trainer, TrainerCallback, TrainingArguments

from spri_hf import (
    SpriForCausalLM,
    SpriForMaskedLM,
    SpriForSequenceClassification,
    SpriForSpeechSeq2Seq,
    SpriSeq2SeqTrainer,
    SpriSeq2SeqTrainingArguments,
    SpriTrainer,
    SpriTrainingArguments,
)
from spri_hf.trainer import STAGE1_LR_MULTIPLIER


def _args(output_dir, arguments_class=SpriTrainingArguments, **overrides):
    settings = dict(
        output_dir=str(output_dir), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
        stage1_steps=0.5, stage2_warmup_steps=2, warmup_steps=1, lr_scheduler_type="linear", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
    )  # fmt: skip
    settings.update(overrides)
    return arguments_class(**settings)


def _causal(stage=None, **settings):
    return SpriForCausalLM.from_dense(tiny_dense("qwen2"), num_experts=4, diversity=0.3, stage=stage, **settings).train()


def _speech():
    return SpriForSpeechSeq2Seq.from_dense(tiny("whisper"), num_experts=4, diversity=0.3, upcycle="both").train()


class _GroupRecorder(TrainerCallback):
    """Per optimizer step: the peak rate of every group, and the ids of the parameters the optimizer holds."""

    def __init__(self):
        self.steps = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        groups = optimizer.param_groups
        self.steps.append(
            dict(
                step=state.global_step + 1,
                initial_lr={group["initial_lr"] for group in groups if group["params"]},
                lr={group["lr"] for group in groups if group["params"]},
                params={id(p) for group in groups for p in group["params"]},
            )
        )


def _logged(trainer, key):
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry and "loss" in entry}


def test_one_run_two_stages_learning_rates_and_groups(tmp_path):
    model = _causal()
    stage1_trainable = {id(p) for p in model.parameters() if p.requires_grad}
    recorder = _GroupRecorder()
    trainer = SpriTrainer(model=model, args=_args(tmp_path), train_dataset=progression_dataset(), callbacks=[recorder])
    output = trainer.train()
    assert output.global_step == 12 and model.config.stage == 2
    assert trainer.switch_step == 6 and (tmp_path / "checkpoint-6" / "config.json").exists()

    base, stage1 = 3e-3, STAGE1_LR_MULTIPLIER * 3e-3
    # stage-1 groups hold exactly the stage-1 parameters at the stage-1 rate; stage 2 every parameter at the base rate
    for record in recorder.steps:
        if record["step"] <= 6:
            assert record["initial_lr"] == {stage1} and record["params"] == stage1_trainable
        else:
            assert record["initial_lr"] == {base}
            assert record["params"] == {id(p) for p in model.parameters()}
    # one curve over the global step: warm-up (1 step), linear decay over stage 1, re-warm-up (2 steps), decay
    expected = {1: 0.0, 2: stage1, 3: stage1 * 4 / 5, 4: stage1 * 3 / 5, 5: stage1 * 2 / 5, 6: stage1 / 5,
                7: 0.0, 8: base / 2, 9: base, 10: base * 3 / 4, 11: base / 2, 12: base / 4}  # fmt: skip
    logged = _logged(trainer, "learning_rate")
    assert sorted(logged) == list(range(1, 13))
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-9, abs=1e-12), step
    assert _logged(trainer, "stage") == {step: 1 if step <= 6 else 2 for step in range(1, 13)}


@pytest.mark.parametrize("carry", [True, False])
def test_router_optimizer_state_carries_over_the_switch(tmp_path, carry):
    model = _causal()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    trainer = SpriTrainer(
        model=model, args=_args(tmp_path, stage2_carry_optimizer_state=carry), train_dataset=progression_dataset()
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    # AdamW counts its steps per parameter: carried state has seen all 12, a fresh one only stage 2's 6
    for router in routers:
        assert int(optimizer.state[router]["step"]) == (12 if carry else 6)
    expert = model.moe_blocks()[0].experts.gate_up_proj
    assert int(optimizer.state[expert]["step"]) == 6  # parameters new in stage 2 always start fresh


def test_models_without_a_stage_one_train_as_plain_trainer(tmp_path):
    model = _causal(init="copy")
    reference = _causal(init="copy")
    trainer = SpriTrainer(
        model=model, args=_args(tmp_path / "spri", warmup_steps=2), train_dataset=progression_dataset()
    )
    trainer.train()
    plain_args = TrainingArguments(**{k: v for k, v in _args(tmp_path / "plain", warmup_steps=2).to_dict().items()
                                      if k in TrainingArguments.__dataclass_fields__ and k not in ("output_dir",)},
                                   output_dir=str(tmp_path / "plain"))  # fmt: skip
    Trainer(model=reference, args=plain_args, train_dataset=progression_dataset()).train()
    assert trainer.switch_step is None and not (tmp_path / "spri" / "checkpoint-6").exists()
    assert_same_state(model, reference)


def test_stage1_steps_zero_trains_stage2_only(tmp_path):
    model = _causal()
    trainer = SpriTrainer(model=model, args=_args(tmp_path, stage1_steps=0), train_dataset=progression_dataset())
    trainer.train()
    assert model.config.stage == 2 and trainer.switch_step is None
    assert set(_logged(trainer, "stage").values()) == {2}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(stage1_steps=12), "stage1_steps=12 is not shorter than the run"),
        (dict(stage1_steps=-1), "stage1_steps=-1 must be a number >= 0"),
        (dict(stage1_steps=2.5), "must be a whole number"),
        (dict(stage2_warmup_steps=-0.5), "stage2_warmup_steps=-0.5"),
        (dict(stage1_learning_rate=0.0), "stage1_learning_rate=0.0 must be > 0"),
    ],
)
def test_bad_stage_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **overrides)


def test_stage1_longer_than_an_epoch_based_run_is_refused_before_training(tmp_path):
    args = _args(tmp_path, max_steps=-1, num_train_epochs=1, stage1_steps=8)  # 64 rows / 8 = 8 steps in all
    trainer = SpriTrainer(model=_causal(), args=args, train_dataset=progression_dataset())
    with pytest.raises(ValueError, match="stage 1 of 8 steps, not shorter than the run \\(8 optimizer steps over 64 examples\\)"):
        trainer.train()
    assert not any(tmp_path.glob("checkpoint-*"))


def test_optimizers_argument_is_refused(tmp_path):
    model = _causal()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        SpriTrainer(
            model=model, args=_args(tmp_path), train_dataset=progression_dataset(), optimizers=(optimizer, None)
        )


# ---- exact resume --------------------------------------------------------------------------------------------------
def _causal_tied():
    """GPT-2 ties its LM head to the embeddings (as SmolLM2 does): the checkpoints hold the weight once."""
    return SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4, diversity=0.3).train()


_RESUME = {
    "causal": (_causal, progression_dataset, SpriTrainer, SpriTrainingArguments),
    "causal-tied": (_causal_tied, progression_dataset, SpriTrainer, SpriTrainingArguments),
    "speech": (_speech, lambda: speech_dataset(64), SpriSeq2SeqTrainer, SpriSeq2SeqTrainingArguments),
}


@pytest.mark.parametrize("kind", list(_RESUME))
def test_resume_anywhere_ends_bit_identical(tmp_path, kind):
    make_model, make_data, trainer_class, arguments_class = _RESUME[kind]

    def run(output_dir, resume=None):
        model = make_model()
        args = _args(output_dir, arguments_class, save_strategy="steps", save_steps=3, learning_rate=1e-2)
        trainer_class(model=model, args=args, train_dataset=make_data()).train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run(tmp_path / "full")
    assert uninterrupted.config.stage == 2
    # stage 2 trained the whole model
    assert not torch.equal(uninterrupted.get_input_embeddings().weight, make_model().get_input_embeddings().weight)
    # mid stage 1, the switch checkpoint, mid stage 2; each resumed in a fresh output folder from a copy
    for step, stage in ((3, 1), (6, 2), (9, 2)):
        checkpoint = tmp_path / f"copy-{step}"
        shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", checkpoint)
        assert f'"stage": {stage}' in (checkpoint / "config.json").read_text()
        resumed = run(tmp_path / f"resumed-{step}", resume=str(checkpoint))
        assert resumed.config.stage == 2
        assert_same_state(resumed, uninterrupted)
        if kind == "causal-tied":  # the tie survived the reload from the checkpoint
            assert resumed.get_output_embeddings().weight is resumed.get_input_embeddings().weight


# ---- the loss spike at the switch ----------------------------------------------------------------------------------
def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_hand_built_recipe_spikes_at_the_switch_and_spri_trainer_does_not(tmp_path):
    """Stage 1 for 20 steps at 10x the rate, then stage 2 for 20 at lr 1e-2 (linear decay in both).

    Hand-built (README's old recipe): a second Trainer, fresh AdamW at the full rate, no warm-up. SpriTrainer with
    its defaults (10 % re-warm-up, router state carried). Measured here: last stage-1 losses ~4.21; the hand-built
    run climbs to 4.36 within 3 stage-2 steps, SpriTrainer stays at or below 4.20."""
    lr, steps = 1e-2, 20

    def fresh():
        return SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, diversity=0.3).train()

    common = dict(per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                  disable_tqdm=True, seed=0, data_seed=0, lr_scheduler_type="linear")  # fmt: skip
    model = fresh()
    stage1 = Trainer(model=model, train_dataset=progression_dataset(), args=TrainingArguments(
        output_dir=str(tmp_path / "h1"), max_steps=steps, learning_rate=STAGE1_LR_MULTIPLIER * lr, **common))
    stage1.train()
    model.set_stage(2)
    stage2 = Trainer(model=model, train_dataset=progression_dataset(), args=TrainingArguments(
        output_dir=str(tmp_path / "h2"), max_steps=steps, learning_rate=lr, **common))
    stage2.train()
    hand_before, hand_after = _losses(stage1)[-4:], _losses(stage2)[:4]

    trainer = SpriTrainer(model=fresh(), train_dataset=progression_dataset(), args=SpriTrainingArguments(
        output_dir=str(tmp_path / "spri"), max_steps=2 * steps, learning_rate=lr, stage1_steps=steps, **common))
    trainer.train()
    losses = _losses(trainer)
    spri_before, spri_after = losses[steps - 4 : steps], losses[steps : steps + 4]
    assert spri_before == pytest.approx(hand_before, abs=1e-6)  # the same stage 1
    level = sum(hand_before) / 4
    assert max(hand_after) > level + 0.05, (hand_before, hand_after)  # the spike is real at this size
    assert max(spri_after) <= level + 0.02, (spri_before, spri_after)  # tolerance: 0.02 nats


# ---- Trainer features through the switch ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        dict(gradient_accumulation_steps=2, per_device_train_batch_size=4),
        dict(gradient_checkpointing=True),
        dict(bf16=True),
        dict(eval_strategy="steps", eval_steps=3),
    ],
    ids=["grad-accumulation", "gradient-checkpointing", "bf16", "eval"],
)
def test_trainer_features_work_through_the_switch(tmp_path, overrides):
    model = _causal()
    trainer = SpriTrainer(model=model, args=_args(tmp_path, **overrides), train_dataset=progression_dataset(),
                          eval_dataset=progression_dataset(16))  # fmt: skip
    trainer.train()
    assert model.config.stage == 2 and trainer.state.global_step == 12
    losses = _losses(trainer)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    if "eval_strategy" in overrides:
        evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
        assert [entry["step"] for entry in evals] == [3, 6, 9, 12]
        assert [entry["stage"] for entry in evals] == [1, 1, 2, 2]


@pytest.mark.parametrize("head", ["sequence-classification", "masked-lm"])
def test_encoder_heads_train_both_stages(tmp_path, head):
    if head == "masked-lm":
        model = SpriForMaskedLM.from_dense(tiny("bert", AutoModelForMaskedLM), num_experts=4, diversity=0.3)
        rows = [{"input_ids": [3 + (i + j) % 90 for j in range(8)], "labels": [3 + (i + j) % 90 for j in range(8)]}
                for i in range(64)]  # fmt: skip
    else:
        model = SpriForSequenceClassification.from_dense(tiny("bert"), num_experts=4, diversity=0.3)
        rows = [{"input_ids": [3 + (i + j) % 90 for j in range(8)], "labels": i % 2} for i in range(64)]
    trainer = SpriTrainer(model=model.train(), args=_args(tmp_path), train_dataset=Dataset.from_list(rows))
    trainer.train()
    assert model.config.stage == 2 and trainer.switch_step == 6


def test_train_output_summarises_both_stages(tmp_path):
    trainer = SpriTrainer(model=_causal(), args=_args(tmp_path), train_dataset=progression_dataset())
    output = trainer.train()
    losses = _losses(trainer)
    assert output.global_step == 12
    assert output.training_loss == pytest.approx(sum(losses) / 12, rel=1e-6)


def test_stage2_frozen_keeps_parameters_fixed_through_the_switch(tmp_path):
    model = _causal(stage2_frozen=["embed_tokens"])
    embeddings = model.get_input_embeddings().weight.detach().clone()
    trainer = SpriTrainer(model=model, args=_args(tmp_path), train_dataset=progression_dataset())
    trainer.train()
    assert model.config.stage == 2 and not model.get_input_embeddings().weight.requires_grad
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert model.moe_blocks()[0].experts.gate_up_proj.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" not in n)
