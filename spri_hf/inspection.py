"""Per-layer diagnostics of an SPRI model: how far apart its experts are and how much of them is residual."""

import torch

from .moe_layers import SpriResidualExperts
from .upcycling.initializers import principal_rank


@torch.no_grad()
def full_experts(block):
    """The block's experts in stage-2 form (stage-1 factors are materialised into a copy)."""
    return block.experts.materialize() if isinstance(block.experts, SpriResidualExperts) else block.experts


def expert_matrices(experts) -> torch.Tensor:
    """All expert weights flattened per expert, shape (E, params per expert), float64."""
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    return torch.cat([up.flatten(1), experts.down_proj.flatten(1)], dim=1).double()


@torch.no_grad()
def inspect_model(model) -> list[dict]:
    """One row per MoE layer: experts, principal rank, residual energy share, mean pairwise expert distance.

    - principal rank: rank of the part shared by all experts (from the config; with `principal_energy`, measured on
      the experts' mean down projection).
    - residual energy share: `sum_i ||W_i - mean||^2 / sum_i ||W_i||^2`, the share of expert energy that differs
      between experts (0 for copy upcycling).
    - pairwise distance: mean over expert pairs of `||W_i - W_j|| / ||mean||` (relative Frobenius distance).
    """
    config = model.config
    rows = []
    for stack, idx, block in model.moe_sites():
        experts = full_experts(block)
        flat = expert_matrices(experts)
        mean = flat.mean(0)
        deviation = (flat - mean).square().sum() / flat.square().sum().clamp_min(1e-300)
        distances = torch.cdist(flat, flat)
        num = flat.shape[0]
        pairwise = distances.sum() / max(num * (num - 1), 1) / mean.norm().clamp_min(1e-300)
        down = experts.down_proj
        q = min(down.shape[1:])
        if config.init != "spri":
            rank = q
        elif config.principal_energy is None:
            rank = principal_rank(torch.empty(q), config.principal_ratio)
        else:
            rank = principal_rank(torch.linalg.svdvals(down.double().mean(0)), principal_energy=config.principal_energy)
        rows.append(
            {
                "stack": stack,
                "layer": idx,
                "experts": num,
                "principal_rank": rank,
                "rank": q,
                "residual_energy_share": deviation.item(),
                "pairwise_distance": pairwise.item(),
            }
        )
    return rows


def format_report(config, rows: list[dict]) -> str:
    head = (
        f"SPRI model: init={config.init}, stage={config.stage}, {config.num_experts} experts, "
        f"top-{config.num_experts_per_tok}, base={config.base_config.model_type}"
    )
    lines = [head, f"{'layer':>5} {'experts':>7} {'principal rank':>15} {'residual share':>15} {'pairwise dist':>14}"]
    several_stacks = len({row["stack"] for row in rows}) > 1
    for row in rows:
        layer = f"{row['stack']}.{row['layer']}" if several_stacks else row["layer"]
        lines.append(
            f"{layer:>5} {row['experts']:>7} {row['principal_rank']:>8}/{row['rank']:<6} "
            f"{row['residual_energy_share']:>15.3e} {row['pairwise_distance']:>14.3e}"
        )
    return "\n".join(lines)
