#!/usr/bin/env python
"""Performance of spri_hf: every figure is a ratio of two things measured side by side in one run (issue 5).

A shared CPU makes absolute timings noisy, so each figure times SPRI and its reference in the same process (calls
alternate A B / B A after a warm-up; the median of the repeats is kept) or, for whole commands, in fresh processes run
one after the other, with the peak RSS of each read from the kernel (`wait4`).

    python benchmarks/perf.py COMMAND [--device cpu|cuda] [--preset tiny|small|full] [--repeats N] [--out FILE]

Commands (one per figure; `all` runs every figure in one run):
    block     MoE block forward and forward+backward tokens/s: `SpriMoeBlock` (stage 2) vs transformers'
              `Qwen3MoeSparseMoeBlock`, same shapes, weights and `experts_implementation` (eager, batched_mm,
              grouped_mm). Target: spri/native >= 0.95.
    stage     stage 1 vs stage 2 training step (forward, backward, AdamW step) at equal shapes: time, trainable
              parameters, optimizer state, peak memory. Target: stage 1 no slower, far fewer trainable parameters
              and optimizer bytes.
    upcycle   `spri-hf upcycle` of a Qwen2.5-0.5B-shaped random checkpoint into 8 experts: spri vs copy (time, peak
              RSS), and the default SVD method vs plain `torch.linalg.svd` per matrix (time, accuracy). Targets: SVD
              >= 3x faster at relative reconstruction error <= 1e-5 (fp32); spri <= 3x copy's time.
    mergekit  `mergekit-moe` (gate_mode random, 8 copies, fp32; in its own virtual environment) vs `spri-hf upcycle
              --init spri` of the real SmolLM2-135M. Target: spri no slower and no larger in peak RSS.
    generate  greedy generation tokens/s of an SPRI model vs the same model exported to native Qwen3-MoE, batch 1
              and 8. Target: spri/native >= 0.95.
    stream    `spri-hf upcycle --dtype bfloat16` of a Qwen2.5-1.5B-shaped bf16 checkpoint: wall time and peak RSS
              against the checkpoint sizes, then `from_pretrained` of the result and one forward.

Presets: `tiny` runs everything in seconds (the test suite runs it so that the script never rots; it skips
`mergekit`), `small` in a few minutes, `full` (default) uses the shapes of issue 5. The random checkpoints and the
SmolLM2 folder are written once to `--cache-dir` and reused. Only the public API of spri_hf is used.
"""

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import spri_hf  # noqa: E402  (registers model_type "spri")
from spri_hf import SpriForCausalLM, export_native, thin_svd  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

SCRIPT = str(Path(__file__).resolve())
FIGURES = ("block", "stage", "upcycle", "mergekit", "generate", "stream")
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
MERGEKIT_VENV = Path(__file__).resolve().parent / ".venv-mergekit"
# torch first: a plain torch requirement pulls the newest release with GBs of CUDA wheels
MERGEKIT_SETUP = "python3 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 && {venv}/bin/pip install mergekit"

# Model shapes: `layers`, `hidden`, `intermediate` (the dense FFN = one expert), `heads`, `kv_heads`, `vocab`.
QWEN3_TINY = dict(layers=2, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=97)
QWEN3_SMALL = dict(layers=2, hidden=256, intermediate=384, heads=4, kv_heads=2, vocab=2048)
# Expert width 768 is Qwen3-30B-A3B's `moe_intermediate_size`; hidden is half of its 2048, and 16 experts top-2 stand
# in for its 128 top-8, so the per-expert GEMMs (~128 routed tokens each at 1024 tokens) keep a realistic size while
# one forward+backward of a block takes 0.3-2 s on one CPU core.
QWEN3_FULL = dict(layers=4, hidden=1024, intermediate=768, heads=16, kv_heads=8, vocab=4096)
QWEN25_05B = dict(layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936)
QWEN25_15B = dict(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936)

