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


def experts_per_slice(config: SpriConfig) -> int:
    """How many experts hold each slice of the dense FFN (all of them unless `expert_granularity` > 1)."""
    return config.num_experts // config.expert_granularity


def slice_name(proj: str, piece: int, granularity: int) -> str:
    return proj if granularity == 1 else f"{proj}.{piece}"


def ffn_slices(config: SpriConfig, matrices: dict) -> dict:
    """The matrices the experts are made from, keyed `slice_name(proj, piece, G)`: the dense FFN's own when
    `expert_granularity` is 1; otherwise each projection's `G` slices of the intermediate neurons (rows of gate and
    up, columns of down), slice after slice, the down slices scaled by `G` (in float64) so that the `G` slices of a
    virtual group, each weighted 1/G by the replicated router, sum to the dense FFN."""
    granularity = config.expert_granularity
    if granularity == 1:
        return matrices
    sliced = {}
    for piece in range(granularity):
        for proj, weight in matrices.items():
            if proj == "down":
                width = weight.shape[1] // granularity
                sliced[f"down.{piece}"] = weight[:, piece * width : (piece + 1) * width].double() * granularity
            else:
                width = weight.shape[0] // granularity
                sliced[f"{proj}.{piece}"] = weight[piece * width : (piece + 1) * width]
    return sliced


def principal_of(config: SpriConfig, singular_values: torch.Tensor) -> int:
    """A matrix's principal rank under the config's rule (`principal_ratio` or `principal_energy`)."""
    return spri_init.principal_rank(singular_values, config.principal_ratio, config.principal_energy)


def check_tail(config: SpriConfig, tail: int, where: str):
    """Refuse a residual rank below the number of experts sharing it: some experts would get no residual direction."""
    experts = experts_per_slice(config)
    if 0 < tail < experts:
        setting = (
            f"principal_energy={config.principal_energy}"
            if config.principal_energy is not None
            else f"principal_ratio={config.principal_ratio}"
        )
        holders = f"num_experts={config.num_experts}"
        if config.expert_granularity > 1:
            holders = f"the {experts} experts that hold each slice (expert_granularity={config.expert_granularity})"
        raise ValueError(
            f"The residual rank of {where} is {tail}, smaller than {holders}: some experts "
            f"would get no residual direction. Lower {setting} or use fewer experts."
        )


