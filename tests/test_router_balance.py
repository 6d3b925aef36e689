"""Auxiliary-loss-free balancing (`router_balance="bias"` / `"both"`): a per-expert bias on the routing scores for the
top-k choice only, moved after every optimizer step from the step's expert load (SpriTrainer adds the callback), the
same on every process, stored in checkpoints only when used, and refused by the native export when non-zero."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import progression_dataset, tiny, tiny_dense
from safetensors.torch import load_file
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

import spri_hf
from spri_hf import SpriForCausalLM, SpriForSeq2SeqLM, SpriTrainer, SpriTrainingArguments


REPO = Path(__file__).resolve().parents[1]
RATE = 0.05
HEAD_START = 0.5  # expert 0's initial bias: every token's top-1 choice at first


def _biased_model(**settings):
    settings = {**dict(num_experts=4, num_experts_per_tok=1, init="copy", norm_topk_prob=False, router_balance="bias",
                       router_bias_update_rate=RATE), **settings}  # fmt: skip
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), **settings)
    for block in model.moe_blocks().values():
        block.router.e_score_correction_bias[0] = HEAD_START
    return model


def _route(model, input_ids):
    """Per MoE layer: (probabilities, top-k weights, top-k index) of a forward in eval mode."""
    seen = {}
    handles = [
        block.router.register_forward_hook(lambda module, args, out, idx=idx: seen.__setitem__(idx, (args[0], out)))
        for idx, block in model.moe_blocks().items()
    ]
    try:
        with torch.no_grad():
            model.eval()(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    routes = {}
    for idx, (_, (logits, weights, index)) in seen.items():
        routes[idx] = (F.softmax(logits, dim=-1, dtype=torch.float), weights, index)
    return routes


def test_bias_spreads_a_collapsed_load_and_leaves_the_mixing_weights_alone(tmp_path):
    """Every token starts on expert 0 (its bias is 0.5 ahead); SpriTrainer at learning rate 0 changes nothing but the
    biases, which bring the busiest expert's share from 1.0 to below 0.5 within 12 steps (the gap closes at 2 x RATE
    per step: 5 steps, then the router's own preferences spread the tokens). The weights the chosen experts are mixed
    with stay their softmax probabilities, with or without the bias."""
    model = _biased_model()
    dataset = progression_dataset(n=64)
    probe = torch.tensor([row["input_ids"] for row in dataset.select(range(16))])
    before = _route(model, probe)
    assert all((index == 0).all() for _, _, index in before.values())
    router_weights = {idx: block.router.weight.detach().clone() for idx, block in model.moe_blocks().items()}

    args = SpriTrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=16, learning_rate=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, warmup_steps=0,
    )  # fmt: skip
    SpriTrainer(model=model, args=args, train_dataset=dataset).train()

    after = _route(model, probe)
    for idx, block in model.moe_blocks().items():
        assert torch.equal(block.router.weight, router_weights[idx])  # only the bias moved
        bias = block.router.e_score_correction_bias
        assert bias[0] < HEAD_START and (bias[1:] > 0).all()
        probs, weights, index = after[idx]
        share = torch.bincount(index.flatten(), minlength=4).max().item() / index.numel()
        assert share < 0.5, (idx, share, bias)
        # mixing weights: the chosen experts' probabilities, bias or not
        torch.testing.assert_close(weights.float(), probs.gather(-1, index), rtol=0, atol=0)


def _loads(model):
    return {f"{stack}.{idx}": block.router.expert_load for stack, idx, block in model.moe_sites()}


def test_padding_is_no_load():
    """Padding routes like any token but is not counted: a causal LM counts the tokens of `attention_mask`, the decoder
    of a seq2seq model the positions of `decoder_attention_mask`, else those whose labels are not -100 (its encoder
    the positions of `attention_mask`); without a mask every token counts."""
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # 4 padding positions: 14 real tokens
    model = _biased_model(num_experts_per_tok=2).train()
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert {name: load.sum().item() for name, load in _loads(model).items()} == {"decoder.0": 28, "decoder.1": 28}
    assert all(block.router.load_mask is None for block in model.moe_blocks().values())  # set for the forward only
    model.update_router_biases()
    model(ids, labels=ids)
    assert all(load.sum().item() == 36 for load in _loads(model).values())

    seq2seq = SpriForSeq2SeqLM.from_dense(tiny("bart"), num_experts=4, num_experts_per_tok=1, init="copy",
                                          upcycle="both", router_balance="bias").train()  # fmt: skip
    source = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    source_mask = torch.ones_like(source)
    source_mask[0, 4:] = 0  # 11 real source tokens
    labels = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    labels[0, 3:] = -100  # 9 real target positions
    seq2seq(input_ids=source, attention_mask=source_mask, labels=labels)
    counts = {name: load.sum().item() for name, load in _loads(seq2seq).items()}
    assert counts == {"encoder.0": 11, "encoder.1": 11, "decoder.0": 9, "decoder.1": 9}
    seq2seq.update_router_biases()
    decoder_mask = torch.ones_like(labels)
    decoder_mask[1, 4:] = 0  # given, it wins over the labels: 10 real target positions
    seq2seq(input_ids=source, attention_mask=source_mask, labels=labels, decoder_attention_mask=decoder_mask)
    assert {name: load.sum().item() for name, load in _loads(seq2seq).items() if name.startswith("decoder")} == {
        "decoder.0": 10, "decoder.1": 10}


def test_the_loss_has_no_aux_term_with_bias_and_keeps_it_with_both():
    dense = tiny_dense("llama")
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = {}
    for balance in ("aux_loss", "bias", "both"):
        model = SpriForCausalLM.from_dense(dense, num_experts=4, init="copy", router_balance=balance)
        assert model.config.router_aux_loss_coef == (0.0 if balance == "bias" else 0.01)
        output = model(ids, labels=ids)
        losses[balance] = (output.loss.item(), output.aux_loss.item())
    plain = AutoModelForCausalLM.from_config(dense.config)
    plain.load_state_dict(dense.state_dict())
    lm_loss = plain(ids, labels=ids).loss.item()
    assert losses["bias"][0] == pytest.approx(lm_loss, abs=1e-6)  # the LM loss alone
    for balance in ("aux_loss", "both"):
        assert losses[balance][0] == pytest.approx(lm_loss + 0.01 * losses[balance][1], abs=1e-6)


def test_the_bias_is_stored_only_when_used_and_reloads(tmp_path):
    plain = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="copy")
    plain.save_pretrained(tmp_path / "plain")
    assert not any("e_score_correction_bias" in name for name in load_file(tmp_path / "plain" / "model.safetensors"))
    model = _biased_model()
    model.save_pretrained(tmp_path / "biased")
    stored = load_file(tmp_path / "biased" / "model.safetensors")
    biases = {name: value for name, value in stored.items() if name.endswith("router.e_score_correction_bias")}
    assert len(biases) == 2 and all(value.dtype == torch.float32 and value[0] == HEAD_START for value in biases.values())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "biased")
    for block in reloaded.moe_blocks().values():
        assert block.router.e_score_correction_bias[0] == HEAD_START
    # the streaming upcycler writes the (zero) bias too
    tiny_dense("llama").save_pretrained(tmp_path / "dense")
    spri_hf.upcycle_checkpoint(tmp_path / "dense", tmp_path / "streamed", num_experts=4, router_balance="both")
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    assert sum(name.endswith("e_score_correction_bias") for name in streamed) == 2


def test_native_export_refuses_a_nonzero_bias_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"non-zero e_score_correction_bias .*mixtral routes by the softmax alone"):
        spri_hf.export_native(_biased_model(norm_topk_prob=True), tmp_path / "native")
    assert not (tmp_path / "native").exists()
    zero = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="copy", router_balance="both")
    spri_hf.export_native(zero, tmp_path / "native")  # an unused bias changes nothing: exported exactly


_DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import tiny_dense
from spri_hf import SpriForCausalLM

dist.init_process_group("gloo")
rank = dist.get_rank()
model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, num_experts_per_tok=1, init="copy",
                                   router_balance="bias", router_bias_update_rate=0.01).train()
data = torch.randint(3, 97, (4, 2, 9), generator=torch.Generator().manual_seed(0))
for step in range(3):  # each rank its own half of every step's batch
    model(data[step][rank : rank + 1]).logits.sum().backward()
    model.update_router_biases()
biases = [block.router.e_score_correction_bias.tolist() for block in model.moe_blocks().values()]
with open(sys.argv[1] + f"/rank{{rank}}.json", "w") as f:
    json.dump(biases, f)
"""