# Per figure: shapes, `experts` / `top_k`, `warmup` + `repeats` (timed in-process calls), `runs` (fresh processes per
# measured command); `jobs`: measured processes at once (tiny is a smoke test: its process timings do not count).
PRESETS = {
    "tiny": {
        "block": dict(QWEN3_TINY, layers=1, experts=4, top_k=2, tokens=64, batched_mm_mb=64, warmup=1, repeats=3),
        "stage": dict(QWEN3_TINY, experts=4, top_k=2, batch=2, seq=16, warmup=1, repeats=3, memory_steps=2),
        "upcycle": dict(QWEN3_TINY, experts=8, top_k=2, runs=1, svd_shape=(32, 48), svd_repeats=3),
        "mergekit": None,
        "generate": dict(QWEN3_TINY, experts=4, top_k=2, prompt=8, new_tokens=8, batches=(1, 8), warmup=1, repeats=2),
        "stream": dict(QWEN3_TINY, experts=8, top_k=2, dtype="bfloat16"),
        "jobs": 4,
    },
    "small": {
        "block": dict(QWEN3_SMALL, layers=1, experts=8, top_k=2, tokens=512, batched_mm_mb=256, warmup=1, repeats=5),
        "stage": dict(QWEN3_SMALL, experts=8, top_k=2, batch=4, seq=64, warmup=1, repeats=5, memory_steps=3),
        "upcycle": dict(QWEN25_05B, layers=4, vocab=8192, experts=8, top_k=2, runs=1, svd_shape=(896, 4864),
                        svd_repeats=3),
        "mergekit": dict(experts=8, top_k=2, runs=1),
        "generate": dict(QWEN3_SMALL, experts=8, top_k=2, prompt=16, new_tokens=16, batches=(1, 8), warmup=1,
                         repeats=3),
        "stream": dict(QWEN25_15B, layers=4, vocab=8192, experts=8, top_k=2, dtype="bfloat16"),
        "jobs": 1,
    },
    "full": {
        "block": dict(QWEN3_FULL, layers=1, experts=16, top_k=2, tokens=1024, batched_mm_mb=768, warmup=1,
                      repeats=7),
        "stage": dict(QWEN3_FULL, experts=16, top_k=2, batch=4, seq=256, warmup=1, repeats=5, memory_steps=3),
        "upcycle": dict(QWEN25_05B, experts=8, top_k=2, runs=1, svd_shape=(896, 4864), svd_repeats=3),
        "mergekit": dict(experts=8, top_k=2, runs=1),
        "generate": dict(QWEN3_FULL, experts=16, top_k=2, prompt=32, new_tokens=32, batches=(1, 8), warmup=1,
                         repeats=5),
        "stream": dict(QWEN25_15B, experts=8, top_k=2, dtype="bfloat16"),
        "jobs": 1,
    },
}

TITLES = {
    "block": "(a) MoE block: SpriMoeBlock (stage 2) vs transformers' Qwen3MoeSparseMoeBlock",
    "stage": "(b) training step: stage 1 (shared principal + residual factors) vs stage 2 (full experts)",
    "upcycle": "(c) upcycling a Qwen2.5-0.5B-shaped checkpoint: spri vs copy, default SVD vs plain SVD",
    "mergekit": "(d) spri-hf upcycle vs mergekit-moe on the real SmolLM2-135M",
    "generate": "(e) greedy generation: SPRI model vs its native Qwen3-MoE export",
    "stream": "(stream) spri-hf upcycle --dtype bfloat16 of a Qwen2.5-1.5B-shaped checkpoint",
}


# ---------------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One comparison. `ratio` is `ratio_def` (e.g. "spri/native") so that `target` reads on it directly."""

    setting: str
    metric: str
    unit: str
    spri_name: str
    spri: float | None
    reference_name: str
    reference: float | None
    ratio: float | None
    ratio_def: str
    target: str | None  # ">= 0.95", "<= 3", or None (informational)
    met: bool | None
    note: str


@dataclass
class Figure:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    sanity: dict = field(default_factory=dict)  # check -> {"passed": bool, details...}
    skipped: list[dict] = field(default_factory=list)  # {"setting": ..., "reason": ...}
    details: dict = field(default_factory=dict)
    wall_s: float | None = None

    def add(self, setting, metric, unit, spri, reference, *, per="spri/reference", target=None, note=""):
        """Add a row. `spri` and `reference` are `(name, value)`; the ratio is spri/reference, or reference/spri with
        `per="reference/spri"` (a speed-up from two times); `target` is e.g. `(">=", 0.95)`."""
        (spri_name, spri_value), (reference_name, reference_value) = spri, reference
        ratio = None
        if spri_value and reference_value and spri_value > 0 and reference_value > 0:
            ratio = spri_value / reference_value if per == "spri/reference" else reference_value / spri_value
        met = None
        if target is not None and ratio is not None:
            met = ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
        ratio_def = f"{spri_name}/{reference_name}" if per == "spri/reference" else f"{reference_name}/{spri_name}"
        target_text = None if target is None else f"{target[0]} {target[1]:g}"
        self.rows.append(Row(setting, metric, unit, spri_name, spri_value, reference_name, reference_value, ratio,
                             ratio_def, target_text, met, note))

    def check(self, name: str, passed, **details):
        self.sanity[name] = dict(details, passed=bool(passed))
        if not passed:
            log(f"  SANITY CHECK FAILED: {name}: {details}")


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:,.4g}"


