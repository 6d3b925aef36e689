"""Real `transformers.Trainer` runs on tiny configs: both stages learn, and resuming is exact."""

import pytest
import torch
from conftest import progression_dataset, tiny_dense
from transformers import Trainer, TrainerCallback, TrainingArguments

from spri_hf import SpriForCausalLM


class _StopAt(TrainerCallback):
    """Simulates a run killed right after the checkpoint of step `step` was written."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _train(model, output_dir, max_steps, save_steps=None, resume=None, lr=1e-2, stop_at=None):
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 10_000,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    callbacks = [_StopAt(stop_at)] if stop_at else None
    trainer = Trainer(model=model, args=args, train_dataset=progression_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_decreases_in_both_stages(family, tmp_path):
    model = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, diversity=0.3).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    stage1 = _train(model, tmp_path / "s1", 40, lr=1e-2)
    # only the low-rank residual factors and routers learn here: a clear but smaller drop than in stage 2
    assert sum(stage1[-5:]) / 5 < sum(stage1[:5]) / 5 - 0.1
    # stage 1 leaves the frozen parameters untouched
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.set_stage(2)
    stage2 = _train(model, tmp_path / "s2", 30, lr=3e-3)
    assert sum(stage2[-5:]) / 5 < 0.9 * sum(stage2[:5]) / 5


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_from_checkpoint_ends_with_the_same_weights(tmp_path, stage):
    dense = tiny_dense("qwen2")

    def fresh():
        return SpriForCausalLM.from_dense(dense, num_experts=4, diversity=0.3, stage=stage).train()

    uninterrupted = fresh()
    _train(uninterrupted, tmp_path / "full", 12)
    interrupted = fresh()
    _train(interrupted, tmp_path / "run", 12, save_steps=6, stop_at=6)  # "killed" after step 6
    checkpoint = tmp_path / "run" / "checkpoint-6"
    assert (checkpoint / "model.safetensors").exists()
    resumed = fresh()
    _train(resumed, tmp_path / "run", 12, save_steps=6, resume=str(checkpoint))
    assert resumed.config.stage == stage
    expected = uninterrupted.state_dict()
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)
    # the run really moved the weights
    initial = fresh().state_dict()
    assert any(not torch.equal(initial[n], t) for n, t in expected.items())
