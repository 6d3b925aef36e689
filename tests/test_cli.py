"""The `spri-hf` console script: upcycle and inspect on tiny checkpoints (the demo runs in the slow tier)."""

import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from conftest import assert_reloaded_logits, assert_same_state, tiny_dense
from spri_hf import SpriForCausalLM
from spri_hf.cli import main as cli_main


def test_upcycle_writes_a_checkpoint_that_automodel_loads(tmp_path, capsys, input_ids):
    dense = tiny_dense("qwen3")
    dense.save_pretrained(tmp_path / "dense")
    code = cli_main(
        ["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4", "--diversity", "0.2",
         "--moe-layers", "1", "--seed", "3"]
    )
    assert code == 0
    assert "1 MoE layers x 4 experts" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert isinstance(loaded, SpriForCausalLM) and loaded.config.moe_layers == [1] and loaded.config.seed == 3
    direct = SpriForCausalLM.from_dense(dense, num_experts=4, diversity=0.2, moe_layers=[1], seed=3)
    assert_same_state(loaded, direct)
    assert_reloaded_logits(loaded(input_ids).logits, direct(input_ids).logits)


def test_inspect_reports_every_layer(tmp_path, capsys):
    SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4, diversity=0.3).save_pretrained(tmp_path / "spri")
    SpriForCausalLM.from_dense(tiny_dense("gpt2"), num_experts=4, init="copy").save_pretrained(tmp_path / "copy")
    assert cli_main(["inspect", str(tmp_path / "spri")]) == 0
    spri_report = capsys.readouterr().out
    assert "init=spri, stage=1, 4 experts" in spri_report
    rows = [line.split() for line in spri_report.splitlines()[2:]]
    assert [row[0] for row in rows] == ["0", "1"]
    assert all(row[2] == "16/32" and float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
    assert cli_main(["inspect", str(tmp_path / "copy")]) == 0
    copy_rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert all(float(row[3]) == 0 and float(row[4]) == 0 for row in copy_rows)


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "spri-hf")
    result = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "upcycle" in result.stdout and "demo" in result.stdout


def test_from_dense_accepts_a_local_path_with_loading_kwargs(tmp_path, input_ids):
    dense = tiny_dense("mistral")
    dense.save_pretrained(tmp_path / "dense")
    from_path = SpriForCausalLM.from_dense(str(tmp_path / "dense"), num_experts=4, init="copy", dtype=torch.bfloat16)
    assert from_path.dtype == torch.bfloat16
    from_model = SpriForCausalLM.from_dense(dense.to(torch.bfloat16), num_experts=4, init="copy")
    a, b = from_path.state_dict(), from_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