def print_figure(figure: Figure):
    print(f"\n{figure.title}" + (f"  [{figure.wall_s:.0f} s]" if figure.wall_s is not None else ""))
    header = ("setting", "metric", "spri", "reference", "ratio", "target", "met?")
    lines = [
        (
            row.setting,
            f"{row.metric} ({row.unit})" if row.unit else row.metric,
            f"{row.spri_name} {_fmt(row.spri)}",
            f"{row.reference_name} {_fmt(row.reference)}",
            f"{_fmt(row.ratio)} {row.ratio_def}" if row.ratio is not None else "-",
            row.target or "info",
            {True: "yes", False: "NO", None: "-"}[row.met],
        )
        for row in figure.rows
    ]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    for line in [header, *lines]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    for skip in figure.skipped:
        print(f"  skipped {skip['setting']}: {skip['reason']}")
    failed = [name for name, check in figure.sanity.items() if not check["passed"]]
    passed = len(figure.sanity) - len(failed)
    print(f"  sanity checks: {passed}/{len(figure.sanity)} passed" + (f"; FAILED: {failed}" if failed else ""))
    for row in figure.rows:
        if row.note:
            print(f"  note ({row.setting}; {row.metric}): {row.note}")


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
        result = dict(command=" ".join(command), wall_s=usage["wall_s"], peak_rss_mb=usage["maxrss_kb"] * 1024 / 1e6)
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
    """Each command `runs` times, in rotating order, every run a fresh process; medians per command."""
    names = list(commands)
    runs_by_name = {name: [] for name in names}
    for repeat in range(runs):
        order = names if repeat % 2 == 0 else names[::-1]
        batch = run_many({name: (commands[name], work / f"{name}.{repeat}.log") for name in order}, jobs)
        for name in names:
            runs_by_name[name].append(batch[name])
    return {
        name: dict(
            wall_s=statistics.median(run["wall_s"] for run in values),
            peak_rss_mb=statistics.median(run["peak_rss_mb"] for run in values),
            output_mb=values[0].get("output_mb"),
            runs=values,
        )
        for name, values in runs_by_name.items()
    }


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


# ---------------------------------------------------------------------------------------------------------------------
# Models, checkpoints, commands


