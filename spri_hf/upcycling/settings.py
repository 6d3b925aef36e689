"""What the caller asked for, checked and turned into an `SpriConfig` before any weight is read.

Two kinds of arguments reach the entry points: SPRI settings (the fields of `SpriConfig`, `CONFIG_FIELDS`), which
say what the checkpoint will be, and work options (`WorkOptions`: SVD method, device, workers, progress bar), which
say how the work is done. Both are checked here, once, by the entry point (`spri_hf.upcycling`), and the rest of the
pipeline receives a made config and checked options. Making a config also validates the dense side: a quantized
model is refused (`dequantized_config`), and a family without a table entry has its FFN layout detected
(`detection.attach_ffn_layout`), so a refusal comes before anything is loaded or written.
"""

import copy
import os
from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError

from ..architectures import get_ffn_layouts
from ..configuration_spri import UPCYCLING_SETTINGS, SpriConfig
from . import initializers as spri_init
from .detection import attach_ffn_layout


CONFIG_FIELDS = UPCYCLING_SETTINGS + (
    "stage",
    "stage1_experts_implementation",
    "stage1_trainable",
    "stage2_frozen",
    "stage2_train_all",
    "initializer_range",
    "output_router_logits",
    "base_model",
    "base_model_license",
)
# `from_pretrained` arguments that also say where the dense config is (the others only concern its weights)
CONFIG_LOCATION_KWARGS = ("gguf_file", "revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")


def already_spri(config) -> str:
    """What to say when the model given to the upcycler is an SPRI model already, and what to do instead."""
    base = config.base_config
    origin = f" (upcycled from {config.base_model})" if getattr(config, "base_model", None) else ""
    return (
        f"This is already an SPRI model{origin}: a {base.model_type} with {config.num_experts} experts (top-"
        f"{config.num_experts_per_tok}, init {config.init!r}) in stage {config.stage}. Train it as it is "
        "(SpriForCausalLM.from_pretrained, or spri-hf train on it); to serve it as a native MoE use "
        "`spri-hf export-native` (export_native); to get a dense model back use fold_to_dense; to upcycle with other "
        "settings, upcycle its dense base model instead."
    )


def make_config(base_config, **settings) -> SpriConfig:
    """`SpriConfig(base_config=..., **settings)` with validation errors raised as `ValueError` / `TypeError`."""
    unknown = sorted(set(settings) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"Unknown SPRI setting(s) {unknown}; the settings are {list(CONFIG_FIELDS)}.")
    if getattr(base_config, "model_type", None) == SpriConfig.model_type:
        raise ValueError(already_spri(base_config))
    if "initializer_range" not in settings:
        settings["initializer_range"] = getattr(base_config, "initializer_range", None) or 0.02
    attach_ffn_layout(base_config)  # a family without a table entry: its layout detected and verified, or refused
    try:
        return SpriConfig(base_config=base_config, **settings)
    except StrictDataclassError as err:
        cause = err.__cause__ if isinstance(err.__cause__, (TypeError, ValueError)) else None
        message = str(cause) if cause is not None else str(err)
        raise (TypeError if isinstance(cause, TypeError) else ValueError)(message) from None


def spri_config(dense_config, settings: dict, base_model: str | None, may_fetch_card: bool = False) -> SpriConfig:
    """The run's config, made once by the entry point from the config the dense weights come with.

    `base_model` (where the dense model came from) and its card's license are recorded unless `settings` gives them;
    the card is only fetched from the Hub when `may_fetch_card` (the dense model is being downloaded anyway).
    """
    settings = dict(settings)
    settings.setdefault("base_model", base_model)
    if "base_model_license" not in settings:
        settings["base_model_license"] = read_license(settings["base_model"], may_fetch_card)
    config = make_config(dequantized_config(dense_config), **settings)
    check_shared_expert(config)
    return config


def check_settings(dense_config, settings: dict):
    """Validate `settings` against a dense config file before a dense model is downloaded or loaded whole; the run's
    config is made afterwards from the loaded model's config (`from_pretrained` may change it: its dtype, config
    arguments given to it)."""
    make_config(dequantized_config(dense_config), **settings)


