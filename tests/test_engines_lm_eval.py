"""lm-eval scores an SPRI checkpoint (`--model hf`, `trust_remote_code=True`) on local tasks, as this project does.

The checkpoint (stage 1, experts moved off their initialisation) is saved with a word-level tokenizer; lm-eval runs
in its own cached environment (tests/engines.py: torch, lm-eval and a transformers it accepts, no spri_hf), offline,
on two tasks written here: a perplexity task (`loglikelihood_rolling`) over documents longer than the context
(`max_length`, so the rolling windows are exercised) and a multiple-choice task. Its per-document log-likelihoods
(`--log_samples`) and its metrics must equal the ones computed below with the model's forward, the way lm-eval
defines them (lm_eval.api.model / lm_eval.utils.get_rolling_token_windows / lm_eval.api.task):

- a document's log-likelihood is the sum of log p(token | context) over all its tokens, the first one conditioned
  on the prefix token (BOS); the tokens are scored in chunks of `max_length`, each chunk's input being the
  `max_length` tokens (prefix included) that end right before the chunk's last token;
- word_perplexity = exp(-sum(loglikelihood) / sum(words)), words counted by `re.split(r"\\s+", doc)`;
  byte_perplexity = exp(-sum(loglikelihood) / sum(utf-8 bytes)); bits_per_byte = -sum(ll) / sum(bytes) / ln 2;
- a choice's log-likelihood is the sum of log p over the tokens of `context + " " + choice` past those of the
  context; acc is the share of questions whose highest-scoring choice is the gold one.
"""

import json
import math
import re

import pytest
import torch
from conftest import perturb_experts, tiny_dense
from engines import TORCH_CPU, engine_env, installed_version, run_in
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spri_hf import SpriForCausalLM


pytestmark = pytest.mark.engines

LM_EVAL = "0.4.13"  # the newest on PyPI
TRANSFORMERS = "5.24.0"  # lm-eval[hf] 0.4.13 asks for transformers>=4.1
MAX_LENGTH = 16  # lm-eval's context window, in tokens; the longest document below is several windows long
# Same weights, inputs and torch in both processes: the sums differ only by float32 rounding (~1e-6 per token).
LL_ATOL = 1e-4  # nats, on a document's (or a choice's) summed log-likelihood
METRIC_RTOL = 1e-5  # on perplexities and bits per byte

WORDS = "the a cat dog bird fish sat ran flew swam on under over near mat log tree pond red big small old".split()
DOCUMENTS = [
    "the cat sat.",  # shorter than a window; "sat." is one word but two tokens
    " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(MAX_LENGTH)),  # exactly one window
    ". ".join(" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(6)) for i in range(9)) + ".",  # 4 windows
]
QUESTIONS = [
    {"question": "the cat sat on the", "choices": ["mat", "pond", "tree"], "gold": 0},
    {"question": "a fish swam under the", "choices": ["log", "bird"], "gold": 0},
    {"question": "the big dog ran near a", "choices": ["red", "old", "small", "tree"], "gold": 3},
    {"question": "a small bird flew over", "choices": ["the pond", "the mat"], "gold": 0},
]
PERPLEXITY_TASK = """task: spri_perplexity
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
CHOICE_TASK = """task: spri_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def word_tokenizer():
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # ids 0..3 are the tiny models' pad / bos / eos ids, and unk
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    backend.train_from_iterator(WORDS + ["."], trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    """`(engine, model, tokenizer, results, samples)`: one lm-eval run of both tasks on the saved checkpoint."""
    venv = engine_env("lm-eval", [TORCH_CPU, [f"lm-eval[hf]=={LM_EVAL}", f"transformers=={TRANSFORMERS}"]])
    engine = f"lm-eval {installed_version(venv, 'lm-eval')} (transformers {installed_version(venv, 'transformers')})"
    folder = tmp_path_factory.mktemp("lm-eval")
    tokenizer = word_tokenizer()
    model = perturb_experts(SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4)).eval()
    assert len(tokenizer) <= model.config.base_config.vocab_size
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    tasks = folder / "tasks"
    tasks.mkdir()
    data = _write_jsonl(folder / "documents.jsonl", [{"text": text} for text in DOCUMENTS])
    (tasks / "spri_perplexity.yaml").write_text(PERPLEXITY_TASK.format(data=data))
    data = _write_jsonl(folder / "questions.jsonl", QUESTIONS)
    (tasks / "spri_choice.yaml").write_text(CHOICE_TASK.format(data=data))
    model_args = f"pretrained={folder / 'model'},trust_remote_code=True,dtype=float32,max_length={MAX_LENGTH}"
    run_in(
        venv, engine,
        ["-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", "spri_perplexity,spri_choice",
         "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1", "--output_path", str(folder / "out"),
         "--log_samples"],
        cwd=folder,
        env={"HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(folder / "modules"), "HF_HOME": str(folder / "hf"),
             "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    (results_file,) = (folder / "out").rglob("results_*.json")
    samples = {
        task: sorted((json.loads(line) for line in next((folder / "out").rglob(f"samples_{task}_*.jsonl")).open()),
                     key=lambda sample: sample["doc_id"])
        for task in ("spri_perplexity", "spri_choice")
    }  # fmt: skip
    return engine, model, tokenizer, json.loads(results_file.read_text())["results"], samples


def _token_log_probs(model, input_ids: list[int]) -> torch.Tensor:
    """log p(input_ids[i + 1] | input_ids[: i + 1]) for every position i."""
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(input_ids[1:])[:, None])[:, 0]


def rolling_log_likelihood(model, tokens: list[int], prefix: int, window: int) -> float:
    """A document's log-likelihood as lm-eval's loglikelihood_rolling defines it (see the module docstring)."""
    padded = [prefix, *tokens]  # padded[j + 1] is tokens[j]
    total = 0.0
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))
        inputs = padded[max(0, end - window) : end + 1]  # the window's inputs, plus its last target
        total += _token_log_probs(model, inputs)[-(end - start) :].sum().item()
    return total


