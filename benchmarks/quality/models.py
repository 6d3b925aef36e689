"""The models: the real Whisper base or a tiny random one, the restricted output vocabulary, freezing."""

import copy
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

import spri_hf
from spri_hf import SpriForSpeechSeq2Seq

from .data import Vocabulary, fingerprint, whisper_language
from .methods import Method, Preset


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
    """The real Whisper base, converted once from the packaged CTranslate2 weights (benchmarks/real_models.py)."""
    from .. import real_models

    folder = Path(real_models.whisper_base_folder(cache / "whisper-base-hf"))
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    marker = (folder / real_models.DONE_MARKER).read_text()
    return model, WhisperProcessor.from_pretrained(folder), f"whisper-base:{fingerprint(marker)}"


def whisper_specials(tokenizer, langs: list[str]) -> list[int]:
    """The special tokens a prompt of these languages and either task needs, and Whisper's control tokens."""
    names = ["<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
             "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"] + [f"<|{whisper_language(lang)}|>" for lang in ["en", *langs]]
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
    granularity = method.settings.get("expert_granularity", 1)  # fine-grained: the same active width as G = 1
    return SpriForSpeechSeq2Seq.from_dense(
        dense,
        upcycle="decoder",
        num_experts=preset.num_experts * granularity,
        num_experts_per_tok=preset.num_experts_per_tok * granularity,
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
