"""The wider family matrix (conftest.py's TABLE_FAMILIES and DETECTED_FAMILIES), in one matrix: copy equivalence
and both stages (fast, one test per family); save and reload of both stages, generate with cache and remote code (slow,
batched per family / over all).

`TABLE_FAMILIES` have an entry in spri_hf/architectures.py; `DETECTED_FAMILIES` have none and go through detection.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import (
    DETECTED_FAMILIES,
    TABLE_FAMILIES,
    assert_reloaded_logits,
    assert_same_state,
    perturb_experts,
    tiny_dense,
    without_spri_hf,
)
from transformers import AutoModelForCausalLM

from spri_hf import FFN_LAYOUTS, SpriForCausalLM
from spri_hf.architectures import DETECTED_LAYOUT_ATTR


ATOL = 1e-5
NEW_FAMILIES = TABLE_FAMILIES + DETECTED_FAMILIES


def test_the_matrix_has_at_least_fifteen_new_families():
    assert len(NEW_FAMILIES) >= 15
    assert all(family in FFN_LAYOUTS for family in TABLE_FAMILIES)
    assert not any(family in FFN_LAYOUTS for family in DETECTED_FAMILIES)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_copy_reproduces_the_dense_logits_and_stage1_equals_stage2(family, input_ids):
    dense = tiny_dense(family)
    reference = dense(input_ids).logits
    copy = SpriForCausalLM.from_dense(dense, num_experts=4, num_experts_per_tok=2, init="copy")
    torch.testing.assert_close(copy(input_ids).logits, reference, atol=ATOL, rtol=0)
    detected = getattr(copy.config.base_config, DETECTED_LAYOUT_ATTR, None)
    assert (detected is not None) == (family in DETECTED_FAMILIES)
    assert not hasattr(dense.config, DETECTED_LAYOUT_ATTR)  # the dense model is not modified

    model = SpriForCausalLM.from_dense(dense, num_experts=4, diversity=0.5)
    assert model.config.stage == 1
    stage1 = model(input_ids).logits
    assert (stage1 - reference).abs().max() > 1e-4  # SPRI changes the function...
    model.set_stage(2)
    torch.testing.assert_close(model(input_ids).logits, stage1, atol=ATOL, rtol=0)  # ...the same in both stages


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_save_reload_both_stages_and_generate_with_cache(family, input_ids, tmp_path):
    model = perturb_experts(SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, diversity=0.5))
    for stage in (1, 2):
        if stage == 2:
            model.set_stage(2)
        reference = model(input_ids).logits
        folder = tmp_path / f"stage{stage}"
        model.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(loaded, SpriForCausalLM) and loaded.config.stage == stage
        assert_same_state(loaded, model)
        assert_reloaded_logits(loaded(input_ids).logits, reference)
        kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(input_ids), pad_token_id=0)
        with_cache = loaded.generate(input_ids, use_cache=True, **kwargs)
        assert with_cache.shape == (2, 13)
        assert torch.equal(with_cache, loaded.generate(input_ids, use_cache=False, **kwargs))


@pytest.mark.slow
def test_every_new_family_loads_as_remote_code_without_spri_hf(tmp_path, input_ids):
    expected = {}
    for family in NEW_FAMILIES:
        model = perturb_experts(SpriForCausalLM.from_dense(tiny_dense(family), num_experts=4, diversity=0.5, stage=2))
        model.save_pretrained(tmp_path / family)
        expected[family] = model(input_ids).logits
    torch.save(input_ids, tmp_path / "ids.pt")
    (tmp_path / "families.json").write_text(json.dumps(NEW_FAMILIES))
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"root = {str(tmp_path)!r}\n"
        "ids = torch.load(f'{root}/ids.pt')\n"
        "out = {}\n"
        "for family in json.load(open(f'{root}/families.json')):\n"
        "    model = AutoModelForCausalLM.from_pretrained(f'{root}/{family}', trust_remote_code=True).eval()\n"
        "    assert not type(model).__module__.startswith('spri_hf'), type(model).__module__\n"
        "    with torch.no_grad():\n"
        "        out[family] = model(ids).logits\n"
        "torch.save(out, f'{root}/logits.pt')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run(
        [sys.executable, "-c", without_spri_hf(script)], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt")
    for family in NEW_FAMILIES:
        assert_reloaded_logits(logits[family], expected[family])
