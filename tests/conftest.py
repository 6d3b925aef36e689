"""Shared by the whole suite: tiny random models and configs, datasets, helpers and fixtures. Test modules import
from here (`from conftest import ...`), never from one another (tests/test_suite_structure.py checks)."""

import importlib.util
import os
import re


# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One intra-op thread, here and in every process a test starts, unless OMP_NUM_THREADS says otherwise: the models are
# tiny, so a second thread only adds synchronisation, and on a shared CPU OpenMP's threads spin waiting for one
# another (measured on 2 busy cores: ten tiny `generate` tests took 187 s with two threads and 4 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging  # noqa: E402

import spri_hf  # noqa: E402, F401  (registers the auto classes)
from benchmarks import real_models  # noqa: E402  (the slow tier's offline real-model loaders, shared with the benchmarks)
from spri_hf import SpriForSeq2SeqLM, SpriForSequenceClassification, SpriForSpeechSeq2Seq  # noqa: E402


if os.environ["OMP_NUM_THREADS"].isdigit():  # torch may have been imported (by a plugin) before the variable was set
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
logging.set_verbosity_error()
logging.disable_progress_bar()

VOCAB = 97

# Tiny random configs, one per supported family: gated/plain MLPs, with and without biases.
TINY_CONFIGS = {
    "llama": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
    "llama-bias": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, mlp_bias=True),
    "mistral": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "phi3": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4),
}
FAMILIES = list(TINY_CONFIGS)

# The wider family matrix (tests/test_families.py), one tiny config each (hidden 32, 2 layers): `TABLE_FAMILIES` have
# an entry in spri_hf/architectures.py, `DETECTED_FAMILIES` are upcycled through FFN detection
# (spri_hf/upcycling/detection.py).
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
TABLE_FAMILY_CONFIGS = {
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "cohere2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "ministral": _LLAMA_LIKE,
    "granite": dict(_LLAMA_LIKE, mlp_bias=True, residual_multiplier=0.5, embedding_multiplier=2.0),
    "smollm3": _LLAMA_LIKE,
    "helium": dict(_LLAMA_LIKE, mlp_bias=True),
    "seed_oss": _LLAMA_LIKE,
    "ernie4_5": dict(_LLAMA_LIKE, use_bias=True),
    "glm": _LLAMA_LIKE,  # fused gate_up_proj
    "nemotron": dict(_LLAMA_LIKE, mlp_bias=True),  # plain up/down, relu2
    "starcoder2": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2),
    "phi": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4),  # gelu_new
    "gptj": dict(n_embd=32, n_head=4, rotary_dim=4, n_positions=64, n_inner=48),
    "codegen": dict(n_embd=32, n_head=4, rotary_dim=4, n_positions=64, n_ctx=64, n_inner=48),
    "gpt_neo": dict(hidden_size=32, num_heads=4, attention_types=[[["global", "local"], 1]], intermediate_size=48,
                    max_position_embeddings=64, window_size=16),
    "falcon": dict(hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, bias=True),
    "opt": dict(hidden_size=32, ffn_dim=48, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64),
}
DETECTED_FAMILY_CONFIGS = {
    "olmo3": _LLAMA_LIKE,
    "exaone4": _LLAMA_LIKE,
    "glm4": _LLAMA_LIKE,  # fused gate_up_proj
    "arcee": dict(_LLAMA_LIKE, mlp_bias=True),  # plain up/down, relu2
    "gpt_bigcode": dict(n_embd=32, n_head=4, n_inner=48, n_positions=64),  # plain c_fc/c_proj with biases, Linear
}
TINY_CONFIGS.update({  # variants for export_native: what Mixtral / Qwen2-MoE can and cannot express
    "seed_oss-nobias": dict(_LLAMA_LIKE, attention_bias=False),
    "seed_oss-outbias": dict(_LLAMA_LIKE, attention_out_bias=True),
    "smollm3-nope": dict(_LLAMA_LIKE, no_rope_layers=[1, 0]),
    "ministral-mixed": dict(_LLAMA_LIKE, layer_types=["sliding_attention", "full_attention"]),
})
TINY_CONFIGS.update(TABLE_FAMILY_CONFIGS)
TINY_CONFIGS.update(DETECTED_FAMILY_CONFIGS)
TABLE_FAMILIES, DETECTED_FAMILIES = list(TABLE_FAMILY_CONFIGS), list(DETECTED_FAMILY_CONFIGS)


def tiny_config(family: str, vocab_size: int = VOCAB):
    model_type = family.split("-")[0]
    kwargs = dict(TINY_CONFIGS[family], vocab_size=vocab_size, num_hidden_layers=2)
    kwargs.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_dense(family: str, seed: int = 0, vocab_size: int = VOCAB):
    """A tiny random dense causal LM of `family`; `vocab_size` other than the default fits a real tokenizer to it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size))
    # random init leaves FFN matrices close to rank-deficient noise; a visible bias makes bias handling testable
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.05)
    return model.eval()


def assert_same_state(actual, expected):
    """The two models' state dicts have the same names, dtypes and bits."""
    a, b = actual.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def assert_reloaded_logits(actual, expected, rel=1e-6):
    """Logits of a reloaded model: its weights are bit-identical (checked separately), but a float32 product over
    differently aligned memory (mmap'd safetensors, another process) may round its last bits differently (seen up
    to 7e-7 on tiny configs). Compared relative to the logits' size, so a real difference (>= 1e-4) still fails."""
    torch.testing.assert_close(actual, expected, atol=rel * max(1.0, expected.abs().max().item()), rtol=0)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def input_ids():
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))


