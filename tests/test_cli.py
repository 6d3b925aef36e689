"""The `spri-hf` console script: upcycle and inspect on tiny checkpoints (the demo runs in the slow tier)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_reloaded_logits, assert_same_state, tiny_dense
from transformers import AutoModelForCausalLM

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


_RUN_CONSOLE_SCRIPT = """
import json, runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"exit": code, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["upcycle", "--help"], ["upcycle", "src", "out", "--num-experts", "x"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    """The installed `spri-hf` script itself, in a fresh interpreter: what it imported by the time it exits."""
    script = os.path.join(os.path.dirname(sys.executable), "spri-hf")
    result = subprocess.run([sys.executable, "-c", _RUN_CONSOLE_SCRIPT, script, *argv], capture_output=True, text=True)
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["exit"] == (0 if "--help" in argv else 2), result.stderr
    heavy = [name for name in report["modules"] if name.split(".")[0] in ("torch", "transformers", "numpy", "safetensors")]
    assert not heavy, heavy[:10]
    assert "spri_hf.cli" in report["modules"]
    if "x" in argv:
        assert "argument --num_experts/--num-experts: invalid int value: 'x'" in result.stderr


@pytest.mark.parametrize("case", ["missing source", "occupied output"])
def test_path_errors_answer_before_torch_is_imported(case, tmp_path):
    """`spri-hf upcycle` refuses a source that is neither a folder nor a Hub id, and an occupied output folder, before
    it imports torch; nothing is written and what was there stays."""
    script = os.path.join(os.path.dirname(sys.executable), "spri-hf")
    out = tmp_path / "out"
    if case == "occupied output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        src = tmp_path
    else:
        src = tmp_path / "no" / "such" / "dense"
    result = subprocess.run([sys.executable, "-c", _RUN_CONSOLE_SCRIPT, script, "upcycle", str(src), str(out)],
                            capture_output=True, text=True)  # fmt: skip
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["exit"] == 2, result.stderr
    assert not [name for name in report["modules"] if name.split(".")[0] in ("torch", "transformers", "safetensors")]
    if case == "occupied output":
        assert "already exists; pass --overwrite" in result.stderr and (out / "keep.txt").read_text() == "mine"
    else:
        assert f"{src} is neither a folder nor a Hub model id" in result.stderr and not out.exists()


def test_the_flags_read_from_the_config_source_are_the_config_fields():
    """`cli_flags` reads SpriConfig's fields from its source (no torch); they are the live dataclass's, exactly."""
    from spri_hf.cli_flags import upcycling_flag_specs
    from spri_hf.training_cli import upcycling_fields

    live = [(name, flag_type, spec.default, spec.metadata["help"]) for name, flag_type, spec in upcycling_fields()]
    assert upcycling_flag_specs() == live
    assert all(help_text for *_, help_text in live)


@pytest.mark.slow
def test_an_import_of_spri_hf_outside_the_console_script_registers_at_once():
    code = "import spri_hf, sys; from transformers import AutoConfig; print(AutoConfig.for_model('spri').model_type)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip().endswith("spri"), result.stderr[-2000:]


@pytest.mark.slow
def test_console_script_upcycles_and_inspects_in_a_fresh_process(tmp_path):
    """The deferred imports of the console script still register SPRI with the Auto classes before a command runs;
    no progress bar is drawn when stderr is not a terminal."""
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    script = os.path.join(os.path.dirname(sys.executable), "spri-hf")
    flags = ["--num-experts", "4", "--diversity", "0.3", "--svd-workers", "2"]
    result = subprocess.run([script, "upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), *flags], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Upcycling FFN layers" not in result.stderr and "Upcycled" in result.stdout
    reference = SpriForCausalLM.from_dense(dense, num_experts=4, diversity=0.3)
    assert_same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "moe"), reference)
    inspected = subprocess.run([script, "inspect", str(tmp_path / "moe")], capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    refused = subprocess.run([script, "upcycle", str(tmp_path / "dense"), str(tmp_path / "x"), "--svd-workers", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--svd-workers: invalid _positive_int value" not in refused.stderr
    assert "'0' is not a positive whole number" in refused.stderr


def test_from_dense_accepts_a_local_path_with_loading_kwargs(tmp_path, input_ids):
    dense = tiny_dense("mistral")
    dense.save_pretrained(tmp_path / "dense")
    from_path = SpriForCausalLM.from_dense(str(tmp_path / "dense"), num_experts=4, init="copy", dtype=torch.bfloat16)
    assert from_path.dtype == torch.bfloat16
    from_model = SpriForCausalLM.from_dense(dense.to(torch.bfloat16), num_experts=4, init="copy")
    a, b = from_path.state_dict(), from_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_upcycle_picks_the_spri_class_from_the_dense_config_and_inspect_reads_it(tmp_path, capsys):
    """A Whisper checkpoint becomes an SpriForSpeechSeq2Seq (streamed), a BERT classifier an
    SpriForSequenceClassification (--task overrides), both loadable with their own auto class."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForSpeechSeq2Seq

    from spri_hf import SpriForSequenceClassification, SpriForSpeechSeq2Seq
    from spri_hf.training_cli import task_for

    whisper = AutoModelForSpeechSeq2Seq.from_config(AutoConfig.for_model(
        "whisper", d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=40, vocab_size=97, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    ))
    whisper.save_pretrained(tmp_path / "whisper")
    assert cli_main(["upcycle", str(tmp_path / "whisper"), str(tmp_path / "moe"), "--num-experts", "4"]) == 0
    assert "SpriForSpeechSeq2Seq" in capsys.readouterr().out
    loaded = AutoModelForSpeechSeq2Seq.from_pretrained(tmp_path / "moe")
    assert isinstance(loaded, SpriForSpeechSeq2Seq) and loaded.config.upcycled_stacks() == ["decoder"]
    assert cli_main(["inspect", str(tmp_path / "moe")]) == 0
    assert capsys.readouterr().out.count("\n") > 2  # one row per MoE layer

    bert_config = AutoConfig.for_model("bert", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, vocab_size=97, max_position_embeddings=64)
    bert = AutoModelForSequenceClassification.from_config(bert_config)
    bert.save_pretrained(tmp_path / "bert")
    assert task_for(AutoConfig.from_pretrained(tmp_path / "bert")) == "sequence-classification"
    assert task_for(AutoConfig.for_model("bert")) == "masked-lm"  # no architectures recorded: its pretraining head
    assert cli_main(["upcycle", str(tmp_path / "bert"), str(tmp_path / "bert-moe"), "--num-experts", "4"]) == 0
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert-moe"),
                      SpriForSequenceClassification)


def test_pickle_only_dense_checkpoints_are_refused_unless_allowed(tmp_path, capsys, input_ids):
    dense = tiny_dense("llama")
    dense.save_pretrained(tmp_path / "dense")  # then swap its weights for a pickle file
    os.remove(tmp_path / "dense" / "model.safetensors")
    torch.save(dense.state_dict(), tmp_path / "dense" / "pytorch_model.bin")
    pickled = sorted(os.listdir(tmp_path / "dense"))
    assert "pytorch_model.bin" in pickled and not any(name.endswith(".safetensors") for name in pickled)

    assert cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4"]) == 2
    message = capsys.readouterr().err
    assert "only pickle weights (pytorch_model.bin)" in message and "--allow_pickle" in message
    assert not os.path.exists(tmp_path / "moe") and sorted(os.listdir(tmp_path)) == ["dense"]
    with pytest.raises(OSError, match="only pickle weights.*use_safetensors=False"):
        SpriForCausalLM.from_dense(str(tmp_path / "dense"), num_experts=4)

    assert cli_main(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--num-experts", "4",
                     "--allow-pickle"]) == 0
    trusted = SpriForCausalLM.from_dense(str(tmp_path / "dense"), num_experts=4, use_safetensors=False)
    assert_same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "moe"), trusted)


def test_upcycle_takes_a_t5_checkpoint(tmp_path, capsys):
    """T5's FFN layout depends on its config (v1.0 wi/wo or gated wi_0/wi_1/wo): the CLI passes the config."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("t5", d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, vocab_size=97,
                                  pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "t5")
    assert cli_main(["upcycle", str(tmp_path / "t5"), str(tmp_path / "moe"), "--num-experts", "4"]) == 0, (
        capsys.readouterr().err
    )
    assert "SpriForSeq2SeqLM" in capsys.readouterr().out
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moe").config.base_config.model_type == "t5"


def test_cannot_fit_refusal_names_the_command_line_flag(tmp_path, capsys):
    """The estimate's refusal names --no_resource_check on the command line (check_resources=False in Python)."""
    import json

    folder = tmp_path / "huge"
    tiny_dense("llama").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=65536, intermediate_size=262144, num_attention_heads=512, num_key_value_heads=512)
    (folder / "config.json").write_text(json.dumps(config))
    assert cli_main(["upcycle", str(folder), str(tmp_path / "out"), "--num-experts", "8"]) == 2
    err = capsys.readouterr().err
    assert "--no_resource_check" in err and "check_resources=False" not in err
    assert not (tmp_path / "out").exists()


_CONSOLE_SCRIPT_IMPORTS = """
import sys
sys.argv = ["/somewhere/bin/spri-hf", "demo"]
import spri_hf
assert "torch" not in sys.modules
from spri_hf import cli
cli._load_for("demo")  # what `spri-hf demo` and `spri-hf train` import before they run
from spri_hf import modeling_spri, api
from transformers import AutoConfig
print(spri_hf.SpriForCausalLM.__name__, AutoConfig.for_model("spri").model_type, api.SpriConfig is spri_hf.SpriConfig)
"""


@pytest.mark.slow
def test_console_script_process_imports_the_public_api_for_train_and_demo():
    """In the console script's process the package defers its imports; `from spri_hf import x` and the public names
    must still resolve (a `from . import api` inside the lazy `__getattr__` recursed until the stack overflowed)."""
    result = subprocess.run([sys.executable, "-c", _CONSOLE_SCRIPT_IMPORTS], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["SpriForCausalLM", "spri", "True"]


def test_upcycling_an_spri_checkpoint_says_what_it_is_and_what_to_do(tmp_path, capsys):
    """The input is already an SPRI model: the message names its settings and the ways on (train it, export it,
    fold it, or upcycle its dense base), from the command line and from Python, and nothing is written."""
    moe = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, num_experts_per_tok=2)
    moe.save_pretrained(tmp_path / "moe")
    assert cli_main(["upcycle", str(tmp_path / "moe"), str(tmp_path / "again"), "--num_experts", "8"]) == 2
    err = capsys.readouterr().err
    assert "This is already an SPRI model: a llama with 4 experts (top-2, init 'spri') in stage 1" in err
    assert "export-native" in err and "fold_to_dense" in err and "upcycle its dense base model" in err
    assert not (tmp_path / "again").exists()
    with pytest.raises(ValueError, match="already an SPRI model"):
        SpriForCausalLM.from_dense(moe, num_experts=8)
    with pytest.raises(ValueError, match="already an SPRI model"):
        SpriForCausalLM.from_dense(str(tmp_path / "moe"))
