"""Fine-grained experts (`expert_granularity` G): each expert holds one of G slices of the dense FFN's neurons, and the
router's rows start equal within each virtual group of G experts, so copy upcycling reproduces the dense model exactly
for every top-k that picks whole groups; SPRI partitions each slice's residual among the experts holding it. Streaming
equals in memory bit for bit, and the native export, the fold and PEFT handle the narrower experts."""

import json

import pytest
import torch
from conftest import (
    SEQ2SEQ_FAMILIES,
    VOCAB,
    perturb_experts,
    progression_dataset,
    tiny_dense,
    tiny_word_tokenizer,
)
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

import spri_hf
from spri_hf import SpriForCausalLM, SpriForSeq2SeqLM, SpriForSpeechSeq2Seq
from spri_hf.cli import main as cli_main


ATOL = 1e-5  # fp32, relative to the logits' size
CAUSAL = ["llama", "qwen3", "gpt2"]


def _ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol * max(1.0, expected.abs().max().item()), rtol=0)


def _seq2seq_inputs(family: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    decoder_input_ids = torch.randint(3, VOCAB, (2, 5), generator=generator)
    if family == "whisper":  # (batch, mel bins, 2 * max_source_positions)
        return dict(input_features=torch.randn(2, 8, 32, generator=generator), decoder_input_ids=decoder_input_ids)
    return dict(input_ids=torch.randint(3, VOCAB, (2, 7), generator=generator), decoder_input_ids=decoder_input_ids)


def _logits(model, **inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("granularity", [1, 2, 4])
def test_copy_reproduces_the_dense_model_for_every_top_k_of_whole_groups(family, granularity):
    dense = tiny_dense(family)
    expected = _logits(dense, input_ids=_ids())
    for top_k in range(granularity, 8 + 1, granularity):
        model = SpriForCausalLM.from_dense(
            dense, num_experts=8, num_experts_per_tok=top_k, expert_granularity=granularity, init="copy"
        )
        _close(_logits(model, input_ids=_ids()), expected)
        experts = model.moe_blocks()[0].experts
        assert experts.down_proj.shape[-1] == dense.config.to_dict().get("intermediate_size", 128) // granularity
        # SPRI with diversity 0 is copy upcycling, through the residual parametrisation (stage 1)
        spri = SpriForCausalLM.from_dense(
            dense, num_experts=8, num_experts_per_tok=top_k, expert_granularity=granularity, diversity=0.0
        )
        assert spri.config.stage == 1
        _close(_logits(spri, input_ids=_ids()), expected)


@pytest.mark.parametrize("family, spri_class", [("marian", SpriForSeq2SeqLM), ("whisper", SpriForSpeechSeq2Seq)])
@pytest.mark.parametrize("granularity", [2, 4])
def test_copy_reproduces_a_seq2seq_model_in_both_stacks(family, spri_class, granularity):
    kwargs, auto_class, _ = SEQ2SEQ_FAMILIES[family]
    # both FFN widths 48: 12 neurons per expert at G=4 keep each expert's rows 16-byte aligned, as grouped_mm needs
    torch.manual_seed(0)
    dense = auto_class.from_config(AutoConfig.for_model(family, **dict(kwargs, decoder_ffn_dim=48))).eval()
    inputs = _seq2seq_inputs(family)
    model = spri_class.from_dense(
        dense, num_experts=2 * granularity, num_experts_per_tok=granularity, expert_granularity=granularity,
        init="copy", upcycle="both",
    )  # fmt: skip
    _close(_logits(model, **inputs), _logits(dense, **inputs))


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("granularity", [2, 4])
def test_stage1_equals_stage2_after_the_switch(family, granularity):
    model = SpriForCausalLM.from_dense(
        tiny_dense(family), num_experts=8, num_experts_per_tok=2 * granularity, expert_granularity=granularity,
        diversity=0.5,
    )  # fmt: skip
    stage1 = _logits(model, input_ids=_ids())
    model.set_stage(2)
    _close(_logits(model, input_ids=_ids()), stage1)


@pytest.mark.parametrize("granularity", [2, 4])
def test_spri_partitions_each_slice_among_the_experts_that_hold_it(granularity):
    """Balanced SPRI: the experts holding a slice average exactly to that slice of the dense FFN (the down slices
    times G), and they differ from each other (each has its own part of the slice's residual)."""
    dense = tiny_dense("llama")
    model = SpriForCausalLM.from_dense(
        dense, num_experts=8, num_experts_per_tok=granularity, expert_granularity=granularity, diversity=0.5, stage=2
    )
    experts = model.moe_blocks()[0].experts
    mlp = dense.model.layers[0].mlp
    width = 48 // granularity
    gate_up = experts.gate_up_proj.view(-1, granularity, 2 * width, 32)  # (N, G, 2w, H)
    down = experts.down_proj.view(-1, granularity, 32, width)
    for piece in range(granularity):
        rows = slice(piece * width, (piece + 1) * width)
        expected = torch.cat([mlp.gate_proj.weight[rows], mlp.up_proj.weight[rows]])
        _close(gate_up[:, piece].mean(0), expected)
        _close(down[:, piece].mean(0), granularity * mlp.down_proj.weight[:, rows])
        assert (gate_up[0, piece] - gate_up[1, piece]).abs().max() > 1e-3
    router = model.moe_blocks()[0].router.weight
    assert torch.equal(router, router[::granularity].repeat_interleave(granularity, dim=0))


@pytest.mark.parametrize(
    "family, settings",
    [
        ("llama", {"expert_granularity": 2, "num_experts": 8, "num_experts_per_tok": 4}),
        ("llama", {"expert_granularity": 4, "num_experts": 8, "num_experts_per_tok": 4, "stage": 2}),
        ("qwen3", {"expert_granularity": 2, "num_experts": 4, "num_experts_per_tok": 2, "principal_energy": 0.6}),
        ("gpt2", {"expert_granularity": 4, "num_experts": 8, "num_experts_per_tok": 4, "init": "drop"}),
    ],
    ids=["llama-G2-stage1", "llama-G4-stage2", "qwen3-G2-energy", "gpt2-G4-drop"],
)
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, family, settings):
    dense = tiny_dense(family)
    dense.save_pretrained(tmp_path / "dense")
    spri_hf.upcycle_checkpoint(tmp_path / "dense", tmp_path / "streamed", **settings)
    SpriForCausalLM.from_dense(dense, **settings).save_pretrained(tmp_path / "memory")
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    memory = load_file(tmp_path / "memory" / "model.safetensors")
    assert streamed.keys() == memory.keys()
    assert all(torch.equal(streamed[name], memory[name]) for name in memory)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert reloaded.config.expert_granularity == settings["expert_granularity"]


@pytest.mark.parametrize("family, native_type, width_field", [
    ("qwen3", "qwen3_moe", "moe_intermediate_size"), ("llama", "mixtral", "intermediate_size"),
])  # fmt: skip
def test_native_export_of_a_fine_grained_model_is_exact_and_reloads(tmp_path, family, native_type, width_field):
    model = SpriForCausalLM.from_dense(tiny_dense(family), num_experts=8, num_experts_per_tok=4, expert_granularity=4)
    perturb_experts(model.set_stage(2))
    expected = _logits(model, input_ids=_ids())
    spri_hf.export_native(model, tmp_path / "native")
    saved = json.loads((tmp_path / "native" / "config.json").read_text())
    assert saved["model_type"] == native_type and saved[width_field] == 12 and "auto_map" not in saved
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    _close(_logits(native, input_ids=_ids()), expected)


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("granularity", [2, 4])
def test_fold_to_dense_of_copy_is_the_dense_model(family, granularity):
    dense = tiny_dense(family)
    model = SpriForCausalLM.from_dense(
        dense, num_experts=8, num_experts_per_tok=granularity, expert_granularity=granularity, init="copy"
    )
    folded = spri_hf.fold_to_dense(model)
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(folded.state_dict()[name], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_experts": 8, "num_experts_per_tok": 3}, r"num_experts_per_tok=3 .*valid values are \[2, 4, 6, 8\]"),
        ({"num_experts": 6, "num_experts_per_tok": 2, "expert_granularity": 4}, r"num_experts=6 is not a multiple"),
        ({"num_experts": 10, "num_experts_per_tok": 5, "expert_granularity": 5}, r"does not divide .* 48.*\[1, 2, 3, 4, 6"),
        ({"num_experts": 8, "num_experts_per_tok": 2, "expert_granularity": 0}, r"expert_granularity=0 must be"),
    ],
    ids=["top-k", "num-experts", "width", "zero"],
)
def test_refusals_name_the_valid_values_and_write_nothing(tmp_path, settings, message):
    settings = {"expert_granularity": 2, **settings}
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=message):
        SpriForCausalLM.from_dense(dense, **settings)
    with pytest.raises(ValueError, match=message):
        spri_hf.upcycle_checkpoint(tmp_path / "dense", tmp_path / "out", **settings)
    assert not (tmp_path / "out").exists()


