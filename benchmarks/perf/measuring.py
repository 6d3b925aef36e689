"""Measuring: in-process calls timed alternately, fresh processes with their wall time and peak RSS."""

import contextlib
import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import spri_hf  # noqa: F401  (registers model_type "spri")

from .results import Figure, log


# ---------------------------------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(calls: dict, *, warmup: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each callable. Calls alternate (A B, then B A, ...), so a slow phase of a shared
    machine falls on all of them alike; `warmup` untimed rounds first (allocator, kernels, page faults)."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    synchronize(device)
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# A child's ru_maxrss starts at its parent's RSS (Linux keeps the old mm's high-water mark across exec), and this
# process holds models: every command is started by this stdlib-only wrapper, a few MB large, which writes the
# command's wall time and ru_maxrss (the command and the children it waited for) to the file given first.
_RUSAGE_WRAPPER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as out:
    json.dump({"wall_s": time.perf_counter() - start, "maxrss_kb": usage.ru_maxrss, "exit": code}, out)
sys.exit(0 if code == 0 else 1)
"""


def run_many(commands: dict[str, tuple[list, Path]], jobs: int = 1) -> dict[str, dict]:
    """Run `{name: (command, log file)}` as fresh processes, at most `jobs` at once: wall seconds, peak RSS (MB), the
    `RESULT {json}` line a worker printed, and for output folders named `*.out` their size and config (the folder
    is then removed, to keep disk use at one output)."""
    pending, running, results = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, (command, log_path) = pending.pop(0)
            command = [str(part) for part in command]
            log(f"  $ {' '.join(command)}")
            log_file = open(log_path, "w")
            usage_path = log_path.with_suffix(".rusage.json")
            wrapped = [sys.executable, "-S", "-c", _RUSAGE_WRAPPER, str(usage_path), *command]
            process = subprocess.Popen(wrapped, stdout=log_file, stderr=subprocess.STDOUT)
            running[process.pid] = (name, command, log_path, log_file, process, usage_path)
        try:
            pid, status, _ = os.wait4(-1, 0)
        except BaseException:
            for *_, process, _ in running.values():
                process.kill()
            raise
        if pid not in running:
            continue
        name, command, log_path, log_file, process, usage_path = running.pop(pid)
        log_file.close()
        process.returncode = os.waitstatus_to_exitcode(status)
        output = log_path.read_text(errors="replace")
        if process.returncode != 0:
            tail = "\n".join(output.splitlines()[-20:])
            raise RuntimeError(f"command failed: {' '.join(command)}\n{tail}")
        usage = json.loads(usage_path.read_text())
        result = dict(command=" ".join(command), wall_s=usage["wall_s"], peak_rss_mb=usage["maxrss_kb"] * 1024 / 1e6,
                      load=os.getloadavg()[0])
        for line in output.splitlines():
            if line.startswith("RESULT "):
                result["result"] = json.loads(line.removeprefix("RESULT "))
        for part in command:
            if part.endswith(".out") and os.path.isdir(part):
                result["output_mb"] = folder_bytes(Path(part)) / 1e6
                result["output_config"] = checkpoint_summary(Path(part))
                shutil.rmtree(part, ignore_errors=True)
        results[name] = result
    return results


def run_measured(command: list, log_path: Path) -> dict:
    return run_many({"run": (command, log_path)})["run"]


def measure_commands(commands: dict[str, list], runs: int, work: Path, jobs: int) -> dict[str, dict]:
    """Each command `runs` times, in rotating order (a round runs every command once), every run a fresh process.

    The figures are the best of the rounds for every command alike (`wall_s`, `peak_rss_mb`): on a shared machine a
    neighbour only ever adds time, so the minimum is the closest to what the command costs; the median and the slowest
    round say how noisy the run was, and `round_ratios` pairs the commands round by round."""
    names = list(commands)
    runs_by_name = {name: [] for name in names}
    for repeat in range(runs):
        order = names if repeat % 2 == 0 else names[::-1]
        batch = run_many({name: (commands[name], work / f"{name}.{repeat}.log") for name in order}, jobs)
        for name in names:
            runs_by_name[name].append(batch[name])
    measured = {}
    for name, values in runs_by_name.items():
        walls = [run["wall_s"] for run in values]
        rss = [run["peak_rss_mb"] for run in values]
        measured[name] = dict(
            wall_s=min(walls), wall_s_median=statistics.median(walls), wall_s_max=max(walls),
            peak_rss_mb=min(rss), peak_rss_mb_max=max(rss), output_mb=values[0].get("output_mb"), rounds=len(values),
            runs=values,
        )  # fmt: skip
    return measured


def round_ratios(measured: dict, name: str, reference: str, key: str = "wall_s") -> list[float]:
    """`name / reference` of each round (the two ran one after the other, so they met the same neighbours)."""
    return [run[key] / ref[key] for run, ref in zip(measured[name]["runs"], measured[reference]["runs"])]


def spread_note(measured: dict, name: str, reference: str, key: str = "wall_s") -> str:
    """How much the figure moved over the rounds, and the load of the machine, for a row's note."""
    ratios = round_ratios(measured, name, reference, key)
    values = [run[key] for run in measured[name]["runs"]]
    reference_values = [run[key] for run in measured[reference]["runs"]]
    text = (f"best of {len(values)} rounds; {name} {min(values):.4g}-{max(values):.4g}, {reference} "
            f"{min(reference_values):.4g}-{max(reference_values):.4g}; per-round ratio {min(ratios):.3g}-{max(ratios):.3g}")
    loads = [run["load"] for run in measured[name]["runs"] if "load" in run]
    return text + (f"; load average {min(loads):.1f}-{max(loads):.1f}" if loads else "")


def checkpoint_summary(folder: Path) -> dict:
    """What a written checkpoint is (for the sanity checks): model type, experts, stage, weight files."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return dict(
        model_type=config.get("model_type"),
        num_experts=config.get("num_experts", config.get("num_local_experts")),
        stage=config.get("stage"),
        weight_files=len(list(folder.glob("*.safetensors"))),
    )


def check_outputs(figure: Figure, measured: dict, expected: dict[str, dict]):
    """Every measured command wrote the checkpoint it should have."""
    for name, want in expected.items():
        got = measured[name]["runs"][0].get("output_config", {})
        passed = got.get("weight_files") and all(got.get(key) == value for key, value in want.items())
        wanted = ", ".join(f"{key}={value}" for key, value in want.items())
        figure.check(f"{name} wrote a checkpoint with {wanted}", passed, **got)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets this process's peak RSS (VmHWM) to its current RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap, so that later growth shows in the RSS
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def close_enough(value: torch.Tensor, reference: torch.Tensor) -> tuple[bool, float]:
    """Equal up to the rounding of the dtype, relative to the reference's scale; and the largest difference."""
    diff = (value.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item() or 1.0
    return diff <= (1e-5 if reference.dtype == torch.float32 else 2e-2) * scale, diff
