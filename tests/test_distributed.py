"""Multi-process (DDP, gloo on CPU) two-stage training through `accelerate launch`, and why idle experts are safe.

The launch test (slow tier) runs `examples/train_distributed.py` in 2 processes with 8 experts, top-1 routing and one 8-token
sequence per rank and step, so that experts routinely receive no token on a rank. It runs with
`ddp_find_unused_parameters=False`, which DDP would punish with an error at the next step if any trainable parameter
went without a gradient; the in-process test shows why that never happens with fused expert tensors.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_dense
from safetensors.torch import load_file

from spri_hf import SpriForCausalLM


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_distributed.py"
NUM_EXPERTS = 8
# learning rates of the 2-process vs 1-process comparison, 10x below the script's defaults: at 3e-2 / 3e-3, AdamW's
# sign-like first steps turn float rounding (two half-batch means all-reduced vs one batch mean) into lr-sized moves
# of near-zero-gradient elements, and the result depends on the CPU (max difference 1.8e-4 on one machine, 8.6e-3 on
# another, deterministically); at 3e-3 / 3e-4 it is 7e-5, and 6.6e-6 at 3e-4 / 3e-5 (linear in the rate: rounding).
# A step without the all-reduce is caught apart from this: the ranks would no longer be bit-identical.
COMPARISON_LRS = ("--lr-stage1", "3e-3", "--lr-stage2", "3e-4")
# largest weight difference allowed between the 2-process run and one process with the same global batch
TWO_PROCESS_ATOL = 5e-4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("stage", [1, 2])
def test_idle_experts_still_get_a_gradient_tensor(stage):
    """With some experts idle, every trainable tensor still gets a `.grad`; the idle experts' slices are zero."""
    model = SpriForCausalLM.from_dense(
        tiny_dense("llama"), num_experts=NUM_EXPERTS, num_experts_per_tok=1, diversity=0.3, stage=stage
    ).train()
    input_ids = torch.randint(3, 97, (1, 4), generator=torch.Generator().manual_seed(0))  # 4 tokens, 8 experts
    output = model(input_ids, labels=input_ids, output_router_logits=True)
    output.loss.backward()
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert trainable
    missing = [name for name, param in trainable.items() if param.grad is None]
    assert not missing, f"unused trainable parameters (DDP would need find_unused_parameters=True): {missing}"
    # the experts each layer's router chose; 4 tokens cannot cover 8 experts
    for layer_idx, logits in enumerate(output.router_logits):
        used = set(logits.argmax(-1).tolist())
        idle = sorted(set(range(NUM_EXPERTS)) - used)
        assert idle
        experts = model.moe_blocks()[layer_idx].experts
        for name, param in experts.named_parameters():
            if param.requires_grad and param.dim() >= 2 and param.shape[0] == NUM_EXPERTS:
                assert torch.count_nonzero(param.grad[idle]) == 0, name  # zero rows, not missing tensors
                assert torch.count_nonzero(param.grad[sorted(used)]) > 0, name


@pytest.mark.slow
def test_two_process_training_keeps_ranks_in_sync(tmp_path):
    """`accelerate launch` with 2 CPU processes, one SpriTrainer run through the switch: both stages run, ranks end
    bit-identical, some experts sat idle, and the weights match a single process with the same global batch."""
    output_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        # --multi_gpu means "torchrun N processes"; with use_cpu=True in the script accelerate picks gloo (MULTI_CPU).
        # (--cpu --num_processes 2 would start only one process: --cpu selects accelerate's single-process launcher.)
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(SCRIPT), "--output-dir", str(output_dir), "--steps", "4", "--num-experts", str(NUM_EXPERTS), "--top-k", "1",
        "--router-aux-loss-coef", "0", "--experts-implementation", "eager", *COMPARISON_LRS,
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout's spri_hf
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    # the same global batch (2 sequences per step) in one process: the sequences of a step are the same ones. Without
    # the load-balancing loss (a product of per-rank means, ~0.01 of the loss) the loss is a plain token mean, so the
    # runs differ only by float rounding, which AdamW's normalised steps magnify over 8 steps (see COMPARISON_LRS).
    single = subprocess.run(
        [sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "single"), "--steps", "4",
         "--num-experts", str(NUM_EXPERTS), "--top-k", "1", "--batch-size", "2", "--router-aux-loss-coef", "0",
         "--experts-implementation", "eager", *COMPARISON_LRS],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-6000:]

    reports = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        assert report["distributed_type"].endswith("MULTI_CPU") and report["backend"] == "gloo"
        assert report["final_stage"] == 2 and report["switch_step"] == 4
        assert len(report["losses"]["1"]) == 4 and len(report["losses"]["2"]) == 4  # both stages trained 4 steps
        assert set(report["expert_token_counts"]) == {"1", "2"}
        for steps in report["expert_token_counts"].values():
            assert len(steps) == 4
            for step in steps:
                # top-1 over one 8-token sequence: every layer routed exactly 8 (token, slot) pairs on this rank
                assert [sum(layer) for layer in step] == [8] * len(report["moe_layers"])

    # gradients were all-reduced every step of both stages (stage 2 re-wrapped the new experts in DDP)
    assert reports[0]["state_dict_sha256"] == reports[1]["state_dict_sha256"]
    assert reports[0]["losses"]["1"] == pytest.approx(json.loads((tmp_path / "single" / "rank0.json").read_text())["losses"]["1"], abs=1e-5)
    distributed, reference = load_file(output_dir / "rank0.safetensors"), load_file(tmp_path / "single" / "rank0.safetensors")
    assert distributed.keys() == reference.keys()
    worst = max((distributed[k] - reference[k]).abs().max().item() for k in reference)
    assert worst < TWO_PROCESS_ATOL, sorted(((distributed[k] - reference[k]).abs().max().item(), k) for k in reference)[-3:]
    # Trainer logs the loss averaged over ranks, so both ranks log the same numbers
    assert reports[0]["losses"] == reports[1]["losses"]
    # the ranks saw different shards of the data, so they routed differently
    assert reports[0]["expert_token_counts"] != reports[1]["expert_token_counts"]
    # experts that received no token on a rank in a step, in both stages, did not stall or break DDP
    for report in reports:
        for steps in report["expert_token_counts"].values():
            assert any(count == 0 for step in steps for layer in step for count in layer)
