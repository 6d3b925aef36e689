"""`spri-hf train` end to end on a tiny dense Llama with a real (word-level) tokenizer and tiny data files."""

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from spri_hf.cli import main


ROWS = [
    {"prompt": f"count from {i}", "completion": " ".join(str(i + j) for j in range(1, 5))} for i in range(24)
]


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    """A tiny random Llama saved with a word-level tokenizer trained on the rows' words."""
    folder = tmp_path_factory.mktemp("dense")
    words = [row["prompt"] + " " + row["completion"] for row in ROWS]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _train(dense_folder, data, out, *extra):
    flags = [
        "--model", str(dense_folder), "--dataset", str(data), "--output_dir", str(out), "--max_steps", "6",
        "--stage1_steps", "3", "--per_device_train_batch_size", "4", "--num_experts", "4", "--learning_rate", "1e-2",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
    ]  # fmt: skip
    return main(["train", *flags, *extra])


@pytest.mark.parametrize("columns", ["prompt/completion", "source/target", "text"])
def test_train_end_to_end(dense_folder, tmp_path, columns, capsys):
    if columns == "source/target":
        rows = [{"source": r["prompt"], "target": r["completion"]} for r in ROWS]
    elif columns == "text":
        rows = [{"text": r["prompt"] + " " + r["completion"]} for r in ROWS]
    else:
        rows = ROWS
    out = tmp_path / "out"
    assert _train(dense_folder, _write(tmp_path / "data.jsonl", rows), out, "--diversity", "0.3") == 0
    assert "trained 6 steps (stage 1 until step 3)" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spri" and config["stage"] == 2 and config["num_experts"] == 4
    assert config["diversity"] == 0.3
    assert json.loads((out / "checkpoint-3" / "config.json").read_text())["stage"] == 2  # the switch checkpoint
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [entry["stage"] for entry in state["log_history"] if "loss" in entry] == [1, 1, 1]
    model = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(dense_folder)
    assert type(model).__name__ == "SpriForCausalLM"
    # stage 2 trained the embeddings (stage 1 cannot)
    assert not torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)


def test_train_csv_and_an_spri_checkpoint_as_the_model(dense_folder, tmp_path):
    """A csv file, and continuing from the SPRI checkpoint of a first run (stage 2: trains as plain stage 2)."""
    data = tmp_path / "data.csv"
    data.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in ROWS))
    assert _train(dense_folder, data, tmp_path / "first") == 0
    assert _train(tmp_path / "first", data, tmp_path / "second") == 0
    assert not (tmp_path / "second" / "checkpoint-3").exists()  # no stage 1, no switch
    assert json.loads((tmp_path / "second" / "config.json").read_text())["stage"] == 2


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"question": "a", "answer": "b"}] * 8, [], "has the columns \\['question', 'answer'\\]"),
        ([], [], "has no rows"),
        ([{"prompt": "a", "completion": ""}] * 8, [], "column 'completion' is empty"),
        (ROWS, ["--stage1_steps", "6"], "stage1_steps=6 is not shorter than the run \\(max_steps=6\\)"),
        (ROWS, ["--max_steps", "-1", "--num_train_epochs", "1", "--stage1_steps", "6"],
         "stage 1 of 6 steps, not shorter than the run \\(6 optimizer steps over 24 examples\\)"),
        (ROWS, ["--num_experts", "0"], "num_experts"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_anything_is_written(dense_folder, tmp_path, rows, extra, message, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    assert _train(dense_folder, data, out, *extra) == 2
    err = capsys.readouterr().err
    assert "spri-hf train: error:" in err
    assert re.search(message, err), err
    assert not out.exists()


def test_missing_data_file_is_named(dense_folder, tmp_path, capsys):
    assert _train(dense_folder, tmp_path / "nope.jsonl", tmp_path / "out") == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_under_accelerate_launch_with_two_processes(dense_folder, tmp_path):
    """`accelerate launch -m spri_hf.training_cli` on 2 CPU processes (gloo): both stages, one saved checkpoint."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data, out = _write(tmp_path / "data.jsonl", ROWS), tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "spri_hf.training_cli", "--model", str(dense_folder), "--dataset", str(data), "--output_dir", str(out),
        "--max_steps", "6", "--stage1_steps", "3", "--per_device_train_batch_size", "2", "--num_experts", "4",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        "--ddp_find_unused_parameters", "false",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stderr.count("trained 6 steps (stage 1 until step 3)") == 1  # printed by rank 0 only
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["SpriStageRecord"]["args"]["switch_step"] == 3
    assert json.loads((out / "config.json").read_text())["stage"] == 2


def test_train_pushes_to_the_hub_when_asked(dense_folder, tmp_path):
    """`--push_to_hub --hub_model_id ...` against a real local Hub server: code, weights, card and the stage."""
    from hub_server import LocalHub, use_local_hub

    out = tmp_path / "out"
    with LocalHub() as hub, use_local_hub(hub, tmp_path / "cache"):
        code = _train(dense_folder, _write(tmp_path / "data.jsonl", ROWS), out, "--push_to_hub",
                      "--hub_model_id", "alice/trained")  # fmt: skip
        files = hub.files("alice/trained")
    assert code == 0
    assert {"config.json", "model.safetensors", "modeling_spri.py", "configuration_spri.py", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["stage"] == 2
    assert "spri_hf model card" in files["README.md"].decode()
