"""Figure (d): spri-hf upcycle vs mergekit-moe on the real SmolLM2-135M."""

import subprocess
from pathlib import Path

import spri_hf  # noqa: F401  (registers model_type "spri")

from .common import MERGEKIT_SETUP, TITLES
from .measuring import check_outputs, measure_commands, spread_note
from .models import smollm2_folder, upcycle_command
from .results import Figure, log


# ---------------------------------------------------------------------------------------------------------------------
# (d) mergekit-moe


def figure_mergekit(spec, device, runs, work: Path, cache_dir: Path, venv: Path, setup: bool, jobs: int) -> Figure:
    figure = Figure("mergekit", TITLES["mergekit"])
    if spec is None:
        figure.skipped.append(dict(setting="all", reason="the tiny preset skips mergekit (it needs the real model)"))
        return figure
    mergekit_moe = venv / "bin" / "mergekit-moe"
    if not mergekit_moe.exists() and setup:
        log(f"  creating mergekit's virtual environment: {MERGEKIT_SETUP.format(venv=venv)}")
        subprocess.run(MERGEKIT_SETUP.format(venv=venv), shell=True, check=True)
    if not mergekit_moe.exists():
        reason = (f"no {mergekit_moe}; create it with `{MERGEKIT_SETUP.format(venv=venv)}` (torch first, so that pip "
                  "takes the CPU wheel), or run with --setup")
        figure.skipped.append(dict(setting="all", reason=reason))
        return figure
    model = smollm2_folder(cache_dir)
    config_path = work / "mergekit-moe.yml"
    config_path.write_text(
        f"base_model: {model}\ngate_mode: random\ndtype: float32\nexperts_per_token: {spec['top_k']}\nexperts:\n"
        + "".join(f"  - source_model: {model}\n" for _ in range(spec["experts"]))
    )
    gpu = device.type == "cuda"  # then both tools do their arithmetic there (mergekit --cuda, --svd-device)
    commands = {
        "mergekit": [mergekit_moe, config_path, work / "mergekit.out",
                     "--i-understand-this-is-not-useful-without-training", *(["--cuda"] if gpu else [])],
        "spri": upcycle_command(model, work / "spri.out", spec, init="spri", svd_device="cuda" if gpu else None),
        "copy": upcycle_command(model, work / "copy.out", spec, init="copy"),
    }
    measured = measure_commands(commands, runs or spec["runs"], work, jobs)
    check_outputs(figure, measured, {
        "mergekit": dict(model_type="mixtral", num_experts=spec["experts"]),
        "spri": dict(model_type="spri", num_experts=spec["experts"], stage=1),
        "copy": dict(model_type="spri", num_experts=spec["experts"], stage=2),
    })
    version = subprocess.run([venv / "bin" / "python", "-c", "import importlib.metadata as m; print(m.version("
                              "'mergekit'))"], capture_output=True, text=True).stdout.strip()
    figure.details = dict(spec, model=str(model), mergekit_version=version, mergekit_config=config_path.read_text(),
                          runs=measured)
    setting = f"SmolLM2-135M -> {spec['experts']} experts top-{spec['top_k']}, fp32"
    for name, targets in (("spri", {"wall_s": ("<=", 1.0), "peak_rss_mb": ("<=", 0.25)}), ("copy", {})):
        for metric, key, unit in (("wall time", "wall_s", "s"), ("peak RSS", "peak_rss_mb", "MB")):
            figure.add(setting, metric, unit, (f"spri-hf --init {name}", measured[name][key]),
                       ("mergekit-moe", measured["mergekit"][key]), target=targets.get(key),
                       note=spread_note(measured, name, "mergekit", key))
    return figure
