"""Where the streamed tensors go: an SPRI model in memory (`fill_model`), or a checkpoint folder (`write_checkpoint`).

Both take a skeleton built on the meta device and consume `pipeline.stream_tensors`, so the model `from_dense`
returns and the checkpoint `upcycle_checkpoint` writes hold the same tensors bit for bit; the checkpoint also gets
the metadata `save_pretrained` would write (config.json with its auto_map, the code files, the generation config,
the model card) plus the dense folder's tokenizer and processor files. Each first checks that the run fits the memory
(and disk) it needs (`resources.py`).
"""

import math
import os
import shutil

import torch
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from ..configuration_spri import record_base_model_class
from ..model_card import write_model_card
from ..persistence import staged_folder
from .pipeline import plan_order, stream_tensors
from .resources import Estimate, check_fits, layer_work_bytes, tensor_bytes
from .safetensors_io import ShardWriter
from .settings import WorkOptions


# Files of the dense folder that describe how to use the model rather than its weights: carried over as they are.
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "source.spm",
    "target.spm",
    "vocab.txt",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)


def fill_model(model, source, layouts: dict, dtype: torch.dtype, work: WorkOptions, *, check_resources: bool = True):
    """The in-memory sink: allocate `model` (built on meta) on the source's device and fill it from `stream_tensors`."""
    weights, layer_work = tensor_bytes(model, dtype), layer_work_bytes(model)
    check_fits(Estimate(weights, layer_work, weights + layer_work, 0), check=check_resources and source.device.type == "cpu")
    model.to_empty(device=source.device)
    targets = model.model.state_dict(keep_vars=True)
    filled = set()
    with torch.no_grad():
        source.fill_non_persistent_buffers(model.model)
        for name, tensor in stream_tensors(model, source, layouts, dtype, work):
            targets[name].copy_(tensor)
            filled.add(name)
    unset = set(targets) - filled - {name.removeprefix("model.") for name in model.all_tied_weights_keys}
    if unset:
        raise RuntimeError(f"Internal error: upcycling left {sorted(unset)[:5]} unset; please report it.")
    model.tie_weights()
    generation_config = source.generation_config()
    if generation_config is not None and model.can_generate():
        model.generation_config = generation_config
    model.apply_stage_trainability()
    return model.eval()


def write_checkpoint(
    model,
    source,
    layouts: dict,
    dtype: torch.dtype,
    work: WorkOptions,
    out_dir: str,
    *,
    dense_folder: str,
    max_shard_bytes: int,
    check_resources: bool = True,
):
    """The checkpoint sink: every tensor written to its shard as soon as it is made, in a folder next to `out_dir`
    that is renamed into place at the end (an interrupted run leaves no half checkpoint at `out_dir`).

    `dense_folder` is where the generation config and the tokenizer and processor files come from.
    """
    with staged_folder(out_dir) as staging, torch.no_grad():
        tied = {name.removeprefix("model.") for name in model.all_tied_weights_keys}
        inner_params = model.model.state_dict(keep_vars=True)
        plan = [
            (f"model.{name}", tuple(inner_params[name].shape), _out_dtype(inner_params[name], dtype))
            for name in plan_order(model, source, layouts, tied)
        ]
        writer = ShardWriter(staging, plan, max_shard_bytes)
        largest = max((math.prod(shape) * dtype_.itemsize for _, shape, dtype_ in plan), default=0)
        layer_work = layer_work_bytes(model)
        estimate = Estimate(tensor_bytes(model, dtype), layer_work, layer_work + largest, writer.total_size)
        check_fits(estimate, out_dir, check_resources)
        for name, tensor in stream_tensors(model, source, layouts, dtype, work):
            if name in tied:
                continue
            writer.write(f"model.{name}", tensor)
        writer.close()
        write_metadata(model, dense_folder, staging, dtype)


def _out_dtype(param: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if param.dtype.is_floating_point else param.dtype


def write_metadata(model, dense_folder: str, staging: str, dtype: torch.dtype):
    """config.json (with auto_map), the code files, generation config, tokenizer files and the model card."""
    config = model.config
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    record_base_model_class(config)  # AutoModel -> SpriModel, as save_pretrained writes it
    custom_object_save(model, staging, config=config)
    config.save_pretrained(staging)
    if model.can_generate() and os.path.isfile(os.path.join(dense_folder, "generation_config.json")):
        GenerationConfig.from_pretrained(dense_folder).save_pretrained(staging)
    for name in CARRIED_FILES:
        if os.path.isfile(os.path.join(dense_folder, name)):
            shutil.copy2(os.path.join(dense_folder, name), os.path.join(staging, name))
    write_model_card(model, staging)