# ---- encoder-decoder (text and speech) and encoder-only families ----------------------------------------------------
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
_BART_LIKE = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=48, decoder_ffn_dim=40, vocab_size=VOCAB, max_position_embeddings=64, **_TOKENS,
)
_T5 = dict(d_model=32, d_ff=48, num_layers=2, num_heads=4, d_kv=8, vocab_size=VOCAB, **_TOKENS)
TINY_BERT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                 max_position_embeddings=64)
# family -> (config kwargs, dense auto class, Spri class)
SEQ2SEQ_FAMILIES = {
    "whisper": (
        dict(_BART_LIKE, num_mel_bins=8, max_source_positions=16, max_target_positions=32, begin_suppress_tokens=None,
             suppress_tokens=None),
        AutoModelForSpeechSeq2Seq, SpriForSpeechSeq2Seq,
    ),
    "speech_to_text": (
        dict(_BART_LIKE, input_feat_per_channel=8, max_source_positions=64, max_target_positions=32, conv_channels=16),
        AutoModelForSpeechSeq2Seq, SpriForSpeechSeq2Seq,
    ),
    "marian": (_BART_LIKE, AutoModelForSeq2SeqLM, SpriForSeq2SeqLM),
    "m2m_100": (_BART_LIKE, AutoModelForSeq2SeqLM, SpriForSeq2SeqLM),
    "mbart": (_BART_LIKE, AutoModelForSeq2SeqLM, SpriForSeq2SeqLM),
    "bart": (_BART_LIKE, AutoModelForSeq2SeqLM, SpriForSeq2SeqLM),
    "t5": (_T5, AutoModelForSeq2SeqLM, SpriForSeq2SeqLM),  # T5 v1.0: wi / wo
    "mt5": (_T5, AutoModelForSeq2SeqLM, SpriForSeq2SeqLM),  # gated: wi_0 / wi_1 / wo
    "bert": (dict(TINY_BERT, pad_token_id=0), AutoModelForSequenceClassification, SpriForSequenceClassification),
    "roberta": (dict(TINY_BERT, pad_token_id=1), AutoModelForSequenceClassification, SpriForSequenceClassification),
    "xlm-roberta": (
        dict(TINY_BERT, pad_token_id=1), AutoModelForSequenceClassification, SpriForSequenceClassification,
    ),
}


def tiny(family: str, auto_class=None, seed: int = 0):
    """A tiny random dense model of `family` (a key of SEQ2SEQ_FAMILIES) with visible biases (so bias handling is
    tested)."""
    kwargs, default_auto, _ = SEQ2SEQ_FAMILIES[family]
    torch.manual_seed(seed)
    model = (auto_class or default_auto).from_config(AutoConfig.for_model(family, **kwargs)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.05)
    return model


# ---- datasets -------------------------------------------------------------------------------------------------------
def progression_dataset(n=64, length=12, vocab=97):
    """A learnable task: arithmetic progressions with a random start."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        start = int(torch.randint(3, 20, (1,), generator=generator))
        seq = [3 + (start + 5 * j) % (vocab - 3) for j in range(length)]
        rows.append({"input_ids": seq, "labels": seq})
    return Dataset.from_list(rows)


def speech_dataset(n=16):
    """Four 'utterances' (fixed random log-mel features) with four fixed transcripts: learnable by a tiny Whisper."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 8, 32, generator=generator)
    transcripts = [[5 + 7 * k + j for j in range(4)] + [2] for k in range(4)]
    rows = [dict(input_features=features[i % 4].tolist(), labels=transcripts[i % 4]) for i in range(n)]
    return Dataset.from_list(rows)


# ---- model helpers --------------------------------------------------------------------------------------------------
def perturb_experts(model, seed=0):
    """Stand-in for training: move every expert tensor so that experts differ from their initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name or ".router." in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def without_spri_hf(script: str) -> str:
    """Prefix `script` with a meta-path blocker: `import spri_hf` fails as if it were not installed (it is installed
    editable in the test environment, so removing a path entry would not hide it)."""
    blocker = (
        "import sys\n"
        "class _NoSpri:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'spri_hf' or name.startswith('spri_hf.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, _NoSpri())\n"
    )
    return blocker + script


# ---- slow tier: real models from benchmarks/real_models.py ----------------------------------------------------------
def tiny_word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary ("w0" .. "w96"), with padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0")


def require_packages(*names):
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(n.replace('_', '-') for n in missing)} (pip install --no-deps ...)")


def words(text: str) -> list[str]:
    # Whisper's casing and punctuation are not what is being tested
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    require_packages(*real_models.WHISPER_PARTS)
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    folder = real_models.whisper_base_folder(tmp_path_factory.mktemp("whisper-base"))
    model = WhisperForConditionalGeneration.from_pretrained(folder).eval()
    return model, WhisperProcessor.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def minilm():
    require_packages(real_models.MINILM_PACKAGE)
    from transformers import AutoModel, AutoTokenizer

    path = real_models.minilm_folder()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
