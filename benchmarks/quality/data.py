"""The benchmark data: splits, audio, shared context length, encoder states (cached per clip), examples."""

import hashlib
import json
import math
import os
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from .common import FRAMES_PER_SECOND, MAX_FRAMES, SAMPLING_RATE, WHISPER_LANGUAGE
from .methods import Preset


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


def note_context_frames(data_dir: Path, rows: list[dict], preset: Preset) -> int:
    """Writes each row's own context need (`frames`: its clip + the margin) into it; returns the largest, the length
    the encoder states are cached at. Batches then cut the states to their longest clip (`stack_states`)."""
    for row in rows:
        row["frames"] = context_frames(wav_samples(data_dir / row["audio"]), preset)
    return max((row["frames"] for row in rows), default=0)


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


def _claim(cached: Path) -> bool:
    """Claims the computation of one clip's states for this process (a `.claim` file created exclusively); a claim
    left by a process that is gone is taken over. Two benchmark processes started together (one per core) then
    compute disjoint halves of a new cache instead of the same clips twice."""
    claim = cached.with_suffix(".claim")
    for _ in range(2):
        try:
            handle = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(claim.read_text() or 0)
            except (OSError, ValueError):
                return False  # being written this instant: its owner is alive
            if owner == os.getpid():
                return True
            try:
                os.kill(owner, 0)
                return False  # its owner is alive and computing it
            except ProcessLookupError:
                claim.unlink(missing_ok=True)  # stale: its owner died; take it over
                continue
            except PermissionError:
                return False
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        return True
    return False


@torch.no_grad()
def encoder_states(dense, processor, data_dir: Path, rows: list[dict], frames: int, cache_dir: Path, device,
                   log=print, batch_size: int = 8, poll_s: float = 2.0) -> dict[str, torch.Tensor]:
    """float16 encoder states (`frames` x d_model) of every clip (keyed by its audio file), cached on disk.

    The cache holds one file per clip, named by the SHA-256 of its wav bytes, in a folder per encoder: a rebuilt or
    grown dataset reuses every clip it shares with an earlier one, and a killed run keeps what it computed. A cached
    state at least `frames` long serves any shorter context. Processes sharing the cache split the clips to compute
    between them (`_claim`): each computes the clips it claimed and then waits for, or takes over, the others'.
    """
    clips = {row["audio"]: data_dir / row["audio"] for row in rows}
    cache_dir.mkdir(parents=True, exist_ok=True)
    out, todo = {}, []

    def load(name, cached):
        state = torch.load(cached) if cached.is_file() else None
        if state is not None and state.shape[0] >= frames:
            out[name] = state[:frames]
            return True
        return False

    for name, path in clips.items():
        cached = cache_dir / f"{hashlib.sha256(path.read_bytes()).hexdigest()}.pt"
        if not load(name, cached):
            todo.append((name, cached))
    if todo:
        log(f"    encoder states: {len(out)} cached, {len(todo)} to compute")
    encoder = dense.get_encoder().to(device).eval()
    computed = 0
    while todo:
        waiting, batch = [], []
        for name, cached in todo:
            if len(batch) < batch_size and _claim(cached):
                if load(name, cached):  # finished by another process just before this claim
                    cached.with_suffix(".claim").unlink(missing_ok=True)
                else:
                    batch.append((name, cached))
            else:
                waiting.append((name, cached))
        if batch:
            audio = [read_wav(clips[name]) for name, _ in batch]
            features = processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE,
                                                   return_tensors="pt").input_features  # fmt: skip
            states = encoder(features.to(device=device, dtype=dense.dtype)).last_hidden_state
            for (name, cached), state in zip(batch, states):
                out[name] = state[:frames].to("cpu", torch.float16).clone()
                partial = cached.with_suffix(f".tmp-{os.getpid()}")
                torch.save(out[name], partial)
                os.replace(partial, cached)
                cached.with_suffix(".claim").unlink(missing_ok=True)
            computed += len(batch)
            if computed // 80 != (computed - len(batch)) // 80:
                log(f"    encoder states: {computed} computed here, {len(waiting)} left")
        # what another process claimed: taken from the cache once it is there
        todo = [(name, cached) for name, cached in waiting if not load(name, cached)]
        if todo and not batch:
            time.sleep(poll_s)
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
    frames: int | None = None  # encoder states this clip needs (its length + the margin); None: all that are cached
    task: str | None = None  # two-task data: Whisper's task of this row ("transcribe" or "translate")

    @property
    def group(self) -> str:
        """What metrics, batches and generation lengths are kept apart by: the language, and the task if any."""
        return group_of(self.lang, self.task)

    @property
    def target_language(self) -> str:
        """The language the decoder writes: English when translating XX speech, else the row's language."""
        return "en" if self.task == "translate" else self.lang


def group_of(lang: str, task: str | None) -> str:
    return f"{lang}-{task}" if task else lang


def make_examples(rows: list[dict], tokenizer, preset: Preset, direction: str,
                  vocabulary: "Vocabulary | None" = None) -> list[Example]:
    """Decoder inputs `<sot> <|xx|> <|task|> <|notimestamps|> target` and labels `-100 x3, target, <eot>`.

    en-xx: `<|xx|>` is the target language with the transcribe task (Whisper's "translate" means X->English);
    xx-en: `<|xx|>` is the spoken language with Whisper's native translate task; two-task data (rows with a `task`):
    the spoken language with the row's task.
    """
    sot, no_timestamps, eot = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>"])
    examples = []
    for row in rows:
        task = row.get("task") or ("translate" if direction == "xx-en" else "transcribe")
        task_id = tokenizer.convert_tokens_to_ids(f"<|{task}|>")
        language = language_token_id(tokenizer, row["lang"])
        target = tokenizer(row["target"], add_special_tokens=False).input_ids[: preset.max_target_tokens - 1]
        prompt = [sot, language, task_id, no_timestamps]
        spoken = row.get("source_text") or row["en"]
        inputs, labels = prompt + target, target + [eot]
        if vocabulary is not None:
            inputs, labels = vocabulary.encode(inputs), vocabulary.encode(labels)
        examples.append(Example(row["lang"], row["source_id"], row["audio"], inputs, [-100] * 3 + labels,
                                row["target"], spoken, row.get("frames"), row.get("task")))  # fmt: skip
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
    encoder = stack_states(examples, states, device, dtype)
    batch = {"encoder_outputs": BaseModelOutput(last_hidden_state=encoder), "decoder_input_ids": decoder_input_ids,
             "labels": labels}  # fmt: skip
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def stack_states(examples: list[Example], states: dict[str, torch.Tensor], device=None, dtype=torch.float32):
    """The encoder states of a batch, cut to what its longest clip needs (`Example.frames`).

    Every clip's cached states run past its end (the states of its trailing silence), so the shorter clips of a batch
    keep at least their own length + margin and no frame is padding; cutting per batch instead of at the longest clip
    of the data roughly halves the cross-attention work of the CPU presets.
    """
    needed = [example.frames for example in examples]
    frames = None if None in needed else max(needed)
    return torch.stack([states[example.audio][:frames] for example in examples]).to(device=device, dtype=dtype)


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


@dataclass
class Vocabulary:
    """The token ids a restricted model keeps: `kept[new] = old`; `to_new[old] = new`."""

    kept: list[int]
    to_new: dict[int, int]

    def encode(self, ids: list[int]) -> list[int]:
        return [self.to_new[i] for i in ids]

    def decode(self, ids) -> list[int]:
        return [self.kept[i] for i in ids]
