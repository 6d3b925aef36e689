#!/usr/bin/env python
"""Quality benchmark: SPRI against dense fine-tuning and the upcycling baselines on speech translation.

Whisper (the real Whisper base, or a tiny random one for the test suite) is fine-tuned on a CoVoST2-shaped set that
`python -m benchmarks.data.build` writes, with the same budget for every method (steps, batch, schedule shape, data
order and seed), every method through the product's own `SpriSeq2SeqTrainer` (dense too: it trains a plain model as
`Seq2SeqTrainer` does), decoded with `generate`, and scored with sacrebleu (chrF++ primary, BLEU) per language, plus
the teacher-forced cross-entropy of the references. Paired differences (sentence chrF++, 95% bootstrap interval over
seeds and test sentences) against dense and the best upcycling baseline; routing diagnostics as JSON and PNG.

    python -m benchmarks.data.build --direction xx-en --langs de,sv,ca,tr,id --train-sources 200 \
        --dev-sources 40 --test-sources 60 --out benchmarks/data/covost_mini_xx_en
    python benchmarks/quality.py --preset pilot --data benchmarks/data/covost_mini_xx_en --out benchmarks/results/pilot
    python benchmarks/quality.py --preset cpu-xx-en --data benchmarks/data/covost_mini_xx_en \
        --out benchmarks/results/cpu-xx-en --select-lr 1e-4,3e-4,1e-3

Options: `--methods a,b` and `--seeds 0,1,2` override the preset; `--select-lr GRID` picks each method's learning rate
on dev (seed 0) first, `--learning-rates FILE` reuses such a choice; `--stage1-fraction`, `--stage1-lr-multiplier`;
`--test-pairs FILE` also scores every trained model on your own pairs (the builder's row format; the speech is
synthesised); `--keep-models`; `--device cuda`; `--eval-split dev`; `--cache DIR` (encoder states and the converted
Whisper folder, default ~/.cache/spri_hf/quality); `--context-check`.

Presets:
    tiny                 tiny random Whisper (byte-level tokenizer), a couple of steps, every method (the test suite).
    pilot                real Whisper base, X->En: the untrained model, copying the source and dense, 150 steps,
                         dev scored every 50 steps (does the reference method clearly learn?).
    cpu-xx-en            the main comparison, X->En, 5 seeds.
    cpu-xx-en-ablations  SPRI's open settings, 3 seeds.
    gpu                  the paper's direction (En->XX, 15 languages), for an accelerator (`--device cuda`).

Design (the same for every method; see docs/RESULTS.md):
- The encoder is frozen and run once per clip; its states are cached in float16, every clip to one shared length (the
  longest clip plus `context_margin_s`, its own trailing-silence states), so batches need no padding frames.
- Decoder prompt `<|startoftranscript|><|xx|><|task|><|notimestamps|>`: X->En uses Whisper's native translate task;
  En->XX uses the target-language token with the transcribe task. Prompt positions carry no loss.
- CPU presets restrict the output vocabulary to the tokens of the target side (train, dev, test) plus the prompt
  specials; every method and the untrained model share the restricted model.
- Dense: every decoder parameter trains (embeddings too when `train_embeddings`). MoE methods: decoder FFNs
  upcycled (`upcycle="decoder"`, `stage2_frozen` keeps the encoder and embeddings frozen); two-stage SPRI runs stage 1
  for `stage1_fraction` of the steps at `stage1_lr_multiplier` x its rate (None: SpriTrainingArguments' default), then
  SpriSeq2SeqTrainer's switch and re-warm-up; the other inits and `spri-stage2only` train stage 2 throughout.
- The loss is the model's own: cross-entropy plus the router load-balancing loss for MoE models.

Results: `<out>/runs/<method>-seed<k>.json` (written as each run ends; a rerun skips finished runs with the same
spec), `<out>/summary.json`, `<out>/summary.md` and `<out>/plots/*.png`.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import wave
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    TrainerCallback,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import spri_hf  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/quality.py` from anywhere
from benchmarks.data import build as builder  # noqa: E402
from spri_hf import SpriForSpeechSeq2Seq, SpriSeq2SeqTrainer, SpriSeq2SeqTrainingArguments  # noqa: E402
from spri_hf.inspection import inspect_model  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
SAMPLING_RATE = 16000
FRAMES_PER_SECOND = 50  # Whisper encoder: 1500 states for 30 s
MAX_FRAMES = 1500
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spri_hf" / "quality"
# data language code -> Whisper language token (Whisper has one Chinese token)
WHISPER_LANGUAGE = {"zh-cn": "zh"}

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------------------------
# methods and presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One row of the comparison. `settings` go to `from_dense`; `None` is the dense model itself."""

    name: str
    settings: dict | None
    train: bool = True
    description: str = ""

    @property
    def is_moe(self) -> bool:
        return self.settings is not None

    @property
    def two_stage(self) -> bool:
        # init="spri" starts in stage 1 unless a stage is given (spri_hf's own default)
        return self.is_moe and self.settings.get("init", "spri") == "spri" and self.settings.get("stage") in (None, 1)


def _methods() -> dict[str, Method]:
    rows = [
        Method("dense-untrained", None, train=False, description="Whisper base as it is (zero-shot reference)"),
        Method("source-copy", None, train=False, description="the spoken source sentence, copied (trivial baseline)"),
        Method("dense", None, description="dense full fine-tuning of the decoder"),
        Method("copy", {"init": "copy"}, description="sparse upcycling: every expert a copy"),
        Method("noise", {"init": "noise"}, description="copy + 1% relative Gaussian noise"),
        Method("drop", {"init": "drop"}, description="Drop-Upcycling, 50% of neurons re-initialised"),
        Method("random", {"init": "random"}, description="experts from scratch"),
        Method("spri", {"init": "spri"}, description="SPRI, spri_hf defaults, two stages"),
        Method("spri-stage2only", {"init": "spri", "stage": 2}, description="SPRI init, stage 2 throughout"),
        Method("spri-div0", {"init": "spri", "diversity": 0.0},
               description="control: two stages, per-expert low-rank adapters on an exact copy"),
    ]
    for diversity in (0.05, 0.2, 0.5):
        settings = {"init": "spri", "spri_mode": "balanced", "diversity": diversity}
        rows.append(Method(f"spri-div{diversity:g}", settings))
    rows.append(Method("spri-partition", {"init": "spri", "spri_mode": "partition", "residual_scale": 1.0}))
    for ratio in (0.25, 0.75, 0.9):
        rows.append(Method(f"spri-pr{ratio:g}", {"init": "spri", "principal_ratio": ratio}))
    rows.append(Method("spri-contiguous", {"init": "spri", "partition": "contiguous"}))
    return {method.name: method for method in rows}


METHODS = _methods()
BASELINES = ("dense-untrained", "source-copy")
MAIN_METHODS = BASELINES + ("dense", "copy", "noise", "drop", "random", "spri", "spri-stage2only", "spri-div0")
# the upcycling baselines SPRI is compared with ("the best baseline": the best of these on the evaluation split)
UPCYCLING_BASELINES = ("copy", "noise", "drop", "random")
# rows of the main table and of the per-language plot
HEADLINE_METHODS = MAIN_METHODS
# ablation tables: which runs differ in one setting from the default `spri`
ABLATIONS = {
    "diversity (spri_mode balanced)": ("spri-div0", "spri-div0.05", "spri", "spri-div0.2", "spri-div0.5"),
    "spri_mode": ("spri", "spri-partition"),
    "principal_ratio": ("spri-pr0.25", "spri", "spri-pr0.75", "spri-pr0.9"),
    "partition": ("spri", "spri-contiguous"),
    "training stages": ("spri", "spri-stage2only"),
}


