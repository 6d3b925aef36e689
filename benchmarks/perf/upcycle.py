"""Figure (c): upcycling, spri vs copy, and the SVD methods."""

from pathlib import Path

import torch

import spri_hf  # noqa: F401  (registers model_type "spri")
from spri_hf import thin_svd

from .common import TITLES
from .measuring import check_outputs, folder_bytes, measure_commands, spread_note, time_side_by_side
from .models import qwen2_checkpoint, upcycle_command
from .results import Figure, log


# ---------------------------------------------------------------------------------------------------------------------
# (c) upcycling: spri vs copy, SVD methods


def relative_reconstruction_error(weight: torch.Tensor, u, s, vh, dtype: torch.dtype) -> float:
    """||U diag(s) V^T - W|| / ||W||, everything cast to `dtype` first."""
    w = weight.to(dtype)
    return (((u.to(dtype) * s.to(dtype)) @ vh.to(dtype) - w).norm() / w.norm()).item()


def figure_upcycle(spec: dict, device, repeats, runs, work: Path, cache_dir: Path, jobs: int) -> Figure:
    figure = Figure("upcycle", TITLES["upcycle"])

    # One FFN matrix: thin_svd's default method vs plain torch.linalg.svd, at equal accuracy.
    rows, cols = spec["svd_shape"]
    weight = (0.02 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))).to(device)
    factors = {}
    methods = {
        "thin_svd default": lambda: thin_svd(weight),
        "torch.linalg.svd fp32": lambda: torch.linalg.svd(weight, full_matrices=False),
        "torch.linalg.svd fp64": lambda: thin_svd(weight, method="full"),  # what --svd-method full runs
    }
    log(f"  upcycle: SVD of one {rows}x{cols} matrix")
    seconds = time_side_by_side({name: (lambda n=name: factors.__setitem__(n, methods[n]())) for name in methods},
                                warmup=1, repeats=repeats or spec["svd_repeats"], device=device)
    errors = {name: relative_reconstruction_error(weight, *usv, torch.float32) for name, usv in factors.items()}
    errors_fp64 = {name: relative_reconstruction_error(weight, *usv, torch.float64) for name, usv in factors.items()}
    for name in methods:
        figure.check(f"{name}: relative reconstruction error <= 1e-5 (fp32)", errors[name] <= 1e-5,
                     error_fp32=errors[name], error_fp64=errors_fp64[name])
    setting = f"one {rows}x{cols} matrix, {device.type}"
    for reference in ("torch.linalg.svd fp32", "torch.linalg.svd fp64"):
        figure.add(setting, "SVD time", "s", ("thin_svd default", seconds["thin_svd default"]),
                   (reference, seconds[reference]), per="reference/spri", target=(">=", 3.0))
    figure.add(setting, "relative reconstruction error (fp32)", "", ("thin_svd default", errors["thin_svd default"]),
               ("torch.linalg.svd fp32", errors["torch.linalg.svd fp32"]))

    # Whole upcycles, each a fresh process. On a GPU machine the SVDs run there (--svd-device), the rest on the CPU.
    src = qwen2_checkpoint(spec, torch.float32, cache_dir)
    gpu = dict(svd_device="cuda") if device.type == "cuda" else {}
    commands = {
        "copy": upcycle_command(src, work / "copy.out", spec, init="copy"),
        "spri": upcycle_command(src, work / "spri.out", spec, init="spri", **gpu),
        "spri_stage2": upcycle_command(src, work / "spri_stage2.out", spec, init="spri", stage=2, **gpu),
        "spri_full_svd": upcycle_command(src, work / "spri_full_svd.out", spec, init="spri", svd_method="full", **gpu),
    }
    measured = measure_commands(commands, runs or spec["runs"], work, jobs)
    experts = spec["experts"]
    check_outputs(figure, measured, {
        "copy": dict(model_type="spri", num_experts=experts, stage=2),
        "spri": dict(model_type="spri", num_experts=experts, stage=1),
        "spri_stage2": dict(model_type="spri", num_experts=experts, stage=2),
        "spri_full_svd": dict(model_type="spri", num_experts=experts, stage=1),
    })
    figure.details = dict(spec, checkpoint=str(src), checkpoint_mb=folder_bytes(src) / 1e6, svd_seconds=seconds,
                          reconstruction_error_fp32=errors, reconstruction_error_fp64=errors_fp64, runs=measured)
    shape = f"{spec['layers']} x ({spec['hidden']}, {spec['intermediate']}) -> {experts} experts"
    for name, label, wall_target in (("spri", "stage 1 (default)", 1.0), ("spri_stage2", "--stage 2", 3.0)):
        for metric, key, target in (("wall time", "wall_s", ("<=", wall_target)), ("peak RSS", "peak_rss_mb", None)):
            figure.add(f"{shape}, {label}", f"upcycle {metric}", "s" if key == "wall_s" else "MB",
                       (name, measured[name][key]), ("copy", measured["copy"][key]), target=target,
                       note=spread_note(measured, name, "copy", key))
    figure.add(f"{shape}, stage 1 (default)", "upcycle wall time", "s", ("default svd", measured["spri"]["wall_s"]),
               ("--svd-method full", measured["spri_full_svd"]["wall_s"]), per="reference/spri",
               note="the whole command (read, SVDs, write); the SVDs alone are the per-matrix rows")
    return figure
