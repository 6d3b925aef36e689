"""`from_dense`: the entry point that upcycles a dense model (in memory, a local folder or a Hub id).

One pipeline serves it and `upcycle_checkpoint` (streaming.py): a source (`ModuleSource`: a dense model in memory;
`CheckpointSource`: a safetensors folder read tensor by tensor) -> the per-layer recipe (recipe.py, pure tensor
code) -> a sink (`fill_model`: an SPRI model in memory; `ShardWriter`: safetensors shards). Nothing about the dense
model is modified.
"""

import os

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import logging

from . import initializers as spri_init
from . import streaming
from .persistence import refuse_pickle_only
from .recipe import CONFIG_FIELDS, dequantized_config, make_config

logger = logging.get_logger(__name__)


def upcycle(
    spri_class: type,
    dense: PreTrainedModel | str | os.PathLike,
    *,
    show_progress: bool = False,
    svd_method: str = "auto",
    svd_device: torch.device | str | None = None,
    svd_workers: int | None = None,
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
        svd_device: compute the SVDs there (e.g. "cuda" when the weights are on the CPU), a layer's as one batch;
            `None`: where they live.
        svd_workers: threads computing SVDs at once on the CPU, each single-threaded (default: the cores this process
            may use); the result is bit-identical whatever the number.
        check_resources: estimate the memory the SPRI model and the largest layer's work need (logged at INFO) and
            raise `MemoryError` before allocating when it is not available; `False` tries anyway.
        **settings: any `SpriConfig` field (`num_experts`, `init`, `principal_ratio`, ... see its docstring).
    """
    if svd_method not in spri_init.SVD_METHODS:
        raise ValueError(f"svd_method={svd_method!r} is not supported; choose one of {spri_init.SVD_METHODS}.")
    svd_device = spri_init.check_device(svd_device)
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
                    svd_device=svd_device, svd_workers=svd_workers,
                )
            except streaming.NotStreamable as reason:
                logger.info(f"Loading {dense} whole: {reason}.")
        make_config(dequantized_config(AutoConfig.from_pretrained(dense, **_config_kwargs(load_kwargs))), **settings)
        if load_kwargs.get("gguf_file") is None:
            # safetensors only (from a folder or the Hub) unless the caller opts in: unpickling can run code
            load_kwargs.setdefault("use_safetensors", True)
            if load_kwargs["use_safetensors"]:
                refuse_pickle_only(dense, fix="pass use_safetensors=False to from_dense")
        dense = auto_class.from_pretrained(dense, **load_kwargs)
    if not isinstance(dense, PreTrainedModel):
        raise TypeError(f"dense must be a PreTrainedModel, a local path or a Hub id, got {type(dense).__name__}.")
    model, source, layouts, dtype = streaming.prepare_module(spri_class, dense, settings, may_fetch_card)
    return streaming.fill_model(
        model, source, layouts, dtype, check_resources=check_resources, show_progress=show_progress,
        svd_method=svd_method, svd_device=svd_device, svd_workers=svd_workers,
    )  # fmt: skip


def _config_kwargs(load_kwargs: dict) -> dict:
    """The `from_pretrained` kwargs that also locate the config (validated before any weight is read)."""
    keys = ("gguf_file", "revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")
    return {key: load_kwargs[key] for key in keys if key in load_kwargs}
