"""`from_dense`: build an SPRI model from a dense one, layer by layer, under `torch.no_grad()`.

The SPRI skeleton is built on the meta device, every non-FFN tensor is copied from the dense model by name, and each
upcycled FFN layer gets its router and experts from the pure functions of `initializers`. Nothing about the dense model
is modified.
"""

import copy
import os

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import logging

from . import initializers as spri_init
from . import streaming
from .architectures import FfnLayout, get_ffn_layouts
from .configuration_spri import SpriConfig
from .recipe import (
    CONFIG_FIELDS,
    default_dtype,
    dense_root_of,
    dense_to_spri_names,
    dequantized_config,
    generator_key,
    make_config,
    module_name,
    read_license,
    residual_rank,
    upcycle_layer,
)
from .resources import Estimate, check_fits, layer_work_bytes, tensor_bytes
from .utils import refuse_pickle_only


logger = logging.get_logger(__name__)


def upcycle(
    spri_class: type,
    dense: PreTrainedModel | str | os.PathLike,
    *,
    show_progress: bool = False,
    svd_method: str = "auto",
    svd_device: torch.device | str | None = None,
    from_pretrained_kwargs: dict | None = None,
    check_resources: bool = True,
    **settings,
) -> PreTrainedModel:
    """Upcycle `dense` into `spri_class` (`SpriForCausalLM` or `SpriModel`).

    Args:
        dense: a `PreTrainedModel`, or a local folder / Hub id loaded with `from_pretrained(**from_pretrained_kwargs)`.
        show_progress: show a progress bar over layers.
        svd_method: "auto" / "gram" (eigh of the smaller Gram matrix, float64) or "full" (`torch.linalg.svd`); see
            `initializers.thin_svd`. Both are exact; "gram" is several times faster on CPU.
        svd_device: compute the SVDs there (e.g. "cuda" when the weights are on the CPU); `None`: where they live.
        check_resources: estimate the memory the SPRI model and the largest layer's work need (logged at INFO) and
            raise `MemoryError` before allocating when it is not available; `False` tries anyway.
        **settings: any `SpriConfig` field (`num_experts`, `init`, `principal_ratio`, ... see its docstring).
    """
    if svd_method not in spri_init.SVD_METHODS:
        raise ValueError(f"svd_method={svd_method!r} is not supported; choose one of {spri_init.SVD_METHODS}.")
    auto_class = getattr(transformers, getattr(spri_class, "_dense_auto_class", "AutoModel"))
    # a Hub id given here is being downloaded anyway: its card may be fetched too; otherwise only local files are read
    may_fetch_card = isinstance(dense, str) and not os.path.exists(dense)
    if isinstance(dense, (str, os.PathLike)):
        # settings that are not SPRI fields (dtype=, revision=, gguf_file=, ...) are for loading the dense model
        load_kwargs = dict(from_pretrained_kwargs or {})
        load_kwargs.update({key: settings.pop(key) for key in list(settings) if key not in CONFIG_FIELDS})
        dtype = load_kwargs.get("dtype")
        if streaming.can_stream(dense) and set(load_kwargs) <= {"dtype"} and (dtype in (None, "auto") or isinstance(dtype, torch.dtype)):
            # a local safetensors folder: read it tensor by tensor instead of loading the dense model whole
            try:
                return streaming.upcycle_in_memory(
                    spri_class, os.fspath(dense), None if dtype == "auto" else dtype, dict(settings),
                    check_resources=check_resources, show_progress=show_progress, svd_method=svd_method,
                    svd_device=svd_device,
                )
            except streaming.NotStreamable as reason:
                logger.info(f"Loading {dense} whole: {reason}.")
        make_config(dequantized_config(AutoConfig.from_pretrained(dense, **_config_kwargs(load_kwargs))), **settings)
        if load_kwargs.get("gguf_file") is None:
            # safetensors only (from a folder or the Hub) unless the caller opts in: unpickling can run code
            load_kwargs.setdefault("use_safetensors", True)
            refuse_pickle_only(dense, load_kwargs["use_safetensors"], fix="pass use_safetensors=False to from_dense")
        dense = auto_class.from_pretrained(dense, **load_kwargs)
    if not isinstance(dense, PreTrainedModel):
        raise TypeError(f"dense must be a PreTrainedModel, a local path or a Hub id, got {type(dense).__name__}.")
    layouts = get_ffn_layouts(dense.config)
    dense_root = dense_root_of(spri_class, dense)

    settings.setdefault("base_model", dense.name_or_path or None)
    if "base_model_license" not in settings:
        settings["base_model_license"] = read_license(settings["base_model"], may_fetch_card)
    config = make_config(dequantized_config(dense.config), **settings)
    stacks = config.upcycled_stacks()
    if config.shared_expert is not None and any(layouts[stack].split for stack in stacks):
        raise ValueError(
            f"shared_expert={config.shared_expert!r} needs an FFN that is one module; a {dense.config.model_type} block "
            "calls its FFN projections itself. Use shared_expert=None."
        )
    _check_finite(dense_root)
    if config.init == "spri":
        config.residual_rank = max(
            residual_rank(config, layouts[stack], stack, _layer_matrices(dense_root, layouts[stack])) for stack in stacks
        )

    dtype, device = dense.dtype, dense.device
    with torch.no_grad(), default_dtype(dtype), torch.device("meta"):
        model = spri_class(config)
    model.tie_weights()
    weights = tensor_bytes(model)
    work = layer_work_bytes(model)
    check_fits(Estimate(weights, work, weights + work, 0), check=check_resources and device.type == "cpu")
    model.to_empty(device=device)

    with torch.no_grad():
        filled = _copy_dense_tensors(config, dense_root, model.model, layouts)
        sites = model.moe_sites()
        for stack, idx, block in logging.tqdm(sites, desc="Upcycling FFN layers", disable=not show_progress):
            layout = layouts[stack]
            matrices, biases = layout.layer_ffn_weights(dense_root, idx)
            tensors = upcycle_layer(
                config, layout, generator_key(stack, idx), matrices, biases, svd_method=svd_method, svd_device=svd_device
            )
            block_name = module_name(model.model, block)
            for name, value in tensors.items():
                block.get_parameter(name).copy_(value)
                filled.add(f"{block_name}.{name}")

    expected = {name for name, _ in model.model.named_parameters()} | {name for name, _ in model.model.named_buffers()}
    expected -= {name.removeprefix("model.") for name in model.all_tied_weights_keys}  # tied below
    if expected - filled:
        raise RuntimeError(f"Internal error: upcycling left {sorted(expected - filled)[:5]} unset; please report it.")
    model.tie_weights()
    if getattr(dense, "generation_config", None) is not None and model.can_generate():
        model.generation_config = copy.deepcopy(dense.generation_config)
    model.apply_stage_trainability()
    return model.eval()