def check_shared_expert(config: SpriConfig):
    """A shared expert is the dense FFN module kept whole: refused where the block calls its projections itself."""
    layouts = get_ffn_layouts(config.base_config)  # carries the detected layout of a family without a table entry
    if config.shared_expert is not None and any(layouts[stack].split for stack in config.upcycled_stacks()):
        raise ValueError(
            f"shared_expert={config.shared_expert!r} needs an FFN that is one module; a {config.base_config.model_type} "
            "block calls its FFN projections itself. Use shared_expert=None."
        )


def split_load_kwargs(settings: dict, from_pretrained_kwargs: dict | None) -> dict:
    """The arguments for loading the dense model: `from_pretrained_kwargs`, plus every setting that is not an SPRI
    field (`dtype=`, `revision=`, `gguf_file=`, ...), which is taken out of `settings`."""
    load_kwargs = dict(from_pretrained_kwargs or {})
    load_kwargs.update({key: settings.pop(key) for key in list(settings) if key not in CONFIG_FIELDS})
    return load_kwargs


def location_kwargs(load_kwargs: dict) -> dict:
    """The `from_pretrained` kwargs that also locate the config (validated before any weight is read)."""
    return {key: load_kwargs[key] for key in CONFIG_LOCATION_KWARGS if key in load_kwargs}


def output_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype of the written tensors as a `torch.dtype`; a name such as "bfloat16" is accepted."""
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
            raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; use float32, bfloat16 or float16.")
        dtype = getattr(torch, dtype)
    return dtype


def dequantized_config(config):
    """A copy of the dense config; GGUF checkpoints are dequantised on load, so their quantization entry goes."""
    config = copy.deepcopy(config)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
        if str(method).lower().endswith("gguf"):
            del config.quantization_config
        else:
            raise ValueError(
                f"The dense model is quantized ({method}); SPRI needs floating-point weights. Load it without "
                "quantization (or dequantize it) before upcycling."
            )
    return config


def read_license(name_or_path: str | None, may_fetch: bool = False) -> str | None:
    """The `license` of the dense model's card: a local folder's README.md, a Hub repo's cached README.md, or (only
    when `may_fetch`) the Hub's. `None` when there is none to read: the model card then says it is unknown."""
    if not name_or_path:
        return None
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if os.path.isdir(name_or_path):
        card = os.path.join(name_or_path, "README.md")
    else:
        try:
            cached = try_to_load_from_cache(name_or_path, "README.md")
        except Exception:  # not a repo id
            return None
        card = cached if isinstance(cached, str) else (name_or_path if may_fetch else None)
    if card is None or (os.path.isabs(card) and not os.path.isfile(card)):
        return None
    try:
        return ModelCard.load(card).data.get("license")
    except Exception:  # offline, no card, unreadable card
        return None


@dataclass(frozen=True)
class WorkOptions:
    """How the FFN layers' work is done, kept apart from the settings that say what the model is (`SpriConfig`).

    `svd_method`: see `initializers.thin_svd` (both methods are exact, equal to rounding); `svd_device`: where the
    SVDs run (`None`: where the weights are); `workers`: threads computing SVDs at once, each single-threaded (the
    tensors are bit-identical whatever the number); `show_progress`: a progress bar over layers.
    """

    svd_method: str = "auto"
    svd_device: torch.device | None = None
    workers: int = 1
    show_progress: bool = False


def work_options(
    svd_method: str = "auto",
    svd_device: torch.device | str | None = None,
    svd_workers: int | None = None,
    show_progress: bool = False,
) -> WorkOptions:
    """The entry points' work arguments, checked (an unknown method, a device that is not there, no worker) before
    anything is read."""
    spri_init.check_svd_method(svd_method)
    svd_device = spri_init.check_device(svd_device)
    workers = svd_workers if svd_workers is not None else svd_worker_count(svd_device)
    if workers < 1:
        raise ValueError(f"svd_workers={workers} must be at least 1.")
    return WorkOptions(svd_method, svd_device, workers, show_progress)


def svd_worker_count(svd_device=None) -> int:
    """Worker threads for the FFN layers' SVDs: the cores this process may run on (one accelerator needs one)."""
    if svd_device is not None and torch.device(svd_device).type != "cpu":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
