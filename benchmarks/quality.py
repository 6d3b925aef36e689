#!/usr/bin/env python
"""Quality benchmark: SPRI against dense fine-tuning and the upcycling baselines on En->XX speech translation.

Whisper (the real Whisper base, or a tiny random one for the test suite) is fine-tuned on the CoVoST2-shaped set that
`python -m benchmarks.data.build` writes, with the same budget for every method (steps, batch, learning-rate
schedule, data order and seed), then scored with sacrebleu (BLEU, chrF++) per target language. Routing diagnostics
(per-language expert load per layer, pairwise expert distance before and after training, load-balance statistics)
are written as JSON and PNG.

    python benchmarks/quality.py --preset cpu-small --data benchmarks/data/covost_mini \
        --out benchmarks/results/cpu-small
    python benchmarks/quality.py --preset cpu-small-seeds --data benchmarks/data/covost_mini \
        --out benchmarks/results/cpu-small-seeds --reuse benchmarks/results/cpu-small

Options: `--methods a,b` and `--seeds 0,1,2` override the preset; `--device cuda`; `--eval-split dev` (for tuning);
`--cache DIR` (encoder states and the converted Whisper folder, default ~/.cache/spri_hf/quality);
`--context-check` (English transcription with the trimmed vs the full 30 s encoder context).

Presets:
    tiny             tiny random Whisper (byte-level tokenizer), a couple of steps, every method (the test suite).
    cpu-small        real Whisper base, every method and ablation, seed 0 (about an hour on 2 CPU cores).
    cpu-small-seeds  dense, copy, noise, drop, spri and spri-stage2only with seeds 0, 1, 2.
    gpu              more steps, a larger batch, trainable embeddings and Whisper's full 30 s encoder context for an
                     accelerator (`--device cuda`; written for one, not run here).

Design (the same for every method; see docs/RESULTS.md):
- The encoder is frozen and run once per clip; its states are cached in float16. The decoder cross-attends to the
  first `context` frames: the clip plus at least `context_margin_s` seconds of the trailing silence, rounded up to
  `context_bucket` frames (Whisper's encoder always sees the 30 s window; only the states kept for the decoder are
  trimmed). Batches are made of clips with the same context length, so no padding frames are ever attended.
- Decoder prompt `<|startoftranscript|><|xx|><|transcribe|><|notimestamps|>`: Whisper's own "translate" task means
  X->English, so En->XX uses the target-language token with the transcribe task. Prompt positions carry no loss.
- Dense: every decoder parameter trains (embeddings too when `train_embeddings`). MoE methods: decoder FFNs
  upcycled (`upcycle="decoder"`); `spri` trains stage 1 (routers + residual factors) for `stage1_fraction` of the
  steps, then `set_stage(2)` and the rest; the other inits and `spri-stage2only` train stage 2 throughout. One
  warmup + linear-decay schedule spans all steps; a new AdamW starts at the stage switch (new parameters).
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
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.modeling_outputs import BaseModelOutput  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import spri_hf  # noqa: E402
from spri_hf import SpriForSpeechSeq2Seq  # noqa: E402
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
        Method("dense", None, description="dense full fine-tuning of the decoder"),
        Method("copy", {"init": "copy"}, description="sparse upcycling: every expert a copy"),
        Method("noise", {"init": "noise"}, description="copy + 1% relative Gaussian noise"),
        Method("drop", {"init": "drop"}, description="Drop-Upcycling, 50% of neurons re-initialised"),
        Method("random", {"init": "random"}, description="experts from scratch"),
        Method("spri", {"init": "spri"}, description="SPRI, spri_hf defaults, two stages"),
    ]
    for diversity in (0.05, 0.2, 0.5):
        settings = {"init": "spri", "spri_mode": "balanced", "diversity": diversity}
        rows.append(Method(f"spri-div{diversity:g}", settings))
    rows.append(Method("spri-partition", {"init": "spri", "spri_mode": "partition", "residual_scale": 1.0}))
    for ratio in (0.25, 0.75, 0.9):
        rows.append(Method(f"spri-pr{ratio:g}", {"init": "spri", "principal_ratio": ratio}))
    rows.append(Method("spri-contiguous", {"init": "spri", "partition": "contiguous"}))
    rows.append(Method("spri-stage2only", {"init": "spri", "stage": 2}, description="SPRI init, stage 2 throughout"))
    return {method.name: method for method in rows}


METHODS = _methods()
MAIN_METHODS = ("dense-untrained", "dense", "copy", "noise", "drop", "random", "spri")
# the comparison repeated over seeds: the references, the upcycling baselines that are not far behind in cpu-small
# (random is), spri with spri_hf's defaults and its best single-setting variant in cpu-small (stage 2 only)
SEEDS_METHODS = ("dense-untrained", "dense", "copy", "noise", "drop", "spri", "spri-stage2only")
# rows of the main table and of the per-language plot
HEADLINE_METHODS = tuple(dict.fromkeys(MAIN_METHODS + SEEDS_METHODS))
# ablation tables: which runs differ in one setting from the default `spri`
ABLATIONS = {
    "diversity (spri_mode balanced)": ("spri-div0.05", "spri", "spri-div0.2", "spri-div0.5"),
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
    learning_rate: float = 3e-4  # chosen on the dev split for dense fine-tuning (1e-4, 3e-4, 1e-3 tried)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    stage1_fraction: float = 0.5
    train_embeddings: bool = False  # token embeddings (tied with the output projection)
    num_experts: int = 8
    num_experts_per_tok: int = 2
    max_target_tokens: int = 128
    max_train_sources: int | None = None
    max_eval_sources: int | None = None
    eval_batch_size: int = 32
    # max_new_tokens per language: this percentile of its training targets' lengths (in tokens, with <eot>) + slack
    generation_percentile: float = 99.0
    generation_slack: int = 4
    # seconds of encoder states kept after each clip: zero-shot English transcription of the test clips loses 12
    # chrF++ with 1 s, none with 4 s (docs/RESULTS.md); 30 s is Whisper's own full window
    context_margin_s: float = 4.0
    context_bucket: int = 50
    amp: bool = False  # bfloat16 autocast (accelerators)


ALL_METHODS = tuple(METHODS)
PRESETS = {
    "tiny": Preset(
        "tiny", "tiny", ALL_METHODS, steps=2, batch_size=4, learning_rate=1e-3, num_experts=4,
        max_target_tokens=16, eval_batch_size=8, generation_slack=0,
    ),
    "cpu-small": Preset("cpu-small", "whisper-base", ALL_METHODS, max_eval_sources=30),
    "cpu-small-seeds": Preset("cpu-small-seeds", "whisper-base", SEEDS_METHODS, seeds=(0, 1, 2), max_eval_sources=30),
    "gpu": Preset(
        "gpu", "whisper-base", ALL_METHODS, seeds=(0, 1, 2), steps=600, batch_size=32, learning_rate=1e-4,
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


def fingerprint(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def data_fingerprint(data_dir: Path) -> str:
    return fingerprint(*[(data_dir / f"{split}.jsonl").read_bytes() for split in ("train", "dev", "test")])


@torch.no_grad()
def encoder_states(dense, processor, data_dir: Path, rows: list[dict], preset: Preset, cache_file: Path, device,
                   log=print, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """float16 encoder states (context frames x d_model) of every clip, computed once and cached on disk."""
    cached = torch.load(cache_file) if cache_file.is_file() else {}
    clips = {row["source_id"]: data_dir / row["audio"] for row in rows}
    todo = [source for source in clips if source not in cached]
    encoder = dense.get_encoder().to(device).eval()
    for start in range(0, len(todo), batch_size):
        sources = todo[start : start + batch_size]
        audio = [read_wav(clips[source]) for source in sources]
        features = processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
        states = encoder(features.to(device=device, dtype=dense.dtype)).last_hidden_state
        for source, clip, state in zip(sources, audio, states):
            cached[source] = state[: context_frames(len(clip), preset)].to("cpu", torch.float16).clone()
        if (start // batch_size) % 10 == 9:
            log(f"    encoder states {start + len(sources)}/{len(todo)}")
    if todo:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".tmp-{os.getpid()}")
        torch.save(cached, partial)
        os.replace(partial, cache_file)
    return {source: cached[source] for source in clips}


@dataclass
class Example:
    lang: str
    source_id: str
    decoder_input_ids: list[int]
    labels: list[int]
    reference: str


def make_examples(rows: list[dict], tokenizer, preset: Preset) -> list[Example]:
    """Decoder inputs `<sot> <|xx|> <|transcribe|> <|notimestamps|> target` and labels `-100 x3, target, <eot>`."""
    sot, transcribe, no_timestamps, eot = tokenizer.convert_tokens_to_ids(
        ["<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>", "<|endoftext|>"]
    )
    examples = []
    for row in rows:
        language = language_token_id(tokenizer, row["lang"])
        target = tokenizer(row["target"], add_special_tokens=False).input_ids[: preset.max_target_tokens - 1]
        prompt = [sot, language, transcribe, no_timestamps]
        examples.append(
            Example(row["lang"], row["source_id"], prompt + target, [-100] * 3 + target + [eot], row["target"])
        )
    return examples


def language_token_id(tokenizer, lang: str) -> int:
    token = f"<|{whisper_language(lang)}|>"
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
        raise ValueError(f"Whisper has no language token {token} for target language {lang!r}")
    return token_id


def collate(examples: list[Example], states: dict[str, torch.Tensor], pad_id: int, device, dtype) -> dict:
    length = max(len(example.labels) for example in examples)
    decoder_input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        decoder_input_ids[row, : len(example.decoder_input_ids)] = torch.tensor(example.decoder_input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    encoder = torch.stack([states[example.source_id] for example in examples]).to(device=device, dtype=dtype)
    return {
        "encoder_outputs": BaseModelOutput(last_hidden_state=encoder),
        "decoder_input_ids": decoder_input_ids.to(device),
        "labels": labels.to(device),
    }


def training_batches(examples: list[Example], states: dict, preset: Preset, seed: int):
    """Endless seeded stream of batches; each batch holds clips of one context length (no padded frames)."""
    generator = torch.Generator().manual_seed(seed)
    buckets = defaultdict(list)
    for example in examples:
        buckets[states[example.source_id].shape[0]].append(example)
    while True:
        batches = []
        for frames in sorted(buckets):
            bucket = buckets[frames]
            order = torch.randperm(len(bucket), generator=generator).tolist()
            for start in range(0, len(order), preset.batch_size):
                batches.append([bucket[i] for i in order[start : start + preset.batch_size]])
        for index in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[index]


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


def load_dense(preset: Preset, langs: list[str], cache: Path):
    if preset.model == "tiny":
        return tiny_whisper(langs)
    if preset.model == "whisper-base":
        return whisper_base(cache)
    raise ValueError(f"preset.model={preset.model!r}: use 'tiny' or 'whisper-base'")


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
        **method.settings,
    )


def set_trainable(model, preset: Preset):
    """Freeze what no method trains (the encoder; the tied embeddings unless `train_embeddings`); return the rest."""
    if isinstance(model, SpriForSpeechSeq2Seq):
        model.apply_stage_trainability()
    else:
        model.requires_grad_(True)
    model.get_encoder().requires_grad_(False)
    if not preset.train_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return [param for param in model.parameters() if param.requires_grad]


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


def learning_rate_factor(step: int, preset: Preset) -> float:
    """Linear warmup over `warmup_ratio` of the steps, then linear decay to zero, over all stages together."""
    warmup = max(1, round(preset.warmup_ratio * preset.steps))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (preset.steps - step) / max(1, preset.steps - warmup))


def make_optimizer(params, preset: Preset, device):
    # fused AdamW: the per-parameter loop of the default CPU implementation costs as much as a Whisper base step
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=preset.learning_rate, weight_decay=preset.weight_decay, fused=fused)


def train(model, method: Method, examples, states, preset: Preset, seed: int, device, log) -> list[dict]:
    stage1_steps = round(preset.stage1_fraction * preset.steps) if method.two_stage else 0
    batches = training_batches(examples, states, preset, seed)
    torch.manual_seed(seed)
    model.train()
    params = set_trainable(model, preset)
    optimizer = make_optimizer(params, preset, device)
    history = []
    for step in range(preset.steps):
        if step == stage1_steps and method.two_stage:
            model.set_stage(2)  # materialise W_i = S + B_i A_i; new parameters, new optimizer
            params = set_trainable(model, preset)
            optimizer = make_optimizer(params, preset, device)
        lr = preset.learning_rate * learning_rate_factor(step, preset)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = collate(next(batches), states, model.config.pad_token_id, device, torch.float32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.amp):
            outputs = model(**batch)
        outputs.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, preset.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        aux = outputs.get("aux_loss")
        row = {
            "step": step + 1,
            "stage": getattr(model.config, "stage", None),
            "lr": lr,
            "loss": outputs.loss.item(),
            "aux_loss": None if aux is None else aux.item(),
            "grad_norm": grad_norm.item(),
            "trainable_params": sum(p.numel() for p in params),
        }
        history.append(row)
        if step == 0 or (step + 1) % max(1, preset.steps // 8) == 0 or step + 1 == preset.steps:
            log(f"    step {step + 1}/{preset.steps} stage {row['stage']} loss {row['loss']:.3f} lr {lr:.2e}")
    model.eval()
    return history


def eval_batches(examples: list[Example], states: dict, batch_size: int):
    """Evaluation batches of one context length (languages mixed), in a fixed order."""
    groups = defaultdict(list)
    for index, example in enumerate(examples):
        groups[states[example.source_id].shape[0]].append(index)
    for frames in sorted(groups):
        indices = sorted(groups[frames], key=lambda i: (examples[i].lang, examples[i].source_id))
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


@torch.no_grad()
def greedy_decode(model, encoder_states: torch.Tensor, prompts: torch.Tensor, limits: list[int]) -> list[list[int]]:
    """Whisper's greedy decoding, with each sentence leaving the batch as soon as it is finished.

    The same search as `model.generate(..., num_beams=1)` with Whisper's generation config (`suppress_tokens` at
    every step, `begin_suppress_tokens` at the first one, stop at `<|endoftext|>` or after `limits[i]` new tokens),
    but finished sentences are dropped from the batch and its cache, so a batch costs the tokens it generates rather
    than batch size x its longest sentence (one looping hypothesis no longer holds up the rest). Returns the new
    tokens of every sentence without the end token.
    """
    config = model.generation_config
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    suppress = torch.tensor(config.suppress_tokens or [], dtype=torch.long)
    begin_suppress = torch.tensor(config.begin_suppress_tokens or [], dtype=torch.long)
    tokens = [[] for _ in range(len(prompts))]
    active = torch.arange(len(prompts))
    encoder = encoder_states
    input_ids, cache, first = prompts, None, True
    while len(active):
        outputs = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder), decoder_input_ids=input_ids, cache=cache,
            use_cache=True,
        )
        logits = outputs.logits[:, -1].float()
        logits[:, suppress.to(logits.device)] = -float("inf")
        if first:
            logits[:, begin_suppress.to(logits.device)] = -float("inf")
        next_tokens = logits.argmax(-1)
        cache, first = outputs.cache, False
        keep = []
        for row, (index, token) in enumerate(zip(active.tolist(), next_tokens.tolist())):
            if token == eos:
                continue
            tokens[index].append(token)
            if len(tokens[index]) < limits[index]:
                keep.append(row)
        if len(keep) < len(active):
            keep = torch.tensor(keep, dtype=torch.long, device=next_tokens.device)
            cache.batch_select_indices(keep)
            encoder, next_tokens, active = encoder[keep], next_tokens[keep], active[keep.cpu()]
        input_ids = next_tokens[:, None]
    return tokens


@torch.no_grad()
def translate(model, tokenizer, examples, states, preset: Preset, max_new_tokens: dict[str, int], device) -> list[str]:
    """Greedy translations (prompt `<sot> <|xx|> <|transcribe|> <|notimestamps|>`), special tokens removed."""
    hypotheses = [""] * len(examples)
    for indices in eval_batches(examples, states, preset.eval_batch_size):
        encoder = torch.stack([states[examples[i].source_id] for i in indices]).to(device=device, dtype=torch.float32)
        prompts = torch.tensor([examples[i].decoder_input_ids[:4] for i in indices], device=device)
        limits = [max_new_tokens[examples[i].lang] for i in indices]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.amp):
            generated = greedy_decode(model, encoder, prompts, limits)
        for i, sequence in zip(indices, generated):
            hypotheses[i] = tokenizer.decode(sequence, skip_special_tokens=True).strip()
    return hypotheses


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
    for indices in eval_batches(examples, states, preset.eval_batch_size):
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
    return {
        "method": method.name,
        "settings": method.settings,
        "train": method.train,
        "seed": seed if method.train or method.is_moe else 0,
        "budget": budget,
        "model": model_id,
        "data": data_id,
        "eval_split": eval_split,
    }


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


def run_one(method: Method, seed: int, ctx: dict, log) -> dict:
    preset, device = ctx["preset"], ctx["device"]
    timings = {}
    clock = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(method, ctx["dense"], preset, seed).to(device)
    timings["upcycle_s"] = time.perf_counter() - clock
    distance_before = pairwise_distances(model) if method.is_moe else None
    initial_settings = spri_settings(model)
    history = []
    if method.train:
        clock = time.perf_counter()
        history = train(model, method, ctx["train_examples"], ctx["states"], preset, seed, device, log)
        timings["train_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    hypotheses = translate(
        model, ctx["tokenizer"], ctx["eval_examples"], ctx["states"], preset, ctx["max_new_tokens"], device
    )
    timings["generate_s"] = time.perf_counter() - clock
    metrics = score(hypotheses, ctx["eval_examples"])
    routing = None
    if method.is_moe:
        clock = time.perf_counter()
        routing = routing_diagnostics(model, ctx["eval_examples"], ctx["states"], preset, device)
        routing["pairwise_distance_before"] = distance_before
        routing["pairwise_distance_after"] = pairwise_distances(model)
        timings["routing_s"] = time.perf_counter() - clock
    samples = {}
    for example, hypothesis in zip(ctx["eval_examples"], hypotheses):
        if example.lang not in samples:
            samples[example.lang] = {"reference": example.reference, "hypothesis": hypothesis}
    return {
        "method": method.name,
        "description": method.description,
        "seed": seed,
        "settings": initial_settings,
        "metrics": metrics,
        "routing": routing,
        "history": history,
        "timings": timings,
        "samples": samples,
        "hypotheses": hypotheses,
    }


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
        if runs[0]["history"]:
            curves = [[step["loss"] for step in run["history"]] for run in runs]
            row["loss_curve"] = [statistics.fmean(losses) for losses in zip(*curves)]
            row["trainable_params_last_step"] = runs[0]["history"][-1]["trainable_params"]
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
        return "dense"
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
    reference = methods.get("dense")
    header = "| method | settings | BLEU | chrF++ | ΔBLEU vs dense | train s | generate s |"
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
        header,
        "|---|---|---|---|---|---|---|",
    ]

    def row_line(name):
        row = methods[name]
        delta = ""
        if reference is not None and name != "dense":
            delta = f"{row['bleu']['mean'] - reference['bleu']['mean']:+.2f}"
        timings = row["timings"]
        return (
            f"| {name} | {_setting_label(name, row)} | {_cell(row['bleu'])} | {_cell(row['chrf'])} | {delta} | "
            f"{timings['train_s']:.0f} | {timings['generate_s']:.0f} |"
        )

    lines += [row_line(name) for name in HEADLINE_METHODS if name in methods]
    for title, names in ABLATIONS.items():
        names = [name for name in names if name in methods]
        if len(names) < 2:
            continue
        lines += ["", f"## Ablation: {title}", "", header, "|---|---|---|---|---|---|---|"]
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
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
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
    out = args.out or ROOT / "benchmarks" / "results" / preset.name
    run_benchmark(preset, args.data, out, torch.device(args.device), args.cache, args.reuse, args.eval_split,
                  args.context_check)
    return 0


def run_benchmark(preset: Preset, data_dir: Path, out: Path, device=torch.device("cpu"), cache: Path = DEFAULT_CACHE,
                  reuse: list[Path] = (), eval_split: str = "test", check_context: bool = False,
                  log=lambda message: print(message, flush=True)) -> dict:
    """Run every (method, seed) of `preset` that `out` does not hold yet; write the summary, tables and plots."""
    started = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    train_rows = load_split(data_dir, "train", preset.max_train_sources)
    eval_rows = load_split(data_dir, eval_split, preset.max_eval_sources)
    langs = sorted({row["lang"] for row in eval_rows})
    log(f"[{preset.name}] {len(train_rows)} training pairs, {len(eval_rows)} {eval_split} pairs, languages {langs}")

    dense, processor, model_id = load_dense(preset, sorted({row["lang"] for row in train_rows + eval_rows}), cache)
    dense = dense.to(device)
    tokenizer = processor.tokenizer
    for lang in langs:
        language_token_id(tokenizer, lang)
    clock = time.perf_counter()
    data_id = data_fingerprint(data_dir)
    key = fingerprint(model_id, preset.context_margin_s, preset.context_bucket, str(data_dir.resolve()), data_id)
    cache_file = cache / f"encoder-{key}.pt"
    states = encoder_states(dense, processor, data_dir, train_rows + eval_rows, preset, cache_file, device, log)
    encoder_seconds = time.perf_counter() - clock
    frames = [state.shape[0] for state in states.values()]
    log(f"encoder states: {len(states)} clips, context {min(frames)}-{max(frames)} frames "
        f"(mean {statistics.fmean(frames):.0f}), {encoder_seconds:.0f} s")

    train_examples = make_examples(train_rows, tokenizer, preset)
    eval_examples = make_examples(eval_rows, tokenizer, preset)
    lengths = defaultdict(list)
    for example in train_examples:
        lengths[example.lang].append(len(example.labels) - 3)
    max_new_tokens = {
        lang: (math.ceil(np.percentile(lengths[lang], preset.generation_percentile)) if lengths[lang]
               else preset.max_target_tokens) + preset.generation_slack
        for lang in langs
    }
    ctx = dict(preset=preset, device=device, dense=dense, tokenizer=tokenizer, states=states,
               train_examples=train_examples, eval_examples=eval_examples, max_new_tokens=max_new_tokens)

    results = []
    for method_name in preset.methods:
        method = METHODS[method_name]
        for seed in preset.seeds if method.train else preset.seeds[:1]:
            seed = seed if method.train else 0
            spec = run_spec(method, seed, preset, model_id, data_id, eval_split)
            path = out / "runs" / f"{method.name}-seed{seed}.json"
            result = find_finished(spec, path, [Path(folder) for folder in reuse])
            if result is not None:
                log(f"{method.name} seed {seed}: finished before, BLEU {result['metrics']['bleu']:.2f}")
                if not path.is_file() or json.loads(path.read_text()).get("spec") != spec:
                    write_json(path, result)
            else:
                log(f"{method.name} seed {seed}: {method.description or method.settings}")
                clock = time.perf_counter()
                result = run_one(method, seed, ctx, log) | {"spec": spec}
                result["timings"]["total_s"] = time.perf_counter() - clock
                write_json(path, result)
                log(f"    BLEU {result['metrics']['bleu']:.2f} chrF++ {result['metrics']['chrf']:.2f} "
                    f"({result['timings']['total_s']:.0f} s)")
            if result["routing"]:
                plot_routing(result, out / "plots" / f"routing-{method.name}-seed{seed}.png")
            results.append(result)

    summary = {
        "preset": preset.name,
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
            "context_frames": {"min": min(frames), "max": max(frames), "mean": statistics.fmean(frames)},
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
        "methods": summarise(results, langs),
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


if __name__ == "__main__":
    sys.exit(main())
