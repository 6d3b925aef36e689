"""Bad input gets a clear error naming the value and the fix, and nothing is written."""

import json
import os

import pytest
import torch
from conftest import tiny_dense
from transformers import AutoConfig, AutoModelForCausalLM

from spri_hf import SpriConfig, SpriForCausalLM
from spri_hf.cli import main as cli_main


def test_unsupported_architecture_names_it_and_lists_the_supported_ones():
    config = AutoConfig.for_model("bloom", hidden_size=16, n_layer=1, n_head=2, vocab_size=50)
    dense = AutoModelForCausalLM.from_config(config)
    # upcycling tries detection first (tests/test_detection.py), which says what it found and what is missing
    with pytest.raises(ValueError, match=r"Cannot upcycle 'bloom'.*takes extra inputs \['residual'\]"):
        SpriForCausalLM.from_dense(dense)
    # a config that reaches the model without a detected layout gets the list of the table's families
    with pytest.raises(Exception, match=r"'bloom' has no FFN layout.*gpt2.*llama.*qwen3"):  # strict-dataclass wrapper
        SpriConfig(base_config=config)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(num_experts=4, num_experts_per_tok=5), r"num_experts_per_tok=5 must be between 1 and num_experts=4"),
        (dict(principal_ratio=1.2), r"principal_ratio=1.2 is outside \[0, 1\]"),
        (dict(principal_ratio=-0.1), r"principal_ratio=-0.1 is outside \[0, 1\]"),
        (dict(principal_energy=2.0), r"principal_energy=2.0 is outside"),
        (dict(diversity=1.5), r"diversity=1.5 is outside"),
        (dict(init="upcycle"), r"init='upcycle' is not supported; choose one of"),
        (dict(partition="zigzag"), r"partition='zigzag'"),
        (dict(num_experts=10**9), r"num_experts=1000000000 must be between 1 and"),
        (dict(moe_layers=[0, 5]), r"moe_layers contains 5, outside the dense model's decoder layers 0..1"),
        (dict(init="copy", stage=1), r"stage=1 needs init='spri'"),
        (dict(stage1_experts_implementation="fast"), r"stage1_experts_implementation='fast' is not supported"),
        (dict(num_experts=4, principal_ratio=0.9), r"residual rank of every FFN matrix is 3, smaller than num_experts=4"),
    ],
)
def test_invalid_settings_raise_value_error(settings, message):
    with pytest.raises(ValueError, match=message):
        SpriForCausalLM.from_dense(tiny_dense("llama"), **settings)


def test_wrong_types_and_unknown_settings_raise_type_error():
    with pytest.raises(TypeError, match="num_experts"):
        SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts="8")
    with pytest.raises(TypeError, match=r"Unknown SPRI setting\(s\) \['num_expert'\]"):
        SpriForCausalLM.from_dense(tiny_dense("llama"), num_expert=8)


def test_non_finite_dense_weights_are_refused_by_name():
    dense = tiny_dense("qwen2")
    with torch.no_grad():
        dense.model.layers[1].mlp.up_proj.weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' contains NaN or infinite"):
        SpriForCausalLM.from_dense(dense)


def test_backbone_is_refused_by_the_causal_lm_class():
    with pytest.raises(TypeError, match="needs a causal LM"):
        SpriForCausalLM.from_dense(tiny_dense("llama").model)


def _saved(tmp_path):
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_config_weights_mismatch_names_the_first_tensor(tmp_path):
    folder = _saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model\.model\.layers\.0\.mlp\.\S+' has shape \[4, .*expects \[8, "):
        AutoModelForCausalLM.from_pretrained(folder)


def test_cli_upcycle_with_bad_settings_writes_nothing(tmp_path, capsys):
    dense_dir, out = tmp_path / "dense", tmp_path / "out"
    tiny_dense("llama").save_pretrained(dense_dir)
    before = sorted(os.listdir(tmp_path))
    code = cli_main(["upcycle", str(dense_dir), str(out), "--num-experts", "4", "--num-experts-per-tok", "6"])
    assert code == 2
    assert "num_experts_per_tok=6" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_cli_upcycle_refuses_to_overwrite_and_keeps_the_existing_checkpoint(tmp_path, capsys):
    dense_dir, out = tmp_path / "dense", tmp_path / "out"
    tiny_dense("llama").save_pretrained(dense_dir)
    assert cli_main(["upcycle", str(dense_dir), str(out), "--num-experts", "4"]) == 0
    snapshot = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert cli_main(["upcycle", str(dense_dir), str(out), "--num-experts", "4", "--init", "copy"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == snapshot
    assert cli_main(["upcycle", str(dense_dir), str(out), "--num-experts", "4", "--init", "bogus", "--overwrite"]) == 2
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "out"]  # no staging folder left behind