def test_cli_upcycles_fine_grained_experts(tmp_path, capsys):
    tiny_dense("qwen3").save_pretrained(tmp_path / "dense")
    argv = ["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "8", "--num-experts-per-tok",
            "4", "--expert-granularity", "4", "--init", "copy"]  # fmt: skip
    assert cli_main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert model.config.expert_granularity == 4
    assert model.moe_blocks()[0].experts.gate_up_proj.shape == (8, 24, 32)
    capsys.readouterr()
    refused = ["upcycle", str(tmp_path / "dense"), str(tmp_path / "other"), "--num-experts", "8", "--expert-granularity",
               "4"]  # fmt: skip
    assert cli_main(refused) == 2  # top-2 of G=4
    assert "valid values are [4, 8]" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_lora_trains_fine_grained_experts(tmp_path):
    model = SpriForCausalLM.from_dense(
        tiny_dense("llama"), num_experts=8, num_experts_per_tok=4, expert_granularity=2, stage=2, diversity=0.3
    )
    before = _logits(model, input_ids=_ids())
    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj"],
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])  # fmt: skip
    peft_model = get_peft_model(model, config)
    _close(_logits(peft_model, input_ids=_ids()), before)  # a fresh adapter is the identity
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=2e-2, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=peft_model.train(), args=args, train_dataset=progression_dataset(n=32))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    merged = peft_model.merge_and_unload()
    assert merged.moe_blocks()[0].experts.gate_up_proj.shape == (8, 48, 32)
    assert (_logits(merged, input_ids=_ids()) - before).abs().max() > 1e-4


def test_router_init_keeps_virtual_groups_replicated():
    tokenizer = tiny_word_tokenizer()
    model = SpriForCausalLM.from_dense(
        tiny_dense("llama"), num_experts=8, num_experts_per_tok=2, expert_granularity=2, init="copy"
    )
    texts = [" ".join(f"w{(3 * i + j) % VOCAB}" for j in range(6)) for i in range(12)]
    spri_hf.init_routers(model, tokenizer, texts, method="kmeans", show_progress=False)
    for block in model.moe_blocks().values():
        weight = block.router.weight
        assert torch.equal(weight, weight[::2].repeat_interleave(2, dim=0))
    with pytest.raises(ValueError, match=r"4 virtual groups of 2 fine-grained experts"):
        spri_hf.init_routers(model, tokenizer, {0: ["w1"], 5: ["w2"]}, method="prompts", show_progress=False)
