"""Figure (b): a training step in stage 1 vs stage 2."""

import gc
import json
from pathlib import Path

import torch

import spri_hf  # noqa: F401  (registers model_type "spri")
from spri_hf import SpriForCausalLM

from .common import COMMAND, PRESETS, TITLES
from .measuring import _proc_status_bytes, _reset_peak_rss, close_enough, run_many, synchronize, time_side_by_side
from .models import qwen3_dense
from .results import Figure, log


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
        stage: ([*COMMAND, "_stage-memory", "--preset", preset, "--stage", stage, "--device",
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
