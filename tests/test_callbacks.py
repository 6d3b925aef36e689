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
LAYER_METRICS = ["load_max", "load_min", "load_cv", "entropy", "aux_loss", "z_loss"]


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
            mean = sum(loads) / NUM_EXPERTS
            spread = math.sqrt(sum((load - mean) ** 2 for load in loads) / NUM_EXPERTS)
            assert entry[f"spri/{site}/load_cv"] == pytest.approx(spread / mean)
            assert 0.0 <= entry[f"spri/{site}/entropy"] <= math.log(NUM_EXPERTS) + 1e-6
            assert entry[f"spri/{site}/aux_loss"] > 0 and entry[f"spri/{site}/z_loss"] >= 0
        for name in LAYER_METRICS:
            mean = sum(entry[f"spri/{site}/{name}"] for site in SITES) / len(SITES)
            assert entry[f"spri/{name}_mean"] == pytest.approx(mean)
        # no routing labels asked for, no router with a correction bias
        assert not [key for key in entry if "label_expert_mi_bits" in key or "bias_range" in key]
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
    """LoRA on attention and on the fused experts, routers as `modules_to_save`: the monitor finds the blocks, and the
    routing labels pass through PEFT's forward to the SPRI model, where the monitor takes them out."""
    model = _spri().set_stage(2)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        modules_to_save=["router"],
    )
    monitor = SpriMonitorCallback(routing_label_key="language")
    dataset = _dataset().add_column("language", [0, 1] * 8)
    peft_model = get_peft_model(model, config)
    trainer = _trainer(peft_model, tmp_path, [monitor], dataset=dataset, remove_unused_columns=False)
    trainer.train()
    for entry in _train_logs(trainer):
        names = LAYER_METRICS + ["label_expert_mi_bits"]
        assert all(f"spri/{site}/{name}" in entry for site in SITES for name in names)
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


# ---- routing labels, load spread and balancing bias ----

LANGUAGE = "language"


def _language_dataset(design):
    """16 examples, 8 of them on the first half of the vocabulary (side A) and 8 on the second half (side B), with a
    `language` label each. `split`: the sides are the labels; `independent`: each label has 4 examples of each side;
    `one_side`: every example is on side A, labels alternate."""
    half = VOCAB // 2
    generator = torch.Generator().manual_seed(0)
    side_a = torch.randint(3, half, (8, 10), generator=generator)
    side_b = torch.randint(half, VOCAB, (8, 10), generator=generator)
    ids = torch.cat([side_a, side_a if design == "one_side" else side_b])
    languages = [0] * 8 + [1] * 8 if design == "split" else [0, 1] * 8
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), LANGUAGE: languages})