def choice_log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    whole, context_ids = tokenizer(context + continuation)["input_ids"], tokenizer(context)["input_ids"]
    return _token_log_probs(model, whole)[len(context_ids) - 1 :].sum().item()


def test_lm_eval_perplexity_equals_ours(lm_eval_run):
    engine, model, tokenizer, results, samples = lm_eval_run
    ours = [rolling_log_likelihood(model, tokenizer(text)["input_ids"], tokenizer.bos_token_id, MAX_LENGTH)
            for text in DOCUMENTS]  # fmt: skip
    assert len(tokenizer(DOCUMENTS[-1])["input_ids"]) > 3 * MAX_LENGTH  # several rolling windows
    words = [len(re.split(r"\s+", text)) for text in DOCUMENTS]
    num_bytes = [len(text.encode("utf-8")) for text in DOCUMENTS]
    # each sample carries its document's (log-likelihood, words) and (log-likelihood, bytes)
    theirs = [(*sample["word_perplexity"], sample["byte_perplexity"][1]) for sample in samples["spri_perplexity"]]
    assert len(theirs) == len(DOCUMENTS), f"{engine}: scored {len(theirs)} documents of {len(DOCUMENTS)}"
    for doc_id, (mine, (lm_eval, lm_words, lm_bytes)) in enumerate(zip(ours, theirs)):
        assert abs(mine - lm_eval) <= LL_ATOL, f"{engine}: document {doc_id} log-likelihood {lm_eval} vs ours {mine}"
        assert (lm_words, lm_bytes) == (words[doc_id], num_bytes[doc_id]), f"{engine}: document {doc_id} counts"
    total, words, num_bytes = sum(ours), sum(words), sum(num_bytes)
    expected = {
        "word_perplexity": math.exp(-total / words),
        "byte_perplexity": math.exp(-total / num_bytes),
        "bits_per_byte": -total / num_bytes / math.log(2),
    }
    reported = {name: results["spri_perplexity"][f"{name},none"] for name in expected}
    worst = max(abs(mine - lm_eval) for mine, (lm_eval, _, _) in zip(ours, theirs))
    print(f"{engine}: perplexity task, lm-eval {reported} vs ours {expected}; documents' |ll diff| <= {worst:.1e}")
    for name, value in expected.items():
        assert reported[name] == pytest.approx(value, rel=METRIC_RTOL), (
            f"{engine}: {name} {reported[name]} vs ours {value}"
        )


def test_lm_eval_multiple_choice_equals_ours(lm_eval_run):
    engine, model, tokenizer, results, samples = lm_eval_run
    correct = 0
    assert len(samples["spri_choice"]) == len(QUESTIONS), f"{engine}: scored {len(samples['spri_choice'])} questions"
    for question, sample in zip(QUESTIONS, samples["spri_choice"]):
        ours = [choice_log_likelihood(model, tokenizer, question["question"], " " + choice)
                for choice in question["choices"]]  # fmt: skip
        theirs = [float(response[0]) for response in sample["filtered_resps"]]  # (log-likelihood, is_greedy) as text
        assert len(theirs) == len(ours) and all(abs(a - b) <= LL_ATOL for a, b in zip(ours, theirs)), (
            f"{engine}: {question['question']!r} choice log-likelihoods {theirs} vs ours {ours}"
        )
        correct += max(range(len(ours)), key=ours.__getitem__) == question["gold"]
    reported = results["spri_choice"]["acc,none"]
    print(f"{engine}: multiple-choice acc, lm-eval {reported} vs ours {correct / len(QUESTIONS)}")
    assert reported == pytest.approx(correct / len(QUESTIONS)), f"{engine}: acc {reported} vs ours {correct}/4"
