"""Scaling out with transformers' and accelerate's own engines: tensor- and expert-parallel plans, FSDP2 through the
stage switch, each checked against one process with `torchrun --standalone --nproc-per-node 2` on CPU (gloo).

The multi-process tests (slow tier; about 20-40 s each on 2 shared CPU cores) run `examples/parallel_forward.py`
(a stage-2 checkpoint loaded with `from_pretrained(distributed_config=...)`, one inference forward, one training
forward + backward) and `examples/train_distributed.py --fsdp` (one `SpriTrainer.train()` through the switch). Every
subprocess has a timeout, so a hang (the MoE failure mode of an expert without tokens on one rank) fails the test.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_experts, tiny_dense
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

from spri_hf import SpriForCausalLM
from spri_hf.parallel import check_distributed_config, moe_block_paths


REPO = Path(__file__).resolve().parents[1]
FORWARD = REPO / "examples" / "parallel_forward.py"
TRAIN = REPO / "examples" / "train_distributed.py"
ZERO = REPO / "examples" / "deepspeed_zero.py"
TIMEOUT = 300  # seconds per subprocess: a hang becomes a failure
# Tensor/expert-parallel logits, loss and gradients vs one process, relative to each tensor's largest magnitude:
# float32 partial sums reduced in another order. Measured up to 1.0e-6 (gradients; logits 2e-7).
PARALLEL_RTOL = 1e-5
# FSDP2 run through the switch vs one process with the same global batch, largest weight difference after 8 AdamW
# steps (router aux loss 0), at 10x below the script's learning rates as for DDP (tests/test_distributed.py's
# COMPARISON_LRS): at 3e-2 / 3e-3 AdamW's sign-like first steps turn rounding into 8.6e-3 on one CPU (1.8e-4 on another)
FSDP_ATOL = 5e-4
# DeepSpeed ZeRO vs one process, 3 SGD steps (a linear update, so only float rounding differs): measured 1.2e-7.
ZERO_ATOL = 1e-6


def _env() -> dict:
    # the processes import this checkout's spri_hf, whatever is installed
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _run(args: list[str], processes: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [str(arg) for arg in args]
    return subprocess.run(
        command, check=False, cwd=REPO, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=TIMEOUT
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _stage2_checkpoint(folder: Path, idle_layer: int | None = None) -> Path:
    """A tiny stage-2 SPRI Llama (4 experts, top-2) with moved experts; `idle_layer` zeroes that layer's router, so
    all its logits tie and top-2 picks experts 2 and 3 for every token: under 2-way expert parallelism rank 0's
    experts (0, 1) get no token there."""
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, num_experts_per_tok=2, diversity=0.3)
    perturb_experts(model.set_stage(2))
    if idle_layer is not None:
        with torch.no_grad():
            model.moe_blocks()[idle_layer].router.weight.zero_()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    plain, idle = _stage2_checkpoint(root / "plain"), _stage2_checkpoint(root / "idle", idle_layer=0)
    references = {}
    for name, folder in (("plain", plain), ("idle", idle)):  # one process: the reference
        _ok(_run([FORWARD, folder, "--mode", "single", "--output", root / f"single-{name}"], processes=1))
        references[name] = load_file(root / f"single-{name}" / "result.safetensors")
    return {"plain": plain, "idle": idle, "root": root, "reference": references}


def _assert_matches(result: dict, reference: dict):
    assert result.keys() == reference.keys()  # the same tensors got gradients
    for name, expected in reference.items():
        scale = max(expected.abs().max().item(), 1e-12)
        worst = (result[name] - expected).abs().max().item()
        assert worst <= PARALLEL_RTOL * scale, f"{name}: {worst:.3g} vs scale {scale:.3g}"


# ---- the plans (one process) ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2"])
def test_plans_extend_the_dense_family_plans(family):
    """The dense family's own TP plan (its attention, embeddings, LM head) is kept under the wrapper's prefix, and
    every MoE block gets Mixtral-style expert entries that name real stage-2 modules and parameters."""
    dense = tiny_dense(family)
    model = SpriForCausalLM.from_dense(dense, num_experts=4, init="copy", shared_expert="dense")
    names = {replace_layer_number_by_wildcard(n) for n, _ in [*model.named_modules(), *model.named_parameters()]}
    # every entry names something (no "TP rules were not applied" warnings); the dense MLP entries went with the MLPs
    assert set(model.tp_plan) <= names
    kept = {f"model.{key}": style for key, style in dense.tp_plan.items() if ".mlp." not in key}
    assert kept.items() <= model.tp_plan.items()
    assert not any(".mlp." in key and ".mlp.experts" not in key and ".shared_expert" not in key for key in model.tp_plan)
    (block,) = moe_block_paths(model)
    assert block == "model.model.layers.*.mlp"
    assert model.tp_plan[f"{block}.experts.gate_up_proj"] == "packed_colwise"
    assert model.tp_plan[f"{block}.experts.down_proj"] == "rowwise"
    assert model.tp_plan[f"{block}.experts"] == "moe_tp_experts"
    assert model.ep_plan == {
        f"{block}.experts.gate_up_proj": "grouped_gemm",
        f"{block}.experts.down_proj": "grouped_gemm",
        f"{block}.experts": "ep_dispatch_experts",
    }
    spri_entries = [key for key in model.tp_plan if key.startswith(f"{block}.experts") or ".shared_expert." in key]
    assert set(spri_entries) | set(model.ep_plan) <= names
    # the shared expert is the dense MLP: the dense family's MLP entries, moved under it
    shared = {key: style for key, style in model.tp_plan.items() if ".shared_expert." in key}
    dense_plan = {f"model.{key}": style for key, style in dense.tp_plan.items()}
    assert shared and all(dense_plan[key.replace(".shared_expert", "")] == style for key, style in shared.items())


def test_experts_with_biases_shard_by_expert_only():
    """A row-split down projection would add its bias once per rank: biased experts (GPT-NeoX) stay whole under tensor
    parallelism and shard, biases included, under expert parallelism."""
    model = SpriForCausalLM.from_dense(tiny_dense("gpt_neox"), num_experts=4, init="copy")
    (block,) = moe_block_paths(model)
    assert block == "model.gpt_neox.layers.*.mlp"
    assert not [key for key in model.tp_plan if ".experts" in key]
    assert model.tp_plan["model.gpt_neox.layers.*.attention.query_key_value"] == "colwise"  # the dense plan
    assert model.ep_plan == {
        f"{block}.experts.up_proj": "grouped_gemm",
        f"{block}.experts.down_proj": "grouped_gemm",
        f"{block}.experts.up_proj_bias": "grouped_gemm",
        f"{block}.experts.down_proj_bias": "grouped_gemm",
        f"{block}.experts": "ep_dispatch_experts",
    }
    assert set(model.ep_plan) <= {replace_layer_number_by_wildcard(n) for n, _ in model.named_parameters()} | {
        f"{block}.experts"
    }


def test_refusals_name_the_value_and_the_fix():
    stage1 = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4)
    assert stage1.config.stage == 1
    with pytest.raises(ValueError, match=r"tp_size=2.*stage 1.*set_stage\(2\)"):
        check_distributed_config(stage1, DistributedConfig(tp_size=2))
    stage2 = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=6, init="copy")
    with pytest.raises(ValueError, match=r"ep_size=4 does not divide num_experts=6"):
        check_distributed_config(stage2, DistributedConfig(tp_size=4, ep_size=4))
    with pytest.raises(ValueError, match=r"pp_size=2: pipeline parallelism is not supported"):
        check_distributed_config(stage2, DistributedConfig(pp_size=2))
    check_distributed_config(stage2, DistributedConfig(tp_size=2, ep_size=2))  # accepted


def test_eager_experts_skip_the_expert_parallel_sentinel():
    """Expert parallelism (all-reduce dispatch) marks the routes to other ranks' experts with id `num_experts` and
    weight 0; the eager experts skip them (as Mixtral's do) instead of failing in one_hot."""
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="copy")
    model.set_experts_implementation("eager")
    experts = model.moe_blocks()[0].experts
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 4], [1, 4], [4, 4], [2, 3], [0, 1]])
    weights = torch.where(index == 4, 0.0, 0.5)
    kept = torch.tensor([[0, 0], [1, 1], [0, 0], [2, 3], [0, 1]])  # same routes, sentinels replaced by weight-0 ones
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden, index, weights), experts(hidden, kept, weights))


