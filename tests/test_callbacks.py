"""`SpriMonitorCallback` in real `Trainer` runs: routing metrics in the logs, collapse and NaN warnings."""

import logging
import math

import pytest
import torch
from conftest import VOCAB, tiny_dense
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import DefaultFlowCallback, Trainer, TrainerCallback, TrainingArguments

from spri_hf import SpriForCausalLM
from spri_hf.callbacks import SpriMonitorCallback, add_spri_monitor
from spri_hf.modeling_spri import load_balancing_loss


NUM_EXPERTS, TOP_K = 4, 2
SITES = ["decoder.0", "decoder.1"]
LAYER_METRICS = ["load_max", "load_min", "entropy", "aux_loss", "z_loss"]


def _dataset(n=16, length=10, padded=False):
    """Random token ids; `padded`: row i ends in i % 4 padding positions (attention_mask 0, label -100)."""
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))
    if not padded:
        return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    mask = (torch.arange(length) < length - torch.arange(n)[:, None] % 4).long()
    labels = ids.masked_fill(mask == 0, -100)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def _spri(**settings):
    settings = dict(num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, init="spri", diversity=0.3, **settings)
    return SpriForCausalLM.from_dense(tiny_dense("llama"), **settings).train()


def _trainer(model, tmp_path, callbacks=None, max_steps=2, batch_size=8, dataset=None, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **overrides})
    return Trainer(model=model, args=args, train_dataset=dataset or _dataset(), callbacks=callbacks)


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _warnings(caplog, text):
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


class _Recorder(TrainerCallback):
    """Stands in for a reporting integration: keeps what every `on_log` receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_metrics_in_log_history(tmp_path):
    """Stage 1, logged every 2 steps: every training log carries sane per-layer metrics and their means."""
    model = _spri()
    trainer = _trainer(model, tmp_path, [SpriMonitorCallback(per_expert=True)], max_steps=4, logging_steps=2)
    trainer.train()
    logs = _train_logs(trainer)
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        for site in SITES:
            loads = [entry[f"spri/{site}/load_expert_{e}"] for e in range(NUM_EXPERTS)]
            assert sum(loads) == pytest.approx(1.0, abs=1e-5)
            assert entry[f"spri/{site}/load_max"] == pytest.approx(max(loads))
            assert entry[f"spri/{site}/load_min"] == pytest.approx(min(loads))
            assert 0.0 <= entry[f"spri/{site}/entropy"] <= math.log(NUM_EXPERTS) + 1e-6
            assert entry[f"spri/{site}/aux_loss"] > 0 and entry[f"spri/{site}/z_loss"] >= 0
        for name in LAYER_METRICS:
            mean = sum(entry[f"spri/{site}/{name}"] for site in SITES) / len(SITES)
            assert entry[f"spri/{name}_mean"] == pytest.approx(mean)
    # the run summary and the model are left as they were: no metrics there, no hooks left behind
    assert not any(key.startswith("spri/") for key in trainer.state.log_history[-1])
    assert all(not block.router._forward_hooks and not block._forward_hooks for _, _, block in model.moe_sites())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_add_spri_monitor_runs_before_reporters_and_matches_the_model_losses(tmp_path):
    """`add_spri_monitor` puts the monitor right after the flow callback, so callbacks after it (the reporting
    integrations, here a recorder) receive the metrics; the logged router losses are those the model trains on:
    padding left out, and gradient checkpointing's recomputation (which runs the routers again) not counted."""
    model = _spri(router_z_loss_coef=1e-3)
    recorder = _Recorder()
    dataset = _dataset(padded=True)
    # one step over the whole dataset: the logged window is exactly one forward pass on it
    trainer = _trainer(
        model, tmp_path, [recorder], max_steps=1, batch_size=16, dataset=dataset, gradient_checkpointing=True
    )
    monitor = add_spri_monitor(trainer)
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], DefaultFlowCallback) and callbacks[1] is monitor
    batch = {name: torch.tensor(dataset[name]) for name in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        expected = model(**batch, output_router_logits=True)
    # per layer, transformers' balance loss of that layer alone; the model's aux_loss pools the layers' tokens
    per_layer_aux = [load_balancing_loss([logits], 2, batch["attention_mask"]).item() for logits in expected.router_logits]
    trainer.train()
    assert model.model.is_gradient_checkpointing
    logged = [logs for logs in recorder.logs if "loss" in logs]
    assert len(logged) == 1 and logged[0] == {k: v for k, v in _train_logs(trainer)[0].items() if k != "step"}
    assert logged[0]["spri/aux_loss_mean"] == pytest.approx(sum(per_layer_aux) / len(per_layer_aux), rel=1e-5)
    assert logged[0]["spri/z_loss_mean"] == pytest.approx(expected.z_loss.item(), rel=1e-5)


def test_add_spri_monitor_moves_a_monitor_given_to_the_trainer(tmp_path):
    monitor = SpriMonitorCallback()
    trainer = _trainer(_spri(), tmp_path, [monitor])
    assert add_spri_monitor(trainer) is monitor
    assert [type(cb) for cb in trainer.callback_handler.callbacks].count(SpriMonitorCallback) == 1
    assert trainer.callback_handler.callbacks[1] is monitor and monitor.placed_before_reporters
    with pytest.raises(ValueError, match="already has a SpriMonitorCallback"):
        add_spri_monitor(trainer, collapse_share=0.8)


def test_forced_collapse_warns_once_naming_the_layer_and_expert(tmp_path, caplog):
    """Every token of layer 1 picks expert 0: a large constant embedding channel that only expert 0's router row reads.

    The second choice still varies per token, and layer 0 ignores that channel; the learning rate is 0 so that the
    routers keep this state (training would let layer 0 pick the channel up too).
    """
    model = _spri()
    blocks = model.moe_blocks()
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] = 20.0
        blocks[0].router.weight[:, 0] = 0.0
        blocks[1].router.weight[:, 0] = 0.0
        blocks[1].router.weight[0, 0] = 5.0  # larger logits would underflow the others to exact ties
    monitor = SpriMonitorCallback(collapse_share=0.9, collapse_steps=2)
    trainer = _trainer(model, tmp_path, [monitor], max_steps=4, learning_rate=0.0)
    with caplog.at_level(logging.WARNING, logger="spri_hf"):
        trainer.train()
    collapses = _warnings(caplog, "Expert collapse")
    assert len(collapses) == 1, collapses  # once per layer until it recovers
    assert "MoE layer decoder.1: more than 90% of its tokens" in collapses[0] and "(expert 0: 100.0%)" in collapses[0]
    assert "for 2 consecutive optimizer steps, up to step 2" in collapses[0]
    # expert 0 takes one of the two slots of every token
    assert all(entry["spri/decoder.1/load_max"] == pytest.approx(0.5) for entry in _train_logs(trainer))


