"""Upcycling a dense model (in memory, a local folder or a Hub id) into an SPRI model or an SPRI checkpoint folder.

The two entry points, `upcycle` (behind `from_dense`) and `upcycle_checkpoint`, check their arguments once, make the
run's `SpriConfig` once from the config the dense weights come with (`settings.py`), then pick a source and a sink
around one pipeline:

    source                                      pipeline                         sink
    CheckpointSource: a safetensors folder  ->  skeleton, stream_tensors     ->  fill_model: an SPRI model in memory
    ModuleSource: a dense model in memory       (recipe.py, per FFN layer)       write_checkpoint: safetensors shards

A folder whose tensors are converted on load (`NotStreamable`) is loaded whole with `from_pretrained` and read as a
`ModuleSource`. Nothing about the dense model is modified.

The other modules: `sources.py`, `safetensors_io.py` (the reader and the shard writer), `pipeline.py` (skeleton,
tensor stream, worker pool), `recipe.py` (pure tensor code on top of `initializers.py`), `sinks.py`, `resources.py`
(memory and disk estimates) and `detection.py` (the FFN layout of a family without a table entry).
"""

import os

import torch
import transformers
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, PreTrainedModel
from transformers.utils import logging
from transformers.utils.hub import convert_file_size_to_int

from ..configuration_spri import SpriConfig
from ..persistence import atomic_save, refuse_pickle_only
from .pipeline import skeleton
from .settings import (
    check_settings,
    dequantized_config,
    location_kwargs,
    output_dtype,
    split_load_kwargs,
    spri_config,
    work_options,
)
from .sinks import fill_model, write_checkpoint
from .sources import CheckpointSource, ModuleSource, NotStreamable, can_stream, resolve_dense_folder


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
    work = work_options(svd_method, svd_device, svd_workers, show_progress)
    # a Hub id given here is being downloaded anyway: its card may be fetched too; otherwise only local files are read
    may_fetch_card = isinstance(dense, str) and not os.path.exists(dense)
    if isinstance(dense, (str, os.PathLike)):
        # settings that are not SPRI fields (dtype=, revision=, gguf_file=, ...) are for loading the dense model
        load_kwargs = split_load_kwargs(settings, from_pretrained_kwargs)
        dtype = load_kwargs.get("dtype")
        if can_stream(dense) and set(load_kwargs) <= {"dtype"} and (dtype in (None, "auto") or isinstance(dtype, torch.dtype)):
            # a local safetensors folder: read it tensor by tensor instead of loading the dense model whole
            try:
                model, source, layouts, dtype = _open_checkpoint(
                    spri_class, os.fspath(dense), None if dtype == "auto" else dtype, settings
                )
            except NotStreamable as reason:  # the settings were checked: the config was made before
                logger.info(f"Loading {dense} whole: {reason}.")
            else:
                return fill_model(model, source, layouts, dtype, work, check_resources=check_resources)
        else:
            # before any weight is downloaded or loaded
            check_settings(AutoConfig.from_pretrained(dense, **location_kwargs(load_kwargs)), settings)
        dense = _load_whole(spri_class, dense, load_kwargs)
    if not isinstance(dense, PreTrainedModel):
        raise TypeError(f"dense must be a PreTrainedModel, a local path or a Hub id, got {type(dense).__name__}.")
    model, source, layouts, dtype = _open_module(spri_class, dense, settings, may_fetch_card)
    return fill_model(model, source, layouts, dtype, work, check_resources=check_resources)