def _attention(spec: dict) -> dict:
    return dict(num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                head_dim=spec["hidden"] // spec["heads"])


def qwen3_dense(spec: dict, seed: int = 0) -> Qwen3ForCausalLM:
    """A random dense Qwen3 of the preset's shape (its FFN becomes the experts)."""
    config = Qwen3Config(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], bos_token_id=1, eos_token_id=2, pad_token_id=0, **_attention(spec),
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def qwen2_checkpoint(spec: dict, dtype: torch.dtype, cache_dir: Path) -> Path:
    """A random Qwen2.5-shaped dense checkpoint (safetensors), written once into `cache_dir` and reused."""
    name = "qwen2-{layers}l-{hidden}h-{intermediate}i-{vocab}v".format(**spec) + f"-{str(dtype).split('.')[-1]}"
    folder = cache_dir / name
    if (folder / "config.json").exists() and folder_bytes(folder) > 0:
        return folder
    log(f"  writing a random dense checkpoint to {folder} (once)")
    config = Qwen2Config(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], tie_word_embeddings=True,  # as Qwen2.5-0.5B and -1.5B
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **_attention(spec),
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    staging = Path(tempfile.mkdtemp(prefix=name + ".", dir=cache_dir))
    model.save_pretrained(staging)
    staging.rename(folder)  # atomic: a half-written checkpoint is never reused
    return folder


def smollm2_folder(cache_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct as a plain safetensors folder, dequantised once from the packaged GGUF."""
    folder = cache_dir / "smollm2-135m-instruct-hf"
    if (folder / "config.json").exists() and folder_bytes(folder) > 0:
        return folder
    from spri_hf.assets import load_smollm2

    log(f"  writing SmolLM2-135M as safetensors to {folder} (once, about 20 s)")
    gguf_model, tokenizer = load_smollm2()
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a GGUF-loaded model; the weights are plain fp32
    model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the LM head is tied to the embeddings
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    staging = Path(tempfile.mkdtemp(prefix="smollm2.", dir=cache_dir))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


def spri_cli() -> list[str]:
    """The `spri-hf` console script of this interpreter's environment (or the module behind it)."""
    script = Path(sys.executable).with_name("spri-hf")
    return [str(script)] if script.exists() else [sys.executable, "-m", "spri_hf.cli"]


def upcycle_command(src, out, spec: dict, *, init: str, stage=None, svd_method=None, dtype=None, svd_device=None):
    """`spri-hf upcycle SRC OUT` with the preset's experts; `svd_device` only where there are SVDs to run."""
    command = [*spri_cli(), "upcycle", str(src), str(out), "--overwrite", "--init", init,
               "--num-experts", str(spec["experts"]), "--num-experts-per-tok", str(spec["top_k"])]
    if stage is not None:
        command += ["--stage", str(stage)]
    if svd_method is not None:
        command += ["--svd-method", svd_method]
    if svd_device is not None and init == "spri":
        command += ["--svd-device", svd_device]
    if dtype is not None:
        command += ["--dtype", dtype]
    return command


# ---------------------------------------------------------------------------------------------------------------------
# (a) MoE block


def native_block_like(spri_block, spec: dict, device, dtype) -> tuple[Qwen3MoeSparseMoeBlock, Qwen3MoeConfig]:
    """transformers' own Qwen3-MoE sparse block with the SPRI block's shapes and weights."""
    config = Qwen3MoeConfig(
        hidden_size=spec["hidden"], moe_intermediate_size=spec["intermediate"], num_experts=spec["experts"],
        num_experts_per_tok=spec["top_k"], norm_topk_prob=True, hidden_act="silu",
    )
    native = Qwen3MoeSparseMoeBlock(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        # the same layouts: router (E, H); gate_up_proj (E, 2I, H) = [gate; up]; down_proj (E, H, I)
        native.gate.weight.copy_(spri_block.router.weight)
        native.experts.gate_up_proj.copy_(spri_block.experts.gate_up_proj)
        native.experts.down_proj.copy_(spri_block.experts.down_proj)
    return native, config


def block_sanity(figure: Figure, implementation: str, blocks: dict, x, grad_output) -> bool:
    """Both blocks give the same output and the same gradients before anything is timed."""
    outputs, grads = {}, {}
    for name, block in blocks.items():
        inputs = x.detach().requires_grad_(True)
        output = block(inputs)
        output.backward(grad_output)
        grads[name] = (inputs.grad, block.experts.gate_up_proj.grad, block.experts.down_proj.grad)
        outputs[name] = output.detach()
        for param in block.parameters():
            param.grad = None
    same_output, output_diff = close_enough(outputs["spri"], outputs["native"])
    same_grads = [close_enough(a, b) for a, b in zip(grads["spri"], grads["native"])]
    passed = same_output and all(ok for ok, _ in same_grads)
    figure.check(f"{implementation}: same outputs and gradients", passed, max_abs_output_diff=output_diff,
                 max_abs_grad_diff=max(diff for _, diff in same_grads))
    return passed


def figure_block(spec: dict, device, dtype, repeats: int) -> Figure:
    figure = Figure("block", TITLES["block"])
    model = SpriForCausalLM.from_dense(
        qwen3_dense(spec), init="spri", stage=2, num_experts=spec["experts"], num_experts_per_tok=spec["top_k"]
    ).to(device=device, dtype=dtype)
    _, _, spri_block = model.moe_sites()[0]
    native, native_config = native_block_like(spri_block, spec, device, dtype)
    blocks = {"spri": spri_block.train(), "native": native.train()}
    # stage 1 of the same layer (shared base + residual factors), dispatched through the same experts implementation
    stage1_model = SpriForCausalLM.from_dense(
        qwen3_dense(spec), init="spri", stage=1, num_experts=spec["experts"], num_experts_per_tok=spec["top_k"]
    ).to(device=device, dtype=dtype)
    stage1_block = stage1_model.moe_sites()[0][2].train()
    figure.details = dict(spec, dtype=str(dtype), spri=type(spri_block).__name__,
                          spri_experts=type(spri_block.experts).__name__, native=type(native).__name__,
                          stage1_experts=type(stage1_block.experts).__name__,
                          stage1_residual_rank=stage1_model.config.residual_rank)
    generator = torch.Generator().manual_seed(2)
    for implementation in IMPLEMENTATIONS:
        try:
            model.set_experts_implementation(implementation)  # checks that the device can run it
            stage1_model.config.stage1_experts_implementation = implementation
            native_config._experts_implementation = implementation  # the standalone block reads its config
        except (ValueError, ImportError, KeyError, RuntimeError) as err:
            figure.skipped.append(dict(setting=implementation, reason=str(err).splitlines()[0]))
            continue
        tokens = spec["tokens"]
        if implementation == "batched_mm":
            # batched_mm gathers one copy of the expert weights per (token, expert) pair: a decode-sized batch
            pair_bytes = 3 * spec["intermediate"] * spec["hidden"] * torch.finfo(dtype).bits // 8
            tokens = max(1, min(tokens, spec["batched_mm_mb"] * 10**6 // (pair_bytes * spec["top_k"])))
        x = torch.randn(1, tokens, spec["hidden"], generator=generator).to(device=device, dtype=dtype)
        grad_output = torch.randn(1, tokens, spec["hidden"], generator=generator).to(device=device, dtype=dtype)
        try:
            if not block_sanity(figure, implementation, blocks, x, grad_output):
                continue
        except (RuntimeError, NotImplementedError) as err:
            figure.skipped.append(dict(setting=implementation, reason=f"{type(err).__name__}: {err}".splitlines()[0]))
            continue

        def forward(block):
            with torch.no_grad():
                block(x)

        def forward_backward(block):
            inputs = x.detach().requires_grad_(True)
            block(inputs).backward(grad_output)
            for param in block.parameters():
                param.grad = None

        setting = f"{implementation}, {tokens} tokens"
        log(f"  block: {setting}")
        floor = flop_floor(spec, tokens, device, dtype, generator)
        for metric, step in (("forward", forward), ("forward+backward", forward_backward)):
            calls = {name: (lambda b=block: step(b)) for name, block in {**blocks, "stage1": stage1_block}.items()}
            calls["floor"] = floor[metric]
            seconds = time_side_by_side(calls, warmup=spec["warmup"], repeats=repeats, device=device)
            figure.add(setting, metric, "tokens/s", ("spri", tokens / seconds["spri"]),
                       ("native", tokens / seconds["native"]), target=(">=", 0.95))
            figure.add(setting, f"{metric} vs FLOP floor", "tokens/s", ("spri", tokens / seconds["spri"]),
                       ("active-FLOP GEMMs", tokens / seconds["floor"]),
                       note="two dense GEMMs with exactly the routed experts' FLOPs (no routing, gather or scatter)")
            figure.add(setting, f"stage 1 {metric} vs FLOP floor", "tokens/s",
                       ("spri stage 1", tokens / seconds["stage1"]), ("active-FLOP GEMMs", tokens / seconds["floor"]),
                       note="stage 1 forms W_i = S + B_i A_i in every forward (eager: the low-rank form instead)")
    return figure


def flop_floor(spec: dict, tokens: int, device, dtype, generator) -> dict:
    """The physical floor of a top-k MoE block on this device: the active expert FLOPs as two dense GEMMs,
    (T x H) @ (H x k*2I) and (T x k*I) @ (k*I x H), i.e. 2 * T * k * 3 * H * I multiply-adds forward, with the
    same activation; forward+backward also computes the input and weight gradients, as the blocks do."""
    hidden, inner, k = spec["hidden"], spec["intermediate"], spec["top_k"]
    make = lambda *shape: (torch.randn(*shape, generator=generator) * 0.02).to(device=device, dtype=dtype)  # noqa: E731
    x, w_in, w_out = make(tokens, hidden), make(hidden, 2 * k * inner), make(k * inner, hidden)
    w_in.requires_grad_(True)
    w_out.requires_grad_(True)
    grad_output = make(tokens, hidden)

    def run(inputs):
        gate, up = (inputs @ w_in).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w_out

    def forward():
        with torch.no_grad():
            run(x)

    def forward_backward():
        inputs = x.detach().requires_grad_(True)
        run(inputs).backward(grad_output)
        w_in.grad = w_out.grad = None

    return {"forward": forward, "forward+backward": forward_backward}


# ---------------------------------------------------------------------------------------------------------------------
# (b) stage 1 vs stage 2


def build_stage_model(spec: dict, stage: int, device, dtype) -> SpriForCausalLM:
    """The (b) model: upcycled with init spri in stage 1, then `set_stage(2)` for stage 2, so that both compute the
    same function at the start."""
    model = SpriForCausalLM.from_dense(
        qwen3_dense(spec), init="spri", stage=1, num_experts=spec["experts"], num_experts_per_tok=spec["top_k"]
    )
    if stage == 2:
        model.set_stage(2)
    return model.to(device=device, dtype=dtype).train()


def stage_batch(spec: dict, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, spec["vocab"], (spec["batch"], spec["seq"]), generator=generator).to(device)


def make_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-5)


def training_step(model, optimizer, input_ids):
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=input_ids).loss.backward()  # the loss includes the router losses
    optimizer.step()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))


def figure_stage(spec: dict, device, dtype, repeats: int, work: Path, preset: str, jobs: int) -> Figure:
    figure = Figure("stage", TITLES["stage"])
    models = {stage: build_stage_model(spec, stage, device, dtype) for stage in (1, 2)}
    input_ids = stage_batch(spec, device)
    with torch.no_grad():
        losses = [model(input_ids=input_ids, labels=input_ids).loss.reshape(1) for model in models.values()]
    same, diff = close_enough(*losses)
    figure.check("stage 2 = stage 1 materialised (same loss before training)", same, loss_diff=diff)
    optimizers = {stage: make_optimizer(model) for stage, model in models.items()}
    log("  stage: training steps")
    seconds = time_side_by_side(
        {stage: (lambda s=stage: training_step(models[s], optimizers[s], input_ids)) for stage in models},
        warmup=spec["warmup"], repeats=repeats, device=device,
    )
    trainable = {s: sum(p.numel() for p in m.parameters() if p.requires_grad) for s, m in models.items()}
    state = {s: optimizer_state_bytes(o) for s, o in optimizers.items()}
    figure.details = dict(
        spec, dtype=str(dtype), step_seconds=seconds, trainable_parameters=trainable, optimizer_state_bytes=state,
        total_parameters={s: sum(p.numel() for p in m.parameters()) for s, m in models.items()},
        experts_implementation=models[2].config._experts_implementation,
    )
    models.clear()  # free both before the memory workers start
    optimizers.clear()
    gc.collect()

    # Peak memory: each stage in a fresh process, over its training steps only (the upcycling is not counted).
    commands = {
        stage: ([sys.executable, SCRIPT, "_stage-memory", "--preset", preset, "--stage", stage, "--device",
                 device.type, "--dtype", str(dtype).removeprefix("torch."), "--threads", torch.get_num_threads()],
                work / f"stage{stage}-memory.log")
        for stage in (1, 2)
    }
    memory = {stage: run["result"] for stage, run in run_many(commands, jobs).items()}
    figure.details["memory"] = memory

    tokens = spec["batch"] * spec["seq"]
    setting = f"{spec['layers']} layers, {spec['experts']} experts top-{spec['top_k']}, {tokens} tokens/step"
    figure.add(setting, "train step time", "s", ("stage1", seconds[1]), ("stage2", seconds[2]), target=("<=", 1.0))
    figure.add(setting, "trainable parameters", "", ("stage1", trainable[1]), ("stage2", trainable[2]),
               target=("<=", 0.1), note="'far fewer' read as at least 10x fewer")
    figure.add(setting, "AdamW state", "MB", ("stage1", state[1] / 1e6), ("stage2", state[2] / 1e6),
               target=("<=", 0.1))
    figure.add(setting, "peak memory in training", "MB", ("stage1", memory[1]["peak_mb"]),
               ("stage2", memory[2]["peak_mb"]), note=f"{memory[1]['method']}; the loaded model included")
    figure.add(setting, "memory growth over the loaded model", "MB", ("stage1", memory[1]["growth_mb"]),
               ("stage2", memory[2]["growth_mb"]), note="gradients, AdamW state, activations")
    return figure


def stage_memory_worker(args) -> int:
    """Build one stage's model, then measure the peak memory of `memory_steps` training steps alone."""
    spec = PRESETS[args.preset]["stage"]
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_stage_model(spec, args.stage, device, getattr(torch, args.dtype))
    optimizer = make_optimizer(model)
    input_ids = stage_batch(spec, device)
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        reset = _reset_peak_rss()
        method = "peak RSS (VmHWM) of a fresh process" + (", reset after upcycling" if reset else "")
        base = _proc_status_bytes("VmRSS")
    for _ in range(spec["memory_steps"]):
        training_step(model, optimizer, input_ids)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_status_bytes("VmHWM")
    result = dict(method=method, peak_mb=peak / 1e6, base_mb=base / 1e6, growth_mb=(peak - base) / 1e6,
                  optimizer_state_mb=optimizer_state_bytes(optimizer) / 1e6)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


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
    for name, label in (("spri", "stage 1 (default)"), ("spri_stage2", "--stage 2")):
        for metric, key, target in (("wall time", "wall_s", ("<=", 3.0)), ("peak RSS", "peak_rss_mb", None)):
            figure.add(f"{shape}, {label}", f"upcycle {metric}", "s" if key == "wall_s" else "MB",
                       (name, measured[name][key]), ("copy", measured["copy"][key]), target=target)
    figure.add(f"{shape}, stage 1 (default)", "upcycle wall time", "s", ("default svd", measured["spri"]["wall_s"]),
               ("--svd-method full", measured["spri_full_svd"]["wall_s"]), per="reference/spri",
               note="the whole command (read, SVDs, write); the SVDs alone are the per-matrix rows")
    return figure


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
    for name, target in (("spri", ("<=", 1.0)), ("copy", None)):
        for metric, key, unit in (("wall time", "wall_s", "s"), ("peak RSS", "peak_rss_mb", "MB")):
            figure.add(setting, metric, unit, (f"spri-hf --init {name}", measured[name][key]),
                       ("mergekit-moe", measured["mergekit"][key]), target=target)
    return figure


# ---------------------------------------------------------------------------------------------------------------------
# (e) generation


def figure_generate(spec: dict, device, dtype, repeats: int, work: Path) -> Figure:
    figure = Figure("generate", TITLES["generate"])
    model = SpriForCausalLM.from_dense(
        qwen3_dense(spec), init="spri", stage=2, num_experts=spec["experts"], num_experts_per_tok=spec["top_k"]
    )
    model.save_pretrained(work / "spri")
    export_native(model, work / "native")  # checks the native model's logits before writing
    del model
    # both loaded the same way, each with transformers' default experts implementation for the device
    models = {name: AutoModelForCausalLM.from_pretrained(work / name, dtype=dtype).to(device).eval()
              for name in ("spri", "native")}
    implementations = {name: model.config._experts_implementation for name, model in models.items()}
    figure.check("same experts_implementation", len(set(implementations.values())) == 1, **implementations)
    figure.details = dict(spec, dtype=str(dtype), experts_implementation=implementations,
                          classes={name: type(model).__name__ for name, model in models.items()})
    generator = torch.Generator().manual_seed(4)
    new_tokens = spec["new_tokens"]
    for batch in spec["batches"]:
        prompt = torch.randint(3, spec["vocab"], (batch, spec["prompt"]), generator=generator).to(device)
        mask = torch.ones_like(prompt)
        outputs = {}

        def generate(name):
            with torch.no_grad():  # greedy, exactly new_tokens (min_new_tokens keeps EOS from stopping early)
                outputs[name] = models[name].generate(
                    input_ids=prompt, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=2,
                )

        with torch.no_grad():
            logits = {name: model(input_ids=prompt, attention_mask=mask).logits for name, model in models.items()}
        same, diff = close_enough(logits["spri"], logits["native"])
        figure.check(f"batch {batch}: same logits", same, max_abs_logit_diff=diff)
        log(f"  generate: batch {batch}")
        seconds = time_side_by_side({name: (lambda n=name: generate(n)) for name in models},
                                    warmup=spec["warmup"], repeats=repeats, device=device)
        generated = outputs["spri"].shape[1] - prompt.shape[1]
        figure.check(f"batch {batch}: {new_tokens} new tokens each", generated == new_tokens, generated=generated,
                     same_tokens=torch.equal(outputs["spri"], outputs["native"]))
        tokens = batch * new_tokens
        figure.add(f"batch {batch}, {spec['prompt']}+{new_tokens} tokens, {implementations['spri']}",
                   "greedy generation", "tokens/s", ("spri", tokens / seconds["spri"]),
                   ("native", tokens / seconds["native"]), target=(">=", 0.95))
    return figure


# ---------------------------------------------------------------------------------------------------------------------
# stream


def figure_stream(spec: dict, device, work: Path, cache_dir: Path) -> Figure:
    figure = Figure("stream", TITLES["stream"])
    src = qwen2_checkpoint(spec, getattr(torch, spec["dtype"]), cache_dir)
    out = work / "stream-model"  # not *.out: run_many would remove it before it is loaded
    svd_device = "cuda" if device.type == "cuda" else None
    upcycle = run_measured(upcycle_command(src, out, spec, init="spri", dtype=spec["dtype"], svd_device=svd_device),
                           work / "upcycle.log")
    load = run_measured([sys.executable, SCRIPT, "_load-forward", out, "--dtype", spec["dtype"]], work / "load.log")
    result = load["result"]
    figure.check("the reloaded model runs a finite forward", result["finite"], model_class=result["model_class"])
    dense_mb, out_mb = folder_bytes(src) / 1e6, folder_bytes(out) / 1e6
    figure.details = dict(spec, checkpoint=str(src), checkpoint_mb=dense_mb, output_mb=out_mb, upcycle=upcycle,
                          load_forward=load)
    setting = f"{spec['layers']} x ({spec['hidden']}, {spec['intermediate']}), vocab {spec['vocab']}, {spec['dtype']}"
    figure.add(setting, "upcycle peak RSS", "MB", ("upcycle", upcycle["peak_rss_mb"]), ("dense files", dense_mb))
    figure.add(setting, "upcycle peak RSS", "MB", ("upcycle", upcycle["peak_rss_mb"]), ("output files", out_mb))
    figure.add(setting, "upcycle wall time", "s", ("upcycle", upcycle["wall_s"]), ("-", None))
    timings = f"load {result['load_s']:.1f} s, forward {result['forward_s']:.2f} s, process {load['wall_s']:.1f} s"
    figure.add(setting, "from_pretrained + 1 forward: peak RSS", "MB", ("load", load["peak_rss_mb"]),
               ("output files", out_mb), note=timings)
    return figure


def load_forward_worker(args) -> int:
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=getattr(torch, args.dtype)).eval()
    loaded = time.perf_counter()
    input_ids = torch.randint(3, 90, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    result = dict(model_class=type(model).__name__, finite=bool(torch.isfinite(logits).all()),
                  load_s=loaded - start, forward_s=time.perf_counter() - loaded)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def run_figure(name: str, args, spec, device, dtype, work: Path, cache_dir: Path, jobs: int) -> Figure:
    repeats = args.repeats or (spec or {}).get("repeats")
    if name == "block":
        return figure_block(spec, device, dtype, repeats)
    if name == "stage":
        return figure_stage(spec, device, dtype, repeats, work, args.preset, jobs)
    if name == "upcycle":
        return figure_upcycle(spec, device, args.repeats, args.runs, work, cache_dir, jobs)
    if name == "mergekit":
        return figure_mergekit(spec, device, args.runs, work, cache_dir, Path(args.mergekit_venv), args.setup, jobs)
    if name == "generate":
        return figure_generate(spec, device, dtype, repeats, work)
    return figure_stream(spec, device, work, cache_dir)


def run_figures(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        # On a shared CPU, intra-op threads stall at every barrier while another process holds a core (a block's
        # forward+backward: 90th percentile 5 ms -> 300 ms; one upcycled layer: 1.5 s on 1 thread, 4.2 s on 2):
        # one thread keeps the ratios honest. The measured commands (spri-hf, mergekit-moe, workers) get it too.
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    preset = PRESETS[args.preset]
    jobs = args.jobs or preset["jobs"]
    cache_dir = Path(args.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    report = dict(meta=dict(
        command=" ".join(["benchmarks/perf.py", *sys.argv[1:]]), preset=args.preset, device=str(device),
        dtype=str(dtype), repeats=args.repeats, runs=args.runs, jobs=jobs, torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), cpus=os.cpu_count(), machine=platform.machine(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, python=platform.python_version(),
        torch=torch.__version__, transformers=transformers.__version__, spri_hf=spri_hf.__version__,
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
    ), figures={})
    started = time.perf_counter()
    for name in FIGURES if args.command == "all" else (args.command,):
        log(f"figure {name} ({args.preset})")
        begin = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"perf-{name}.", dir=cache_dir) as work:
            try:
                figure = run_figure(name, args, preset[name], device, dtype, Path(work), cache_dir, jobs)
            except Exception as err:  # one broken figure must not cost the others of a long run
                figure = Figure(name, TITLES[name])
                figure.check("the figure ran", False, error=f"{type(err).__name__}: {err}")
        figure.wall_s = time.perf_counter() - begin
        print_figure(figure)
        report["figures"][name] = asdict(figure)
        gc.collect()
    report["meta"]["wall_s"] = time.perf_counter() - started
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="spri_hf performance figures, each a ratio measured side by side in one run (issue 5).",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=(*FIGURES, "all"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--preset", default="full", choices=tuple(PRESETS))
    parser.add_argument("--repeats", type=int, help="timed calls per measurement, after warm-up (default: preset's)")
    parser.add_argument("--runs", type=int, help="fresh processes per measured command (default: the preset's)")
    parser.add_argument("--out", help="JSON results file (default: perf-COMMAND-PRESET.json)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of block, stage and generate; auto: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of this process and of every measured command (OMP_NUM_THREADS); 0: the "
                        "libraries' defaults. Default: 1 on cpu (threads stall on a shared CPU), 0 on cuda")
    parser.add_argument("--jobs", type=int, help="measured processes at once (default: 1; 4 for the tiny preset)")
    parser.add_argument("--cache-dir", default=os.environ.get("SPRI_BENCH_CACHE", "~/.cache/spri-hf-bench"),
                        help="where the random checkpoints and the SmolLM2 folder are written once")
    parser.add_argument("--mergekit-venv", default=str(MERGEKIT_VENV), help="the virtual environment of mergekit")
    parser.add_argument("--setup", action="store_true", help="create mergekit's virtual environment if it is missing")
    return parser


def build_worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="internal: the parts perf.py measures in a fresh process")
    workers = parser.add_subparsers(dest="worker", required=True)
    stage = workers.add_parser("_stage-memory")
    stage.add_argument("--preset", required=True)
    stage.add_argument("--stage", type=int, required=True)
    stage.add_argument("--device", default="cpu")
    stage.add_argument("--dtype", default="float32")
    stage.add_argument("--threads", type=int, default=0)
    stage.set_defaults(func=stage_memory_worker)
    load = workers.add_parser("_load-forward")
    load.add_argument("path")
    load.add_argument("--dtype", default="float32")
    load.set_defaults(func=load_forward_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        args = build_worker_parser().parse_args(argv)
        return args.func(args)
    args = build_parser().parse_args(argv)
    report = run_figures(args)
    out = Path(args.out or f"perf-{args.command}-{args.preset}.json")
    out.write_text(json.dumps(report, indent=2, default=str))
    failed = [f"{name}: {check}" for name, figure in report["figures"].items()
              for check, result in figure["sanity"].items() if not result["passed"]]
    summary = f"\nwrote {out} ({report['meta']['wall_s']:.0f} s)"
    print(summary + (f"; FAILED sanity checks: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