@dataclass(frozen=True)
class Preset:
    """Everything that sets the budget; identical for every method of a run."""

    name: str
    model: str  # "whisper-base" or "tiny"
    methods: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int = 40
    batch_size: int = 16
    learning_rate: float = 3e-4  # every method's, unless `learning_rates` names it
    # per-method learning rates chosen on dev (`--select-lr`): ((method, lr), ...)
    learning_rates: tuple[tuple[str, float], ...] = ()
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # two-stage SPRI through SpriSeq2SeqTrainer: stage-1 length (fraction of the steps), its rate as a multiple of the
    # method's (None: SpriTrainingArguments' default), the re-warm-up after the switch (fraction of stage 2)
    stage1_fraction: float = 0.5
    stage1_lr_multiplier: float | None = None
    stage2_warmup_ratio: float = 0.1
    train_embeddings: bool = False  # token embeddings (tied with the output projection)
    num_experts: int = 8
    num_experts_per_tok: int = 2
    max_target_tokens: int = 128
    max_train_sources: int | None = None
    max_eval_sources: int | None = None
    langs: tuple[str, ...] | None = None  # only these languages of the data (None: all of them)
    eval_batch_size: int = 32
    # max_new_tokens per language: this percentile of its training targets' lengths (in tokens, with <eot>) + slack
    generation_percentile: float = 99.0
    generation_slack: int = 4
    # seconds of encoder states kept after each clip: zero-shot English transcription of the test clips loses 12
    # chrF++ with 1 s, none with 4 s (docs/RESULTS.md); 30 s is Whisper's own full window
    context_margin_s: float = 4.0
    context_bucket: int = 50
    amp: bool = False  # bfloat16 autocast (accelerators)
    eval_every: int = 0  # > 0: score the dev split every so many steps (the pilot's learning curve)
    # output vocabulary restricted to the tokens of the target side (train, dev and test) + prompt specials: ~12x
    # fewer logits per token; every method and the untrained model share it (CPU presets)
    restrict_vocab: bool = False


ALL_METHODS = tuple(METHODS)
PRESETS = {
    "tiny": Preset(
        "tiny", "tiny", ALL_METHODS, steps=2, batch_size=4, learning_rate=1e-3, num_experts=4,
        max_target_tokens=16, eval_batch_size=8, generation_slack=0, restrict_vocab=True,
    ),
    # X->English on espeak-ng speech of de, sv, ca, tr, id (`python -m benchmarks.data.build --preset cpu-xx-en`):
    # Whisper's native translate task, so there is headroom above the zero-shot model and above copying the source
    "pilot": Preset("pilot", "whisper-base", ("dense-untrained", "source-copy", "dense"), steps=150, eval_every=50,
                    max_eval_sources=30, restrict_vocab=True),
    "cpu-xx-en": Preset("cpu-xx-en", "whisper-base", MAIN_METHODS, seeds=(0, 1, 2, 3, 4), steps=150,
                        max_eval_sources=60, restrict_vocab=True),
    "cpu-xx-en-ablations": Preset("cpu-xx-en-ablations", "whisper-base", tuple(dict.fromkeys(
        name for names in ABLATIONS.values() for name in names)), seeds=(0, 1, 2), steps=150, max_eval_sources=60,
        restrict_vocab=True),
    # the paper's direction, 15 En->XX languages (`python -m benchmarks.data.build`), for an accelerator
    "gpu": Preset(
        "gpu", "whisper-base", MAIN_METHODS, seeds=(0, 1, 2, 3, 4), steps=600, batch_size=32, learning_rate=1e-4,
        train_embeddings=True, eval_batch_size=64, amp=True, context_margin_s=30.0,
    ),
}
# fields of a Preset that are not part of a run's spec (they do not change its result)
_NOT_IN_SPEC = {"name", "methods", "seeds", "eval_batch_size"}


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------


def load_split(data_dir: Path, split: str, max_sources: int | None = None) -> list[dict]:
    """Rows of `<data_dir>/<split>.jsonl`; with `max_sources`, only the first sources (in file order)."""
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: build the data first with `python -m benchmarks.data.build --out {data_dir}`"
        )
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if max_sources is not None:
        keep = set(list(dict.fromkeys(row["source_id"] for row in rows))[:max_sources])
        rows = [row for row in rows if row["source_id"] in keep]
    return rows


def whisper_language(lang: str) -> str:
    return WHISPER_LANGUAGE.get(lang, lang)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as handle:
        if handle.getframerate() != SAMPLING_RATE or handle.getnchannels() != 1 or handle.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16 kHz mono 16-bit PCM")
        pcm = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def context_frames(num_samples: int, preset: Preset) -> int:
    """Encoder states the decoder sees for a clip: the clip + the margin, rounded up to the bucket size."""
    seconds = num_samples / SAMPLING_RATE + preset.context_margin_s
    frames = math.ceil(seconds * FRAMES_PER_SECOND / preset.context_bucket) * preset.context_bucket
    return min(frames, MAX_FRAMES)


def wav_samples(path: Path) -> int:
    with wave.open(str(path), "rb") as handle:
        return handle.getnframes()


def shared_context_frames(data_dir: Path, rows: list[dict], preset: Preset) -> int:
    """One context length for every clip: the longest clip + the margin. Every clip keeps its own encoder states up to
    there (the states of its trailing silence), so batches need no padded frames and any batch order works."""
    return max(context_frames(wav_samples(data_dir / row["audio"]), preset) for row in rows)


