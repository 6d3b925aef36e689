"""The per-layer upcycling recipe and the navigation of a dense model that both upcyclers share.

`from_dense` (upcycling.py, a model in memory) and `upcycle_checkpoint` (streaming.py, a safetensors folder read
tensor by tensor) are two sources and two sinks around the same recipe: `make_config` validates the settings,
`residual_rank` sizes the stage-1 factors, `upcycle_layer` turns one dense FFN's matrices into router and expert
tensors (pure tensor code on top of initializers.py), `dense_to_spri_names` maps every other tensor. Neither imports the
other's internals.
"""

from contextlib import contextmanager
import copy
import os
from typing import NamedTuple

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import MODEL_MAPPING, PreTrainedModel

from . import initializers as spri_init
from .architectures import FfnLayout
from .configuration_spri import UPCYCLING_SETTINGS, SpriConfig
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


def make_config(base_config, **settings) -> SpriConfig:
    """`SpriConfig(base_config=..., **settings)` with validation errors raised as `ValueError` / `TypeError`."""
    unknown = sorted(set(settings) - set(CONFIG_FIELDS))
    if unknown:
        raise TypeError(f"Unknown SPRI setting(s) {unknown}; the settings are {list(CONFIG_FIELDS)}.")
    if "initializer_range" not in settings:
        settings["initializer_range"] = getattr(base_config, "initializer_range", None) or 0.02
    attach_ffn_layout(base_config)  # a family without a table entry: its layout detected and verified, or refused
    try:
        return SpriConfig(base_config=base_config, **settings)
    except StrictDataclassError as err:
        cause = err.__cause__ if isinstance(err.__cause__, (TypeError, ValueError)) else None
        message = str(cause) if cause is not None else str(err)
        raise (TypeError if isinstance(cause, TypeError) else ValueError)(message) from None


def generator_key(stack: str, idx: int) -> int:
    """Random streams per layer; the encoder's are offset so that encoder and decoder layer i draw differently."""
    return idx if stack == "decoder" else 100_000 + idx


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


TASK_NAMES = {
    "AutoModelForCausalLM": "causal LM",
    "AutoModelForSeq2SeqLM": "seq2seq LM",
    "AutoModelForSpeechSeq2Seq": "speech seq2seq model",
    "AutoModelForSequenceClassification": "sequence classifier",
    "AutoModelForMaskedLM": "masked LM",
}


