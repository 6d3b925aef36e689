"""Pure tensor functions that turn dense FFN weights into expert weights (SPRI and its baselines).

Everything here works on plain tensors, never on modules, so every invariant of SPRI can be tested
without building a model. Weights are `(out_features, in_features)` matrices as in `nn.Linear`.
All arithmetic is done in float64 and the results are returned in float64; callers cast.
"""

import math

import torch

from ..defaults import PARTITIONS, SPRI_MODES
from ..torch_tools import torch_threads


SVD_METHODS = ("auto", "gram", "full")


def check_svd_method(method: str) -> str:
    if method not in SVD_METHODS:
        raise ValueError(f"svd_method={method!r} is not supported; choose one of {SVD_METHODS}.")
    return method


def _one_thread_if(small: bool):
    """One thread for a CPU factorisation of an FFN-sized problem (see `torch_threads`)."""
    return torch_threads(1 if small else None)


def thin_svd(
    weight: torch.Tensor, method: str = "auto", device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD `(U, s, Vh)` of `weight` in float64, singular values descending.

    Args:
        method: "gram" takes `eigh` of the smaller Gram matrix `A A^T` (A = W or W^T): one symmetric eigensolve of
            size min(m, n) instead of an SVD of the whole matrix (6-18x faster on CPU for FFN shapes). The
            singular vectors of the longer side are recovered as `U^T A / s` with `s` the norms of `U^T A`'s rows,
            so products like `U diag(s) Vh`, `P` and every `R_i` are exact to float64 rounding whatever the
            conditioning (below about 1e-8 * s_max the directions within that noise subspace are not unique, as in
            any SVD). "full" is
            `torch.linalg.svd`. "auto" is "gram".
        device: where to compute (e.g. "cuda"); results come back on `weight`'s device.
    """
    check_svd_method(method)
    w = weight.detach().to(device=device or weight.device, dtype=torch.float64)
    if method == "full":
        with _one_thread_if(w.device.type == "cpu" and min(w.shape) <= 2048):
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        transpose = w.shape[0] > w.shape[1]
        a = w.T if transpose else w  # (p, q), p <= q
        gram = a @ a.T
        # LAPACK's threaded symmetric eigensolver spins badly when cores are shared (10x slower on 2 busy cores);
        # one thread solves an FFN-sized problem (p <= 2048) in tens of milliseconds anyway
        with _one_thread_if(gram.device.type == "cpu" and gram.shape[0] <= 2048):
            _, eigenvectors = torch.linalg.eigh(gram)
        scaled = eigenvectors.T @ a  # diag(s) V_a^T, exact as a product
        # singular values as the norms of those rows: exact even where the Gram eigenvalues are rounding noise
        s, order = scaled.norm(dim=1).sort(descending=True)
        left, scaled = eigenvectors[:, order], scaled[order]
        right = scaled / torch.where(s > 0, s, torch.ones_like(s))[:, None]  # V_a^T; zero rows where s == 0
        u, vh = (right.T, left.T) if transpose else (left, right)
    return u.to(weight.device), s.to(weight.device), vh.to(weight.device)
def thin_svds(
    weights: list[torch.Tensor], method: str = "auto", device: torch.device | str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`thin_svd` of each of `weights`. On an accelerator the matrices whose Gram matrices have one size (a gated
    FFN's gate, up and down all do) are solved as one batch there; on the CPU one after another, as `thin_svd`.
    """
    check_svd_method(method)
    target = torch.device(device) if device is not None else (weights[0].device if weights else torch.device("cpu"))
    if target.type == "cpu" or len(weights) < 2:
        return [thin_svd(weight, method, device) for weight in weights]
    results = [None] * len(weights)
    batches = {}  # the oriented shape (p, q), p <= q -> indices
    for i, weight in enumerate(weights):
        batches.setdefault(tuple(sorted(weight.shape)), []).append(i)
    for indices in batches.values():
        oriented = [weights[i].detach().to(device=target, dtype=torch.float64) for i in indices]
        oriented = torch.stack([w.T if w.shape[0] > w.shape[1] else w for w in oriented])
        left, s, right = _batched_svd(oriented, method)
        for j, i in enumerate(indices):
            home = weights[i].device
            u, vh = (right[j].T, left[j].T) if weights[i].shape[0] > weights[i].shape[1] else (left[j], right[j])
            results[i] = (u.to(home), s[j].to(home), vh.to(home))
    return results


def singular_values(weight: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Singular values of `weight` in float64, descending, without the singular vectors.

    The square roots of the smaller Gram matrix's eigenvalues (`eigvalsh`): about a third of `thin_svd`'s work. Values
    below about 1e-8 * s_max are rounding noise, which is enough to choose a rank by its share of `sum(s**2)`
    (`principal_rank`), not to reconstruct the matrix.
    """
    w = weight.detach().to(device=device or weight.device, dtype=torch.float64)
    a = w.T if w.shape[0] > w.shape[1] else w
    gram = a @ a.T
    with _one_thread_if(gram.device.type == "cpu" and gram.shape[0] <= 2048):
        values = torch.linalg.eigvalsh(gram)  # ascending
    return values.clamp_min(0).sqrt().flip(0).to(weight.device)


def _batched_svd(a: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(U, s, Vh)` of a batch `a` (B, p, q), p <= q, float64: `thin_svd`'s algorithm with a batch dimension."""
    if method == "full":
        return torch.linalg.svd(a, full_matrices=False)
    _, eigenvectors = torch.linalg.eigh(a @ a.mT)
    scaled = eigenvectors.mT @ a
    s, order = scaled.norm(dim=-1).sort(dim=-1, descending=True)
    left = eigenvectors.gather(-1, order[:, None, :].expand_as(eigenvectors))
    scaled = scaled.gather(-2, order[:, :, None].expand_as(scaled))
    right = scaled / torch.where(s > 0, s, torch.ones_like(s))[..., None]
    return left, s, right


def check_device(device: torch.device | str | None, setting: str = "svd_device") -> torch.device | None:
    """`device` as a `torch.device`, or a `ValueError` naming it when it is unknown or not available here."""
    if device is None:
        return None
    try:
        device = torch.device(device)
        if device.type == "meta":
            raise ValueError("the meta device holds no values")
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:  # unknown name, no such device, torch built without it
        reason = str(err).splitlines()[0].split(". ")[0]
        raise ValueError(
            f"{setting}={str(device)!r} is not available on this machine ({reason}); leave it unset to compute the "
            "SVDs on the CPU."
        ) from None
    return device




def layer_generator(seed: int, layer_idx: int) -> torch.Generator:
    """A CPU generator whose stream depends only on `(seed, layer_idx)`, so layers can be upcycled in any order."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (int(layer_idx) + 1))


def principal_rank(
    singular_values: torch.Tensor, principal_ratio: float | None = None, principal_energy: float | None = None
) -> int:
    """Rank `r` of the principal part shared by all experts.

    Args:
        singular_values: descending singular values of one matrix.
        principal_ratio: keep `round(principal_ratio * q)` directions, `q = len(singular_values)`.
        principal_energy: keep the smallest `r` whose directions hold this share of `sum(s**2)`.
    """
    q = singular_values.numel()
    if principal_energy is None:
        return int(math.floor(principal_ratio * q + 0.5))
    energy = singular_values.double().square()
    cumulative = torch.cumsum(energy, 0) / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
    # smallest r with cumulative[r - 1] >= principal_energy
    r = int(torch.searchsorted(cumulative, torch.tensor(principal_energy, dtype=torch.float64) - 1e-12).item()) + 1
    return min(max(r, 0), q) if principal_energy > 0 else 0


def partition_residual(
    rank: int, principal: int, num_experts: int, partition: str = "interleaved", generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Split the tail indices `principal .. rank-1` of an SVD into `num_experts` disjoint groups.

    Args:
        rank: number of singular directions `q = min(m, n)`.
        principal: rank `r` of the shared principal part.
        partition: "interleaved" (index j -> expert (j - r) mod N), "contiguous" (N bands), "random" (seeded).
    """
    tail = torch.arange(principal, rank)
    if partition == "interleaved":
        return [tail[i::num_experts] for i in range(num_experts)]
    if partition == "contiguous":
        return list(torch.tensor_split(tail, num_experts))
    if partition == "random":
        shuffled = tail[torch.randperm(tail.numel(), generator=generator)]
        return [shuffled[i::num_experts].sort().values for i in range(num_experts)]
    raise ValueError(f"partition={partition!r} is not one of {PARTITIONS}.")


def residual_rank_per_expert(tail: int, num_experts: int) -> int:
    """Largest group size when `tail` directions are split across `num_experts` (all partitions are balanced)."""
    return -(-tail // num_experts)


def spri_coefficients(num_experts: int, spri_mode: str, diversity: float, residual_scale: float) -> tuple[float, float]:
    """`(b, c)` of `W_i = P + b * R + c * R_i` for the two SPRI presets (see docs/METHOD.md)."""
    if spri_mode == "balanced":
        return 1.0 - diversity, diversity * num_experts
    if spri_mode == "partition":
        return 0.0, residual_scale
    raise ValueError(f"spri_mode={spri_mode!r} is not one of {SPRI_MODES}.")


def spri_residual_factors(
    weight: torch.Tensor,
    num_experts: int,
    *,
    principal: int,
    shared_coef: float,
    expert_coef: float,
    partition: str = "interleaved",
    rank_per_expert: int | None = None,
    generator: torch.Generator | None = None,
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPRI in its stage-1 form: a shared base and per-expert low-rank residual factors.

    Returns `(shared, factor_b, factor_a)` with `shared = P + b * R` of shape (m, n), `factor_b` (N, m, k) and
    `factor_a` (N, k, n) such that `factor_b[i] @ factor_a[i] = c * R_i`. Groups smaller than `k` are zero padded;
    zero rows/columns receive zero gradients, so padding never changes training.
    """
    svd = svd if svd is not None else thin_svd(weight)
    shared = spri_shared(weight, svd, principal=principal, shared_coef=shared_coef)
    factor_b, factor_a = spri_factors(
        svd, num_experts, principal=principal, expert_coef=expert_coef, partition=partition,
        rank_per_expert=rank_per_expert, generator=generator,
    )  # fmt: skip
    return shared, factor_b, factor_a


def spri_shared(
    weight: torch.Tensor, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, principal: int, shared_coef: float
) -> torch.Tensor:
    """The shared base `S = P + b * R` of one matrix (the heavy, random-free half of `spri_residual_factors`)."""
    w = weight.detach().to(torch.float64)
    if shared_coef == 1.0:  # S = W whatever P is
        return w.clone() if w is weight else w
    u, s, vh = svd
    principal_part = (u[:, :principal] * s[:principal]) @ vh[:principal]
    # P + b (W - P), one pass over the matrix instead of two temporaries
    return principal_part.mul_(1.0 - shared_coef).add_(w, alpha=shared_coef)


def spri_factors(
    svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    num_experts: int,
    *,
    principal: int,
    expert_coef: float,
    partition: str = "interleaved",
    rank_per_expert: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(factor_b, factor_a)` of `spri_residual_factors`: the residual groups (the only random draw) as factors."""
    u, s, vh = svd
    q = s.numel()
    groups = partition_residual(q, principal, num_experts, partition, generator)
    k = rank_per_expert if rank_per_expert is not None else residual_rank_per_expert(q - principal, num_experts)
    k = max(k, 1)
    m, n = u.shape[0], vh.shape[1]
    factor_b = u.new_zeros(num_experts, m, k)
    factor_a = u.new_zeros(num_experts, k, n)
    # c * U diag(s) V^T = (sign(c) U sqrt(|c| s)) (sqrt(|c| s) V^T); with c == 0 keep A = sqrt(s) V^T and B = 0 so
    # the factors can still learn (as LoRA starts from B = 0).
    sign = -1.0 if expert_coef < 0 else 1.0
    for i, group in enumerate(groups):
        g = group.numel()
        if g == 0:
            continue
        root = (abs(expert_coef) * s[group]).sqrt()
        if expert_coef == 0:
            factor_a[i, :g] = s[group].sqrt()[:, None] * vh[group]
        else:
            factor_b[i, :, :g] = sign * u[:, group] * root
            factor_a[i, :g] = root[:, None] * vh[group]
    return factor_b, factor_a


def materialize_experts(shared: torch.Tensor, factor_b: torch.Tensor, factor_a: torch.Tensor) -> torch.Tensor:
    """Stage-2 expert weights `W_i = shared + B_i A_i`, shape (N, m, n)."""
    return shared.unsqueeze(0) + torch.bmm(factor_b, factor_a)


def copy_experts(weight: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sparse upcycling: every expert is the dense matrix."""
    return weight.detach().to(torch.float64).unsqueeze(0).expand(num_experts, -1, -1).clone()


def noise_experts(weight: torch.Tensor, num_experts: int, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Copy plus Gaussian noise whose standard deviation is `noise_std` times the matrix's own."""
    experts = copy_experts(weight, num_experts)
    scale = noise_std * experts[0].std()
    return experts + scale * torch.randn(experts.shape, generator=generator, dtype=torch.float64)


def drop_neurons(num_experts: int, intermediate: int, drop_ratio: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Drop-Upcycling: for every expert, the intermediate neurons to re-initialise (shared by all projections)."""
    count = int(math.floor(drop_ratio * intermediate + 0.5))
    return [torch.randperm(intermediate, generator=generator)[:count].sort().values for _ in range(num_experts)]


def drop_experts(
    weight: torch.Tensor, dropped: list[torch.Tensor], neuron_dim: int, generator: torch.Generator
) -> torch.Tensor:
    """Re-initialise the dropped neurons of each expert from N(mean, std) of the dense matrix.

    Args:
        neuron_dim: 0 when neurons are rows (gate/up), 1 when they are columns (down).
    """
    experts = copy_experts(weight, len(dropped))
    mean, std = experts[0].mean(), experts[0].std()
    for i, idx in enumerate(dropped):
        if neuron_dim == 0:
            shape = (idx.numel(), experts.shape[2])
            experts[i, idx, :] = mean + std * torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            shape = (experts.shape[1], idx.numel())
            experts[i, :, idx] = mean + std * torch.randn(shape, generator=generator, dtype=torch.float64)
    return experts


def random_experts(shape: tuple[int, int], num_experts: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """From-scratch experts: N(0, std) entries."""
    return std * torch.randn((num_experts, *shape), generator=generator, dtype=torch.float64)