def fingerprint(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def data_fingerprint(data_dir: Path) -> str:
    return fingerprint(*[(data_dir / f"{split}.jsonl").read_bytes() for split in ("train", "dev", "test")
                         if (data_dir / f"{split}.jsonl").is_file()])  # fmt: skip


def data_direction(data_dir: Path) -> str:
    """`en-xx` (English speech, XX text) or `xx-en` (XX speech, English text), from the builder's manifest."""
    manifest = data_dir / "manifest.json"
    direction = json.loads(manifest.read_text()).get("direction", "en-xx") if manifest.is_file() else "en-xx"
    if direction not in ("en-xx", "xx-en"):
        raise ValueError(f"{manifest}: unknown direction {direction!r}")
    return direction


@torch.no_grad()
def encoder_states(dense, processor, data_dir: Path, rows: list[dict], frames: int, cache_dir: Path, device,
                   log=print, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """float16 encoder states (`frames` x d_model) of every clip (keyed by its audio file), cached on disk.

    The cache holds one file per clip, named by the SHA-256 of its wav bytes, in a folder per encoder: a rebuilt or
    grown dataset reuses every clip it shares with an earlier one, and a killed run keeps what it computed. A cached
    state at least `frames` long serves any shorter context.
    """
    clips = {row["audio"]: data_dir / row["audio"] for row in rows}
    cache_dir.mkdir(parents=True, exist_ok=True)
    out, todo = {}, []
    for name, path in clips.items():
        cached = cache_dir / f"{hashlib.sha256(path.read_bytes()).hexdigest()}.pt"
        state = torch.load(cached) if cached.is_file() else None
        if state is not None and state.shape[0] >= frames:
            out[name] = state[:frames]
        else:
            todo.append((name, cached))
    if todo:
        log(f"    encoder states: {len(out)} cached, {len(todo)} to compute")
    encoder = dense.get_encoder().to(device).eval()
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        audio = [read_wav(clips[name]) for name, _ in batch]
        features = processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
        states = encoder(features.to(device=device, dtype=dense.dtype)).last_hidden_state
        for (name, cached), state in zip(batch, states):
            out[name] = state[:frames].to("cpu", torch.float16).clone()
            partial = cached.with_suffix(f".tmp-{os.getpid()}")
            torch.save(out[name], partial)
            os.replace(partial, cached)
        if (start // batch_size) % 10 == 9:
            log(f"    encoder states {start + len(batch)}/{len(todo)}")
    return out


@dataclass
class Example:
    lang: str
    source_id: str
    audio: str
    decoder_input_ids: list[int]
    labels: list[int]
    reference: str
    source_text: str  # what was spoken: the trivial "copy the source" output


def make_examples(rows: list[dict], tokenizer, preset: Preset, direction: str,
                  vocabulary: "Vocabulary | None" = None) -> list[Example]:
    """Decoder inputs `<sot> <|xx|> <|task|> <|notimestamps|> target` and labels `-100 x3, target, <eot>`.

    en-xx: `<|xx|>` is the target language with the transcribe task (Whisper's "translate" means X->English);
    xx-en: `<|xx|>` is the spoken language with Whisper's native translate task.
    """
    task = "<|translate|>" if direction == "xx-en" else "<|transcribe|>"
    sot, task_id, no_timestamps, eot = tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", task, "<|notimestamps|>", "<|endoftext|>"]
    )
    examples = []
    for row in rows:
        language = language_token_id(tokenizer, row["lang"])
        target = tokenizer(row["target"], add_special_tokens=False).input_ids[: preset.max_target_tokens - 1]
        prompt = [sot, language, task_id, no_timestamps]
        spoken = row.get("source_text") or row["en"]
        inputs, labels = prompt + target, target + [eot]
        if vocabulary is not None:
            inputs, labels = vocabulary.encode(inputs), vocabulary.encode(labels)
        examples.append(Example(row["lang"], row["source_id"], row["audio"], inputs, [-100] * 3 + labels,
                                row["target"], spoken))  # fmt: skip
    return examples


def language_token_id(tokenizer, lang: str) -> int:
    token = f"<|{whisper_language(lang)}|>"
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"Whisper has no language token {token} for target language {lang!r}")
    return token_id


def collate(examples: list[Example], states: dict[str, torch.Tensor], pad_id: int, device=None, dtype=torch.float32) -> dict:
    """A batch: the cached encoder states as `encoder_outputs`, decoder inputs and labels (padding carries no loss)."""
    length = max(len(example.labels) for example in examples)
    decoder_input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        decoder_input_ids[row, : len(example.decoder_input_ids)] = torch.tensor(example.decoder_input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    encoder = torch.stack([states[example.audio] for example in examples]).to(device=device, dtype=dtype)
    batch = {"encoder_outputs": BaseModelOutput(last_hidden_state=encoder), "decoder_input_ids": decoder_input_ids,
             "labels": labels}  # fmt: skip
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


class StatesCollator:
    """`Trainer`'s data collator: examples -> `collate` (Trainer moves the tensors to the device)."""

    def __init__(self, states: dict[str, torch.Tensor], pad_id: int):
        self.states, self.pad_id = states, pad_id

    def __call__(self, examples: list[Example]) -> dict:
        return collate(examples, self.states, self.pad_id)


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------


def tiny_whisper(langs: list[str], seed: int = 0):
    """A random Whisper-shaped model (d_model 64, 2+2 layers) and a byte-level tokenizer with Whisper's specials."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {char: index for index, char in enumerate(sorted(ByteLevel.alphabet()))}
    languages = [f"<|{code}|>" for code in dict.fromkeys(["en"] + [whisper_language(lang) for lang in langs])]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *languages, "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    for token in specials:
        vocab[token] = len(vocab)
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"extra_special_tokens": specials}, replace_extra_special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids
    eot = ids("<|endoftext|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_target_positions=256,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=ids("<|startoftranscript|>"),
        suppress_tokens=None, begin_suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=config.max_target_positions, is_multilingual=True, lang_to_id={t: ids(t) for t in languages},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        return_timestamps=False,
    )
    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer)
    return model.eval(), processor, f"tiny-whisper:{fingerprint(config.to_dict(), seed)}"


def whisper_base(cache: Path):
    """The real Whisper base, converted once from the packaged CTranslate2 weights (examples/real_models.py)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import real_models

    folder = Path(real_models.whisper_base_folder(cache / "whisper-base-hf"))
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    marker = (folder / real_models.DONE_MARKER).read_text()
    return model, WhisperProcessor.from_pretrained(folder), f"whisper-base:{fingerprint(marker)}"


@dataclass
class Vocabulary:
    """The token ids a restricted model keeps: `kept[new] = old`; `to_new[old] = new`."""

    kept: list[int]
    to_new: dict[int, int]

    def encode(self, ids: list[int]) -> list[int]:
        return [self.to_new[i] for i in ids]

    def decode(self, ids) -> list[int]:
        return [self.kept[i] for i in ids]


def whisper_specials(tokenizer, langs: list[str]) -> list[int]:
    """The special tokens a prompt of these languages and either task needs, and Whisper's control tokens."""
    names = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
             "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"] + [f"<|{whisper_language(l)}|>" for l in ["en", *langs]]
    return [tokenizer.convert_tokens_to_ids(name) for name in dict.fromkeys(names)]


@torch.no_grad()
def restrict_vocabulary(dense, tokenizer, texts: list[str], langs: list[str]):
    """A copy of `dense` whose output vocabulary is the tokens of `texts` plus the specials a prompt needs.

    The loss and decoding then run over ~4k tokens instead of 51,865 (the output projection dominated the step cost);
    every method and the untrained model share the restricted model, so the comparison stays fair. The generation
    config's token ids are remapped; `Vocabulary` maps the ids both ways.
    """
    used = {token for text in texts for token in tokenizer(text, add_special_tokens=False).input_ids}
    kept = sorted(set(whisper_specials(tokenizer, langs)) | used)
    vocabulary = Vocabulary(kept, {old: new for new, old in enumerate(kept)})
    config = copy.deepcopy(dense.config)
    config.vocab_size = len(kept)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if getattr(config, name, None) is not None:
            setattr(config, name, vocabulary.to_new[getattr(config, name)])
    config.suppress_tokens = config.begin_suppress_tokens = None
    model = WhisperForConditionalGeneration(config).to(dense.dtype)
    state = dense.state_dict()
    index = torch.tensor(kept)
    state["model.decoder.embed_tokens.weight"] = state["model.decoder.embed_tokens.weight"][index].clone()
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    generation = copy.deepcopy(dense.generation_config)

    def remap(ids):
        return [vocabulary.to_new[i] for i in ids if i in vocabulary.to_new] if ids else ids

    generation.suppress_tokens = remap(generation.suppress_tokens)
    generation.begin_suppress_tokens = remap(generation.begin_suppress_tokens)
    for name in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "no_timestamps_token_id",
                 "prev_sot_token_id"):
        value = getattr(generation, name, None)
        if isinstance(value, int) and value in vocabulary.to_new:
            setattr(generation, name, vocabulary.to_new[value])
    generation.lang_to_id = {t: vocabulary.to_new[i] for t, i in generation.lang_to_id.items() if i in vocabulary.to_new}
    generation.task_to_id = {t: vocabulary.to_new[i] for t, i in generation.task_to_id.items()}
    generation.forced_decoder_ids = None
    if hasattr(generation, "alignment_heads"):
        del generation.alignment_heads
    model.generation_config = generation
    return model.eval(), vocabulary


def load_dense(preset: Preset, langs: list[str], cache: Path):
    if preset.model == "tiny":
        return tiny_whisper(langs)
    if preset.model == "whisper-base":
        return whisper_base(cache)
    raise ValueError(f"preset.model={preset.model!r}: use 'tiny' or 'whisper-base'")


def frozen_patterns(preset: Preset) -> list[str]:
    """What no method trains: the encoder (its states are cached), and the tied embeddings unless `train_embeddings`."""
    return [".encoder."] + ([] if preset.train_embeddings else ["embed_tokens"])


def build_model(method: Method, dense, preset: Preset, seed: int):
    if not method.is_moe:
        # the dense weights are shared by every run: fine-tune a copy
        return copy.deepcopy(dense) if method.train else dense
    return SpriForSpeechSeq2Seq.from_dense(
        dense,
        upcycle="decoder",
        num_experts=preset.num_experts,
        num_experts_per_tok=preset.num_experts_per_tok,
        seed=seed,
        stage2_frozen=frozen_patterns(preset),  # SpriTrainer's switch to stage 2 keeps them frozen too
        **method.settings,
    )


def freeze(model, preset: Preset):
    """The trainable set of `model` for its method: SPRI's stage rules, or the whole dense decoder, minus the frozen."""
    if isinstance(model, SpriForSpeechSeq2Seq):
        model.apply_stage_trainability()
        return
    for name, param in model.named_parameters():
        param.requires_grad_(not any(pattern in f"model.{name}" for pattern in frozen_patterns(preset)))


def spri_settings(model) -> dict | None:
    if not isinstance(model, SpriForSpeechSeq2Seq):
        return None
    config = model.config
    return {name: getattr(config, name) for name in spri_hf.configuration_spri.UPCYCLING_SETTINGS} | {
        "stage": config.stage,
        "residual_rank": config.residual_rank,
    }


# ----------------------------------------------------------------------------------------------------------------
# training, decoding, scoring
# ----------------------------------------------------------------------------------------------------------------