def dense_root_of(spri_class: type, dense: PreTrainedModel) -> PreTrainedModel:
    """The part of `dense` that `spri_class` wraps: the model itself, or its backbone for `SpriModel`."""
    mapping = spri_class._dense_mapping
    expected = mapping[type(dense.config)] if type(dense.config) in mapping else None
    if expected is not None and isinstance(dense, expected):
        return dense
    if mapping is MODEL_MAPPING:
        return dense.base_model
    task = TASK_NAMES.get(spri_class._dense_auto_class, spri_class._dense_auto_class)
    raise TypeError(
        f"{spri_class.__name__}.from_dense needs a {task}"
        f"{f' ({expected.__name__})' if expected is not None else ''}, got {type(dense).__name__}; load it with "
        f"{spri_class._dense_auto_class}, or use the Spri class of its task (SpriModel for a bare backbone)."
    )


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


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def module_name(root: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise RuntimeError("module not found in its model")


def dense_to_spri_names(config: SpriConfig, dense_root, layouts: dict, targets, sources) -> dict[str, str]:
    """Where each tensor named in `sources` (names in `dense_root`) goes in the SPRI inner model (names in `targets`):
    every non-FFN tensor, and the FFN kept as shared expert.

    Give every name of a tied tensor: which one a deduplicating walk keeps depends on module order (XLM-R's MLM head).
    """
    ffn_prefixes = []
    for stack in config.upcycled_stacks():
        layout = layouts[stack]
        layers_name = module_name(dense_root, layout.layers(dense_root))
        for idx in config.upcycled_layers(stack):
            ffn_prefixes += [f"{layers_name}.{idx}.{path}." for path in layout.ffn_paths()]
    keep_shared = config.shared_expert == "dense"
    names = {}
    for name in sources:
        target = name
        prefix = next((p for p in ffn_prefixes if name.startswith(p)), None)
        if prefix is not None:
            if not keep_shared:
                continue
            target = f"{prefix}shared_expert.{name[len(prefix):]}"
        if target not in targets:
            raise RuntimeError(f"Internal error: dense tensor {name!r} has no counterpart in the SPRI model.")
        names[name] = target
    return names


def principal_of(config: SpriConfig, singular_values: torch.Tensor) -> int:
    return spri_init.principal_rank(singular_values, config.principal_ratio, config.principal_energy)


def check_tail(config: SpriConfig, tail: int, where: str):
    if 0 < tail < config.num_experts:
        setting = (
            f"principal_energy={config.principal_energy}"
            if config.principal_energy is not None
            else f"principal_ratio={config.principal_ratio}"
        )
        raise ValueError(
            f"The residual rank of {where} is {tail}, smaller than num_experts={config.num_experts}: some experts "
            f"would get no residual direction. Lower {setting} or use fewer experts."
        )


def residual_rank(config: SpriConfig, layout: FfnLayout, stack: str, ffn_matrices) -> tuple[int, dict | None]:
    """`(k, principal ranks)` of one stack: the rank `k` of each expert's residual factors, checked before any heavy
    work, and with `principal_energy` the principal rank of every FFN matrix (`{layer: {projection: r}}`; None
    otherwise, when the rank follows from the shapes alone).

    `ffn_matrices(idx)` gives the FFN matrices of layer `idx` (only read when `principal_energy` is set). The ranks
    come from the singular values alone (`singular_values`), and `decompose` takes them from here, so no matrix's
    singular values are computed twice.
    """
    rank = min(layout.hidden_size(config.base_config), layout.intermediate_size(config.base_config))
    if config.principal_energy is None:
        tail = rank - spri_init.principal_rank(torch.empty(rank), config.principal_ratio)
        check_tail(config, tail, "every FFN matrix")
        return max(spri_init.residual_rank_per_expert(tail, config.num_experts), 1), None
    largest, ranks = 0, {}
    for idx in config.upcycled_layers(stack):
        for proj, weight in ffn_matrices(idx).items():
            principal = principal_of(config, spri_init.singular_values(weight))
            ranks.setdefault(idx, {})[proj] = principal
            check_tail(config, rank - principal, f"{stack} layer {idx} {proj}")
            largest = max(largest, spri_init.residual_rank_per_expert(rank - principal, config.num_experts))
    return max(largest, 1), ranks


class Decomposed(NamedTuple):
    """One FFN matrix's SVD and what SPRI makes of it before any random draw (see `decompose`)."""

    svd: tuple
    principal: int
    shared: torch.Tensor


def decompose(config: SpriConfig, weight: torch.Tensor, svd: tuple, principal: int | None = None) -> Decomposed:
    """The random-free, heavy part of SPRI for one matrix: its principal rank and shared base `S = P + b R`.

    `principal` is the rank `residual_rank` measured (with `principal_energy`); without it, it follows from `svd`.

    Layers' matrices can be decomposed in any order and on any thread; `upcycle_layer` then draws the layer's random
    stream in its fixed order, so the result does not depend on how the work was scheduled.
    """
    shared_coef, _ = spri_init.spri_coefficients(config.num_experts, config.spri_mode, config.diversity, config.residual_scale)
    principal = principal if principal is not None else principal_of(config, svd[1])
    return Decomposed(svd, principal, spri_init.spri_shared(weight, svd, principal=principal, shared_coef=shared_coef))


def upcycle_layer(
    config: SpriConfig,
    layout: FfnLayout,
    layer_key: int,
    matrices: dict,
    biases: dict,
    *,
    svd_method: str = "auto",
    svd_device: torch.device | str | None = None,
    out_dtype: torch.dtype | None = None,
    decomposed: dict | None = None,
    principals: dict | None = None,
) -> dict:
    """Router and expert tensors of one SpriMoeBlock, keyed by parameter name relative to the block.

    Computed in float64; with `out_dtype` each projection's experts are cast as soon as they are made (the streaming
    upcycler keeps one layer's float64 work at a time this way). `layer_key` seeds the layer's random stream (the
    layer index; encoder layers are offset). `decomposed` (`{projection: decompose(...)}`) gives the SVDs made
    elsewhere (the streaming upcycler's workers); without it the layer's SVDs are made here, as one batch on an
    accelerator `svd_device`, with the principal ranks `principals` (`{projection: r}`, from `residual_rank`) where
    given.
    """

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if out_dtype is None else tensor.to(out_dtype)

    generator = spri_init.layer_generator(config.seed, layer_key)
    num_experts = config.num_experts
    hidden = matrices["down"].shape[0]
    tensors = {"router.weight": config.initializer_range * torch.randn(num_experts, hidden, generator=generator, dtype=torch.float64)}
    up_names = ("gate", "up") if layout.gated else ("up",)
    prefix = "gate_up" if layout.gated else "up"

    if config.init == "spri":
        _, expert_coef = spri_init.spri_coefficients(num_experts, config.spri_mode, config.diversity, config.residual_scale)
        if decomposed is None:
            svds = spri_init.thin_svds(list(matrices.values()), svd_method, svd_device)
            principals = principals or {}
            decomposed = {
                proj: decompose(config, w, svd, principals.get(proj)) for (proj, w), svd in zip(matrices.items(), svds)
            }
        factors = {}
        for proj in matrices:  # the random partition draws in this fixed order
            svd, principal, shared = decomposed[proj]
            factor_b, factor_a = spri_init.spri_factors(
                svd, num_experts, principal=principal, expert_coef=expert_coef, partition=config.partition,
                rank_per_expert=config.residual_rank, generator=generator,
            )  # fmt: skip
            factors[proj] = (shared, factor_b, factor_a)
        del decomposed
        if config.stage == 1:
            tensors[f"experts.{prefix}_shared"] = torch.cat([factors[p][0] for p in up_names], dim=0)
            tensors[f"experts.{prefix}_residual_b"] = torch.cat([factors[p][1] for p in up_names], dim=1)
            tensors[f"experts.{prefix}_residual_a"] = torch.cat([factors[p][2] for p in up_names], dim=1)
            shared, factor_b, factor_a = factors["down"]
            tensors["experts.down_shared"], tensors["experts.down_residual_b"] = shared, factor_b
            tensors["experts.down_residual_a"] = factor_a
        else:
            experts = {proj: cast(spri_init.materialize_experts(*factors.pop(proj))) for proj in list(matrices)}
            add_full_experts(tensors, experts, up_names, prefix)
    else:
        if config.init == "copy":
            experts = {proj: cast(spri_init.copy_experts(w, num_experts)) for proj, w in matrices.items()}
        elif config.init == "noise":
            experts = {
                proj: cast(spri_init.noise_experts(w, num_experts, config.noise_std, generator))
                for proj, w in matrices.items()
            }
        elif config.init == "drop":
            dropped = spri_init.drop_neurons(num_experts, matrices["down"].shape[1], config.drop_ratio, generator)
            experts = {
                proj: cast(spri_init.drop_experts(w, dropped, 1 if proj == "down" else 0, generator))
                for proj, w in matrices.items()
            }
        else:  # random
            experts = {
                proj: cast(spri_init.random_experts(tuple(w.shape), num_experts, config.initializer_range, generator))
                for proj, w in matrices.items()
            }
        add_full_experts(tensors, experts, up_names, prefix)

    if biases:
        zero = config.init == "random"
        up_bias = torch.cat([biases[p].detach().double() for p in up_names])
        down_bias = biases["down"].detach().double()
        tensors[f"experts.{prefix}_proj_bias"] = (up_bias * (not zero)).expand(num_experts, -1)
        tensors["experts.down_proj_bias"] = (down_bias * (not zero)).expand(num_experts, -1)
    return {name: cast(tensor) for name, tensor in tensors.items()}


def add_full_experts(tensors: dict, experts: dict, up_names: tuple, prefix: str):
    tensors[f"experts.{prefix}_proj"] = torch.cat([experts[p] for p in up_names], dim=1)
    tensors["experts.down_proj"] = experts["down"]
