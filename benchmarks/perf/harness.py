"""The command line: one command per figure, `all` for every figure in one run."""

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

import spri_hf  # noqa: F401  (registers model_type "spri")
from benchmarks.machine import cpu_model

from .block import figure_block
from .common import FIGURES, MERGEKIT_VENV, PRESETS, TITLES
from .generate import figure_generate
from .mergekit import figure_mergekit
from .results import Figure, log, print_figure
from .stage import figure_stage, stage_memory_worker
from .stream import figure_stream, load_forward_worker
from .upcycle import figure_upcycle


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
        command=" ".join(["python -m benchmarks.perf", *sys.argv[1:]]), preset=args.preset, device=str(device),
        dtype=str(dtype), repeats=args.repeats, runs=args.runs, jobs=jobs, torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), cpus=os.cpu_count(), machine=platform.machine(),
        cpu=cpu_model(),
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
        prog="python -m benchmarks.perf",
        description="spri_hf performance figures, each a ratio measured side by side in one run.",
        epilog=sys.modules[__package__].__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf", description="internal: the parts the benchmark measures in a fresh process")
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
    out = Path(args.out or f"perf-{args.command}-{args.preset}.json")
    # before the measurements, so that a long run never ends without a place to write its results
    out.parent.mkdir(parents=True, exist_ok=True)
    report = run_figures(args)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(report, indent=2, default=str))
    partial.replace(out)
    failed = [f"{name}: {check}" for name, figure in report["figures"].items()
              for check, result in figure["sanity"].items() if not result["passed"]]
    summary = f"\nwrote {out} ({report['meta']['wall_s']:.0f} s)"
    print(summary + (f"; FAILED sanity checks: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
