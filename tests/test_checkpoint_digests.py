"""Refactoring the upcycler and the modeling code must not change a single byte of what it writes: the checkpoints of a
fixed matrix (streamed and in memory, stage 1 and 2, sharded and not, several families and inits) are hashed and
compared with `fixtures/checkpoint_digests.json`, made by the code before the upcycling package and the modeling split
(commit a56ba2d) with `python tests/test_checkpoint_digests.py OUT.json`. Only the public API is used, so the same
function ran against that code. The SVDs are LAPACK's: the digests hold for this project's CPU wheel of torch."""

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_digests.json"

# (name, dense family, settings, streamed, max_shard_size)
MATRIX = [
    ("llama-spri-stage1", "llama", {"init": "spri", "num_experts": 4}, False, None),
    ("llama-spri-stage1-streamed", "llama", {"init": "spri", "num_experts": 4}, True, None),
    ("llama-spri-stage2", "llama", {"init": "spri", "num_experts": 4, "stage": 2}, False, None),
    ("llama-spri-stage2-streamed-sharded", "llama", {"init": "spri", "num_experts": 4, "stage": 2}, True, "40KB"),
    ("llama-copy-sharded", "llama", {"init": "copy", "num_experts": 4}, False, "40KB"),
    ("qwen3-drop-streamed", "qwen3", {"init": "drop", "num_experts": 4, "seed": 3}, True, None),
    ("gpt2-noise", "gpt2", {"init": "noise", "num_experts": 4, "seed": 1}, False, None),
    ("gpt2-spri-partition-streamed", "gpt2", {"init": "spri", "spri_mode": "partition", "num_experts": 2}, True, None),
]


def _dense(family: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {
        "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
        "qwen3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        "gpt2": dict(n_embd=32, n_head=4, n_positions=64),
    }[family]
    layers = {"n_layer": 2} if family == "gpt2" else {"num_hidden_layers": 2}
    config = AutoConfig.for_model(family, vocab_size=97, **sizes, **layers)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def checkpoint_digests(workdir: str) -> dict[str, dict[str, str]]:
    """sha256 of every weights file (and shard index) of each checkpoint of `MATRIX`."""
    import spri_hf

    digests = {}
    for name, family, settings, streamed, shard in MATRIX:
        out = os.path.join(workdir, name)
        dense = _dense(family)
        kwargs = {"max_shard_size": shard} if shard else {}
        if streamed:
            source = os.path.join(workdir, f"{name}-dense")
            dense.save_pretrained(source)
            spri_hf.upcycle_checkpoint(source, out, **settings, **kwargs)
        else:
            spri_hf.SpriForCausalLM.from_dense(dense, **settings).save_pretrained(out, **kwargs)
        digests[name] = {
            file: hashlib.sha256((Path(out) / file).read_bytes()).hexdigest()
            for file in sorted(os.listdir(out))
            if file.endswith(".safetensors") or file.endswith(".safetensors.index.json")
        }
    return digests


def test_checkpoints_are_bit_identical_to_those_of_the_code_before_the_refactor(tmp_path):
    expected = json.loads(FIXTURE.read_text())
    assert checkpoint_digests(str(tmp_path)) == expected
    assert any(len(files) > 2 for files in expected.values())  # the matrix holds sharded checkpoints


if __name__ == "__main__":  # write the fixture with whichever spri_hf is importable
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as folder:
        Path(sys.argv[1]).write_text(json.dumps(checkpoint_digests(folder), indent=1, sort_keys=True) + "\n")
