"""Models, checkpoints and commands the figures measure."""

import copy
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import spri_hf  # noqa: F401  (registers model_type "spri")

from .measuring import folder_bytes
from .results import log


# ---------------------------------------------------------------------------------------------------------------------
# Models, checkpoints, commands


def _attention(spec: dict) -> dict:
    return dict(num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                head_dim=spec["hidden"] // spec["heads"])


def qwen3_dense(spec: dict, seed: int = 0) -> Qwen3ForCausalLM:
    """A random dense Qwen3 of the preset's shape (its FFN becomes the experts)."""
    config = Qwen3Config(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], bos_token_id=1, eos_token_id=2, pad_token_id=0, **_attention(spec),
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def qwen2_checkpoint(spec: dict, dtype: torch.dtype, cache_dir: Path) -> Path:
    """A random Qwen2.5-shaped dense checkpoint (safetensors), written once into `cache_dir` and reused."""
    name = "qwen2-{layers}l-{hidden}h-{intermediate}i-{vocab}v".format(**spec) + f"-{str(dtype).split('.')[-1]}"
    folder = cache_dir / name
    if (folder / "config.json").exists() and folder_bytes(folder) > 0:
        return folder
    log(f"  writing a random dense checkpoint to {folder} (once)")
    config = Qwen2Config(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], tie_word_embeddings=True,  # as Qwen2.5-0.5B and -1.5B
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **_attention(spec),
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    staging = Path(tempfile.mkdtemp(prefix=name + ".", dir=cache_dir))
    model.save_pretrained(staging)
    staging.rename(folder)  # atomic: a half-written checkpoint is never reused
    return folder


def smollm2_folder(cache_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct as a plain safetensors folder, dequantised once from the packaged GGUF."""
    folder = cache_dir / "smollm2-135m-instruct-hf"
    if (folder / "config.json").exists() and folder_bytes(folder) > 0:
        return folder
    from spri_hf.assets import load_smollm2

    log(f"  writing SmolLM2-135M as safetensors to {folder} (once, about 20 s)")
    gguf_model, tokenizer = load_smollm2()
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-loaded model; the weights are plain fp32
    model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the LM head is tied to the embeddings
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    staging = Path(tempfile.mkdtemp(prefix="smollm2.", dir=cache_dir))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


def spri_cli() -> list[str]:
    """The `spri-hf` console script of this interpreter's environment (or the module behind it)."""
    script = Path(sys.executable).with_name("spri-hf")
    return [str(script)] if script.exists() else [sys.executable, "-m", "spri_hf.cli"]


def upcycle_command(src, out, spec: dict, *, init: str, stage=None, svd_method=None, dtype=None, svd_device=None):
    """`spri-hf upcycle SRC OUT` with the preset's experts; `svd_device` only where there are SVDs to run."""
    command = [*spri_cli(), "upcycle", str(src), str(out), "--overwrite", "--init", init,
               "--num-experts", str(spec["experts"]), "--num-experts-per-tok", str(spec["top_k"])]
    if stage is not None:
        command += ["--stage", str(stage)]
    if svd_method is not None:
        command += ["--svd-method", svd_method]
    if svd_device is not None and init == "spri":
        command += ["--svd-device", svd_device]
    if dtype is not None:
        command += ["--dtype", dtype]
    return command
