"""Encoder-decoder (text and speech) and encoder-only families: dense equivalence for every stack setting, both
stages, save/load through the auto classes, generation, Seq2SeqTrainer in both stages, remote code."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    SEQ2SEQ_FAMILIES,
    VOCAB,
    assert_reloaded_logits,
    assert_same_state,
    speech_dataset,
    tiny,
    without_spri_hf,
)
from datasets import Dataset
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from spri_hf import (
    SpriForMaskedLM,
    SpriForSeq2SeqLM,
    SpriForSequenceClassification,
    SpriForSpeechSeq2Seq,
    fold_to_dense,
)


ENCODER_DECODER = [
    family for family in SEQ2SEQ_FAMILIES if SEQ2SEQ_FAMILIES[family][2] is not SpriForSequenceClassification
]
ENCODER_ONLY = [family for family in SEQ2SEQ_FAMILIES if SEQ2SEQ_FAMILIES[family][2] is SpriForSequenceClassification]


def inputs_for(family: str, batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(1)
    if family == "whisper":  # (batch, mel bins, 2 * max_source_positions): the encoder's fixed input length
        return dict(input_features=torch.randn(batch, 8, 32, generator=generator),
                    decoder_input_ids=torch.randint(3, VOCAB, (batch, 5), generator=generator))
    if family == "speech_to_text":
        return dict(input_features=torch.randn(batch, 20, 8, generator=generator),
                    decoder_input_ids=torch.randint(3, VOCAB, (batch, 5), generator=generator))
    inputs = dict(input_ids=torch.randint(3, VOCAB, (batch, 7), generator=generator))
    if family in ENCODER_DECODER:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=generator)
    return inputs


def _close(actual, expected, atol=1e-5):
    # mT5's unscaled logits reach ~100: compare relative to their size
    torch.testing.assert_close(actual, expected, atol=atol * max(1.0, expected.abs().max().item()), rtol=0)


STACK_SETTINGS = {
    "decoder": dict(upcycle="decoder"),
    "encoder": dict(upcycle="encoder"),
    "both": dict(upcycle="both"),
    "per-stack-layers": dict(moe_layers={"encoder": [1], "decoder": [0]}),
}


@pytest.mark.parametrize("dense_equivalent", [dict(init="copy"), dict(principal_ratio=1.0)], ids=["copy", "ratio1"])
@pytest.mark.parametrize("stacks", list(STACK_SETTINGS))
@pytest.mark.parametrize("family", ENCODER_DECODER)
def test_encoder_decoder_dense_equivalence_for_every_stack_setting(family, stacks, dense_equivalent):
    dense, spri_class = tiny(family), SEQ2SEQ_FAMILIES[family][2]
    inputs = inputs_for(family)
    model = spri_class.from_dense(dense, num_experts=4, **STACK_SETTINGS[stacks], **dense_equivalent)
    expected_stacks = {"decoder": ["decoder"], "encoder": ["encoder"]}.get(stacks, ["encoder", "decoder"])
    assert model.config.upcycled_stacks() == expected_stacks
    assert list(dict.fromkeys(stack for stack, _, _ in model.moe_sites())) == expected_stacks
    _close(model(**inputs).logits, dense(**inputs).logits)


@pytest.mark.parametrize("dense_equivalent", [dict(init="copy"), dict(principal_ratio=1.0)], ids=["copy", "ratio1"])
@pytest.mark.parametrize("family", ENCODER_ONLY)
def test_encoder_only_dense_equivalence_classification_and_masked_lm(family, dense_equivalent):
    inputs = inputs_for(family)
    for auto_class, spri_class in (
        (AutoModelForSequenceClassification, SpriForSequenceClassification),
        (AutoModelForMaskedLM, SpriForMaskedLM),
    ):
        dense = tiny(family, auto_class)
        model = spri_class.from_dense(dense, num_experts=4, **dense_equivalent)
        assert model.config.upcycled_stacks() == ["encoder"]
        _close(model(**inputs).logits, dense(**inputs).logits)


@pytest.mark.parametrize("family", list(SEQ2SEQ_FAMILIES))
def test_stages_save_load_and_trainability(family, tmp_path):
    dense, auto_class, spri_class = tiny(family), SEQ2SEQ_FAMILIES[family][1], SEQ2SEQ_FAMILIES[family][2]
    inputs = inputs_for(family)
    upcycle = dict(upcycle="both") if family in ENCODER_DECODER else {}
    model = spri_class.from_dense(dense, num_experts=4, diversity=0.5, **upcycle)
    assert model.config.stage == 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or "_residual_" in n for n in trainable)
    stage1 = model(**inputs).logits
    assert (stage1 - dense(**inputs).logits).abs().max() > 1e-5  # SPRI moved the function
    model.save_pretrained(tmp_path / "stage1")
    reloaded = auto_class.from_pretrained(tmp_path / "stage1")
    assert_same_state(reloaded, model)
    assert_reloaded_logits(reloaded(**inputs).logits, stage1)
    model.set_stage(2)
    stage2 = model(**inputs).logits
    _close(stage2, stage1)
    model.save_pretrained(tmp_path / "stage2")
    reloaded = auto_class.from_pretrained(tmp_path / "stage2")
    assert type(reloaded) is spri_class and reloaded.config.stage == 2
    assert_same_state(reloaded, model)
    assert_reloaded_logits(reloaded(**inputs).logits, stage2)


@pytest.mark.parametrize("family", ["whisper", "marian", "t5"])
def test_generation_of_copy_upcycled_seq2seq_matches_dense(family):
    dense, spri_class = tiny(family), SEQ2SEQ_FAMILIES[family][2]
    inputs = inputs_for(family)
    inputs.pop("decoder_input_ids")
    model = spri_class.from_dense(dense, num_experts=4, init="copy", upcycle="both")
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**inputs, **kwargs), dense.generate(**inputs, **kwargs))


def test_labels_add_router_losses_and_router_logits_cover_both_stacks():
    dense, inputs = tiny("marian"), inputs_for("marian")
    labels = inputs.pop("decoder_input_ids")
    # copy experts: the language-modelling loss is the dense one, so the rest is exactly the router losses
    model = SpriForSeq2SeqLM.from_dense(dense, num_experts=4, init="copy", upcycle="both", router_z_loss_coef=0.1)
    out = model(**inputs, labels=labels, output_router_logits=True)
    dense_loss = dense(**inputs, labels=labels).loss
    assert out.aux_loss > 0.5 and out.z_loss > 0
    expected = dense_loss + 0.01 * out.aux_loss + 0.1 * out.z_loss
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    # encoder layers route 2x7 source tokens, decoder layers 2x5 target tokens
    assert [logits.shape for logits in out.router_logits] == [(14, 4)] * 2 + [(10, 4)] * 2


def test_moe_blocks_are_keyed_by_layer_index_per_stack():
    model = SpriForSeq2SeqLM.from_dense(tiny("marian"), num_experts=4, init="copy", upcycle="both")
    sites = model.moe_sites()
    for stack in ("encoder", "decoder"):
        blocks = model.moe_blocks(stack)
        assert blocks and all(isinstance(idx, int) for idx in blocks)
        assert list(blocks.items()) == [(idx, block) for site, idx, block in sites if site == stack]
    with pytest.raises(ValueError, match=r"pass moe_blocks\(stack=\.\.\.\)"):
        model.moe_blocks()
    decoder_only = SpriForSeq2SeqLM.from_dense(tiny("marian"), num_experts=4, init="copy")
    assert list(decoder_only.moe_blocks()) == [idx for _, idx, _ in decoder_only.moe_sites()]
    with pytest.raises(ValueError, match="stack='encoder' is not upcycled"):
        decoder_only.moe_blocks("encoder")


@pytest.mark.parametrize(
    "family, settings, message",
    [
        ("marian", dict(upcycle="sideways"), "upcycle='sideways' is not supported"),
        ("bert", dict(upcycle="decoder"), "has only the FFN stack"),
        ("marian", dict(moe_layers={"middle": [0]}), "moe_layers names the stack"),
        ("marian", dict(moe_layers={"encoder": [2]}), "outside the dense model's encoder layers 0..1"),
        ("marian", dict(shared_expert="dense"), "needs an FFN that is one module"),
    ],
)
def test_stack_settings_are_validated(family, settings, message):
    spri_class = SEQ2SEQ_FAMILIES[family][2]
    with pytest.raises(ValueError, match=message):
        spri_class.from_dense(tiny(family), num_experts=4, **settings)


def test_t5_shared_expert_and_wrong_task_class():
    dense, inputs = tiny("t5"), inputs_for("t5")
    model = SpriForSeq2SeqLM.from_dense(dense, num_experts=4, init="copy", shared_expert="dense")
    assert model.moe_blocks()[0].shared_expert is not None
    # copy experts (renormalised top-k) plus the dense FFN: the FFN output is exactly doubled, so not dense-equal
    assert (model(**inputs).logits - dense(**inputs).logits).abs().max() > 1e-4
    with pytest.raises(TypeError, match="needs a speech seq2seq model"):
        SpriForSpeechSeq2Seq.from_dense(dense, num_experts=4)


def _text_dataset(n=16):
    """Copy task: the target is the source sentence."""
    rows = []
    for i in range(n):
        source = [3 + (11 * i + 5 * j) % (VOCAB - 3) for j in range(6)]
        rows.append(dict(input_ids=source, attention_mask=[1] * 6, labels=source + [2]))
    return Dataset.from_list(rows)


def _train_and_evaluate(model, dataset, output_dir, steps=8):
    args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=2e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        predict_with_generate=True,
        generation_max_length=8,
    )
    predictions = {}

    def compute_metrics(eval_pred):
        predictions["ids"] = eval_pred.predictions
        return {"generated_len": float(eval_pred.predictions.shape[-1])}

    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset.select(range(8)),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = trainer.evaluate()
    return losses, metrics, predictions["ids"]


@pytest.mark.parametrize("family", ["whisper", "marian"])
def test_seq2seq_trainer_trains_both_stages_and_evaluates_with_generation(family, tmp_path):
    dense, spri_class = tiny(family), SEQ2SEQ_FAMILIES[family][2]
    dataset = speech_dataset() if family == "whisper" else _text_dataset()
    model = spri_class.from_dense(dense, num_experts=4, diversity=0.3, upcycle="both").train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses1, metrics1, generated = _train_and_evaluate(model, dataset, tmp_path / "stage1")
    assert losses1[-1] < losses1[0], losses1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert "eval_loss" in metrics1 and metrics1["eval_generated_len"] >= 2 and generated.shape[0] == 8

    model.set_stage(2)
    losses2, metrics2, _ = _train_and_evaluate(model, dataset, tmp_path / "stage2")
    assert losses2[-1] < losses2[0], losses2
    assert metrics2["eval_loss"] < metrics1["eval_loss"]


@pytest.mark.slow
def test_seq2seq_checkpoint_loads_with_trust_remote_code_where_spri_hf_is_not_importable(tmp_path):
    dense, inputs = tiny("whisper"), inputs_for("whisper")
    model = SpriForSpeechSeq2Seq.from_dense(dense, num_experts=4, diversity=0.5, upcycle="both")
    model.save_pretrained(tmp_path / "moe")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = without_spri_hf(
        "import torch\n"
        "from transformers import AutoModelForSpeechSeq2Seq\n"
        f"model = AutoModelForSpeechSeq2Seq.from_pretrained({str(tmp_path / 'moe')!r}, trust_remote_code=True)\n"
        f"torch.save(model(**torch.load({str(tmp_path / 'inputs.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_reloaded_logits(torch.load(tmp_path / "out.pt"), model(**inputs).logits)


@pytest.mark.parametrize("init", ["noise", "drop", "random", "spri"])
@pytest.mark.parametrize("family", ["whisper", "t5", "mt5", "bert"])
def test_every_initialiser_upcycles_every_stack(family, init):
    dense, spri_class = tiny(family), SEQ2SEQ_FAMILIES[family][2]
    inputs = inputs_for(family)
    upcycle = dict(upcycle="both") if family in ENCODER_DECODER else {}
    model = spri_class.from_dense(dense, num_experts=4, init=init, diversity=0.5, seed=3, **upcycle)
    logits = model(**inputs).logits
    assert torch.isfinite(logits).all() and (logits - dense(**inputs).logits).abs().max() > 1e-6
    again = spri_class.from_dense(dense, num_experts=4, init=init, diversity=0.5, seed=3, **upcycle)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    if init != "spri":
        return
    # experts of balanced SPRI average to the dense FFN in every stack
    blocks = model.set_stage(2).moe_sites()
    assert {stack for stack, _, _ in blocks} == set(model.config.upcycled_stacks())
    folded = fold_to_dense(model)
    _close(folded(**inputs).logits, dense(**inputs).logits)


def test_lora_on_a_stage2_seq2seq_model_trains_and_merges(tmp_path):
    from peft import LoraConfig, get_peft_model

    dense, inputs = tiny("marian"), inputs_for("marian")
    model = SpriForSeq2SeqLM.from_dense(dense, num_experts=4, diversity=0.3, upcycle="both", stage=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        target_parameters=["experts.up_proj", "experts.down_proj"])
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    labels = inputs.pop("decoder_input_ids")
    losses = []
    for _ in range(6):
        loss = peft_model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        expected = peft_model(**inputs, labels=labels).logits
        merged = peft_model.merge_and_unload()
        assert type(merged) is SpriForSeq2SeqLM
        _close(merged(**inputs, labels=labels).logits, expected)


def test_model_card_of_a_speech_model_names_its_auto_class_and_stacks(tmp_path):
    model = SpriForSpeechSeq2Seq.from_dense(tiny("whisper"), num_experts=4, upcycle="both")
    model.save_pretrained(tmp_path / "moe")
    card = (tmp_path / "moe" / "README.md").read_text()
    assert 'AutoModelForSpeechSeq2Seq.from_pretrained("path/to/this/checkpoint", trust_remote_code=True)' in card
    assert "Upcycled FFN layers (encoder and decoder): 4 of 4" in card