def training_arguments(preset: Preset, method: Method, seed: int, output_dir: str, device):
    """The same budget for every method: steps, batch, schedule shape, warm-up, clipping, data order and seed.

    The learning rate is the method's own (chosen on dev, `Preset.learning_rates`); for two-stage SPRI,
    `SpriSeq2SeqTrainer` runs stage 1 for `stage1_fraction` of the steps at `stage1_lr_multiplier` x that rate, switches,
    re-warms up over `stage2_warmup_ratio` of stage 2 and decays to zero at the last step.
    """
    stage1 = {}
    if method.two_stage:
        stage1 = dict(stage1_steps=preset.stage1_fraction, stage2_warmup_steps=preset.stage2_warmup_ratio)
        if preset.stage1_lr_multiplier is not None:
            stage1["stage1_learning_rate"] = preset.stage1_lr_multiplier * method_learning_rate(preset, method)
    return SpriSeq2SeqTrainingArguments(
        output_dir=output_dir,
        max_steps=preset.steps,
        per_device_train_batch_size=preset.batch_size,
        learning_rate=method_learning_rate(preset, method),
        lr_scheduler_type="linear",
        warmup_steps=preset.warmup_ratio,
        weight_decay=preset.weight_decay,
        max_grad_norm=preset.max_grad_norm,
        # fused AdamW: the per-parameter loop of the default CPU implementation costs as much as a Whisper base step
        optim="adamw_torch_fused" if device.type in ("cpu", "cuda") else "adamw_torch",
        seed=seed,
        data_seed=seed,
        bf16=preset.amp,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **stage1,
    )


def method_learning_rate(preset: Preset, method: Method) -> float:
    return dict(preset.learning_rates).get(method.name, preset.learning_rate)


class DevScores(TrainerCallback):
    """Scores the dev examples every `every` steps (the pilot's learning curve): translation, not training."""

    def __init__(self, every: int, score_fn):
        self.every, self.score_fn, self.scores = every, score_fn, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.scores.append({"step": state.global_step, **self.score_fn(model)})
            model.train()


def train(model, method: Method, examples, states, preset: Preset, seed: int, device, log, callbacks=()) -> list[dict]:
    """Fine-tune with `SpriSeq2SeqTrainer` (every method, dense included: it trains a plain model as Seq2SeqTrainer)."""
    freeze(model, preset)
    with tempfile.TemporaryDirectory(prefix="spri-quality-") as scratch:
        trainer = SpriSeq2SeqTrainer(
            model=model, args=training_arguments(preset, method, seed, scratch, device),
            train_dataset=ExampleDataset(examples), data_collator=StatesCollator(states, model.config.pad_token_id),
            callbacks=list(callbacks),
        )  # fmt: skip
        trainer.train()
    history = []
    for entry in trainer.state.log_history:
        if "loss" in entry:
            history.append({"step": entry["step"], "stage": entry.get("stage"), "lr": entry["learning_rate"],
                            "loss": entry["loss"], "grad_norm": entry.get("grad_norm")})  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if history:
        history[-1]["trainable_params"] = trainable
    for row in history:
        if row is history[0] or row["step"] % max(1, preset.steps // 8) == 0 or row["step"] == preset.steps:
            log(f"    step {row['step']}/{preset.steps} stage {row['stage']} loss {row['loss']:.3f} lr {row['lr']:.2e}")
    model.eval()
    return history


def eval_batches(examples: list[Example], batch_size: int):
    """Evaluation batches of one language each (one prompt per batch), in a fixed order."""
    groups = defaultdict(list)
    for index, example in enumerate(examples):
        groups[example.lang].append(index)
    for lang in sorted(groups):
        indices = sorted(groups[lang], key=lambda i: examples[i].source_id)
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


@torch.no_grad()
def translate(model, tokenizer, examples, states, preset: Preset, max_new_tokens: dict[str, int], device,
              direction: str = "en-xx", vocabulary: Vocabulary | None = None) -> list[str]:
    """Greedy translations through the model's own `generate` (Whisper's prompt, suppression and stopping rules)."""
    task = "translate" if direction == "xx-en" else "transcribe"
    hypotheses = [""] * len(examples)
    for indices in eval_batches(examples, preset.eval_batch_size):
        lang = examples[indices[0]].lang
        encoder = torch.stack([states[examples[i].audio] for i in indices]).to(device=device, dtype=torch.float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.amp):
            generated = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder), language=whisper_language(lang),
                task=task, max_new_tokens=max_new_tokens[lang], do_sample=False, num_beams=1,
            )  # fmt: skip
        sequences = [vocabulary.decode(row.tolist()) for row in generated] if vocabulary else generated
        for i, text in zip(indices, tokenizer.batch_decode(sequences, skip_special_tokens=True)):
            hypotheses[i] = text.strip()
    return hypotheses