def _nan_at(model, where):
    if where == "experts":
        return model.moe_blocks()[1].experts.down_shared
    if where == "router":
        return model.moe_blocks()[0].router.weight
    return model.stack_layers("decoder")[1].self_attn.o_proj.weight


@pytest.mark.parametrize(
    "where, message",
    [
        ("experts", "first in MoE layer decoder.1: its MoE block's output became non-finite"),
        ("router", "first in MoE layer decoder.0: its router logits became non-finite"),
        ("attention", "first in MoE layer decoder.1: the hidden states entering its MoE block were already"),
    ],
    ids=["experts", "router", "attention"],
)
def test_forced_nan_warns_naming_the_first_layer(tmp_path, caplog, where, message):
    model = _spri()
    with torch.no_grad():
        _nan_at(model, where)[0, 0] = float("nan")
    trainer = _trainer(model, tmp_path, [SpriMonitorCallback()], max_steps=2)
    with caplog.at_level(logging.WARNING, logger="spri_hf"):
        trainer.train()
    nonfinite = _warnings(caplog, "Non-finite")
    # the NaN gradients spoil every weight after step 1: still one warning until a finite step comes back
    assert len(nonfinite) == 1, nonfinite
    assert nonfinite[0].startswith("Non-finite values at step 1, ") and message in nonfinite[0]


def test_peft_wrapped_stage2_model(tmp_path):
    """LoRA on attention and on the fused experts, routers as `modules_to_save`: the monitor finds the blocks."""
    model = _spri().set_stage(2)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        modules_to_save=["router"],
    )
    trainer = _trainer(get_peft_model(model, config), tmp_path, [SpriMonitorCallback()])
    trainer.train()
    for entry in _train_logs(trainer):
        assert all(f"spri/{site}/{name}" in entry for site in SITES for name in LAYER_METRICS)
        assert 0.25 <= entry["spri/load_max_mean"] <= 1.0


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(collapse_share=1.5), "collapse_share=1.5 must lie in"),
        (dict(collapse_steps=0), "collapse_steps=0 must be"),
        (dict(log_every=0), "log_every=0 must be"),
    ],
)
def test_invalid_settings(settings, match):
    with pytest.raises(ValueError, match=match):
        SpriMonitorCallback(**settings)


def test_refuses_a_threshold_that_uniform_routing_reaches_and_a_dense_model(tmp_path):
    # 2 of 4 experts per token: uniform routing already gives every expert half of the tokens
    with pytest.raises(ValueError, match="collapse_share=0.5 is not above"):
        _trainer(_spri(), tmp_path, [SpriMonitorCallback(collapse_share=0.5)], max_steps=1).train()
    with pytest.raises(ValueError, match="found no SPRI model inside LlamaForCausalLM"):
        _trainer(tiny_dense("llama").train(), tmp_path, [SpriMonitorCallback()], max_steps=1).train()