# ---- several processes ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tensor_parallel_matches_one_process(checkpoints, tmp_path):
    """`DistributedConfig(tp_plan="auto")`: attention and experts split over 2 ranks; logits, loss and every gradient
    equal one process; `save_pretrained` of the sharded model (all ranks) writes the same weights."""
    out, saved = tmp_path / "tp", tmp_path / "saved"
    _ok(_run([FORWARD, checkpoints["plain"], "--mode", "tp", "--output", out, "--save-to", saved]))
    _assert_matches(load_file(out / "result.safetensors"), checkpoints["reference"]["plain"])
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["tp_size"] == 2
        for layer in report["experts"].values():  # each rank holds half the intermediate dim of every expert
            assert layer["local_shapes"] == {"gate_up_proj": [4, 48, 32], "down_proj": [4, 32, 24]}
    expected = load_file(checkpoints["plain"] / "model.safetensors")
    written = load_file(saved / "model.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, implementation",
    [("ep", "auto"), ("tp+ep", "auto"), ("tp+ep", "all_to_all")],
    ids=["fsdp+ep", "tp+ep", "tp+ep-all_to_all"],
)
def test_expert_parallel_matches_one_process_with_idle_experts(checkpoints, tmp_path, mode, implementation):
    """Experts split 2 + 2 over the ranks (`ep_size=2`, with FSDP2 or with tensor-parallel attention); in layer 0
    every token goes to experts 2 and 3, so rank 0's experts get no token there, in the forward and the backward
    (all-to-all dispatch under autograd; "auto" uses the all-reduce dispatch for the inference forward of tp+ep). No
    hang (timeout), and logits, loss and gradients equal one process."""
    out = tmp_path / "ep"
    _ok(_run([FORWARD, checkpoints["idle"], "--mode", mode, "--ep-implementation", implementation, "--output", out]))
    _assert_matches(load_file(out / "result.safetensors"), checkpoints["reference"]["idle"])
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        for layer in report["experts"].values():  # whole experts, 2 per rank
            assert layer["local_experts"] == 2 and layer["expert_parallel"]
            assert layer["local_shapes"] == {"gate_up_proj": [2, 96, 32], "down_proj": [2, 32, 48]}
        for counts in report["expert_token_counts"]["decoder.0"]:  # every forward: experts 0 and 1 idle
            assert counts[:2] == [0, 0] and counts[2] == counts[3] > 0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tp", "tp+ep"])