def _layer_matrices(dense_root, layout: FfnLayout):
    return lambda idx: layout.layer_ffn_weights(dense_root, idx)[0]






def _config_kwargs(load_kwargs: dict) -> dict:
    """The `from_pretrained` kwargs that also locate the config (validated before any weight is read)."""
    keys = ("gguf_file", "revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")
    return {key: load_kwargs[key] for key in keys if key in load_kwargs}








def _check_finite(dense_root: torch.nn.Module):
    for name, param in dense_root.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ValueError(
                f"The dense weight {name!r} contains NaN or infinite values; SPRI cannot decompose it. "
                "Check the checkpoint (or the dtype it was loaded in) before upcycling."
            )












def _copy_dense_tensors(config: SpriConfig, dense_root, spri_inner, layouts: dict) -> set[str]:
    """Copy every non-FFN tensor (and the shared expert) by name; return the names filled in `spri_inner`."""
    targets = dict(spri_inner.named_parameters(remove_duplicate=False))
    targets.update(spri_inner.named_buffers(remove_duplicate=False))
    sources = dict(dense_root.named_parameters(remove_duplicate=False))
    sources.update(dense_root.named_buffers(remove_duplicate=False))
    filled = set()
    for name, target in dense_to_spri_names(config, dense_root, layouts, targets, sources).items():
        targets[target].copy_(sources[name])
        filled.add(target)
    return filled












