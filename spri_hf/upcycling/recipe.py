"""The per-layer SPRI recipe: one dense FFN's matrices in, one SpriMoeBlock's router and expert tensors out.

Pure tensor code on top of `initializers.py`: it takes a made `SpriConfig`, the FFN layout of its stack and plain
tensors, and never touches a module, a file or the Hub. `residual_rank` sizes every expert's stage-1 factors from
the shapes (or, with `principal_energy`, the singular values); `decompose` is a matrix's heavy, random-free part
(its SVD and shared base), which the pipeline's workers run in any order; `upcycle_layer` draws the layer's random
stream in a fixed order and assembles the block's tensors, so the result does not depend on how the work was
scheduled.
"""

from typing import NamedTuple

import torch

from ..architectures import FfnLayout
from ..configuration_spri import SpriConfig
from . import initializers as spri_init


def generator_key(stack: str, idx: int) -> int:
    """Random streams per layer; the encoder's are offset so that encoder and decoder layer i draw differently."""
    return idx if stack == "decoder" else 100_000 + idx


def principal_of(config: SpriConfig, singular_values: torch.Tensor) -> int:
    """A matrix's principal rank under the config's rule (`principal_ratio` or `principal_energy`)."""
    return spri_init.principal_rank(singular_values, config.principal_ratio, config.principal_energy)


def check_tail(config: SpriConfig, tail: int, where: str):
    """Refuse a residual rank below `num_experts`: some experts would get no residual direction."""
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
