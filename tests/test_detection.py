"""FFN detection for families without a table entry (spri_hf/upcycling/detection.py): what it infers, that it agrees with the
hand-written table, that the probe decides, and what it refuses (clearly, before anything is written)."""

import os

import pytest
import torch
from conftest import DETECTED_FAMILIES, TINY_CONFIGS, VOCAB, tiny_config, tiny_dense
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from spri_hf import FFN_LAYOUTS, SpriForCausalLM, get_ffn_layout
from spri_hf.architectures import DETECTED_LAYOUT_ATTR
from spri_hf.cli import main as cli_main
from spri_hf.upcycling.detection import FfnDetectionError, detect_ffn_layout, probe_config


EXPECTED_ENTRIES = {
    "olmo3": "\"olmo3\": FfnLayout(layers_attr='layers'),",
    "exaone4": "\"exaone4\": FfnLayout(layers_attr='layers'),",
    "glm4": "\"glm4\": FfnLayout(layers_attr='layers', gate=None, up=None, fused_gate_up='gate_up_proj'),",
    "arcee": "\"arcee\": FfnLayout(layers_attr='layers', gated=False, gate=None, bias='mlp_bias'),",
    "gpt_bigcode": (
        "\"gpt_bigcode\": FfnLayout(layers_attr='h', gated=False, gate=None, up='c_fc', down='c_proj', "
        "act_attr='activation_function', intermediate_attr='n_inner', bias=True, dropout_attr='resid_pdrop'),"
    ),
}


def test_detected_families_get_the_expected_layout():
    assert set(EXPECTED_ENTRIES) == set(DETECTED_FAMILIES)
    for family, entry in EXPECTED_ENTRIES.items():
        detection = detect_ffn_layout(tiny_config(family))
        assert detection.table_entry() == entry, family
        assert detection.max_difference <= 1e-5


_STRUCTURE = ("layers_attr", "mlp_attr", "gated", "gate", "up", "down", "fused_gate_up", "split", "conv1d")


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in TINY_CONFIGS if f.split("-")[0] in FFN_LAYOUTS])
def test_detection_agrees_with_the_hand_written_table(family):
    config = tiny_config(family)
    table, detected = get_ffn_layout(config), detect_ffn_layout(config).layout
    assert {k: getattr(detected, k) for k in _STRUCTURE} == {k: getattr(table, k) for k in _STRUCTURE}
    assert detected.activation(config) == table.activation(config)
    assert detected.intermediate_size(config) == table.intermediate_size(config)
    assert detected.has_bias(config) == table.has_bias(config)


def test_a_detected_layout_travels_in_the_checkpoint(tmp_path, input_ids):
    model = SpriForCausalLM.from_dense(tiny_dense("olmo3"), num_experts=4, diversity=0.5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert getattr(loaded.config.base_config, DETECTED_LAYOUT_ATTR) == {"decoder": model.ffn_layout.to_dict()}
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-5, rtol=0)


def test_the_streaming_upcycler_detects_too(tmp_path, input_ids):
    dense = tiny_dense("gpt_bigcode")
    dense.save_pretrained(tmp_path / "dense")
    assert cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4", "--init", "copy"]) == 0
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    torch.testing.assert_close(moe(input_ids).logits, dense(input_ids).logits, atol=1e-5, rtol=0)


def test_probe_config_keeps_the_width_and_cuts_layers_and_vocabulary():
    config = AutoConfig.for_model("olmo3", **TINY_CONFIGS["olmo3"], num_hidden_layers=6, vocab_size=1000, pad_token_id=999)
    probe = probe_config(config)
    assert probe.num_hidden_layers == 2 and len(probe.layer_types) == 2 and probe.vocab_size == 128
    assert probe.pad_token_id is None and probe.hidden_size == config.hidden_size
    assert config.num_hidden_layers == 6  # the original is not touched


def test_inspect_dense_prints_a_table_entry(tmp_path, capsys):
    tiny_config("olmo3").save_pretrained(tmp_path / "olmo3")
    assert cli_main(["inspect", "--dense", str(tmp_path / "olmo3")]) == 0
    printed = capsys.readouterr().out
    assert "no table entry; FFN layout detected and verified" in printed
    assert EXPECTED_ENTRIES["olmo3"] in printed and "max |logit difference|" in printed
    tiny_config("falcon").save_pretrained(tmp_path / "falcon")
    assert cli_main(["inspect", "--dense", str(tmp_path / "falcon")]) == 0
    assert "'falcon': listed in spri_hf/architectures.py" in capsys.readouterr().out


