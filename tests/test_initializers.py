"""The SPRI invariants of docs/METHOD.md on plain tensors, no model involved."""

import pytest
import torch

from spri_hf.upcycling import initializers as spri_init


def _weight(m=24, n=40, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _experts(weight, num_experts, principal, mode="balanced", diversity=0.3, scale=1.0, partition="interleaved", seed=0):
    b, c = spri_init.spri_coefficients(num_experts, mode, diversity, scale)
    shared, fb, fa = spri_init.spri_residual_factors(
        weight, num_experts, principal=principal, shared_coef=b, expert_coef=c, partition=partition,
        generator=torch.Generator().manual_seed(seed),
    )
    return shared, fb, fa, spri_init.materialize_experts(shared, fb, fa)


@pytest.mark.parametrize("partition", ["interleaved", "contiguous", "random"])
def test_partition_is_disjoint_and_covers_the_tail(partition):
    groups = spri_init.partition_residual(24, 10, 4, partition, torch.Generator().manual_seed(0))
    flat = torch.cat(groups).sort().values
    assert torch.equal(flat, torch.arange(10, 24))
    assert max(g.numel() for g in groups) - min(g.numel() for g in groups) <= 1


def test_interleaved_partition_deals_round_robin():
    groups = spri_init.partition_residual(12, 4, 4, "interleaved")
    assert groups[1].tolist() == [5, 9]


@pytest.mark.parametrize("diversity", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("partition", ["interleaved", "contiguous", "random"])
def test_balanced_experts_average_to_the_dense_weight(diversity, partition):
    weight = _weight()
    *_, experts = _experts(weight, 4, principal=12, diversity=diversity, partition=partition)
    torch.testing.assert_close(experts.mean(0), weight, atol=1e-12, rtol=0)
    if diversity > 0:
        assert (experts[0] - experts[1]).abs().max() > 1e-3  # they really differ


def test_partition_mode_residuals_sum_to_the_residual_and_are_orthogonal():
    weight, principal, scale, num_experts = _weight(), 8, 0.7, 4
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    principal_part = (u[:, :principal] * s[:principal]) @ vh[:principal]
    shared, fb, fa, experts = _experts(weight, num_experts, principal, mode="partition", scale=scale)
    torch.testing.assert_close(shared, principal_part, atol=1e-12, rtol=0)
    residuals = (experts - principal_part) / scale
    torch.testing.assert_close(residuals.sum(0), weight - principal_part, atol=1e-12, rtol=0)
    for i in range(num_experts):
        for j in range(num_experts):
            if i != j:
                assert (residuals[i].T @ residuals[j]).abs().max() < 1e-10
                assert (residuals[i] @ residuals[j].T).abs().max() < 1e-10
    assert residuals[0].norm() > 1e-3


def test_full_principal_ratio_makes_every_expert_the_dense_weight():
    weight = _weight()
    principal = spri_init.principal_rank(torch.linalg.svdvals(weight), principal_ratio=1.0)
    *_, experts = _experts(weight, 4, principal)
    for expert in experts:
        torch.testing.assert_close(expert, weight, atol=1e-10, rtol=0)


def test_factors_have_the_padded_rank_and_reproduce_c_times_r_i():
    weight = _weight(24, 40)
    shared, fb, fa, _ = _experts(weight, 5, principal=10, mode="partition", scale=2.0)  # tail 14 -> ranks 3,3,3,3,2
    assert fb.shape == (5, 24, 3) and fa.shape == (5, 3, 40)
    assert fb[4, :, 2].abs().max() == 0 and fa[4, 2].abs().max() == 0  # zero padding of the smaller group


def test_principal_energy_picks_the_smallest_rank_holding_the_energy():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert spri_init.principal_rank(s, principal_energy=16 / 22) == 1
    assert spri_init.principal_rank(s, principal_energy=0.75) == 2
    assert spri_init.principal_rank(s, principal_energy=1.0) == 4
    assert spri_init.principal_rank(s, principal_ratio=0.5) == 2


def test_same_seed_same_weights_and_other_seed_other_weights():
    weight = _weight()
    a = _experts(weight, 4, 10, partition="random", seed=3)[3]
    b = _experts(weight, 4, 10, partition="random", seed=3)[3]
    c = _experts(weight, 4, 10, partition="random", seed=4)[3]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_baselines():
    weight = _weight()
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(spri_init.copy_experts(weight, 3)[2], weight)
    noisy = spri_init.noise_experts(weight, 3, 0.01, gen)
    relative = (noisy - weight).norm(dim=(1, 2)) / weight.norm()
    assert torch.all((relative > 0.005) & (relative < 0.02))
    dropped = spri_init.drop_neurons(3, 24, 0.5, gen)
    assert all(d.numel() == 12 for d in dropped)
    experts = spri_init.drop_experts(weight, dropped, 0, gen)
    kept = [r for r in range(24) if r not in dropped[0].tolist()]
    assert torch.equal(experts[0, kept], weight[kept]) and not torch.equal(experts[0, dropped[0]], weight[dropped[0]])
    random = spri_init.random_experts((24, 40), 3, 0.02, gen)
    assert abs(random.std().item() - 0.02) < 0.003


def _matrix_with_spectrum(m, n, singular_values, seed=0):
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(m, len(singular_values), generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, len(singular_values), generator=generator, dtype=torch.float64))
    return (left * singular_values) @ right.T


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (64, 64), (96, 384), (384, 96)])
@pytest.mark.parametrize(
    "spectrum", ["random", "ill-conditioned", "rank-deficient"],
)
def test_fast_svd_matches_torch_linalg_svd(shape, spectrum):
    from spri_hf.upcycling.initializers import thin_svd

    m, n = shape
    q = min(m, n)
    if spectrum == "random":
        weight = torch.randn(m, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    elif spectrum == "ill-conditioned":  # singular values from 1 down to 1e-14
        weight = _matrix_with_spectrum(m, n, torch.logspace(0, -14, q, dtype=torch.float64))
    else:  # half of the singular values are exactly zero
        weight = _matrix_with_spectrum(m, n, torch.linspace(1, 0.1, q // 2, dtype=torch.float64))
    u, s, vh = thin_svd(weight, "gram")
    reference = torch.linalg.svd(weight, full_matrices=False)
    # exact reconstruction (float64 rounding; the bar is 1e-5 relative in float32)
    assert ((u * s) @ vh - weight).norm() / weight.norm() < 1e-12
    assert (s[:-1] >= s[1:]).all() and s.shape == (q,)
    # singular values agree where the Gram matrix resolves them (its rounding is eps * s_max**2)
    resolved = reference.S > 1e-5 * reference.S[0]
    torch.testing.assert_close(s[resolved], reference.S[resolved], atol=1e-12 * float(reference.S[0]), rtol=1e-5)
    # the principal part and every residual group agree with the reference SVD's (sign-free products)
    r = int(resolved.sum()) // 2
    principal = (u[:, :r] * s[:r]) @ vh[:r]
    expected = (reference.U[:, :r] * reference.S[:r]) @ reference.Vh[:r]
    assert (principal - expected).norm() / weight.norm() < 1e-9
    # the float32 path the upcycler takes meets the 1e-5 relative bar too
    u32, s32, vh32 = thin_svd(weight.float())
    assert ((u32 * s32) @ vh32 - weight).norm() / weight.norm() < 1e-5


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (96, 384)])
@pytest.mark.parametrize("spectrum", ["random", "ill-conditioned", "rank-deficient"])
def test_singular_values_alone_match_torch_linalg_svdvals(shape, spectrum):
    m, n = shape
    q = min(m, n)
    if spectrum == "random":
        weight = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    elif spectrum == "ill-conditioned":
        weight = _matrix_with_spectrum(m, n, torch.logspace(0, -14, q, dtype=torch.float64))
    else:
        weight = _matrix_with_spectrum(m, n, torch.linspace(1, 0.1, q // 2, dtype=torch.float64))
    s = spri_init.singular_values(weight.float())
    reference = torch.linalg.svdvals(weight)
    assert s.dtype == torch.float64 and s.shape == (q,) and (s[:-1] >= s[1:]).all() and (s >= 0).all()
    # the Gram matrix resolves values down to about 1e-8 * s_max; the energy shares principal_rank reads agree
    torch.testing.assert_close(s, reference, atol=1e-6 * float(reference[0]), rtol=1e-5)
    for energy in (0.3, 0.6, 0.9):
        expected = spri_init.principal_rank(reference, principal_energy=energy)
        assert spri_init.principal_rank(s, principal_energy=energy) == expected


@pytest.mark.parametrize("method", ["gram", "full"])
def test_the_batched_svd_of_an_accelerator_matches_torch_linalg_svd(method):
    """What `--svd-device cuda` runs (a layer's gate, up and down as one batch), checked here on the CPU: the same
    accuracy as `thin_svd`, for both orientations and ill-conditioned spectra."""
    from spri_hf.upcycling.initializers import _batched_svd

    weights = [
        _matrix_with_spectrum(96, 40, torch.logspace(0, -14, 40, dtype=torch.float64), seed=1),  # gate (I, H)
        torch.randn(96, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64),  # up
        _matrix_with_spectrum(40, 96, torch.linspace(1, 0.1, 20, dtype=torch.float64), seed=3),  # down, rank-deficient
    ]
    oriented = torch.stack([w.T if w.shape[0] > w.shape[1] else w for w in weights])
    left, s, right = _batched_svd(oriented, method)
    for j, weight in enumerate(weights):
        u, vh = (right[j].T, left[j].T) if weight.shape[0] > weight.shape[1] else (left[j], right[j])
        assert ((u * s[j]) @ vh - weight).norm() / weight.norm() < 1e-12
        assert (s[j][:-1] >= s[j][1:]).all()
        reference = torch.linalg.svdvals(weight)
        resolved = reference > 1e-5 * reference[0]
        torch.testing.assert_close(s[j][resolved], reference[resolved], atol=1e-12 * float(reference[0]), rtol=1e-5)


def test_fast_svd_refuses_unknown_methods():
    from spri_hf.upcycling.initializers import thin_svd

    with pytest.raises(ValueError, match="svd_method='lanczos' is not supported"):
        thin_svd(torch.ones(2, 3), "lanczos")


def test_upcycling_with_either_svd_method_gives_the_same_model():
    from conftest import tiny_dense

    from spri_hf import SpriForCausalLM

    dense = tiny_dense("llama")
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    gram = SpriForCausalLM.from_dense(dense, num_experts=4, diversity=0.5, stage=2, svd_method="gram")
    full = SpriForCausalLM.from_dense(dense, num_experts=4, diversity=0.5, stage=2, svd_method="full")
    for (name, a), b in zip(gram.state_dict().items(), full.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(gram(ids).logits, full(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="svd_method='qr'"):
        SpriForCausalLM.from_dense(dense, num_experts=4, svd_method="qr")


def test_svd_device_gives_the_same_upcycle():
    """`svd_device` moves only the SVDs: on the device the weights are on it changes nothing, and an unknown device
    is an error naming it."""
    from conftest import assert_same_state, tiny_dense

    from spri_hf import SpriForCausalLM

    dense = tiny_dense("qwen3")
    reference = SpriForCausalLM.from_dense(dense, num_experts=4)
    assert_same_state(SpriForCausalLM.from_dense(dense, num_experts=4, svd_device="cpu"), reference)
    with pytest.raises((RuntimeError, ValueError), match="tpu-9|device"):
        SpriForCausalLM.from_dense(dense, num_experts=4, svd_device="tpu-9")
