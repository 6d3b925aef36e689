"""Figure (a): the MoE block (stage 2 and stage 1) vs transformers' Qwen3-MoE block and the FLOP floor."""



from functools import partial

import torch
from transformers import (
    Qwen3MoeConfig,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import spri_hf  # noqa: F401  (registers model_type "spri")
from spri_hf import SpriForCausalLM

from .common import IMPLEMENTATIONS, TITLES
from .measuring import close_enough, time_side_by_side
from .models import qwen3_dense
from .results import Figure, log


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

        def forward(block, x=x):
            with torch.no_grad():
                block(x)

        def forward_backward(block, x=x, grad_output=grad_output):
            inputs = x.detach().requires_grad_(True)
            block(inputs).backward(grad_output)
            for param in block.parameters():
                param.grad = None

        setting = f"{implementation}, {tokens} tokens"
        log(f"  block: {setting}")
        floor = flop_floor(spec, tokens, device, dtype, generator)
        for metric, step in (("forward", forward), ("forward+backward", forward_backward)):
            calls = {name: partial(step, block) for name, block in {**blocks, "stage1": stage1_block}.items()}
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