def residual_rank(config: SpriConfig, layout: FfnLayout, stack: str, ffn_matrices) -> tuple[int, dict | None]:
    """`(k, principal ranks)` of one stack: the rank `k` of each expert's residual factors, checked before any heavy
    work, and with `principal_energy` the principal rank of every FFN matrix (`{layer: {projection: r}}`; None
    otherwise, when the rank follows from the shapes alone).

    `ffn_matrices(idx)` gives the FFN matrices of layer `idx` as `ffn_slices` keys them (only read when
    `principal_energy` is set). The ranks
    come from the singular values alone (`singular_values`), and `decompose` takes them from here, so no matrix's
    singular values are computed twice.
    """
    rank = min(layout.hidden_size(config.base_config), config.expert_intermediate_size(layout))
    experts = experts_per_slice(config)
    if config.principal_energy is None:
        tail = rank - spri_init.principal_rank(torch.empty(rank), config.principal_ratio)
        check_tail(config, tail, "every FFN matrix")
        return max(spri_init.residual_rank_per_expert(tail, experts), 1), None
    largest, ranks = 0, {}
    for idx in config.upcycled_layers(stack):
        for proj, weight in ffn_matrices(idx).items():
            principal = principal_of(config, spri_init.singular_values(weight))
            ranks.setdefault(idx, {})[proj] = principal
            check_tail(config, rank - principal, f"{stack} layer {idx} {proj}")
            largest = max(largest, spri_init.residual_rank_per_expert(rank - principal, experts))
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

    `matrices` are the layer's `ffn_slices`. Computed in float64; with `out_dtype` each projection's experts are cast
    as soon as they are made (the streaming upcycler keeps one layer's float64 work at a time this way). `layer_key`
    seeds the layer's random stream (the layer index; encoder layers are offset). `decomposed` (`{name:
    decompose(...)}`) gives the SVDs made elsewhere (the streaming upcycler's workers); without it the layer's SVDs are
    made here, as one batch on an accelerator `svd_device`, with the principal ranks `principals` (`{name: r}`, from
    `residual_rank`) where given.

    With `expert_granularity` G > 1 each slice is upcycled as an FFN of its own into the `N = num_experts / G` experts
    that hold it (expert `n * G + s` is the n-th of slice s), and the router's `N` rows are each repeated for the G
    experts of their virtual group.
    """

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if out_dtype is None else tensor.to(out_dtype)

    generator = spri_init.layer_generator(config.seed, layer_key)
    granularity, num_experts = config.expert_granularity, experts_per_slice(config)
    hidden = layout.hidden_size(config.base_config)
    router = config.initializer_range * torch.randn(num_experts, hidden, generator=generator, dtype=torch.float64)
    tensors = {"router.weight": router.repeat_interleave(granularity, dim=0)}
    up_names = ("gate", "up") if layout.gated else ("up",)
    prefix = "gate_up" if layout.gated else "up"

    if config.init == "spri":
        _, expert_coef = spri_init.spri_coefficients(num_experts, config.spri_mode, config.diversity, config.residual_scale)
        if decomposed is None:
            svds = spri_init.thin_svds(list(matrices.values()), svd_method, svd_device)
            principals = principals or {}
            decomposed = {
                key: decompose(config, w, svd, principals.get(key)) for (key, w), svd in zip(matrices.items(), svds)
            }
        factors = {}
        for key in matrices:  # the random partition draws in this fixed order
            svd, principal, shared = decomposed[key]
            factor_b, factor_a = spri_init.spri_factors(
                svd, num_experts, principal=principal, expert_coef=expert_coef, partition=config.partition,
                rank_per_expert=config.residual_rank, generator=generator,
            )  # fmt: skip
            factors[key] = (shared, factor_b, factor_a)
        del decomposed
        if config.stage == 1:
            tensors.update(stage1_tensors(factors, up_names, prefix, granularity))
        else:
            experts = {key: cast(spri_init.materialize_experts(*factors.pop(key))) for key in list(matrices)}
            tensors.update(stage2_tensors(experts, up_names, prefix, granularity))
    else:
        experts = {}
        for piece in range(granularity):
            experts.update(baseline_experts(config, matrices, (*up_names, "down"), piece, generator, cast))
        tensors.update(stage2_tensors(experts, up_names, prefix, granularity))

    if biases:
        zero = config.init == "random"
        per_slice_up = [
            torch.cat([biases[p].detach().double().chunk(granularity)[s] for p in up_names]) for s in range(granularity)
        ]
        up_bias = interleave_slices([bias.expand(num_experts, -1) for bias in per_slice_up])
        tensors[f"experts.{prefix}_proj_bias"] = up_bias * (not zero)
        # the down bias is added once per virtual group: each of its G experts adds it with weight 1/G
        down_bias = biases["down"].detach().double() * (not zero)
        tensors["experts.down_proj_bias"] = down_bias.expand(config.num_experts, -1)
    tensors = {key: cast(tensor) for key, tensor in tensors.items()}
    if config.router_balance in ("bias", "both"):  # bias balancing starts from no correction, kept in float32
        tensors["router.e_score_correction_bias"] = torch.zeros(config.num_experts, dtype=torch.float32)
    return tensors


def interleave_slices(per_slice: list[torch.Tensor]) -> torch.Tensor:
    """G tensors (N, ...), one per slice, -> (N * G, ...) with expert `n * G + s` the n-th of slice s."""
    if len(per_slice) == 1:
        return per_slice[0]
    return torch.stack(per_slice, dim=1).flatten(0, 1)


def baseline_experts(config: SpriConfig, matrices: dict, projections: tuple, piece: int, generator, cast) -> dict:
    """The experts of one slice for the baseline inits (copy, noise, drop, random), keyed as `matrices`; the random
    draws in the order of `projections`."""
    granularity, num_experts = config.expert_granularity, experts_per_slice(config)
    if config.init == "drop":
        width = matrices[slice_name("down", piece, granularity)].shape[1]
        dropped = spri_init.drop_neurons(num_experts, width, config.drop_ratio, generator)
    experts = {}
    for proj in projections:
        key = slice_name(proj, piece, granularity)
        weight = matrices[key]
        if config.init == "copy":
            made = spri_init.copy_experts(weight, num_experts)
        elif config.init == "noise":
            made = spri_init.noise_experts(weight, num_experts, config.noise_std, generator)
        elif config.init == "drop":
            made = spri_init.drop_experts(weight, dropped, 1 if proj == "down" else 0, generator)
        else:  # random
            made = spri_init.random_experts(tuple(weight.shape), num_experts, config.initializer_range, generator)
        experts[key] = cast(made)
    return experts


def stage1_tensors(factors: dict, up_names: tuple, prefix: str, granularity: int) -> dict:
    """SpriResidualExperts' tensors from each slice's `(shared, factor_b, factor_a)`: the shared bases slice after
    slice, the factors of the experts interleaved."""
    pieces = range(granularity)

    def key(proj: str, piece: int) -> str:
        return slice_name(proj, piece, granularity)

    tensors = {f"experts.{prefix}_shared": torch.cat([factors[key(p, s)][0] for s in pieces for p in up_names])}
    for factor, position in (("b", 1), ("a", 2)):
        tensors[f"experts.{prefix}_residual_{factor}"] = interleave_slices(
            [torch.cat([factors[key(p, s)][position] for p in up_names], dim=1) for s in pieces]
        )
        tensors[f"experts.down_residual_{factor}"] = interleave_slices([factors[key("down", s)][position] for s in pieces])
    tensors["experts.down_shared"] = torch.cat([factors[key("down", s)][0] for s in pieces], dim=1)
    return tensors


def stage2_tensors(experts: dict, up_names: tuple, prefix: str, granularity: int) -> dict:
    """Fused stage-2 expert tensors from each slice's experts (`(N, out, in)`, keyed as `ffn_slices`)."""
    pieces = range(granularity)

    def key(proj: str, piece: int) -> str:
        return slice_name(proj, piece, granularity)

    return {
        f"experts.{prefix}_proj": interleave_slices(
            [torch.cat([experts[key(p, s)] for p in up_names], dim=1) for s in pieces]
        ),
        "experts.down_proj": interleave_slices([experts[key("down", s)] for s in pieces]),
    }