@pytest.mark.slow
def test_ddp_ranks_keep_identical_biases_equal_to_one_process_on_the_whole_batch(tmp_path):
    script = tmp_path / "ddp_bias.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    # one process on both halves of each step: the same biases (the loads were summed over the ranks)
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, num_experts_per_tok=1, init="copy",
                                       router_balance="bias", router_bias_update_rate=0.01).train()  # fmt: skip
    data = torch.randint(3, 97, (4, 2, 9), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        for rank in (0, 1):
            model(data[step][rank : rank + 1]).logits.sum().backward()
        model.update_router_biases()
    expected = [block.router.e_score_correction_bias.tolist() for block in model.moe_blocks().values()]
    assert ranks[0] == expected
    assert any(value != 0 for layer in expected for value in layer)


def test_bias_balancing_turned_on_when_loading_a_checkpoint_without_a_bias_starts_at_zero(tmp_path):
    SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="copy").save_pretrained(tmp_path / "plain")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", router_balance="bias")
    assert model.config.router_aux_loss_coef == 0.0
    for block in model.moe_blocks().values():
        assert torch.equal(block.router.e_score_correction_bias, torch.zeros(4))


def test_bias_balancing_switched_on_after_the_model_was_made_is_refused_with_the_fix(tmp_path):
    model = SpriForCausalLM.from_dense(tiny_dense("llama"), num_experts=4, init="copy")
    model.config.router_balance = "bias"
    assert model.config.router_aux_loss_coef == 0.0
    args = SpriTrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = SpriTrainer(model=model, args=args, train_dataset=progression_dataset(n=8))
    with pytest.raises(ValueError, match=r"built without a routing bias.*from_pretrained\(\.\.\., router_balance='bias'\)"):
        trainer.train()