def upcycle_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    spri_class: type | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    show_progress: bool = False,
    svd_method: str = "auto",
    svd_device: torch.device | str | None = None,
    svd_workers: int | None = None,
    check_resources: bool = True,
    **settings,
) -> str:
    """Upcycle the dense safetensors checkpoint `src` into an SPRI checkpoint folder `out_dir`, streaming.

    Peak memory stays near one FFN layer's worth. The folder is written next to `out_dir` and renamed into place, so
    an interrupted run never leaves a half checkpoint at `out_dir` nor damages one already there. Tokenizer and
    processor files of `src` are carried over. Returns `out_dir`.

    Args:
        spri_class: the SPRI class to build (default `SpriForCausalLM`; `SpriForSeq2SeqLM`, ... for other heads).
        dtype: of the written tensors (default: the dense checkpoint's); the SVD itself runs in float64.
        max_shard_size: largest weights file, e.g. "2GB" (an index file is written when there are several).
        svd_device: compute the SVDs there, a layer's as one batch (e.g. "cuda"; default: the CPU).
        svd_workers: threads computing SVDs at once, each single-threaded (default: the cores this process may use);
            the checkpoint is bit-identical whatever the number.
        check_resources: print (log at INFO) the memory and disk the run needs and raise `MemoryError` / `OSError`
            before writing anything when they are not available; `False` tries anyway.
        **settings: any `SpriConfig` field, as for `from_dense`.
    """
    if spri_class is None:  # the SPRI causal LM that `import spri_hf` registered with AutoModelForCausalLM
        spri_class = MODEL_FOR_CAUSAL_LM_MAPPING[SpriConfig]
    work = work_options(svd_method, svd_device, svd_workers, show_progress)
    dtype = output_dtype(dtype)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it, or choose another folder.")
    max_shard_bytes = convert_file_size_to_int(max_shard_size)  # what save_pretrained accepts
    folder = resolve_dense_folder(src)
    try:
        model, source, layouts, dtype = _open_checkpoint(spri_class, folder, dtype, settings)
    except NotStreamable as reason:
        logger.warning(f"{folder} cannot be streamed ({reason}); loading the dense model whole instead.")
        dense = _load_whole(spri_class, folder, {"dtype": dtype or "auto"})
        model, source, layouts, dtype = _open_module(spri_class, dense, settings)
        model = fill_model(model, source, layouts, dtype, work, check_resources=check_resources)
        atomic_save(model, out_dir, overwrite=overwrite, max_shard_size=max_shard_size)
        return out_dir
    write_checkpoint(
        model, source, layouts, dtype, work, out_dir, dense_folder=folder, max_shard_bytes=max_shard_bytes,
        check_resources=check_resources,
    )  # fmt: skip
    return out_dir


def _open_checkpoint(spri_class: type, folder: str, dtype: torch.dtype | None, settings: dict):
    """`(spri_model on meta, source, layouts, output dtype)` of a dense safetensors folder: the run's config made
    from its config.json (every setting validated before any weight is read), then its tensors opened. Raises
    `NotStreamable` when they would have to be converted on load."""
    dense_config = dequantized_config(AutoConfig.from_pretrained(folder))
    config = spri_config(dense_config, settings, base_model=folder)
    source = CheckpointSource(spri_class, folder, dense_config)
    dtype = source.dtype if dtype is None else dtype
    model, layouts = skeleton(spri_class, config, source, dtype)
    return model, source, layouts, dtype


def _open_module(spri_class: type, dense: PreTrainedModel, settings: dict, may_fetch_card: bool = False):
    """`(spri_model on meta, source, layouts, dtype)` of a dense model in memory (its dtype and device are kept); the
    run's config is made from the model's own config, which `from_pretrained` may have changed (its dtype)."""
    source = ModuleSource(spri_class, dense)  # a model of another task is refused first
    config = spri_config(dense.config, settings, base_model=dense.name_or_path or None, may_fetch_card=may_fetch_card)
    source.check_finite()
    model, layouts = skeleton(spri_class, config, source, source.dtype)
    return model, source, layouts, source.dtype


def _load_whole(spri_class: type, name: str | os.PathLike, load_kwargs: dict) -> PreTrainedModel:
    """The dense model, loaded with `from_pretrained(name, **load_kwargs)`: safetensors only (from a folder or the
    Hub) unless the caller opts in, since unpickling can run code."""
    load_kwargs = dict(load_kwargs)
    if load_kwargs.get("gguf_file") is None:
        load_kwargs.setdefault("use_safetensors", True)
        if load_kwargs["use_safetensors"]:
            refuse_pickle_only(name, fix="pass use_safetensors=False to from_dense")
    auto_class = getattr(transformers, getattr(spri_class, "_dense_auto_class", "AutoModel"))
    return auto_class.from_pretrained(name, **load_kwargs)
