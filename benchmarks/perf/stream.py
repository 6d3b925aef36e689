"""Figure (stream): streaming upcycling of a Qwen2.5-1.5B-shaped bf16 checkpoint."""

import json
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
)

import spri_hf  # noqa: F401  (registers model_type "spri")

from .common import COMMAND, TITLES
from .measuring import folder_bytes, run_measured
from .models import qwen2_checkpoint, upcycle_command
from .results import Figure


# ---------------------------------------------------------------------------------------------------------------------
# stream


def figure_stream(spec: dict, device, work: Path, cache_dir: Path) -> Figure:
    figure = Figure("stream", TITLES["stream"])
    src = qwen2_checkpoint(spec, getattr(torch, spec["dtype"]), cache_dir)
    out = work / "stream-model"  # not *.out: run_many would remove it before it is loaded
    svd_device = "cuda" if device.type == "cuda" else None
    upcycle = run_measured(upcycle_command(src, out, spec, init="spri", dtype=spec["dtype"], svd_device=svd_device),
                           work / "upcycle.log")
    load = run_measured([*COMMAND, "_load-forward", out, "--dtype", spec["dtype"]], work / "load.log")
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
