import os

# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging  # noqa: E402

import spri_hf  # noqa: E402, F401  (registers the auto classes)


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


def tiny_config(family: str):
    model_type = family.split("-")[0]
    kwargs = dict(TINY_CONFIGS[family], vocab_size=VOCAB, num_hidden_layers=2)
    kwargs.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_dense(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
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