# ---- refusals ---------------------------------------------------------------------------------------------------------
_MIXTURE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2)
REFUSED = {
    # an FFN that takes extra inputs: BLOOM's MLP.forward(hidden_states, residual) adds the residual itself
    "bloom": (dict(hidden_size=32, n_head=4), r"h\[0\]\.mlp\.forward \(BloomMLP\) takes extra inputs \['residual'\]"),
    # a learned activation: xIELU's alpha_p / alpha_n live in the FFN, the experts would not carry them
    "apertus": (TINY_CONFIGS["olmo3"], r"holds parameters besides its projections: \['act_fn\.alpha_p', 'act_fn\.alpha_n'\]"),
    # already mixtures
    "mixtral": (dict(_MIXTURE, num_local_experts=4), r"block 0 is already a mixture of experts"),
    "qwen2_moe": (
        dict(_MIXTURE, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16),
        r"block 0 is already a mixture of experts",
    ),
    "olmoe": (dict(_MIXTURE, num_experts=4), r"block 0 is already a mixture of experts"),
    "deepseek_v3": (
        dict(_MIXTURE, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
             first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
             v_head_dim=8, n_group=1, topk_group=1),
        r"block 1 is already a mixture of experts",  # block 0 is dense (first_k_dense_replace=1)
    ),
}


def _refused_dense(family):
    kwargs, _ = REFUSED[family]
    config = AutoConfig.for_model(family, **kwargs, num_hidden_layers=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", list(REFUSED))
def test_detection_refuses_what_it_cannot_express_and_writes_nothing(family, tmp_path):
    _, message = REFUSED[family]
    dense = _refused_dense(family)
    with pytest.raises(FfnDetectionError, match=message) as refusal:
        SpriForCausalLM.from_dense(dense, num_experts=4)
    assert f"Cannot upcycle {family!r}" in str(refusal.value) and "Missing: " in str(refusal.value)
    assert not hasattr(dense.config, DETECTED_LAYOUT_ATTR)
    if family in ("bloom", "mixtral"):  # the command line: exit 2, the reason on stderr, no folder, no staging left
        dense.save_pretrained(tmp_path / "dense")
        assert cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4"]) == 2
        assert sorted(os.listdir(tmp_path)) == ["dense"]


class SumGatedConfig(LlamaConfig):
    model_type = "test_sum_gated"


class SumGatedMLP(LlamaMLP):
    """Looks like a gated FFN (gate_proj, up_proj, down_proj, act_fn) but adds where SPRI's experts multiply."""

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))


class SumGatedForCausalLM(LlamaForCausalLM):
    config_class = SumGatedConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = SumGatedMLP(config)
        self.post_init()


AutoConfig.register("test_sum_gated", SumGatedConfig, exist_ok=True)
AutoModelForCausalLM.register(SumGatedConfig, SumGatedForCausalLM, exist_ok=True)


def test_the_probe_refuses_an_ffn_that_looks_gated_but_computes_something_else():
    config = SumGatedConfig(**TINY_CONFIGS["llama"], num_hidden_layers=2, vocab_size=VOCAB)
    dense = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(FfnDetectionError, match=r"the copy upcycle of each candidate layout differs from the dense "
                                                 r"probe's logits \(max \|difference\|: gated gate_proj/up_proj/down_proj"):
        SpriForCausalLM.from_dense(dense, num_experts=4)


def test_encoder_families_without_an_entry_are_refused_by_name():
    config = AutoConfig.for_model("distilbert", dim=32, hidden_dim=48, n_layers=1, n_heads=4, vocab_size=VOCAB)
    with pytest.raises(FfnDetectionError, match=r"Cannot upcycle 'distilbert'.*no causal-LM model.*decoder-only model"):
        detect_ffn_layout(config)


def test_a_damaged_stored_layout_names_the_bad_field():
    config = tiny_config("olmo3")
    setattr(config, DETECTED_LAYOUT_ATTR, {"decoder": {"layers_attr": "layers", "mlp_path": "mlp"}})
    with pytest.raises(ValueError, match=r"Unknown FfnLayout field\(s\) \['mlp_path'\] in 'spri_ffn_layout'"):
        get_ffn_layout(config)