def test_fine_grained_experts_shard_and_match_one_process(tmp_path, mode):
    """`expert_granularity=2` (8 experts of half the FFN width, top-4): the same plans split the narrower experts by
    their intermediate dim (tp) or by whole experts (ep); logits, loss and gradients equal one process."""
    model = SpriForCausalLM.from_dense(
        tiny_dense("llama"), num_experts=8, num_experts_per_tok=4, expert_granularity=2, diversity=0.3
    )
    perturb_experts(model.set_stage(2))
    model.save_pretrained(tmp_path / "fine")
    _ok(_run([FORWARD, tmp_path / "fine", "--mode", "single", "--output", tmp_path / "single"], processes=1))
    _ok(_run([FORWARD, tmp_path / "fine", "--mode", mode, "--output", tmp_path / mode]))
    _assert_matches(load_file(tmp_path / mode / "result.safetensors"), load_file(tmp_path / "single" / "result.safetensors"))
    # 24 neurons per expert (48 / 2): tp halves them, ep keeps 4 whole experts per rank
    expected = {"gate_up_proj": [8, 24, 32], "down_proj": [8, 32, 12]} if mode == "tp" else {
        "gate_up_proj": [4, 48, 32], "down_proj": [4, 32, 24]}  # fmt: skip
    for layer in json.loads((tmp_path / mode / "rank0.json").read_text())["experts"].values():
        assert layer["local_shapes"] == expected


@pytest.mark.slow
def test_stage1_checkpoint_is_refused_with_the_fix(tmp_path):
    folder = tmp_path / "stage1"
    SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4).save_pretrained(folder)
    result = _run([FORWARD, folder, "--mode", "tp", "--output", tmp_path / "out"])
    assert result.returncode != 0
    assert "this SPRI model is in stage 1" in result.stderr and "model.set_stage(2)" in result.stderr