@torch.no_grad()
def teacher_forced_cross_entropy(model, examples, states, preset: Preset, device) -> float:
    """Token-mean cross-entropy of the references (no router loss), the second metric."""
    total, count = 0.0, 0
    for indices in eval_batches(examples, preset.eval_batch_size):
        batch = collate([examples[i] for i in indices], states, model.config.pad_token_id, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        total, count = total + loss.item(), count + int((labels != -100).sum())
    return total / max(count, 1)


def bleu_tokenizer(lang: str) -> str:
    """sacrebleu's tokenizer for a target language: "zh" for Chinese, MeCab for Japanese when installed."""
    if lang.startswith("zh"):
        return "zh"
    if lang == "ja":
        try:
            from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

            TokenizerJaMecab()
            return "ja-mecab"
        except Exception:  # noqa: BLE001  (mecab-python3 / ipadic missing: sacrebleu[ja] not installed)
            return "char"
    return "13a"


def score(hypotheses: list[str], examples: list[Example]) -> dict:
    from sacrebleu.metrics import BLEU, CHRF

    by_lang = defaultdict(lambda: ([], []))
    for hypothesis, example in zip(hypotheses, examples):
        by_lang[example.lang][0].append(hypothesis)
        by_lang[example.lang][1].append(example.reference)
    per_lang = {}
    chrf = CHRF(word_order=2)  # chrF++
    for lang in sorted(by_lang):
        hyps, refs = by_lang[lang]
        tokenize = bleu_tokenizer(lang)
        per_lang[lang] = {
            "bleu": BLEU(tokenize=tokenize).corpus_score(hyps, [refs]).score,
            "chrf": chrf.corpus_score(hyps, [refs]).score,
            "bleu_tokenize": tokenize,
            "sentences": len(hyps),
        }
    return {
        "bleu": statistics.fmean(row["bleu"] for row in per_lang.values()),
        "chrf": statistics.fmean(row["chrf"] for row in per_lang.values()),
        "per_lang": per_lang,
    }


# ----------------------------------------------------------------------------------------------------------------
# routing diagnostics
# ----------------------------------------------------------------------------------------------------------------


def pairwise_distances(model) -> list[float]:
    """Mean pairwise relative Frobenius distance between the experts of each MoE layer (`spri-hf inspect`)."""
    return [row["pairwise_distance"] for row in inspect_model(model)]


@torch.no_grad()
def routing_diagnostics(model, examples, states, preset: Preset, device) -> dict:
    """Teacher-forced routing on the evaluation set: per-language expert load per layer and balance statistics.

    Load = share of the (token, top-k slot) assignments that go to each expert, over the target positions (the
    tokens that carry loss), so every (language, layer) row sums to 1.
    """
    layers = [index for _, index, _ in model.moe_sites()]
    num_experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    langs = sorted({example.lang for example in examples})
    # counts[layer, language, expert]: top-k assignments of the target tokens
    counts = torch.zeros(len(layers), len(langs), num_experts, dtype=torch.float64)
    entropy_sum = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    for indices in eval_batches(examples, preset.eval_batch_size):
        batch = collate([examples[i] for i in indices], states, model.config.pad_token_id, device, torch.float32)
        # the decoder alone: routing needs no logits over the 51k-token vocabulary
        with model.collect_router_logits() as router_logits:
            model.get_decoder()(
                input_ids=batch["decoder_input_ids"],
                encoder_hidden_states=batch["encoder_outputs"].last_hidden_state,
                use_cache=False,
            )
        valid = (batch["labels"] != -100).cpu()
        row_langs = torch.tensor([langs.index(examples[i].lang) for i in indices])
        token_langs = row_langs[:, None].expand_as(valid)[valid]  # language of every target token
        valid = valid.reshape(-1)
        for layer, logits in enumerate(router_logits):
            logits = logits.float().cpu()[valid]
            chosen = logits.topk(top_k, dim=-1).indices  # (tokens, k)
            cells = token_langs[:, None] * num_experts + chosen
            counts[layer] += torch.bincount(cells.reshape(-1), minlength=len(langs) * num_experts).view(
                len(langs), num_experts
            ).double()
            probs = logits.softmax(-1)
            entropy_sum[layer] += -(probs * probs.clamp_min(1e-12).log()).sum().double()
        tokens += int(valid.sum())
    shares = counts / counts.sum(-1, keepdim=True)
    load = {lang: shares[:, index].tolist() for index, lang in enumerate(langs)}
    overall = counts.sum(1) / counts.sum((1, 2))[:, None]
    per_layer = []
    for layer in range(len(layers)):
        share = overall[layer]
        # mutual information between the target language and the chosen expert (bits): language specialisation
        joint = counts[layer] / counts[layer].sum()
        independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        mask = joint > 0
        mutual_information = (joint[mask] * (joint[mask] / independent[mask]).log2()).sum().item()
        per_layer.append(
            {
                "layer": layers[layer],
                "load": share.tolist(),
                "cv": (share.std(unbiased=False) / share.mean()).item(),
                "max_share": share.max().item(),
                "router_entropy": (entropy_sum[layer] / max(tokens, 1)).item(),
                "language_expert_mi_bits": mutual_information,
            }
        )
    return {
        "layers": layers,
        "num_experts": num_experts,
        "top_k": model.config.num_experts_per_tok,
        "tokens": tokens,
        "languages": langs,
        "load": load,
        "per_layer": per_layer,
        "mean": {
            key: statistics.fmean(row[key] for row in per_layer)
            for key in ("cv", "max_share", "router_entropy", "language_expert_mi_bits")
        },
        "max_router_entropy": math.log(num_experts),
    }


# ----------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_routing(result: dict, path: Path):
    """One heatmap per MoE layer: languages x experts, the share of each language's assignments per expert."""
    plt = _pyplot()
    routing = result["routing"]
    langs, layers = routing["languages"], routing["layers"]
    data = np.array([[routing["load"][lang][layer] for lang in langs] for layer in range(len(layers))])
    columns = min(len(layers), 6)
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(1.5 + 2.0 * columns, 1.2 + rows * (0.9 + 0.22 * len(langs))), squeeze=False,
        layout="constrained",
    )
    vmax = max(float(data.max()), 1e-9)
    for index, ax in enumerate(axes.flat):
        if index >= len(layers):
            ax.axis("off")
            continue
        image = ax.imshow(data[index], vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {layers[index]}", fontsize=8)
        ax.set_xticks(range(routing["num_experts"]), [str(e) for e in range(routing["num_experts"])], fontsize=6)
        ax.set_yticks(range(len(langs)), langs if index % columns == 0 else [""] * len(langs), fontsize=7)
        ax.set_xlabel("expert", fontsize=7)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of top-k assignments")
    figure.suptitle(f"{result['method']} (seed {result['seed']}): decoder expert load per target language", fontsize=9)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_summary(summary: dict, plots: Path):
    """Per-language BLEU, pairwise expert distance before/after, load balance and training loss across methods."""
    plt = _pyplot()
    methods = summary["methods"]
    names = [name for name in methods if methods[name]["seeds"]]
    langs = summary["languages"]

    figure, ax = plt.subplots(figsize=(max(6, 0.9 * len(langs) + 2), 3.6))
    shown = [name for name in HEADLINE_METHODS if name in names] or names
    width = 0.8 / len(shown)
    for offset, name in enumerate(shown):
        values = [methods[name]["per_lang"][lang]["bleu"]["mean"] for lang in langs] + [methods[name]["bleu"]["mean"]]
        ax.bar(np.arange(len(langs) + 1) + offset * width, values, width, label=name)
    ax.set_xticks(np.arange(len(langs) + 1) + 0.4 - width / 2, langs + ["avg"], fontsize=8)
    ax.set_ylabel("BLEU")
    ax.legend(fontsize=7, ncol=4)
    ax.set_title("BLEU per target language (mean over seeds)", fontsize=9)
    figure.tight_layout()
    figure.savefig(plots / "bleu-per-language.png", dpi=90)
    plt.close(figure)

    moe = [name for name in names if methods[name].get("routing")]
    if moe:
        figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        x = np.arange(len(moe))
        before = [methods[name]["routing"]["pairwise_distance_before"] for name in moe]
        after = [methods[name]["routing"]["pairwise_distance_after"] for name in moe]
        axes[0].bar(x - 0.2, before, 0.4, label="before training")
        axes[0].bar(x + 0.2, after, 0.4, label="after training")
        axes[0].set_yscale("symlog", linthresh=1e-3)
        axes[0].set_title("mean pairwise expert distance (relative)", fontsize=9)
        axes[0].legend(fontsize=7)
        axes[1].bar(x, [methods[name]["routing"]["cv"] for name in moe])
        axes[1].set_title("load coefficient of variation (0 = uniform)", fontsize=9)
        axes[2].bar(x, [methods[name]["routing"]["language_expert_mi_bits"] for name in moe])
        axes[2].set_title("language-expert mutual information (bits)", fontsize=9)
        for ax in axes:
            ax.set_xticks(x, moe, rotation=60, ha="right", fontsize=7)
        figure.tight_layout()
        figure.savefig(plots / "routing-summary.png", dpi=90)
        plt.close(figure)

    figure, ax = plt.subplots(figsize=(6.5, 3.6))
    for name in shown:
        curve = methods[name].get("loss_curve")
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (seed mean)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(plots / "training-loss.png", dpi=90)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# runs, resume, summary
# ----------------------------------------------------------------------------------------------------------------


def run_spec(method: Method, seed: int, preset: Preset, model_id: str, data_id: str, eval_split: str) -> dict:
    budget = {key: value for key, value in asdict(preset).items() if key not in _NOT_IN_SPEC}
    if method.train:  # only the method's own rate is part of its spec
        budget["learning_rate"], budget["learning_rates"] = method_learning_rate(preset, method), None
    else:
        budget = {key: value for key, value in budget.items() if key in ("model", "max_target_tokens",
                  "max_eval_sources", "langs", "context_margin_s", "generation_percentile", "generation_slack")}  # fmt: skip
    # as it reads back from JSON (tuples become lists), so a finished run is recognised
    return json.loads(json.dumps({
        "method": method.name,
        "settings": method.settings,
        "train": method.train,
        "seed": seed if method.train or method.is_moe else 0,
        "budget": budget,
        "model": model_id,
        "data": data_id,
        "eval_split": eval_split,
    }))


def write_json(path: Path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    os.replace(partial, path)


def find_finished(spec: dict, path: Path, reuse: list[Path]) -> dict | None:
    for candidate in [path] + [folder / "runs" / path.name for folder in reuse]:
        if candidate.is_file():
            result = json.loads(candidate.read_text())
            if result.get("spec") == spec:
                return result
    return None


def sentence_chrf(hypotheses: list[str], examples: list[Example]) -> list[float]:
    """chrF++ of every sentence: the unit the paired bootstrap resamples."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF(word_order=2)
    return [chrf.sentence_score(hypothesis, [example.reference]).score for hypothesis, example in zip(hypotheses, examples)]


def evaluate_model(model, method: Method, examples, ctx: dict, with_cross_entropy: bool = True) -> dict:
    """Translations, corpus and sentence scores, and teacher-forced cross-entropy of one model on `examples`."""
    preset, device = ctx["preset"], ctx["device"]
    clock = time.perf_counter()
    if method.name == "source-copy":
        hypotheses = [example.source_text for example in examples]
    else:
        hypotheses = translate(model, ctx["tokenizer"], examples, ctx["states"], preset, ctx["max_new_tokens"], device,
                               ctx["direction"], ctx["vocabulary"])  # fmt: skip
    result = {"generate_s": time.perf_counter() - clock, "hypotheses": hypotheses}
    result["metrics"] = score(hypotheses, examples)
    result["sentence_chrf"] = sentence_chrf(hypotheses, examples)
    if with_cross_entropy and method.name != "source-copy":
        result["metrics"]["cross_entropy"] = teacher_forced_cross_entropy(model, examples, ctx["states"], preset, device)
    return result


def run_one(method: Method, seed: int, ctx: dict, log) -> dict:
    preset, device = ctx["preset"], ctx["device"]
    timings = {}
    clock = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(method, ctx["dense"], preset, seed).to(device)
    timings["upcycle_s"] = time.perf_counter() - clock
    distance_before = pairwise_distances(model) if method.is_moe else None
    initial_settings = spri_settings(model)
    history, dev_curve = [], []
    if method.train:
        callbacks = []
        if preset.eval_every and ctx.get("dev_examples"):
            def dev_score(current):
                current.eval()
                hyps = translate(current, ctx["tokenizer"], ctx["dev_examples"], ctx["states"], preset,
                                 ctx["max_new_tokens"], device, ctx["direction"], ctx["vocabulary"])  # fmt: skip
                row = score(hyps, ctx["dev_examples"])
                log(f"    dev at this step: chrF++ {row['chrf']:.2f} BLEU {row['bleu']:.2f}")
                return {"chrf": row["chrf"], "bleu": row["bleu"]}

            callbacks.append(DevScores(preset.eval_every, dev_score))
        clock = time.perf_counter()
        history = train(model, method, ctx["train_examples"], ctx["states"], preset, seed, device, log, callbacks)
        timings["train_s"] = time.perf_counter() - clock
        dev_curve = callbacks[0].scores if callbacks else []
    evaluation = evaluate_model(model, method, ctx["eval_examples"], ctx)
    timings["generate_s"] = evaluation["generate_s"]
    routing = None
    if method.is_moe:
        clock = time.perf_counter()
        routing = routing_diagnostics(model, ctx["eval_examples"], ctx["states"], preset, device)
        routing["pairwise_distance_before"] = distance_before
        routing["pairwise_distance_after"] = pairwise_distances(model)
        timings["routing_s"] = time.perf_counter() - clock
    extra = {}
    if ctx.get("extra_examples"):  # --test-pairs: the user's own pairs
        extra_eval = evaluate_model(model, method, ctx["extra_examples"], ctx)
        extra = {"metrics": extra_eval["metrics"], "hypotheses": extra_eval["hypotheses"]}
    if ctx.get("keep_models") and method.train:
        model.save_pretrained(ctx["out"] / "models" / f"{method.name}-seed{seed}")
    samples = {}
    for example, hypothesis in zip(ctx["eval_examples"], evaluation["hypotheses"]):
        if example.lang not in samples:
            samples[example.lang] = {"reference": example.reference, "hypothesis": hypothesis}
    return {
        "method": method.name,
        "description": method.description,
        "seed": seed,
        "settings": initial_settings,
        "learning_rate": method_learning_rate(preset, method) if method.train else None,
        "metrics": evaluation["metrics"],
        "routing": routing,
        "history": history,
        "dev_curve": dev_curve,
        "timings": timings,
        "samples": samples,
        "hypotheses": evaluation["hypotheses"],
        "sentence_chrf": evaluation["sentence_chrf"],
        "test_pairs": extra or None,
    }


def paired_bootstrap(a: list[list[float]], b: list[list[float]], samples: int = 2000, seed: int = 0) -> dict:
    """Mean paired difference `a - b` with a 95% percentile interval, resampling seeds and sentences.

    `a[s][j]`, `b[s][j]`: the score of sentence `j` under seed `s` (same sentences, same seed pairing). Each bootstrap
    sample draws seeds and sentences with replacement and averages `a - b` over the drawn cells. A method without
    seeds (one row) is paired with every seed of the other.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[0] == 1 and b.shape[0] > 1:
        a = np.repeat(a, b.shape[0], axis=0)
    if b.shape[0] == 1 and a.shape[0] > 1:
        b = np.repeat(b, a.shape[0], axis=0)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same seeds x sentences, got {a.shape} and {b.shape}")
    difference = a - b
    rng = np.random.default_rng(seed)
    seeds, sentences = difference.shape
    draws = np.empty(samples)
    for k in range(samples):
        rows = rng.integers(0, seeds, seeds)
        columns = rng.integers(0, sentences, sentences)
        draws[k] = difference[np.ix_(rows, columns)].mean()
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": float(difference.mean()), "low": float(low), "high": float(high),
            "significant": bool(low > 0 or high < 0), "seeds": seeds, "sentences": sentences}  # fmt: skip


def paired_differences(results: list[dict]) -> dict:
    """Sentence chrF++ of every trained method against dense and against the best upcycling baseline."""
    by_method = defaultdict(list)
    for result in results:
        if result.get("sentence_chrf") is not None:
            by_method[result["method"]].append(result)
    scores = {name: [run["sentence_chrf"] for run in sorted(runs, key=lambda r: r["seed"])]
              for name, runs in by_method.items()}  # fmt: skip
    means = {name: float(np.mean(rows)) for name, rows in scores.items()}
    baselines = [name for name in UPCYCLING_BASELINES if name in scores]
    best = max(baselines, key=means.get) if baselines else None
    paired = {}
    for name, rows in scores.items():
        entry = {}
        for reference in ("dense", best):
            if reference and reference != name and reference in scores and len(scores[reference][0]) == len(rows[0]):
                entry[f"vs_{reference}"] = paired_bootstrap(rows, scores[reference])
        paired[name] = entry
    return {"metric": "sentence chrF++", "best_baseline": best, "methods": paired}


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def summarise(results: list[dict], langs: list[str]) -> dict:
    by_method = defaultdict(list)
    for result in results:
        by_method[result["method"]].append(result)
    methods = {}
    for name in [name for name in METHODS if name in by_method]:
        runs = sorted(by_method[name], key=lambda r: r["seed"])
        row = {
            "description": runs[0]["description"],
            "settings": runs[0]["settings"],
            "seeds": [run["seed"] for run in runs],
            "bleu": _mean_std([run["metrics"]["bleu"] for run in runs]),
            "chrf": _mean_std([run["metrics"]["chrf"] for run in runs]),
            "learning_rate": runs[0].get("learning_rate"),
            "per_lang": {
                lang: {
                    "bleu": _mean_std([run["metrics"]["per_lang"][lang]["bleu"] for run in runs]),
                    "chrf": _mean_std([run["metrics"]["per_lang"][lang]["chrf"] for run in runs]),
                }
                for lang in langs
            },
            "timings": {
                key: statistics.fmean(run["timings"].get(key, 0.0) for run in runs)
                for key in ("upcycle_s", "train_s", "generate_s", "routing_s")
            },
        }
        if all("cross_entropy" in run["metrics"] for run in runs):
            row["cross_entropy"] = _mean_std([run["metrics"]["cross_entropy"] for run in runs])
        if all(run.get("test_pairs") for run in runs):
            row["test_pairs"] = {key: _mean_std([run["test_pairs"]["metrics"][key] for run in runs])
                                 for key in ("chrf", "bleu")}  # fmt: skip
        if runs[0]["history"]:
            curves = [[step["loss"] for step in run["history"]] for run in runs]
            row["loss_curve"] = [statistics.fmean(losses) for losses in zip(*curves)]
            row["trainable_params_last_step"] = runs[0]["history"][-1].get("trainable_params")
        if runs[0]["routing"]:
            row["routing"] = {
                key: statistics.fmean(run["routing"]["mean"][key] for run in runs)
                for key in ("cv", "max_share", "router_entropy", "language_expert_mi_bits")
            } | {
                "pairwise_distance_before": statistics.fmean(
                    statistics.fmean(run["routing"]["pairwise_distance_before"]) for run in runs
                ),
                "pairwise_distance_after": statistics.fmean(
                    statistics.fmean(run["routing"]["pairwise_distance_after"]) for run in runs
                ),
            }
        methods[name] = row
    return methods


def _cell(stat: dict, digits: int = 2) -> str:
    if len(stat["per_seed"]) > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _setting_label(name: str, row: dict) -> str:
    settings = row["settings"]
    if not settings:
        return {"source-copy": "the spoken source text", "dense-untrained": "zero-shot"}.get(name, "dense")
    label = f"init={settings['init']}"
    if settings["init"] == "spri":
        label += (
            f", {settings['spri_mode']}, div={settings['diversity']:g}" if settings["spri_mode"] == "balanced"
            else f", partition mode, scale={settings['residual_scale']:g}"
        )
        label += f", pr={settings['principal_ratio']:g}, {settings['partition']}"
        label += ", two-stage" if METHODS[name].two_stage else ", stage 2 only"
    return label


def markdown(summary: dict) -> str:
    methods, langs = summary["methods"], summary["languages"]
    header = ("| method | settings | lr | chrF++ | BLEU | test CE | ΔchrF++ vs dense [95% CI] | "
              "ΔchrF++ vs best baseline [95% CI] | train s | generate s |")
    paired = summary.get("paired", {}).get("methods", {})
    best = summary.get("paired", {}).get("best_baseline")
    lines = [
        f"# Quality benchmark: preset `{summary['preset']}`",
        "",
        f"Model {summary['model']}; data {summary['data']['path']} ({summary['data']['train_pairs']} training pairs, "
        f"{summary['data']['eval_pairs']} {summary['eval_split']} pairs, {len(langs)} languages); "
        f"budget: {summary['budget']['steps']} steps x batch {summary['budget']['batch_size']}, "
        f"lr {summary['budget']['learning_rate']:g}; seeds {summary['seeds']}; "
        f"device {summary['environment']['device']}.",
        "BLEU tokenisation: "
        + ", ".join(f"{lang} `{tok}`" for lang, tok in summary["bleu_tokenize"].items() if tok != "13a")
        + ", others `13a`. Scores are macro averages over languages; ± is the standard deviation over seeds.",
        "",
        "## Main comparison",
        "",
        "Δ columns: paired sentence-level chrF++ differences, 95% bootstrap interval over seeds and test sentences; "
        f"best baseline = {best}. An interval that includes 0 is no difference.",
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def interval(name, against):
        stat = paired.get(name, {}).get(f"vs_{against}")
        if not stat:
            return ""
        mark = "" if stat["significant"] else " (n.s.)"
        return f"{stat['mean']:+.2f} [{stat['low']:+.2f}, {stat['high']:+.2f}]{mark}"

    def row_line(name):
        row = methods[name]
        timings = row["timings"]
        ce = _cell(row["cross_entropy"], 3) if row.get("cross_entropy") else ""
        lr = f"{row['learning_rate']:g}" if row.get("learning_rate") else ""
        return (
            f"| {name} | {_setting_label(name, row)} | {lr} | {_cell(row['chrf'])} | {_cell(row['bleu'])} | {ce} | "
            f"{interval(name, 'dense')} | {interval(name, best)} | {timings['train_s']:.0f} | "
            f"{timings['generate_s']:.0f} |"
        )

    lines += [row_line(name) for name in HEADLINE_METHODS if name in methods]
    for title, names in ABLATIONS.items():
        names = [name for name in names if name in methods]
        if len(names) < 2:
            continue
        lines += ["", f"## Ablation: {title}", "", header, "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [row_line(name) for name in names]
    for metric, title in (("bleu", "BLEU"), ("chrf", "chrF++")):
        lines += ["", f"## {title} per language", "", "| method | " + " | ".join(langs) + " | avg |",
                  "|---" * (len(langs) + 2) + "|"]
        for name, row in methods.items():
            cells = [f"{row['per_lang'][lang][metric]['mean']:.1f}" for lang in langs]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {row[metric]['mean']:.2f} |")
    moe = [name for name, row in methods.items() if row.get("routing")]
    if moe:
        lines += [
            "",
            "## Routing (evaluation set, teacher forcing; means over layers and seeds)",
            "",
            "| method | load CV | max expert share | router entropy (max {:.2f}) | language-expert MI (bits) | "
            "pairwise expert distance before → after |".format(math.log(summary["budget"]["num_experts"])),
            "|---|---|---|---|---|---|",
        ]
        for name in moe:
            r = methods[name]["routing"]
            lines.append(
                f"| {name} | {r['cv']:.3f} | {r['max_share']:.3f} | {r['router_entropy']:.3f} | "
                f"{r['language_expert_mi_bits']:.3f} | "
                f"{r['pairwise_distance_before']:.4f} → {r['pairwise_distance_after']:.4f} |"
            )
    lines += ["", f"Wall time of this invocation: {summary['wall_seconds'] / 60:.1f} min "
              f"(encoder states {summary['encoder_seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


CONTEXT_CHECK_MARGINS = (0.0, 1.0, 2.0, 4.0, 8.0, 30.0)


def context_check(dense, processor, data_dir: Path, rows: list[dict], preset: Preset, device, log) -> dict:
    """Zero-shot English transcription of the evaluation clips with the encoder states trimmed at several margins.

    chrF++ against the English source text: how much the trimmed context (`context_margin_s`) costs the untrained
    model, with 30 s being Whisper's own full window.
    """
    from sacrebleu.metrics import CHRF

    clips = list({row["source_id"]: row for row in rows}.values())
    outputs = {margin: [] for margin in CONTEXT_CHECK_MARGINS}
    with torch.no_grad():
        for row in clips:
            audio = read_wav(data_dir / row["audio"])
            features = processor.feature_extractor([audio], sampling_rate=SAMPLING_RATE, return_tensors="pt")
            states = dense.get_encoder()(features.input_features.to(device)).last_hidden_state
            for margin in CONTEXT_CHECK_MARGINS:
                frames = context_frames(len(audio), replace(preset, context_margin_s=margin))
                ids = dense.generate(
                    encoder_outputs=BaseModelOutput(last_hidden_state=states[:, :frames]),
                    language="en", task="transcribe", max_new_tokens=96,
                )
                outputs[margin].append(processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
    english = [row["en"] for row in clips]
    chrf = CHRF(word_order=2)
    result = {
        "clips": len(clips),
        "chrf_vs_source_by_margin_s": {
            str(margin): chrf.corpus_score(outputs[margin], [english]).score for margin in CONTEXT_CHECK_MARGINS
        },
        "preset_margin_s": preset.context_margin_s,
        "samples": [
            {"en": en, **{str(margin): outputs[margin][i] for margin in CONTEXT_CHECK_MARGINS}}
            for i, en in enumerate(english[:5])
        ],
    }
    log(f"context check (English chrF++ by margin): {result['chrf_vs_source_by_margin_s']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-xx-en")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "covost_mini")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<preset>")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    parser.add_argument("--learning-rate", type=float, default=None, help="override the preset's learning rate")
    parser.add_argument(
        "--context-margin", type=float, default=None,
        help="seconds of encoder states kept after each clip (presets: 4 on CPU, 30 = Whisper's full window)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--eval-split", choices=("test", "dev"), default="test")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--reuse", type=Path, action="append", default=[],
        help="results folder to take finished runs with the same spec from (repeatable)",
    )
    parser.add_argument(
        "--context-check", action="store_true",
        help="also transcribe the evaluation clips in English with the encoder states trimmed at several margins",
    )
    parser.add_argument("--test-pairs", type=Path, default=None,
                        help="also score the trained models on this pairs file (the builder's row format; its speech "
                        "is synthesised with espeak-ng)")  # fmt: skip
    parser.add_argument("--keep-models", action="store_true", help="save every trained model under OUT/models/")
    parser.add_argument("--select-lr", default=None,
                        help="comma-separated learning rates: pick each method's on dev (seed 0), write "
                        "OUT/lr-selection.json, then run the preset with them")  # fmt: skip
    parser.add_argument("--learning-rates", type=Path, default=None,
                        help="an lr-selection.json: use its chosen per-method learning rates")
    parser.add_argument("--langs", default=None, help="comma-separated subset of the data's languages")
    parser.add_argument("--stage1-fraction", type=float, default=None)
    parser.add_argument("--stage1-lr-multiplier", type=float, default=None)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if args.methods:
        unknown = [name for name in args.methods.split(",") if name not in METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        preset = replace(preset, methods=tuple(args.methods.split(",")))
    if args.seeds:
        preset = replace(preset, seeds=tuple(int(seed) for seed in args.seeds.split(",")))
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    if args.learning_rate is not None:
        preset = replace(preset, learning_rate=args.learning_rate)
    if args.context_margin is not None:
        preset = replace(preset, context_margin_s=args.context_margin)
    if args.langs:
        preset = replace(preset, langs=tuple(sorted(lang for lang in args.langs.split(",") if lang.strip())))
    if args.stage1_fraction is not None:
        preset = replace(preset, stage1_fraction=args.stage1_fraction)
    if args.stage1_lr_multiplier is not None:
        preset = replace(preset, stage1_lr_multiplier=args.stage1_lr_multiplier)
    out = args.out or ROOT / "benchmarks" / "results" / preset.name
    device = torch.device(args.device)
    if args.select_lr:
        grid = [float(value) for value in args.select_lr.split(",")]
        chosen = select_learning_rates(preset, grid, args.data, out / "lr-selection", device, args.cache)["chosen"]
        preset = replace(preset, learning_rates=tuple(sorted(chosen.items())))
    elif args.learning_rates:
        chosen = json.loads(args.learning_rates.read_text())["chosen"]
        preset = replace(preset, learning_rates=tuple(sorted(chosen.items())))
    run_benchmark(preset, args.data, out, device, args.cache, args.reuse, args.eval_split, args.context_check,
                  test_pairs=args.test_pairs, keep_models=args.keep_models)
    return 0


def run_benchmark(preset: Preset, data_dir: Path, out: Path, device=torch.device("cpu"), cache: Path = DEFAULT_CACHE,
                  reuse: list[Path] = (), eval_split: str = "test", check_context: bool = False,
                  log=lambda message: print(message, flush=True), test_pairs: Path | None = None,
                  keep_models: bool = False) -> dict:
    """Run every (method, seed) of `preset` that `out` does not hold yet; write the summary, tables and plots."""
    started = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    direction = data_direction(data_dir)
    train_rows = load_split(data_dir, "train", preset.max_train_sources)
    eval_rows = load_split(data_dir, eval_split, preset.max_eval_sources)
    dev_rows = load_split(data_dir, "dev", preset.max_eval_sources) if preset.eval_every else []
    if preset.langs is not None:
        missing = sorted(set(preset.langs) - {row["lang"] for row in train_rows})
        if missing:
            raise ValueError(f"--langs names {missing}, which {data_dir} has no training pairs of")
        train_rows, eval_rows, dev_rows = ([row for row in rows if row["lang"] in preset.langs]
                                           for rows in (train_rows, eval_rows, dev_rows))  # fmt: skip
    extra_rows, extra_dir = [], None
    if test_pairs is not None:
        extra_dir = cache / f"test-pairs-{fingerprint(Path(test_pairs).read_bytes(), direction)}"
        if not (extra_dir / "test.jsonl").is_file():
            builder.synthesise_pairs(test_pairs, extra_dir, direction=direction)
        extra_rows = load_split(extra_dir, "test")
    langs = sorted({row["lang"] for row in eval_rows})
    log(f"[{preset.name}] {direction}: {len(train_rows)} training pairs, {len(eval_rows)} {eval_split} pairs, "
        f"languages {langs}")

    all_rows = train_rows + eval_rows + dev_rows
    dense, processor, model_id = load_dense(preset, sorted({row["lang"] for row in all_rows + extra_rows}), cache)
    dense = dense.to(device)
    tokenizer = processor.tokenizer
    for lang in langs:
        language_token_id(tokenizer, lang)
    clock = time.perf_counter()
    data_id = data_fingerprint(data_dir)
    frames = shared_context_frames(data_dir, all_rows, preset)
    if extra_rows:
        frames = max(frames, shared_context_frames(extra_dir, extra_rows, preset))
    states_dir = cache / f"encoder-states-{fingerprint(model_id)}"
    states = encoder_states(dense, processor, data_dir, all_rows, frames, states_dir, device, log)
    if extra_rows:
        extra_states = encoder_states(dense, processor, extra_dir, extra_rows, frames, states_dir, device, log)
        states.update({f"pairs:{name}": state for name, state in extra_states.items()})
        extra_rows = [dict(row, audio=f"pairs:{row['audio']}") for row in extra_rows]
    encoder_seconds = time.perf_counter() - clock
    log(f"encoder states: {len(states)} clips, {frames} frames each, {encoder_seconds:.0f} s")
    vocabulary = None
    if preset.restrict_vocab:
        texts = [row["target"] for row in all_rows + extra_rows]
        dense, vocabulary = restrict_vocabulary(dense, tokenizer, texts, sorted({r["lang"] for r in all_rows + extra_rows}))
        dense = dense.to(device)
        model_id = f"{model_id}:vocab{fingerprint(vocabulary.kept)}"
        log(f"output vocabulary restricted to {len(vocabulary.kept)} tokens (target side + prompt specials)")

    def examples(rows):
        return make_examples(rows, tokenizer, preset, direction, vocabulary)

    train_examples = examples(train_rows)
    eval_examples = examples(eval_rows)
    lengths = defaultdict(list)
    for example in train_examples:
        lengths[example.lang].append(len(example.labels) - 3)
    all_langs = sorted({row["lang"] for row in eval_rows + extra_rows})
    max_new_tokens = {
        lang: (math.ceil(np.percentile(lengths[lang], preset.generation_percentile)) if lengths[lang]
               else preset.max_target_tokens) + preset.generation_slack
        for lang in all_langs
    }
    ctx = dict(preset=preset, device=device, dense=dense, tokenizer=tokenizer, states=states, direction=direction,
               train_examples=train_examples, eval_examples=eval_examples, max_new_tokens=max_new_tokens,
               dev_examples=examples(dev_rows), extra_examples=examples(extra_rows), keep_models=keep_models,
               out=out, vocabulary=vocabulary)  # fmt: skip

    results = []
    for method_name in preset.methods:
        method = METHODS[method_name]
        for seed in preset.seeds if method.train else preset.seeds[:1]:
            seed = seed if method.train else 0
            spec = run_spec(method, seed, preset, model_id, data_id, eval_split)
            if test_pairs is not None:
                spec["test_pairs"] = fingerprint(Path(test_pairs).read_bytes())
            path = out / "runs" / f"{method.name}-seed{seed}.json"
            result = find_finished(spec, path, [Path(folder) for folder in reuse])
            if result is not None:
                log(f"{method.name} seed {seed}: finished before, chrF++ {result['metrics']['chrf']:.2f}")
                if not path.is_file() or json.loads(path.read_text()).get("spec") != spec:
                    write_json(path, result)
            else:
                log(f"{method.name} seed {seed}: {method.description or method.settings}")
                clock = time.perf_counter()
                result = run_one(method, seed, ctx, log) | {"spec": spec}
                result["timings"]["total_s"] = time.perf_counter() - clock
                write_json(path, result)
                log(f"    chrF++ {result['metrics']['chrf']:.2f} BLEU {result['metrics']['bleu']:.2f} "
                    f"CE {result['metrics'].get('cross_entropy', float('nan')):.3f} ({result['timings']['total_s']:.0f} s)")
            if result["routing"]:
                plot_routing(result, out / "plots" / f"routing-{method.name}-seed{seed}.png")
            results.append(result)

    summary = {
        "preset": preset.name,
        "direction": direction,
        "model": model_id,
        "budget": {key: value for key, value in asdict(preset).items() if key not in ("name", "methods", "seeds")},
        "seeds": list(preset.seeds),
        "eval_split": eval_split,
        "languages": langs,
        "bleu_tokenize": {lang: bleu_tokenizer(lang) for lang in langs},
        "max_new_tokens": max_new_tokens,
        "data": {
            "path": str(data_dir),
            "fingerprint": data_id,
            "train_pairs": len(train_rows),
            "eval_pairs": len(eval_rows),
            "context_frames": frames,
            "test_pairs_file": str(test_pairs) if test_pairs else None,
        },
        "environment": {
            "device": str(device) if device.type != "cpu"
            else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "spri_hf": spri_hf.__version__,
            "sacrebleu": __import__("sacrebleu").__version__,
        },
        "methods": summarise(results, all_langs if extra_rows else langs),
        "paired": paired_differences(results),
        "encoder_seconds": encoder_seconds,
    }
    if check_context:
        summary["context_check"] = context_check(dense, processor, data_dir, eval_rows, preset, device, log)
    summary["wall_seconds"] = time.perf_counter() - started
    plot_summary(summary, out / "plots")
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    log(f"wrote {out / 'summary.md'} ({summary['wall_seconds'] / 60:.1f} min)")
    return summary


def select_learning_rates(preset: Preset, grid: list[float], data_dir: Path, out: Path, device, cache: Path,
                          log=print) -> dict:
    """Seed 0 of every trained method at every rate of `grid` on the dev split; the best chrF++ per method."""
    choice, table = {}, {}
    for lr in grid:
        trial = replace(preset, name=f"{preset.name}-lr{lr:g}", learning_rate=lr, learning_rates=(), seeds=(0,),
                        methods=tuple(name for name in preset.methods if METHODS[name].train))  # fmt: skip
        summary = run_benchmark(trial, data_dir, out / f"lr{lr:g}", device, cache, eval_split="dev", log=log)
        for name, row in summary["methods"].items():
            table.setdefault(name, {})[f"{lr:g}"] = row["chrf"]["mean"]
    for name, scores in table.items():
        choice[name] = float(max(scores, key=scores.get))
    result = {"grid": grid, "dev_chrf": table, "chosen": choice}
    write_json(out / "lr-selection.json", result)
    log(f"learning rates chosen on dev: {choice}")
    return result


if __name__ == "__main__":
    sys.exit(main())
