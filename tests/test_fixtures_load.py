"""Checkpoints saved by earlier versions of spri_hf (tests/fixtures/<version>/, written by tests/fixtures/make_fixtures.py
with that version) load with the current code and give identical logits."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

import spri_hf  # noqa: F401  (registers the auto classes)


FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = sorted(path.name for path in FIXTURES.iterdir() if (path / "expected.safetensors").exists())
STAGES = {"causal-stage1": 1, "causal-stage2": 2, "seq2seq": 2, "classification": 1}  # as make_fixtures.py built them
AUTO_CLASSES = {
    "causal-stage1": AutoModelForCausalLM,
    "causal-stage2": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "classification": AutoModelForSequenceClassification,
}


def made_with_threads(version: str) -> int:
    """The intra-op thread count the fixtures' logits were computed with: torch splits a reduction by that count, so
    identical bits need the same one. Recorded by make_fixtures.py; v0.1.0 predates that and ran with 2."""
    with safe_open(FIXTURES / version / "expected.safetensors", "pt") as handle:
        return int((handle.metadata() or {}).get("intra_op_threads", 2))


def test_fixtures_are_there():
    assert VERSIONS, f"no fixture folder under {FIXTURES}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", list(AUTO_CLASSES))
def test_earlier_checkpoints_load_with_identical_logits(version, kind):
    expected = load_file(FIXTURES / version / "expected.safetensors")[kind]
    model, info = AUTO_CLASSES[kind].from_pretrained(FIXTURES / version / kind, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(made_with_threads(version))
    try:
        with torch.no_grad():
            if kind == "seq2seq":
                logits = model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
            else:
                logits = model(input_ids=ids).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(logits, expected)
    assert model.config.stage == STAGES[kind]