def _side_routed_spri():
    """Both layers send every token of side A to experts 0 and 1 and every token of side B to experts 2 and 3: a large
    embedding channel (+20 on side A, -20 on side B) that only this channel of the router weights reads."""
    model = _spri()
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[: VOCAB // 2, 0], embeddings[VOCAB // 2 :, 0] = 20.0, -20.0
        for block in model.moe_blocks().values():
            block.router.weight[:, 0] = torch.tensor([5.0, 5.0, -5.0, -5.0])
    return model


def _keys_reaching_the_backbone(model):
    """The input names of every call of the wrapped dense model, which the SPRI model's forward calls."""
    seen = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    return seen


@pytest.mark.parametrize(
    "design, load_cv, mi_bits",
    [
        # balanced load, and the label names the pair of experts of every token: log2(4 / 2) = 1 bit, the maximum
        ("split", 0.0, 1.0),
        ("independent", 0.0, 0.0),
        # experts 0 and 1 take every token: shares (1/2, 1/2, 0, 0), standard deviation 1/4 over a mean of 1/4
        ("one_side", 1.0, 0.0),
    ],
)
def test_load_cv_and_label_mutual_information_of_known_routing(tmp_path, design, load_cv, mi_bits):
    """The language column reaches the monitor, not the model (remove_unused_columns=False keeps it in the batches)."""
    model = _side_routed_spri()
    backbone_calls = _keys_reaching_the_backbone(model)
    monitor = SpriMonitorCallback(routing_label_key=LANGUAGE)
    trainer = _trainer(
        model,
        tmp_path,
        [monitor],
        max_steps=2,
        logging_steps=2,
        dataset=_language_dataset(design),
        learning_rate=0.0,
        remove_unused_columns=False,
    )
    trainer.train()
    (entry,) = _train_logs(trainer)  # one report over both steps: all 16 examples
    for site in SITES:
        assert entry[f"spri/{site}/load_cv"] == pytest.approx(load_cv, abs=1e-6)
        assert entry[f"spri/{site}/label_expert_mi_bits"] == pytest.approx(mi_bits, abs=1e-6)
    assert entry["spri/load_cv_mean"] == pytest.approx(load_cv, abs=1e-6)
    assert entry["spri/label_expert_mi_bits_mean"] == pytest.approx(mi_bits, abs=1e-6)
    assert len(backbone_calls) == 2 and all("input_ids" in keys and LANGUAGE not in keys for keys in backbone_calls)


def _hand_mutual_information_bits(forwards, site_index):
    """MI (bits) between label and chosen expert from routing this test recorded itself: every top-k choice of every
    unmasked token counts for its example's label; negative labels are left out."""
    counts = {}
    for labels, mask, choices in forwards:
        batch = labels.shape[0]
        per_token = choices[site_index].reshape(batch, -1, TOP_K)
        for example, label in enumerate(labels.tolist()):
            if label < 0:
                continue
            row = counts.setdefault(label, torch.zeros(NUM_EXPERTS, dtype=torch.float64))
            kept = per_token[example][mask[example].bool()]
            row += torch.bincount(kept.reshape(-1), minlength=NUM_EXPERTS).double()
    joint = torch.stack(list(counts.values()))
    joint = joint / joint.sum()
    independent = joint.sum(dim=1, keepdim=True) * joint.sum(dim=0, keepdim=True)
    nonzero = joint > 0
    return (joint[nonzero] * torch.log2(joint[nonzero] / independent[nonzero])).sum().item()


def test_label_mutual_information_matches_the_recorded_routing(tmp_path, caplog):
    """Random routers that learn, padding, two micro-batches per step, two steps per report, labels that are arbitrary
    integers (-1: no label): the logged MI is the one computed from the routing that the test records itself."""
    model = _spri()
    dataset = _dataset(padded=True)
    dataset = dataset.add_column(LANGUAGE, [[0, 7, 1000, -1][i % 4] for i in range(len(dataset))])
    forwards = []

    def record_batch(module, args, kwargs):  # registered before the monitor's hook, so it still sees the labels
        if module.training:
            forwards.append((kwargs[LANGUAGE].clone(), kwargs["attention_mask"].clone(), []))

    model.register_forward_pre_hook(record_batch, with_kwargs=True)
    for block in model.moe_blocks().values():
        block.router.register_forward_hook(lambda router, args, output: forwards[-1][2].append(output[2].clone()))
    trainer = _trainer(
        model,
        tmp_path,
        [SpriMonitorCallback(routing_label_key=LANGUAGE)],
        max_steps=2,
        batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=2,
        dataset=dataset,
        remove_unused_columns=False,
    )
    with caplog.at_level(logging.WARNING, logger="spri_hf"):
        trainer.train()
    assert not caplog.records  # the labels travel with the step's sums without disturbing the checks
    (entry,) = _train_logs(trainer)
    assert len(forwards) == 4
    expected = [_hand_mutual_information_bits(forwards, index) for index in range(len(SITES))]
    for site, value in zip(SITES, expected):
        assert entry[f"spri/{site}/label_expert_mi_bits"] == pytest.approx(value, rel=1e-6, abs=1e-9)
    assert entry["spri/label_expert_mi_bits_mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-6)


@pytest.mark.parametrize(
    "column, remove_unused_columns, match",
    [
        # Trainer drops columns that the model's forward does not name
        ([0, 1] * 8, True, "found no 'language' in the training batch .*remove_unused_columns=False"),
        ([[0] * 10, [1] * 10] * 8, False, "expects one integer label per example.*tensor of shape \\(8, 10\\)"),
    ],
    ids=["dropped", "per_token"],
)
def test_routing_labels_missing_or_misshaped_stop_the_first_step(tmp_path, column, remove_unused_columns, match):
    model = _spri()
    dataset = _dataset().add_column(LANGUAGE, column)
    monitor = SpriMonitorCallback(routing_label_key=LANGUAGE)
    trainer = _trainer(model, tmp_path, [monitor], dataset=dataset, remove_unused_columns=remove_unused_columns)
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert trainer.state.global_step == 0
    # no hook stays behind to fail the next run on this model
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not block.router._forward_hooks for block in model.moe_blocks().values())


def test_bias_range_only_for_routers_with_a_correction_bias(tmp_path):
    """Layer 0's router carries an auxiliary-loss-free balancing bias, layer 1's a bias slot left at None."""
    model = _spri()
    blocks = model.moe_blocks()
    blocks[0].router.register_buffer("e_score_correction_bias", torch.tensor([0.1, -0.2, 0.3, 0.0]))
    blocks[1].router.register_buffer("e_score_correction_bias", None)
    trainer = _trainer(model, tmp_path, [SpriMonitorCallback()], max_steps=2)
    trainer.train()
    for entry in _train_logs(trainer):
        assert entry["spri/decoder.0/bias_range"] == pytest.approx(0.5)
        assert "spri/decoder.1/bias_range" not in entry
        assert entry["spri/bias_range_mean"] == pytest.approx(0.5)