@pytest.mark.slow
def test_fsdp_trains_both_stages_and_equals_one_process(tmp_path):
    """FSDP2 (accelerate, one unit per decoder layer), 2 ranks, one SpriTrainer.train(): stage 1, the switch (the
    model re-built in stage 2 and sharded afresh), stage 2. Both ranks hold half of every stage's parameters; with
    top-1 routing over 8 experts and 8 tokens per rank and step, experts sit idle on a rank in most steps, without
    hanging; the weights equal one process with the same global batch; the saved final checkpoint reloads in one
    process with identical weights."""
    common = ["--steps", "4", "--num-experts", "8", "--top-k", "1", "--router-aux-loss-coef", "0",
              "--experts-implementation", "eager", "--lr-stage1", "3e-3", "--lr-stage2", "3e-4"]  # fmt: skip
    _ok(_run([TRAIN, "--output-dir", tmp_path / "fsdp", "--fsdp", "--save-final", *common]))
    _ok(_run([TRAIN, "--output-dir", tmp_path / "single", "--batch-size", "2", *common], processes=1))

    reports = [json.loads((tmp_path / "fsdp" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["fsdp"] and report["world_size"] == 2 and report["backend"] == "gloo"
        assert report["final_stage"] == 2 and report["switch_step"] == 4
        assert len(report["losses"]["1"]) == 4 and len(report["losses"]["2"]) == 4
        assert set(report["sharding"]) == {"1", "2"}
        for stage in report["sharding"].values():  # every parameter is a DTensor shard
            assert stage["local_numel"] < stage["numel"]
    for stage in ("1", "2"):  # the two shards make the whole model
        numel = reports[0]["sharding"][stage]["numel"]
        assert sum(report["sharding"][stage]["local_numel"] for report in reports) == numel
    assert reports[1]["state_dict_sha256"] is None  # gathered on rank 0 only
    assert reports[0]["losses"] == reports[1]["losses"]
    idle = [count for report in reports for steps in report["expert_token_counts"].values() for step in steps
            for layer in step for count in layer]  # fmt: skip
    assert idle.count(0) > 0

    single = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert reports[0]["losses"]["1"] == pytest.approx(single["losses"]["1"], abs=1e-5)
    gathered = load_file(tmp_path / "fsdp" / "rank0.safetensors")
    reference = load_file(tmp_path / "single" / "rank0.safetensors")
    assert gathered.keys() == reference.keys()
    worst = max((gathered[k] - reference[k]).abs().max().item() for k in reference)
    assert worst < FSDP_ATOL

    reloaded = SpriForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    assert reloaded.config.stage == 2
    state = reloaded.state_dict()
    assert state.keys() == gathered.keys() and all(torch.equal(state[k], gathered[k]) for k in gathered)
    # the switch checkpoint (written under FSDP) is a stage-2 checkpoint too
    switch = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "checkpoint-4")
    assert switch.config.stage == 2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize(
    "zero, spri_stage", [(2, 1), (2, 2), (3, 2)], ids=["zero2-stage1", "zero2-stage2", "zero3-stage2"]
)
def test_deepspeed_zero_equals_one_process(tmp_path, zero, spri_stage):
    """DeepSpeed's engine (CPU accelerator, gloo), ZeRO-3 with `SpriMoeBlock` as leaf module: 3 steps with top-1 over
    8 experts and one 8-token sequence per rank (experts idle on a rank) end with the weights of one process on the
    same global batch. (ZeRO-3 in stage 1 fails in DeepSpeed 0.19.8, see docs/DISTRIBUTED.md.)"""
    common = ["--spri-stage", str(spri_stage), "--optimizer", "sgd", "--lr", "0.1"]
    _ok(_run([ZERO, "--zero", "0", "--output", tmp_path / "single", *common], processes=1))
    _ok(_run([ZERO, "--zero", str(zero), "--output", tmp_path / "zero", *common], env={"DS_ACCELERATOR": "cpu"}))
    result = json.loads((tmp_path / "zero" / "result.json").read_text())
    reference = json.loads((tmp_path / "single" / "result.json").read_text())
    assert result["losses"] == pytest.approx(reference["losses"], abs=1e-5)
    assert any(count == 0 for rank in result["counts"] for layer in rank for count in layer)
    weights, expected = (load_file(tmp_path / name / "weights.safetensors") for name in ("zero", "single"))
    assert weights.keys() == expected.keys()
    assert max((weights[k] - expected[k]).abs().max().item() for k in expected) < ZERO_ATOL


def test_a_stage1_plan_names_only_what_exists_and_set_stage_adds_the_experts():
    """Stage 1 holds no fused expert tensors: its plans name none (transformers would warn that the rules were not
    applied); after `set_stage(2)` they do, and every entry still names a module or parameter."""
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4)
    assert model.config.stage == 1

    def names():
        return {replace_layer_number_by_wildcard(n) for n, _ in [*model.named_modules(), *model.named_parameters()]}

    assert set(model.tp_plan) <= names() and set(model.ep_plan) <= names()
    assert not any(".experts" in key for key in [*model.tp_plan, *model.ep_plan])
    model.set_stage(2)
    assert set(model.tp_plan) <= names() and set(model.ep_plan) <= names()
    assert model.tp_plan["model.model.layers.*.mlp.experts.gate_up_proj"] == "packed_colwise"
    assert model.ep_plan["model.model.layers.*.mlp.experts"] == "ep_dispatch_experts"
